package certmgr

import (
	"context"
	"crypto/rand"
	"crypto/rsa"
	"crypto/tls"
	"errors"
	"fmt"
	mathrand "math/rand/v2"
	"net/http"
	"net/http/httptest"
	"runtime"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/miekg/dns"
	"golang.org/x/crypto/acme"
	"golang.org/x/crypto/acme/autocert"

	"github.com/certmgr/certmgr/certmgrtest"
	"github.com/certmgr/certmgr/internal/testsupport"
)

// TestServeKeepsTheLaterIssued: serve replaces a certificate only with one
// issued later, whatever their lifetimes; the domain's expiry is the
// served one's; an expired certificate is not served.
func TestServeKeepsTheLaterIssued(t *testing.T) {
	clock := newFakeClock()
	m := newPureManager(t, clock, nil)
	now := clock.Now()
	key := ecKey(t)
	older := selfSigned(t, "a.test", key, "older", now.Add(-2*time.Hour), now.Add(90*24*time.Hour))
	newer := selfSigned(t, "a.test", key, "newer", now.Add(-time.Hour), now.Add(2*time.Hour))
	if _, err := m.domainFor("a.test"); err != nil {
		t.Fatal(err)
	}
	k := certKey{domain: "a.test"}
	m.serve(k, newer)
	m.serve(k, older)
	if c := m.servedCert(k); c != newer {
		t.Errorf("served %v, want the later issued", c.Leaf.Subject)
	}
	if st := m.Status("a.test"); !st.NotAfter.Equal(newer.Leaf.NotAfter) {
		t.Errorf("Status.NotAfter = %v, want the served certificate's (%v)", st.NotAfter, newer.Leaf.NotAfter)
	}
	if c := m.servedCert(certKey{domain: "a.test", rsa: true}); c != nil {
		t.Error("an ECDSA certificate served for the RSA key")
	}
	clock.Advance(3 * time.Hour)
	if c := m.servedCert(k); c != nil {
		t.Error("an expired certificate served")
	}
}

// TestAnswerNow: the hot path answers at once with a valid certificate,
// or with the fallback of a domain that waits once its Cache was read, and
// leaves everything else to the full path.
func TestAnswerNow(t *testing.T) {
	clock := newFakeClock()
	m := newPureManager(t, clock, nil)
	now := clock.Now()
	valid := selfSigned(t, "valid.test", ecKey(t), "test", now.Add(-time.Hour), now.Add(time.Hour))
	for name, set := range map[string]func(d *domain){
		"valid.test":   func(d *domain) {},
		"backoff.test": func(d *domain) { d.fail = failureRecord{Failures: 1, NextAttempt: now.Add(time.Minute)} },
		"unread.test":  func(d *domain) { d.fail = failureRecord{Failures: 1, NextAttempt: now.Add(time.Minute)} },
		"due.test":     func(d *domain) { d.fail = failureRecord{Failures: 1, NextAttempt: now} },
		"obtaining.test": func(d *domain) {
			d.fail = failureRecord{Failures: 1, NextAttempt: now.Add(time.Minute)}
			d.attempt = &attempt{}
		},
	} {
		d, err := m.domainFor(name)
		if err != nil {
			t.Fatal(err)
		}
		m.stateMu.Lock()
		set(d)
		if name != "unread.test" {
			d.loadedAt = [2]time.Time{now, now}
		}
		m.stateMu.Unlock()
	}
	m.serve(certKey{domain: "valid.test"}, valid)
	for name, want := range map[string]string{
		"valid.test": "valid", "backoff.test": "fallback",
		"unread.test": "", "due.test": "", "obtaining.test": "", "unknown.test": "", "VALID.test": "",
	} {
		c, _ := m.answerNow(certKey{domain: name})
		got := ""
		switch {
		case c == valid:
			got = "valid"
		case IsFallback(c):
			got = "fallback"
		case c != nil:
			got = "another certificate"
		}
		if got != want {
			t.Errorf("answerNow(%s) = %q, want %q", name, got, want)
		}
	}
	// The Cache is read again every cacheRetry while the domain waits.
	clock.Advance(30 * time.Second)
	if c, _ := m.answerNow(certKey{domain: "backoff.test"}); c != nil {
		t.Error("answerNow answered a domain whose Cache read is stale")
	}
}

