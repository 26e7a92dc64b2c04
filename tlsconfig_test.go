package certmgr

import (
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"

	"golang.org/x/crypto/acme"
	"golang.org/x/crypto/acme/autocert"
	"golang.org/x/net/idna"
)

// TestTLSConfigObtainsOverTLSALPN: a server using TLSConfig through
// http.Server.ServeTLS obtains a certificate over TLS-ALPN-01 on the first
// handshake, with exactly one order and one authorization; the second
// handshake makes no ACME request.
func TestTLSConfigObtainsOverTLSALPN(t *testing.T) {
	t.Parallel()
	const name = "alpn.test"
	e := newEnv(t, envOptions{cache: memoryCache, names: []string{name}, ownTLS: true})
	m := e.start(t, nil)
	e.serveTLS(t, m.TLSConfig())

	leaf, err := e.dial(t, name, nil)
	if err != nil {
		t.Fatalf("first handshake: %v", err)
	}
	if leaf.Subject.CommonName != name && !slices.Contains(leaf.DNSNames, name) {
		t.Errorf("leaf names %v, want %s", leaf.DNSNames, name)
	}
	c := e.Proxy.Counts(name)
	if c.Orders != 1 || c.Authzs != 1 || c.ChallengeResponses != 1 || c.FailedAuthzs != 0 {
		t.Errorf("proxy counted %+v, want 1 order, 1 authorization, 1 challenge response", c)
	}
	st := m.Status(name)
	if st.State != StateValid || !st.NotAfter.Equal(leaf.NotAfter) || st.Failures != 0 {
		t.Errorf("Status = %+v, want valid until %v", st, leaf.NotAfter)
	}
	if _, err := e.dial(t, name, nil); err != nil {
		t.Fatalf("second handshake: %v", err)
	}
	if c2 := e.Proxy.Counts(name); c2 != c {
		t.Errorf("second handshake made ACME requests: %+v after %+v", c2, c)
	}
}

// TestHandMadeConfigWithoutALPNProtoFails: a hand-made tls.Config without
// acme.ALPNProto makes TLS-ALPN-01 fail at the handshake, and autocert then
// spends a second order (and authorization) on http-01: the incident
// certmgr's TLSConfig prevents.
func TestHandMadeConfigWithoutALPNProtoFails(t *testing.T) {
	t.Parallel()
	const name = "noalpn.test"
	e := newEnv(t, envOptions{cache: memoryCache, names: []string{name}, ownTLS: true})
	m := e.start(t, func(c *Config) { c.HandshakeTimeout = 30 * time.Second })
	m.HTTPHandler(nil) // in use, as in the incident; nothing answers port 80
	e.HTTPListener.Close()
	handMade := &tls.Config{GetCertificate: m.GetCertificate, NextProtos: []string{"h2", "http/1.1"}}
	e.serveTLS(t, handMade)

	if leaf := e.handshake(t, name, insecure); !isFallbackLeaf(leaf) {
		t.Errorf("got %v, want the fallback certificate", leaf.Subject)
	}
	c := e.Proxy.Counts(name)
	// autocert's order loop: tls-alpn-01 fails, a new order for http-01
	// fails; the third order autocert asks for, with no challenge type
	// left to try, is refused before it reaches the CA.
	if c.Orders != 2 || c.FailedAuthzs != 2 {
		t.Errorf("proxy counted %+v, want 2 orders and 2 failed authorizations", c)
	}
	found := false
	for _, p := range e.Proxy.Problems() {
		if strings.Contains(p.Detail, "tls-alpn-01") {
			found = true
		}
	}
	if !found {
		t.Errorf("no TLS-ALPN-01 failure among the CA's problems: %+v", e.Proxy.Problems())
	}
	st := m.Status(name)
	if st.State != StateBackoff || st.Failures != 1 || st.LastError == nil {
		t.Errorf("Status = %+v, want backoff after 1 failure", st)
	}
}

