package certmgr

import (
	"context"
	"crypto/ecdsa"
	"crypto/rsa"
	"crypto/tls"
	"errors"
	"fmt"
	"net/netip"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/crypto/acme/autocert"

	"github.com/certmgr/certmgr/internal/pebbletest"
)

// TestOnEventMayReenter: OnEvent may call the Manager back, even from a
// cache error reported while the failure cache is being written.
func TestOnEventMayReenter(t *testing.T) {
	const name = "reenter.test"
	fc := &faultCache{inner: autocert.DirCache(t.TempDir())}
	var (
		m      atomic.Pointer[Manager]
		called atomic.Bool
	)
	e := startEnv(t, pebbletest.Options{}, Config{
		Autocert: &autocert.Manager{Cache: fc},
		OnEvent: func(ev Event) {
			if ev.Kind == EventCacheError && called.CompareAndSwap(false, true) {
				if mm := m.Load(); mm != nil {
					mm.Retry(name)
					mm.Domains()
				}
			}
		},
	}, name)
	m.Store(e.m)
	e.DNS.SetA(name, "127.0.0.3") // the attempt fails: its record is written
	e.ServeTLS(t, e.m.TLSConfig(), nil)
	fc.failPut.Store(true)
	done := make(chan error, 1)
	go func() { done <- e.m.Provision(context.Background(), name) }()
	select {
	case err := <-done:
		if err == nil {
			t.Fatal("Provision succeeded; validation should fail")
		}
	case <-time.After(20 * time.Second):
		t.Fatal("Provision did not return: OnEvent deadlocked")
	}
	if !called.Load() {
		t.Fatal("OnEvent saw no cache error; the test did not test anything")
	}
}

// TestDNSTimeoutIsNoCAFailure: a pre-check that runs out of time is "DNS
// not ready", not a failed attempt: nothing is spent, no backoff.
func TestDNSTimeoutIsNoCAFailure(t *testing.T) {
	const name = "slowdns.test"
	e := startDNSEnv(t, pebbletest.Options{}, Config{}, name)
	e.m.hooks.dnsCheckTimeout = 200 * time.Millisecond
	e.m.dns.timeout = 5 * time.Second // one query outlives the whole check
	e.DNS.SetSilent(name, true)
	err := e.m.Provision(context.Background(), name)
	if !errors.Is(err, ErrDNSNotReady) {
		t.Fatalf("Provision = %v, want ErrDNSNotReady", err)
	}
	if st := e.m.Status(name); st.State != StateWaitingDNS || st.Failures != 0 {
		t.Errorf("Status = %+v, want waiting-dns without failures", st)
	}
	if strings.Contains(e.logs.String(), "certificate attempt failed") {
		t.Error("the DNS timeout was logged as a failed attempt")
	}
}

// TestNewRefusesUnusableDNSConfig: a pre-check that can never pass is an
// error at New.
func TestNewRefusesUnusableDNSConfig(t *testing.T) {
	_, err := New(Config{Autocert: &autocert.Manager{}, DNS: DNSCheck{KnownIPs: []netip.Addr{{}}, Resolvers: []string{"127.0.0.1:53"}}})
	if err == nil || !strings.HasPrefix(err.Error(), "certmgr: ") {
		t.Fatalf("New = %v, want an error for the invalid known IP", err)
	}
	if _, err := New(Config{Autocert: &autocert.Manager{}, AuthzBudget: 1}); err == nil {
		t.Error("New accepted an AuthzBudget below one attempt's cost")
	}
}

// TestStaleFailuresMakeRoom: names whose failures are over make room for
// new ones; names still backing off do not.
func TestStaleFailuresMakeRoom(t *testing.T) {
	clock := newFakeClock()
	m, err := New(Config{Autocert: &autocert.Manager{}, Logger: newTestLogger(&syncBuffer{}),
		MaxDomains: 3, hooks: testHooks{now: clock.now, rand: func() float64 { return 0 }}})
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	for i := range 3 {
		d, err := m.domainFor(fmt.Sprintf("junk%d.test", i))
		if err != nil {
			t.Fatal(err)
		}
		a := &attempt{path: PathHandshake, start: clock.now(), done: make(chan struct{}), orders: 1}
		m.stateMu.Lock()
		d.attempt = a
		m.inFlight++
		m.stateMu.Unlock()
		m.finish(d, a, nil, errors.New("invalid authorization"))
	}
	if _, err := m.domainFor("legit.test"); err == nil {
		t.Fatal("a new name displaced a domain that backs off")
	}
	clock.advance(2 * time.Hour) // backoffs and the spent authorizations are over
	if _, err := m.domainFor("legit.test"); err != nil {
		t.Fatalf("stale failures kept the table full: %v", err)
	}
	if n := len(m.Domains()); n != 3 {
		t.Errorf("%d domains, want 3", n)
	}
}

