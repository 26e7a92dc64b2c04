package certmgr

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"

	"golang.org/x/crypto/acme"
	"golang.org/x/crypto/acme/autocert"
)

// TLSConfig returns a new tls.Config, on every call, that serves
// certificates through m.GetCertificate, accepts TLS 1.2 and later, and
// offers "h2", "http/1.1" and acme.ALPNProto ("acme-tls/1") so that
// TLS-ALPN-01 validation works. The caller owns the returned config and may
// change it.
//
// A TLS-ALPN-01 validation keeps working even if NextProtos is later
// edited (as http.Server.ServeTLS does) or acme.ALPNProto removed from it:
// the config's GetConfigForClient answers validation hellos itself.
func (m *Manager) TLSConfig() *tls.Config {
	return &tls.Config{
		GetCertificate:     m.GetCertificate,
		GetConfigForClient: m.validationConfig,
		MinVersion:         tls.VersionTLS12,
		NextProtos:         []string{"h2", "http/1.1", acme.ALPNProto},
	}
}

// validationConfig returns, for a TLS-ALPN-01 validation hello, a config
// that negotiates acme.ALPNProto; for any other hello, nil (the config
// itself is used).
func (m *Manager) validationConfig(hello *tls.ClientHelloInfo) (*tls.Config, error) {
	if !wantsTokenCert(hello) {
		return nil, nil
	}
	return m.acmeTLS, nil
}

// tokenCert answers a TLS-ALPN-01 validation hello.
// A name that is not one a certificate can carry, or that the HostPolicy
// refuses, is refused before any Cache call: a remote client can send
// any name, and a Cache error for it would be logged.
func (m *Manager) tokenCert(hello *tls.ClientHelloInfo) (*tls.Certificate, error) {
	name, err := normalize(hello.ServerName)
	if err != nil {
		return nil, err
	}
	ctx, cancel := m.handshakeContext(hello)
	defer cancel()
	if err := m.hostPolicy(ctx, name); err != nil {
		return nil, err
	}
	if c, err := m.storedTokenCert(ctx, name); c != nil || err != nil {
		return c, err
	}
	c, err := m.challengeAutocert(name).GetCertificate(hello)
	if err != nil {
		return nil, fmt.Errorf("certmgr: TLS-ALPN-01 validation of %q: %w", hello.ServerName, err)
	}
	return c, nil
}

// storedTokenCert returns the TLS-ALPN-01 certificate for name that the
// store holds, with a Coordinator, unless this replica holds name's lock
// (its autocert made the order in flight, and answers): that of the order
// in flight, whichever replica made it. A replica's autocert may hold
// another in memory, of an order it gave up when it lost its lock, which
// would fail the CA's validation connections that reach it; so a replica
// that cannot read the store (cut off from it, say) answers none (and
// reports nothing: a remote client chose the name). Otherwise, or if the
// store holds none, it returns nil and no error, and autocert answers.
func (m *Manager) storedTokenCert(ctx context.Context, name string) (*tls.Certificate, error) {
	if m.coord == nil || m.holdsLock(name) {
		return nil, nil
	}
	data, err := m.cache.get(ctx, name+"+token")
	switch {
	case errors.Is(err, autocert.ErrCacheMiss):
		return nil, nil
	case err != nil:
		return nil, fmt.Errorf("certmgr: TLS-ALPN-01 validation of %q: the store cannot be read", name)
	}
	c, err := decodeCert(data)
	if err != nil || c.Leaf.VerifyHostname(name) != nil {
		return nil, nil
	}
	return c, nil
}

// wantsTokenCert reports whether hello is a CA's TLS-ALPN-01 validation:
// acme.ALPNProto is the only protocol it offers (RFC 8737, section 3).
func wantsTokenCert(hello *tls.ClientHelloInfo) bool {
	return len(hello.SupportedProtos) == 1 && hello.SupportedProtos[0] == acme.ALPNProto
}

// supportsECDSA reports whether the client of hello can verify an ECDSA
// P-256 certificate. Unlike autocert's check, a client offering TLS 1.3
// counts (TLS 1.3 cipher suites do not name the key type), so that modern
// clients get the ECDSA certificate that Provision obtains.
func supportsECDSA(hello *tls.ClientHelloInfo) bool {
	if hello.SignatureSchemes != nil && !containsAny(hello.SignatureSchemes,
		tls.ECDSAWithP256AndSHA256, tls.ECDSAWithP384AndSHA384, tls.ECDSAWithP521AndSHA512, tls.ECDSAWithSHA1) {
		return false
	}
	if hello.SupportedCurves != nil && !containsAny(hello.SupportedCurves, tls.CurveP256) {
		return false
	}
	if containsAny(hello.SupportedVersions, tls.VersionTLS13) {
		return true
	}
	return containsAny(hello.CipherSuites,
		tls.TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256, tls.TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
		tls.TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305, tls.TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA256,
		tls.TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA, tls.TLS_ECDHE_ECDSA_WITH_AES_256_CBC_SHA,
		tls.TLS_ECDHE_ECDSA_WITH_RC4_128_SHA)
}

func containsAny[T comparable](have []T, want ...T) bool {
	for _, h := range have {
		for _, w := range want {
			if h == w {
				return true
			}
		}
	}
	return false
}

// syntheticHello returns the hello certmgr hands to autocert for the
// certificate k: autocert then picks the key type k names.
func syntheticHello(k certKey) *tls.ClientHelloInfo {
	if k.rsa {
		return &tls.ClientHelloInfo{
			ServerName:       k.domain,
			SignatureSchemes: []tls.SignatureScheme{tls.PSSWithSHA256, tls.PKCS1WithSHA256},
			CipherSuites:     []uint16{tls.TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256},
		}
	}
	return &tls.ClientHelloInfo{
		ServerName:       k.domain,
		SignatureSchemes: []tls.SignatureScheme{tls.ECDSAWithP256AndSHA256},
		SupportedCurves:  []tls.CurveID{tls.CurveP256},
		CipherSuites:     []uint16{tls.TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256},
	}
}