// TestTLSConfigSurvivesNextProtosEdit: a validation still works after the
// config's NextProtos lost acme-tls/1.
func TestTLSConfigSurvivesNextProtosEdit(t *testing.T) {
	t.Parallel()
	const name = "edited.test"
	e := newEnv(t, envOptions{cache: memoryCache, names: []string{name}, ownTLS: true})
	conf := e.start(t, nil).TLSConfig()
	conf.NextProtos = []string{"http/1.1"}
	e.serveTLS(t, conf)
	e.handshake(t, name, nil)
	if c := e.Proxy.Counts(name); c.Orders != 1 || c.FailedAuthzs != 0 {
		t.Errorf("proxy counted %+v, want 1 order and no failure", c)
	}
}

// TestTLSConfigReturnsDistinctConfigs: every TLSConfig is a new config,
// TLS 1.2 and later, offering h2, http/1.1 and acme-tls/1; changing one
// changes no other.
func TestTLSConfigReturnsDistinctConfigs(t *testing.T) {
	m := newPureManager(t, newFakeClock(), nil)
	a, b := m.TLSConfig(), m.TLSConfig()
	if a == b || &a.NextProtos[0] == &b.NextProtos[0] {
		t.Fatal("TLSConfig returned shared state")
	}
	for _, c := range []*tls.Config{a, b} {
		if c.MinVersion != tls.VersionTLS12 || c.GetCertificate == nil || c.GetConfigForClient == nil ||
			!slices.Contains(c.NextProtos, "h2") || !slices.Contains(c.NextProtos, "http/1.1") || !slices.Contains(c.NextProtos, acme.ALPNProto) {
			t.Errorf("TLSConfig() = %+v", c)
		}
	}
	a.NextProtos[0] = "changed"
	if m.TLSConfig().NextProtos[0] != "h2" {
		t.Error("changing one config changed the next")
	}
}

// TestValidationConfigAnswersOnlyValidations: GetConfigForClient hands a
// validation hello the config that negotiates acme-tls/1, and leaves every
// other hello to the config itself.
func TestValidationConfigAnswersOnlyValidations(t *testing.T) {
	m := newPureManager(t, newFakeClock(), nil)
	for _, tt := range []struct {
		protos []string
		want   bool
	}{
		{[]string{acme.ALPNProto}, true},
		{nil, false},
		{[]string{"h2", "http/1.1"}, false},
		{[]string{"h2", acme.ALPNProto}, false}, // RFC 8737: acme-tls/1 alone
	} {
		hello := &tls.ClientHelloInfo{ServerName: "a.test", SupportedProtos: tt.protos}
		if got := wantsTokenCert(hello); got != tt.want {
			t.Errorf("wantsTokenCert(%v) = %v, want %v", tt.protos, got, tt.want)
		}
		c, err := m.validationConfig(hello)
		if err != nil || (c != nil) != tt.want || tt.want && (c != m.acmeTLS || !slices.Equal(c.NextProtos, []string{acme.ALPNProto})) {
			t.Errorf("validationConfig(%v) = %+v, %v", tt.protos, c, err)
		}
	}
}

// TestValidationHelloGetsTokenCertInBackoff: a TLS-ALPN-01 validation
// hello for a domain in backoff still gets autocert's token certificate.
func TestValidationHelloGetsTokenCertInBackoff(t *testing.T) {
	const name = "token.test"
	e := newEnv(t, envOptions{cache: memoryCache, names: []string{name}, ownTLS: true})
	m := e.start(t, nil)
	e.DNS.SetA(name, "127.0.0.3")
	if err := m.Provision(context.Background(), name); err == nil {
		t.Fatal("Provision succeeded; validation should fail")
	}
	if st := m.Status(name); st.State != StateBackoff {
		t.Fatalf("Status = %+v, want backoff", st)
	}
	waitDetached(t) // autocert's cleanup deletes its token from the cache
	// What autocert stores while it answers a challenge.
	tok, err := (&acme.Client{Key: ecKey(t)}).TLSALPN01ChallengeCert("token-value", name)
	if err != nil {
		t.Fatal(err)
	}
	if err := m.cache.Put(context.Background(), name+"+token", pemCert(t, &tok)); err != nil {
		t.Fatal(err)
	}
	e.serveTLS(t, m.TLSConfig())
	leaf := e.handshake(t, name, &tls.Config{InsecureSkipVerify: true, NextProtos: []string{acme.ALPNProto}})
	if !bytes.Equal(leaf.Raw, tok.Certificate[0]) {
		t.Errorf("validation hello got %v, want the token certificate", leaf.Subject)
	}
}