// TestCacheRereadWhileWaiting: while a domain backs off, a certificate
// another process puts in the shared Cache is served within cacheRetry.
func TestCacheRereadWhileWaiting(t *testing.T) {
	const name = "shared.test"
	dir := t.TempDir()
	e := startEnv(t, pebbletest.Options{}, Config{Autocert: &autocert.Manager{Cache: autocert.DirCache(dir)},
		hooks: testHooks{cacheRetry: 50 * time.Millisecond}}, name)
	e.DNS.SetA(name, "127.0.0.3")
	current := e.serveCurrent(t)
	if err := e.m.Provision(context.Background(), name); err == nil {
		t.Fatal("Provision succeeded; validation should fail")
	}
	// Another replica, whose validation works, obtains the certificate.
	e.DNS.SetA(name, "127.0.0.1")
	other, err := New(Config{
		Autocert: &autocert.Manager{Cache: autocert.DirCache(dir), Client: e.NewClient(), HostPolicy: autocert.HostWhitelist(name)},
		Logger:   newTestLogger(e.logs),
	})
	if err != nil {
		t.Fatal(err)
	}
	current.Store(other)
	other.Retry(name) // it shares the backoff too, through the Cache
	if err := other.Provision(context.Background(), name); err != nil {
		t.Fatal(err)
	}
	other.Close()
	current.Store(e.m)
	if st := e.m.Status(name); st.State != StateBackoff {
		t.Fatalf("Status = %+v, want still backing off", st)
	}
	waitFor(t, 5*time.Second, "the shared certificate", func() bool {
		c, err := e.m.GetCertificate(helloFor(name))
		return err == nil && !IsFallback(c)
	})
	if st := e.m.Status(name); st.State != StateValid {
		t.Errorf("Status = %+v, want valid", st)
	}
}

// rsaOnly is a TLS 1.2 client that cannot verify ECDSA.
var rsaOnly = &tls.Config{MaxVersion: tls.VersionTLS12, CipherSuites: []uint16{tls.TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256}}

// TestRSAInsteadOfFallback: a domain with a valid RSA certificate whose
// ECDSA attempt fails serves the RSA certificate to modern clients, not
// the fallback.
func TestRSAInsteadOfFallback(t *testing.T) {
	const name = "rsa.test"
	e := startEnv(t, pebbletest.Options{}, Config{HandshakeTimeout: 5 * time.Second}, name)
	e.ServeTLS(t, e.m.TLSConfig(), nil)
	leaf, err := e.handshake(t, name, rsaOnly)
	if err != nil {
		t.Fatal(err)
	}
	if _, ok := leaf.PublicKey.(*rsa.PublicKey); !ok {
		t.Fatalf("an RSA-only client got a %T key", leaf.PublicKey)
	}
	e.DNS.SetA(name, "127.0.0.3")
	e.Proxy.ExpireAuthorizations(name)
	for range 2 { // the failed ECDSA attempt, then the backoff
		got, err := e.handshake(t, name, &tls.Config{MinVersion: tls.VersionTLS13})
		if err != nil {
			t.Fatal(err)
		}
		if !got.Equal(leaf) {
			t.Errorf("a TLS 1.3 client got %v, want the valid RSA certificate", got.Subject)
		}
	}
}

// TestProvisionAfterRSAAttempt: Provision that joins an attempt for the
// RSA certificate still ends with the ECDSA one.
func TestProvisionAfterRSAAttempt(t *testing.T) {
	const name = "both.test"
	e := startEnv(t, pebbletest.Options{}, Config{HandshakeTimeout: 100 * time.Millisecond}, name)
	e.ServeTLS(t, e.m.TLSConfig(), nil)
	e.Proxy.AddRule(pebbletest.Rule{Class: pebbletest.ClassNewOrder, Identifier: name, Hold: true, Times: 1})
	// An RSA-only client starts the RSA attempt (and cannot take the
	// ECDSA fallback it gets meanwhile).
	rsaHello := &tls.ClientHelloInfo{ServerName: name, CipherSuites: rsaOnly.CipherSuites,
		SignatureSchemes: []tls.SignatureScheme{tls.PKCS1WithSHA256}}
	if c, err := e.m.GetCertificate(rsaHello); err != nil || !IsFallback(c) {
		t.Fatalf("GetCertificate(RSA hello) = %v, %v; want the fallback while the order is held", c, err)
	}
	waitFor(t, 5*time.Second, "the held RSA order", func() bool { return e.Proxy.Requests(pebbletest.ClassNewOrder) == 1 })
	done := make(chan error, 1)
	go func() { done <- e.m.Provision(context.Background(), name) }()
	e.Proxy.Release()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	c := e.m.servedCert(certKey{domain: name})
	if c == nil {
		t.Fatal("no ECDSA certificate after Provision")
	}
	if _, ok := c.Leaf.PublicKey.(*ecdsa.PublicKey); !ok {
		t.Errorf("Provision's certificate has a %T key", c.Leaf.PublicKey)
	}
}
