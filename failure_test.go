package certmgr

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	crand "crypto/rand"
	"crypto/tls"
	"errors"
	"fmt"
	"math/rand/v2"
	"net/http"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/crypto/acme"
	"golang.org/x/crypto/acme/autocert"

	"github.com/certmgr/certmgr/internal/pebbletest"
)

// Acceptance 1 (failure path): with validation failing, 500 handshakes
// spread over 5 s start exactly one attempt; each gets the fallback within
// HandshakeTimeout + 100 ms; Status shows the backoff.
func TestFailingValidationOneAttempt(t *testing.T) {
	const name = "refused.test"
	e := startEnv(t, pebbletest.Options{}, Config{}, name)
	e.DNS.SetA(name, "127.0.0.3") // the VA connects there; nothing answers
	e.ServeTLS(t, e.m.TLSConfig(), nil)
	bound := DefaultHandshakeTimeout + 100*time.Millisecond

	var (
		wg      sync.WaitGroup
		mu      sync.Mutex
		slowest time.Duration
		errs    []error
	)
	tick := time.NewTicker(10 * time.Millisecond) // 500 handshakes over 5 s
	defer tick.Stop()
	for i := 0; i < 500; i++ {
		<-tick.C
		wg.Add(1)
		go func() {
			defer wg.Done()
			start := time.Now()
			leaf, err := e.handshake(t, name, insecure)
			took := time.Since(start)
			mu.Lock()
			defer mu.Unlock()
			slowest = max(slowest, took)
			if err != nil {
				errs = append(errs, err)
			} else if !strings.Contains(leaf.Subject.String(), "certmgr fallback") {
				errs = append(errs, fmt.Errorf("got %v, not the fallback", leaf.Subject))
			}
		}()
	}
	wg.Wait()
	if len(errs) > 0 {
		t.Fatalf("%d handshakes failed, first: %v", len(errs), errs[0])
	}
	if slowest > bound {
		t.Errorf("slowest handshake took %v, want at most %v", slowest, bound)
	}
	c := e.Proxy.Counts(name)
	if c.ChallengeResponses != 1 || c.FailedAuthzs != 1 || c.Orders > 2 {
		t.Errorf("proxy counted %+v, want one attempt: 1 challenge response, 1 failed authorization, at most 2 orders", c)
	}
	st := e.m.Status(name)
	now := time.Now()
	if st.State != StateBackoff || st.Failures != 1 || st.LastError == nil {
		t.Fatalf("Status = %+v, want backoff after one failure", st)
	}
	if !strings.Contains(st.LastError.Error(), "127.0.0.3") {
		t.Errorf("LastError = %v, want the CA's detail naming 127.0.0.3", st.LastError)
	}
	if ahead := st.NextAttempt.Sub(now); ahead < 50*time.Second || ahead > 67*time.Second {
		t.Errorf("NextAttempt is %v ahead, want about one minute", ahead)
	}
	// What the observer tracked for the attempt is gone with it, even
	// after autocert's detached work fetched the authorizations again.
	waitDetached(t)
	e.m.obs.urlsMu.Lock()
	tracked := len(e.m.obs.urls) + len(e.m.obs.byName) + len(e.m.obs.failed)
	e.m.obs.urlsMu.Unlock()
	if tracked != 0 {
		t.Errorf("the ACME observer still tracks %d entries", tracked)
	}
	t.Logf("slowest of 500 handshakes: %v; proxy: %+v", slowest, c)
}

