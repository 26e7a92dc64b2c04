package certmgr

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"math/big"
	"sync"
	"time"
)

// This file holds the fallback store: the self-signed certificates a
// handshake gets when no real one can be had in time.

// fallbackLifetime is the validity of a fallback certificate. It is
// reissued when it ends; clients never trust it anyway.
const fallbackLifetime = 7 * 24 * time.Hour

// fallbackStore hands out self-signed certificates for handshakes that
// cannot have a real one yet (the domain backs off, waits for DNS, or its
// attempt outlived the handshake timeout). It holds at most max
// certificates, dropping the oldest first, so that no sequence of SNI
// names can grow it. The certificates live only here: never in the Cache.
type fallbackStore struct {
	key *ecdsa.PrivateKey // one key signs and serves every fallback
	max int
	now func() time.Time

	certsMu sync.RWMutex
	certs   map[string]*tls.Certificate // by normalised name
	order   []string                    // ring of the names in certs, oldest at next
	next    int
}

func newFallbackStore(max int, now func() time.Time) (*fallbackStore, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	return &fallbackStore{key: key, max: max, now: now, certs: make(map[string]*tls.Certificate)}, nil
}

// get returns the fallback certificate for name, creating it if needed.
func (s *fallbackStore) get(name string) (*tls.Certificate, error) {
	now := s.now()
	s.certsMu.RLock()
	c := s.certs[name]
	s.certsMu.RUnlock()
	if c != nil && now.Before(c.Leaf.NotAfter) {
		return c, nil
	}
	c, err := s.create(name, now)
	if err != nil {
		return nil, err
	}
	s.certsMu.Lock()
	defer s.certsMu.Unlock()
	if old := s.certs[name]; old != nil && now.Before(old.Leaf.NotAfter) {
		return old, nil // another handshake made one first
	}
	if _, ok := s.certs[name]; !ok {
		if len(s.order) < s.max {
			s.order = append(s.order, name)
		} else {
			delete(s.certs, s.order[s.next])
			s.order[s.next] = name
			s.next = (s.next + 1) % s.max
		}
	}
	s.certs[name] = c
	return c, nil
}

// len returns how many certificates the store holds.
func (s *fallbackStore) len() int {
	s.certsMu.RLock()
	defer s.certsMu.RUnlock()
	return len(s.certs)
}

func (s *fallbackStore) create(name string, now time.Time) (*tls.Certificate, error) {
	serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	if err != nil {
		return nil, err
	}
	tmpl := &x509.Certificate{
		SerialNumber:          serial,
		Subject:               pkix.Name{CommonName: name, Organization: []string{"certmgr fallback"}},
		DNSNames:              []string{name},
		NotBefore:             now.Add(-time.Hour),
		NotAfter:              now.Add(fallbackLifetime),
		KeyUsage:              x509.KeyUsageDigitalSignature,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		BasicConstraintsValid: true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &s.key.PublicKey, s.key)
	if err != nil {
		return nil, err
	}
	leaf, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, err
	}
	return &tls.Certificate{Certificate: [][]byte{der}, PrivateKey: s.key, Leaf: leaf}, nil
}

// IsFallback reports whether cert is one of certmgr's self-signed
// fallback certificates.
func IsFallback(cert *tls.Certificate) bool {
	return cert != nil && cert.Leaf != nil && len(cert.Leaf.Subject.Organization) == 1 &&
		cert.Leaf.Subject.Organization[0] == "certmgr fallback" && cert.Leaf.Issuer.String() == cert.Leaf.Subject.String()
}

// fallback returns the certificate for a handshake that cannot have k's:
// the valid RSA one if k is ECDSA and there is one (every client takes
// it, and it beats a fallback), else the self-signed fallback, logged
// once per change of the domain's state.
func (m *Manager) fallback(k certKey) (*tls.Certificate, error) {
	c, _, err := m.fallbackOrRSA(k)
	return c, err
}

// fallbackOrRSA is fallback, and reports whether the certificate is the
// self-signed fallback.
func (m *Manager) fallbackOrRSA(k certKey) (c *tls.Certificate, fallback bool, err error) {
	if !k.rsa {
		if c := m.servedCert(certKey{domain: k.domain, rsa: true}); c != nil {
			return c, false, nil
		}
	}
	name := k.domain
	m.stateMu.Lock()
	d := m.domains[name]
	first := d != nil && !d.logged
	if first {
		d.logged = true
	}
	m.stateMu.Unlock()
	if first {
		m.emit(Event{Kind: EventFallback, Time: m.now(), Domain: name})
	}
	c, err = m.fallbacks.get(name)
	return c, err == nil, err
}