// TestFallbackPrefersValidRSA: a handshake that cannot have an ECDSA
// certificate gets the domain's valid RSA one (every client takes it)
// rather than the fallback; the fallback is logged once per change of the
// domain's state.
func TestFallbackPrefersValidRSA(t *testing.T) {
	t.Parallel()
	clock := newFakeClock()
	var fallbacks int
	m := newPureManager(t, clock, func(c *Config) {
		c.OnEvent = func(e Event) {
			if e.Kind == EventFallback {
				fallbacks++
			}
		}
	})
	now := clock.Now()
	rsaKey, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	rsaCert := selfSigned(t, "a.test", rsaKey, "test", now.Add(-time.Hour), now.Add(time.Hour))
	if _, err := m.domainFor("a.test"); err != nil {
		t.Fatal(err)
	}
	if c, err := m.fallback(certKey{domain: "a.test"}); err != nil || !IsFallback(c) {
		t.Fatalf("fallback without an RSA certificate = %v, %v; want the fallback", c, err)
	}
	m.fallback(certKey{domain: "a.test", rsa: true})
	if fallbacks != 1 {
		t.Errorf("%d fallback events, want 1 per change of state", fallbacks)
	}
	m.serve(certKey{domain: "a.test", rsa: true}, rsaCert)
	if c, err := m.fallback(certKey{domain: "a.test"}); err != nil || c != rsaCert {
		t.Errorf("fallback with a valid RSA certificate = %v, %v; want it", c, err)
	}
}

// TestCacheRereadWhileWaiting: while a domain backs off, a certificate
// another process puts in the shared Cache is served within cacheRetry.
func TestCacheRereadWhileWaiting(t *testing.T) {
	t.Parallel()
	const name = "shared.test"
	e := newEnv(t, envOptions{names: []string{name}})
	m := e.start(t, func(c *Config) { c.hooks.cacheRetry = 50 * time.Millisecond })
	e.DNS.SetA(name, "127.0.0.3")
	if err := m.Provision(context.Background(), name); err == nil {
		t.Fatal("Provision succeeded; validation should fail")
	}
	// Another replica, whose validation works, obtains the certificate.
	e.DNS.SetA(name, "127.0.0.1")
	other := e.start(t, nil)
	other.Retry(name) // it shares the backoff too, through the Cache
	if err := other.Provision(context.Background(), name); err != nil {
		t.Fatal(err)
	}
	other.Close()
	e.cur.Store(m)
	if st := m.Status(name); st.State != StateBackoff {
		t.Fatalf("Status = %+v, want still backing off", st)
	}
	waitFor(t, 5*time.Second, "the shared certificate", func() bool {
		c, err := m.GetCertificate(helloFor(name))
		return err == nil && !IsFallback(c)
	})
	if st := m.Status(name); st.State != StateValid {
		t.Errorf("Status = %+v, want valid", st)
	}
}

// rsaOnly is a TLS 1.2 client that cannot verify ECDSA.
var rsaOnly = &tls.Config{MaxVersion: tls.VersionTLS12, CipherSuites: []uint16{tls.TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256}}