// Acceptance 2 (failure path): the CA holds new-order for 3 s, then
// answers 429 with Retry-After 3600. The handshake gets the fallback after
// its 1 s timeout; the rate limit shows in Status within 1 s of the 429;
// no further order is made.
func TestRateLimitedRetryAfter(t *testing.T) {
	const name = "limited.test"
	e := startEnv(t, pebbletest.Options{}, Config{HandshakeTimeout: time.Second}, name)
	e.Proxy.AddRule(pebbletest.Rule{Class: pebbletest.ClassNewOrder, Identifier: name, Delay: 3 * time.Second,
		Status: http.StatusTooManyRequests, RetryAfter: "3600",
		Detail: "too many failed authorizations (5) for \"limited.test\" in the last 1h0m0s"})
	e.ServeTLS(t, e.m.TLSConfig(), nil)

	start := time.Now()
	leaf, err := e.handshake(t, name, insecure)
	took := time.Since(start)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(leaf.Subject.String(), "certmgr fallback") || took > 1100*time.Millisecond {
		t.Errorf("handshake got %v after %v, want the fallback within 1.1 s", leaf.Subject, took)
	}
	waitFor(t, 5*time.Second, "the 429", func() bool { return e.Proxy.Requests(pebbletest.ClassNewOrder) >= 1 && len(e.Proxy.Problems()) > 0 })
	answered := time.Now()
	waitFor(t, time.Second, "Status to show the rate limit", func() bool { return e.m.Status(name).Failures == 1 })
	if d := time.Since(answered); d > time.Second {
		t.Errorf("Status showed the failure %v after the 429", d)
	}
	st := e.m.Status(name)
	if ahead := time.Until(st.NextAttempt); ahead < 3599*time.Second {
		t.Errorf("NextAttempt %v ahead, want at least 3599 s", ahead)
	}
	var ae *acme.Error
	if !errors.As(st.LastError, &ae) || ae.StatusCode != http.StatusTooManyRequests {
		t.Errorf("LastError = %#v, want an *acme.Error with status 429 reachable by errors.As", st.LastError)
	}
	if _, err := e.handshake(t, name, insecure); err != nil {
		t.Fatal(err)
	}
	if err := e.m.Provision(context.Background(), name); !errors.Is(err, ErrBackoff) {
		t.Errorf("Provision = %v, want ErrBackoff", err)
	}
	if n := e.Proxy.Requests(pebbletest.ClassNewOrder); n != 1 {
		t.Errorf("%d new-order requests, want 1", n)
	}
	if !strings.Contains(e.logs.String(), "rate limited by CA") {
		t.Error("no rate-limit line in the log")
	}
}

// Acceptance 3 (failure path): an attempt that outlives the handshake
// timeout is recorded when it succeeds later, and served from then on.
func TestLateSuccess(t *testing.T) {
	const name = "late.test"
	e := startEnv(t, pebbletest.Options{}, Config{HandshakeTimeout: 200 * time.Millisecond}, name)
	e.Proxy.AddRule(pebbletest.Rule{Class: pebbletest.ClassNewOrder, Identifier: name, Delay: time.Second})
	e.ServeTLS(t, e.m.TLSConfig(), nil)

	leaf, err := e.handshake(t, name, insecure)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(leaf.Subject.String(), "certmgr fallback") {
		t.Fatalf("first handshake got %v, want the fallback", leaf.Subject)
	}
	if st := e.m.Status(name); st.State != StateObtaining {
		t.Errorf("Status while the order is held = %v, want obtaining", st.State)
	}
	waitFor(t, 10*time.Second, "the late certificate", func() bool { return e.m.Status(name).State == StateValid })
	leaf, err = e.handshake(t, name, nil)
	if err != nil {
		t.Fatalf("handshake after the late success: %v", err)
	}
	st := e.m.Status(name)
	if st.Failures != 0 || st.LastError != nil || !st.NotAfter.Equal(leaf.NotAfter) {
		t.Errorf("Status = %+v, want valid, no failure, NotAfter %v", st, leaf.NotAfter)
	}
	if n := e.Proxy.Counts(name).Orders; n != 1 {
		t.Errorf("%d orders, want 1", n)
	}
}