// TestSupportsECDSA: which hellos get the ECDSA certificate. The first
// seven rows are autocert's own TestSupportsECDSA, where certmgr agrees:
// signature schemes and curves limit, not extend, the cipher suites.
// certmgr deliberately differs for a client offering TLS 1.3, whose
// cipher suites do not name the key type: it counts as ECDSA-capable
// (autocert would give it RSA), unless its signature schemes or curves
// rule ECDSA out.
func TestSupportsECDSA(t *testing.T) {
	rsaSuite, ecdsaSuite := tls.TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256, tls.TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256
	tls13 := []uint16{tls.VersionTLS13, tls.VersionTLS12}
	for i, tt := range []struct {
		suites   []uint16
		schemes  []tls.SignatureScheme
		curves   []tls.CurveID
		versions []uint16
		want     bool
	}{
		// autocert's cases.
		{[]uint16{rsaSuite}, nil, nil, nil, false},
		{[]uint16{rsaSuite, ecdsaSuite}, nil, nil, nil, true},
		{[]uint16{rsaSuite}, []tls.SignatureScheme{tls.PKCS1WithSHA256, tls.ECDSAWithP256AndSHA256}, nil, nil, false},
		{[]uint16{rsaSuite, ecdsaSuite}, []tls.SignatureScheme{tls.PKCS1WithSHA256}, nil, nil, false},
		{[]uint16{rsaSuite, ecdsaSuite}, []tls.SignatureScheme{tls.PKCS1WithSHA256, tls.ECDSAWithP256AndSHA256}, nil, nil, true},
		{[]uint16{rsaSuite, ecdsaSuite}, []tls.SignatureScheme{tls.PKCS1WithSHA256, tls.ECDSAWithP256AndSHA256}, []tls.CurveID{tls.CurveP521}, nil, false},
		{[]uint16{rsaSuite, ecdsaSuite}, []tls.SignatureScheme{tls.PKCS1WithSHA256, tls.ECDSAWithP256AndSHA256}, []tls.CurveID{tls.CurveP256, tls.CurveP521}, nil, true},
		// Where certmgr differs: TLS 1.3 counts, RSA-only suites or none.
		{[]uint16{tls.TLS_AES_128_GCM_SHA256, rsaSuite}, nil, nil, tls13, true},
		{nil, nil, nil, []uint16{tls.VersionTLS13}, true},
		{[]uint16{tls.TLS_AES_128_GCM_SHA256}, []tls.SignatureScheme{tls.ECDSAWithP256AndSHA256, tls.PSSWithSHA256}, []tls.CurveID{tls.X25519, tls.CurveP256}, tls13, true},
		// ... but not against its signature schemes or curves.
		{[]uint16{tls.TLS_AES_128_GCM_SHA256}, []tls.SignatureScheme{tls.PSSWithSHA256, tls.PKCS1WithSHA256}, nil, tls13, false},
		{[]uint16{tls.TLS_AES_128_GCM_SHA256}, nil, []tls.CurveID{tls.X25519}, tls13, false},
		// TLS 1.2 alone is judged by its suites, as autocert does.
		{[]uint16{rsaSuite}, nil, nil, []uint16{tls.VersionTLS12}, false},
		{[]uint16{tls.TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305}, []tls.SignatureScheme{tls.ECDSAWithSHA1}, nil, []uint16{tls.VersionTLS12}, true},
	} {
		hello := &tls.ClientHelloInfo{CipherSuites: tt.suites, SignatureSchemes: tt.schemes, SupportedCurves: tt.curves, SupportedVersions: tt.versions}
		if got := supportsECDSA(hello); got != tt.want {
			t.Errorf("%d: supportsECDSA(suites %v, schemes %v, curves %v, versions %v) = %v, want %v",
				i, tt.suites, tt.schemes, tt.curves, tt.versions, got, tt.want)
		}
	}
}