// TestRSAInsteadOfFallback: a domain with a valid RSA certificate whose
// ECDSA attempt fails serves the RSA certificate to modern clients, not
// the fallback.
func TestRSAInsteadOfFallback(t *testing.T) {
	t.Parallel()
	const name = "rsa.test"
	e := newEnv(t, envOptions{cache: memoryCache, names: []string{name}})
	e.start(t, func(c *Config) { c.HandshakeTimeout = 5 * time.Second })
	leaf := e.handshake(t, name, rsaOnly)
	if _, ok := leaf.PublicKey.(*rsa.PublicKey); !ok {
		t.Fatalf("an RSA-only client got a %T key", leaf.PublicKey)
	}
	e.DNS.SetA(name, "127.0.0.3")
	e.Proxy.ExpireAuthorizations(name)
	for range 2 { // the failed ECDSA attempt, then the backoff
		if got := e.handshake(t, name, &tls.Config{MinVersion: tls.VersionTLS13}); !got.Equal(leaf) {
			t.Errorf("a TLS 1.3 client got %v, want the valid RSA certificate", got.Subject)
		}
	}
}

// TestGetCertificateNormalisesServerName: every spelling of a name gets
// the one certificate of its normalised form, from one order.
func TestGetCertificateNormalisesServerName(t *testing.T) {
	t.Parallel()
	e := newEnv(t, envOptions{cache: memoryCache, names: []string{"example.com"}})
	m := e.start(t, nil)
	leaf := e.handshake(t, "example.com", nil)
	for _, sni := range []string{"Example.COM.", "EXAMPLE.com", "example.com."} {
		c, err := m.GetCertificate(helloFor(sni))
		if err != nil {
			t.Fatalf("GetCertificate(%q): %v", sni, err)
		}
		if !c.Leaf.Equal(leaf) {
			t.Errorf("GetCertificate(%q) returned another certificate", sni)
		}
	}
	if got := e.Proxy.Counts("example.com").Orders; got != 1 {
		t.Errorf("%d orders, want 1", got)
	}
	if _, err := m.GetCertificate(helloFor("other.com")); !errors.Is(err, ErrHostNotAllowed) {
		t.Errorf("refused name: err = %v, want ErrHostNotAllowed", err)
	}
}

// TestGetCertificateRefusedNamesLeaveNothing: names the HostPolicy refuses
// leave no domain, no fallback and no goroutine.
func TestGetCertificateRefusedNamesLeaveNothing(t *testing.T) {
	checkLeaks(t)
	m := newPureManager(t, newFakeClock(), func(c *Config) {
		c.Autocert.HostPolicy = autocert.HostWhitelist("only.test")
	})
	before := runtime.NumGoroutine()
	for i := 0; i < 10000; i++ {
		name := fmt.Sprintf("r%d-%x.test", i, mathrand.Uint64())
		if _, err := m.GetCertificate(&tls.ClientHelloInfo{ServerName: name}); !errors.Is(err, ErrHostNotAllowed) {
			t.Fatalf("GetCertificate(%s) = %v, want ErrHostNotAllowed", name, err)
		}
	}
	if n := len(m.Domains()); n != 0 {
		t.Errorf("%d domains kept", n)
	}
	if n := m.fallbacks.len(); n != 0 {
		t.Errorf("%d fallbacks kept", n)
	}
	if after := runtime.NumGoroutine(); after > before {
		t.Errorf("goroutines: %d before, %d after", before, after)
	}
}

// TestGetCertificateRefusesInvalidNames: a name no certificate can carry
// is refused before the HostPolicy is asked.
func TestGetCertificateRefusesInvalidNames(t *testing.T) {
	asked := 0
	m := newPureManager(t, newFakeClock(), func(c *Config) {
		c.Autocert.HostPolicy = func(context.Context, string) error { asked++; return nil }
	})
	for _, name := range []string{"", "localhost", "a..test", "127.0.0.1", strings.Repeat("a", 64) + ".test"} {
		if c, err := m.GetCertificate(&tls.ClientHelloInfo{ServerName: name}); err == nil || c != nil {
			t.Errorf("GetCertificate(%q) = %v, %v; want an error", name, c, err)
		}
	}
	if asked != 0 || len(m.Domains()) != 0 {
		t.Errorf("HostPolicy asked %d times, %d domains; want none", asked, len(m.Domains()))
	}
}