// Acceptance 4 (failure path): a second Manager on the same cache keeps
// the first one's backoff (no ACME request, the fallback served, Status
// from New on); a corrupt persisted entry is logged and ignored.
func TestRestartKeepsBackoff(t *testing.T) {
	const name = "restart.test"
	dir := t.TempDir()
	e := startEnv(t, pebbletest.Options{}, Config{Autocert: &autocert.Manager{Cache: autocert.DirCache(dir)}}, name)
	e.DNS.SetA(name, "127.0.0.3")
	if err := e.m.Provision(context.Background(), name); err == nil {
		t.Fatal("Provision succeeded; validation should fail")
	}
	first := e.m.Status(name)
	if first.State != StateBackoff {
		t.Fatalf("Status = %+v, want backoff", first)
	}
	e.m.Close()

	// A corrupt entry beside the good one, as another version might write.
	cache := autocert.DirCache(dir)
	data, err := cache.Get(context.Background(), stateKey)
	if err != nil {
		t.Fatal(err)
	}
	data = []byte(strings.Replace(string(data), `"domains":{`, `"domains":{"bad.test":{"failures":"x"},`, 1))
	if err := cache.Put(context.Background(), stateKey, data); err != nil {
		t.Fatal(err)
	}

	logs := &syncBuffer{}
	// The second Manager's ACME requests, counted apart from what the
	// first one's detached work may still send.
	client := e.NewClient()
	requests := &countingTransport{next: client.HTTPClient.Transport}
	client.HTTPClient = &http.Client{Transport: requests}
	m2, err := New(Config{
		Autocert: &autocert.Manager{Cache: cache, Client: client, HostPolicy: autocert.HostWhitelist(name, "bad.test")},
		Logger:   newTestLogger(logs),
	})
	if err != nil {
		t.Fatal(err)
	}
	defer m2.Close()
	st := m2.Status(name)
	if st.State != StateBackoff || st.Failures != 1 || !st.NextAttempt.Equal(first.NextAttempt) || st.LastError == nil {
		t.Errorf("Status after restart = %+v, want %+v", st, first)
	}
	if !strings.Contains(logs.String(), "bad.test") || !strings.Contains(logs.String(), "cache error") {
		t.Errorf("the corrupt entry was not logged:\n%s", logs)
	}
	if st := m2.Status("bad.test"); st.State != StateNone {
		t.Errorf("corrupt entry gave state %+v", st)
	}
	c, err := m2.GetCertificate(&tls.ClientHelloInfo{ServerName: name})
	if err != nil || !IsFallback(c) {
		t.Fatalf("GetCertificate = %v, %v; want the fallback", c, err)
	}
	if err := m2.Provision(context.Background(), name); !errors.Is(err, ErrBackoff) {
		t.Errorf("Provision after restart = %v, want ErrBackoff", err)
	}
	if n := requests.n.Load(); n != 0 {
		t.Errorf("%d ACME requests after restart, want none", n)
	}
}

// countingTransport counts the requests it passes on.
type countingTransport struct {
	next http.RoundTripper
	n    atomic.Int64
}

func (c *countingTransport) RoundTrip(r *http.Request) (*http.Response, error) {
	c.n.Add(1)
	return c.next.RoundTrip(r)
}