// TestSyntheticHelloNamesKeyType: the hello certmgr hands autocert asks
// for the key type of the certificate sought, by certmgr's judgement and
// autocert's alike.
func TestSyntheticHelloNamesKeyType(t *testing.T) {
	for _, k := range []certKey{{domain: "a.test"}, {domain: "a.test", rsa: true}} {
		h := syntheticHello(k)
		if h.ServerName != k.domain || supportsECDSA(h) == k.rsa {
			t.Errorf("syntheticHello(%+v) = %+v: ECDSA %v", k, h, supportsECDSA(h))
		}
		// autocert's own judgement: its GetCertificate reads the cache
		// under the key type's key, where the test's Cache stops it.
		var key string
		am := &autocert.Manager{Prompt: autocert.AcceptTOS, Cache: cacheFunc(func(k string) { key = k })}
		if _, err := am.GetCertificate(h); !errors.Is(err, errFuzzStop) {
			t.Fatalf("autocert's GetCertificate = %v, want it stopped at the Cache", err)
		}
		if key != k.cacheKey() {
			t.Errorf("autocert looked up %q for %+v, want %q", key, k, k.cacheKey())
		}
	}
}

// cacheFunc is an autocert.Cache that reports every certificate key read
// and fails the read with errFuzzStop; it holds nothing.
type cacheFunc func(key string)

func (f cacheFunc) Get(_ context.Context, key string) ([]byte, error) {
	if strings.HasSuffix(key, "+token") {
		return nil, autocert.ErrCacheMiss
	}
	f(key)
	return nil, errFuzzStop
}
func (cacheFunc) Put(context.Context, string, []byte) error { return errInjectedCache }
func (cacheFunc) Delete(context.Context, string) error      { return nil }

// errFuzzStop ends autocert's GetCertificate at its HostPolicy, before it
// does anything but derive the name.
var errFuzzStop = errors.New("fuzz: stop at host policy")

// fuzzAutocertKey returns the key under which autocert's GetCertificate
// knows the server name, and whether it accepts the name at all. It asks
// autocert itself: GetCertificate refuses an empty name and a name with
// no dot inside strings.Trim(name, "."), maps the name with
// idna.Lookup.ToASCII (refusing what IDNA refuses), hands the result to
// the HostPolicy and keys the certificate by
// strings.TrimSuffix(result, ".").
func fuzzAutocertKey(name string) (string, bool) {
	var host string
	m := &autocert.Manager{HostPolicy: func(_ context.Context, h string) error {
		host = h
		return errFuzzStop
	}}
	if _, err := m.GetCertificate(&tls.ClientHelloInfo{ServerName: name}); !errors.Is(err, errFuzzStop) {
		return "", false
	}
	return strings.TrimSuffix(host, "."), true
}

// fuzzEmptyLabel reports whether the dot-separated name has an empty label.
func fuzzEmptyLabel(name string) bool {
	return slices.Contains(strings.Split(name, "."), "")
}

// fuzzCertifiable reports whether an autocert key is a DNS name a
// certificate can carry: at most maxNameLen bytes, two labels or more,
// none empty or over maxLabelLen bytes, not an IP address, and in the
// A-label form IDNA itself accepts unchanged.
func fuzzCertifiable(key string) bool {
	again, err := idna.Lookup.ToASCII(key)
	_, ipErr := netip.ParseAddr(key)
	return len(key) <= maxNameLen && strings.Contains(key, ".") && !fuzzEmptyLabel(key) &&
		!slices.ContainsFunc(strings.Split(key, "."), func(l string) bool { return len(l) > maxLabelLen }) &&
		ipErr != nil && err == nil && again == key
}