// TestHostPolicyErrorWrapsBoth: a refusal wraps ErrHostNotAllowed and the
// policy's own error.
func TestHostPolicyErrorWrapsBoth(t *testing.T) {
	errNotOurs := errors.New("not ours")
	m := newPureManager(t, newFakeClock(), func(c *Config) {
		c.Autocert.HostPolicy = func(context.Context, string) error { return errNotOurs }
	})
	err := m.hostPolicy(context.Background(), "a.test")
	if !errors.Is(err, ErrHostNotAllowed) || !errors.Is(err, errNotOurs) || !strings.Contains(err.Error(), "a.test") {
		t.Errorf("hostPolicy = %v, want both errors and the name", err)
	}
	if err := newPureManager(t, newFakeClock(), nil).hostPolicy(context.Background(), "a.test"); err != nil {
		t.Errorf("no HostPolicy: %v, want every name allowed", err)
	}

}

// TestRemoteNamesMakeNoCacheErrors: names and token paths a remote client
// chooses are checked before any Cache call, and what the Cache cannot
// store is reported at most once a minute.
func TestRemoteNamesMakeNoCacheErrors(t *testing.T) {
	var cacheErrors atomic.Int64
	m := newPureManager(t, nil, func(c *Config) {
		c.Autocert.Cache = autocert.DirCache(t.TempDir())
		c.OnEvent = func(e Event) {
			if e.Kind == EventCacheError {
				cacheErrors.Add(1)
			}
		}
	})
	label := strings.Repeat("a", 63)
	for i := range 20 {
		// 253 bytes in labels of at most 63: a valid name whose "+token"
		// key is too long for a file name.
		name := strings.Join([]string{label, label, label, fmt.Sprintf("%02d", i) + strings.Repeat("c", 59)}, ".")
		hello := &tls.ClientHelloInfo{ServerName: name, SupportedProtos: []string{acme.ALPNProto}}
		if _, err := m.GetCertificate(hello); err == nil {
			t.Fatal("a validation hello with no token got a certificate")
		}
		long := &tls.ClientHelloInfo{ServerName: strings.Repeat("b", 70) + ".test", SupportedProtos: []string{acme.ALPNProto}}
		if _, err := m.GetCertificate(long); err == nil {
			t.Fatal("a validation hello for a label of 70 bytes got a certificate")
		}
	}
	h := m.HTTPHandler(nil)
	for range 20 {
		r := httptest.NewRequest(http.MethodGet, "http://a.test/.well-known/acme-challenge/"+strings.Repeat("x", 250), nil)
		w := httptest.NewRecorder()
		h.ServeHTTP(w, r)
		if w.Code != http.StatusNotFound {
			t.Errorf("a token path of 250 bytes: %d, want 404", w.Code)
		}
	}
	if n := cacheErrors.Load(); n > 1 {
		t.Errorf("%d cache-error events from remote clients' names, want at most 1 a minute", n)
	}
}

// countingStore is a replica's store that counts every request but its
// watch's.
type countingStore struct {
	*certmgrtest.MemoryReplica
	n atomic.Int64
}

func (c *countingStore) Get(ctx context.Context, key string) ([]byte, error) {
	c.n.Add(1)
	return c.MemoryReplica.Get(ctx, key)
}

func (c *countingStore) Put(ctx context.Context, key string, data []byte) error {
	c.n.Add(1)
	return c.MemoryReplica.Put(ctx, key, data)
}

func (c *countingStore) Delete(ctx context.Context, key string) error {
	c.n.Add(1)
	return c.MemoryReplica.Delete(ctx, key)
}

func (c *countingStore) GetRevision(ctx context.Context, key string) ([]byte, int64, error) {
	c.n.Add(1)
	return c.MemoryReplica.GetRevision(ctx, key)
}