// Acceptance 6 (failure path): a TLS-ALPN-01 validation hello for a domain
// in backoff still gets autocert's token certificate.
func TestValidationBypassesBackoff(t *testing.T) {
	const name = "token.test"
	e := startEnv(t, pebbletest.Options{}, Config{}, name)
	e.DNS.SetA(name, "127.0.0.3")
	if err := e.m.Provision(context.Background(), name); err == nil {
		t.Fatal("Provision succeeded; validation should fail")
	}
	if st := e.m.Status(name); st.State != StateBackoff {
		t.Fatalf("Status = %+v, want backoff", st)
	}
	waitDetached(t) // autocert's cleanup deletes its token from the cache
	// What autocert stores while it answers a challenge.
	key, err := ecdsa.GenerateKey(elliptic.P256(), crand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tok, err := (&acme.Client{Key: key}).TLSALPN01ChallengeCert("token-value", name)
	if err != nil {
		t.Fatal(err)
	}
	if err := e.m.cache.Put(context.Background(), name+"+token", pemCert(t, &tok)); err != nil {
		t.Fatal(err)
	}
	e.ServeTLS(t, e.m.TLSConfig(), nil)
	conf := &tls.Config{InsecureSkipVerify: true, NextProtos: []string{acme.ALPNProto}}
	leaf, err := e.handshake(t, name, conf)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(leaf.Raw, tok.Certificate[0]) {
		t.Errorf("validation hello got %v, want the token certificate", leaf.Subject)
	}
}

// Acceptance 7 (failure path): a renewal whose validation fails shows in
// Status (valid, with the failure) while the valid certificate keeps
// being served, and the rest of autocert's renewal flow is refused
// locally by the schedule.
func TestFailedRenewalKeepsServing(t *testing.T) {
	const name = "renew.test"
	dir := t.TempDir()
	e := startEnv(t, pebbletest.Options{CertValidity: time.Minute},
		Config{Autocert: &autocert.Manager{Cache: autocert.DirCache(dir)}}, name)
	current := e.serveCurrent(t) // one listener for both Managers
	if err := e.m.Provision(context.Background(), name); err != nil {
		t.Fatal(err)
	}
	e.m.Close()
	// Validation fails from now on, and the CA forgets the old authorization.
	e.DNS.SetA(name, "127.0.0.3")
	if n := e.Proxy.ExpireAuthorizations(name); n != 1 {
		t.Fatalf("expired %d authorizations, want 1", n)
	}

	// A restarted Manager whose RenewBefore covers the certificate's whole
	// life: autocert's timer renews as soon as the certificate is loaded.
	logs := &syncBuffer{}
	m, err := New(Config{
		Autocert: &autocert.Manager{Cache: autocert.DirCache(dir), Client: e.NewClient(),
			HostPolicy: autocert.HostWhitelist(name), RenewBefore: time.Hour},
		Logger: newTestLogger(logs),
	})
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	current.Store(m)
	leaf, err := e.handshake(t, name, nil)
	if err != nil {
		t.Fatal(err)
	}
	waitFor(t, 10*time.Second, "the failed renewal", func() bool { return m.Status(name).Failures == 1 })
	st := m.Status(name)
	if st.State != StateValid || st.LastError == nil || !strings.Contains(st.LastError.Error(), "127.0.0.3") ||
		!st.NotAfter.Equal(leaf.NotAfter) || time.Until(st.NextAttempt) < 50*time.Second {
		t.Errorf("Status = %+v, want valid with the renewal's failure and a next attempt a minute ahead", st)
	}
	waitFor(t, 10*time.Second, "autocert's next renewal order to be refused", func() bool { return m.refusedOrders.Load() >= 1 })
	again, err := e.handshake(t, name, nil)
	if err != nil || !again.Equal(leaf) {
		t.Errorf("handshake after the failed renewal: %v (same certificate: %v)", err, err == nil && again.Equal(leaf))
	}
	if c := e.Proxy.Counts(name); c.Orders != 2 || c.FailedAuthzs != 1 {
		t.Errorf("proxy counted %+v, want 2 orders (issuance, renewal) and 1 failed authorization", c)
	}
	if !strings.Contains(logs.String(), "path=renewal") {
		t.Errorf("the renewal failure was not logged:\n%s", logs)
	}
}

// Acceptance 8 (failure path): names the HostPolicy refuses leave nothing.
func TestRefusedNamesLeaveNothing(t *testing.T) {
	checkLeaks(t)
	m, err := New(Config{
		Autocert: &autocert.Manager{HostPolicy: autocert.HostWhitelist("only.test")},
		Logger:   newTestLogger(&syncBuffer{}),
	})
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	before := runtime.NumGoroutine()
	for i := 0; i < 10000; i++ {
		name := fmt.Sprintf("r%d-%x.test", i, rand.Uint64())
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

// TestExpiredAfterFailedRenewals: renewals fail until the certificate
// expires; once validation works again, the next handshake gets a new
// certificate from a new order, not the expired one autocert still holds
// in memory.
func TestExpiredAfterFailedRenewals(t *testing.T) {
	const name = "expiring.test"
	dir := t.TempDir()
	e := startEnv(t, pebbletest.Options{CertValidity: 3 * time.Second},
		Config{Autocert: &autocert.Manager{Cache: autocert.DirCache(dir)}}, name)
	current := e.serveCurrent(t)
	if err := e.m.Provision(context.Background(), name); err != nil {
		t.Fatal(err)
	}
	e.m.Close()
	e.DNS.SetA(name, "127.0.0.3")
	e.Proxy.ExpireAuthorizations(name)

	// Restarted, with renewal due at once and a short backoff.
	m, err := New(Config{
		Autocert: &autocert.Manager{Cache: autocert.DirCache(dir), Client: e.NewClient(),
			HostPolicy: autocert.HostWhitelist(name), RenewBefore: time.Hour},
		Logger:  newTestLogger(e.logs),
		Backoff: Backoff{Steps: []time.Duration{50 * time.Millisecond}, Jitter: -1},
	})
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	current.Store(m)
	old, err := e.handshake(t, name, nil)
	if err != nil {
		t.Fatal(err)
	}
	waitFor(t, 10*time.Second, "the failed renewal", func() bool { return m.Status(name).Failures >= 1 })
	waitFor(t, 10*time.Second, "the certificate to expire", func() bool { return time.Now().After(old.NotAfter) })
	e.DNS.SetA(name, "127.0.0.1")
	waitFor(t, 10*time.Second, "a new certificate", func() bool {
		leaf, err := e.handshake(t, name, insecure)
		return err == nil && leaf.NotAfter.After(old.NotAfter) && !strings.Contains(leaf.Subject.String(), "certmgr fallback")
	})
	if st := m.Status(name); st.State != StateValid || st.Failures != 0 {
		t.Errorf("Status = %+v, want valid", st)
	}
	if n := strings.Count(e.logs.String(), "certificate obtained"); n != 2 {
		t.Errorf("%d certificates obtained, want 2 (the first, and one after the expiry):\n%s", n, e.logs)
	}
	if c := e.Proxy.Counts(name); c.Orders < 3 {
		t.Errorf("proxy counted %+v, want the renewal's and a new order", c)
	}
}