func (c *countingStore) PutIf(ctx context.Context, key string, value []byte, rev int64, fence string) (int64, bool, error) {
	c.n.Add(1)
	return c.MemoryReplica.PutIf(ctx, key, value, rev, fence)
}

func (c *countingStore) DeleteIf(ctx context.Context, key string, rev int64, fence string) (bool, error) {
	c.n.Add(1)
	return c.MemoryReplica.DeleteIf(ctx, key, rev, fence)
}

func (c *countingStore) Lock(ctx context.Context, name string) (string, <-chan struct{}, func(), error) {
	c.n.Add(1)
	return c.MemoryReplica.Lock(ctx, name)
}

// countingCache is an autocert.Cache that counts its calls.
type countingCache struct {
	autocert.Cache
	n atomic.Int64
}

func (c *countingCache) Get(ctx context.Context, key string) ([]byte, error) {
	c.n.Add(1)
	return c.Cache.Get(ctx, key)
}

func (c *countingCache) Put(ctx context.Context, key string, data []byte) error {
	c.n.Add(1)
	return c.Cache.Put(ctx, key, data)
}

func (c *countingCache) Delete(ctx context.Context, key string) error {
	c.n.Add(1)
	return c.Cache.Delete(ctx, key)
}

// TestServedHandshakeMakesNoStoreOrDNSRequest: once a certificate is
// served, handshakes for it make no Cache call and no DNS query, on one
// process (a DirCache) and on a replica (a Coordinator), both running
// the DNS pre-check.
func TestServedHandshakeMakesNoStoreOrDNSRequest(t *testing.T) {
	t.Parallel()
	const name = "served.test"
	ca := certmgrtest.Start(t, certmgrtest.Options{})
	ca.DNS.SetA(name, "127.0.0.1")
	var current atomic.Pointer[Manager]
	if err := ca.ServeTLS(&tls.Config{GetConfigForClient: func(*tls.ClientHelloInfo) (*tls.Config, error) {
		return current.Load().TLSConfig(), nil
	}}, nil); err != nil {
		t.Fatal(err)
	}
	single := &countingCache{Cache: autocert.DirCache(t.TempDir())}
	replica := &countingStore{MemoryReplica: certmgrtest.NewMemoryStore().Open()}
	for _, tc := range []struct {
		what  string
		cache autocert.Cache
		calls *atomic.Int64
	}{{"one process", single, &single.n}, {"a replica", replica, &replica.n}} {
		m, err := New(dnsConfig(ca, Config{Autocert: &autocert.Manager{Cache: tc.cache, Client: ca.NewClient(),
			HostPolicy: autocert.HostWhitelist(name)}, Logger: newTestLogger(&testsupport.Buffer{})}))
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { m.Close() })
		current.Store(m)
		if err := m.Provision(t.Context(), name); err != nil {
			t.Fatal(err)
		}
		if c, err := m.GetCertificate(testsupport.Hello(name)); err != nil || IsFallback(c) {
			t.Fatalf("%s: the first handshake: %v", tc.what, err)
		}
		calls := tc.calls.Load()
		ca.DNS.ResetQueries()
		for range 100 {
			if c, err := m.GetCertificate(testsupport.Hello(name)); err != nil || IsFallback(c) {
				t.Fatalf("%s: a handshake: %v", tc.what, err)
			}
		}
		if n := tc.calls.Load() - calls; n != 0 {
			t.Errorf("%s: 100 served handshakes made %d store requests, want none", tc.what, n)
		}
		if n := ca.DNS.Queries(name, dns.TypeA) + ca.DNS.Queries(name, dns.TypeAAAA) + ca.DNS.Queries(name, dns.TypeCAA); n != 0 {
			t.Errorf("%s: 100 served handshakes made %d DNS queries, want none", tc.what, n)
		}
		m.Close()
	}
}
