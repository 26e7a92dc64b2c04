package certmgr

// The fault matrix: one test (or subtest) per fault of the CA, the DNS, the
// cache, the Manager's lifecycle and its clients, each against the
// in-process Pebble, the harness's DNS and the fault-injecting proxy. Every
// row checks, as it applies:
//
//   - handshakes answer within HandshakeTimeout plus a small margin;
//   - failed authorizations stay within the budget (at most 4 an hour);
//   - no goroutine is left behind after Close (checkLeaks);
//   - no certificate that was in the cache is lost or replaced by a
//     fallback: "kept.test" is provisioned before the fault is injected and
//     must keep being served, verified against Pebble's root.

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/miekg/dns"
	"golang.org/x/crypto/acme"
	"golang.org/x/crypto/acme/autocert"

	"github.com/certmgr/certmgr/internal/pebbletest"
)

const (
	// faultHSTimeout is the HandshakeTimeout of every fault row.
	faultHSTimeout = 300 * time.Millisecond
	// faultHSMargin is what a handshake may take beyond it: the TCP
	// connection, the TLS exchange and a fallback's signature, under -race
	// on a shared machine.
	faultHSMargin = 250 * time.Millisecond
	// keptName is the domain provisioned before any fault is injected.
	keptName = "kept.test"
	// faultBudget is the failed-authorization budget per hour.
	faultBudget = 4
)

// faultEnv is one row's CA, DNS, cache and listener. The listener serves
// whichever Manager was started last, so that a row can restart.
type faultEnv struct {
	*pebbletest.Env
	cache    autocert.Cache
	names    []string // allowed by the default HostPolicy
	dnsCheck bool     // the DNS pre-check is on
	logs     *syncBuffer
	cur      atomic.Pointer[Manager]
	kept     *x509.Certificate // kept.test's leaf, once provisioned
	slowest  atomic.Int64      // the slowest handshake, in nanoseconds
}

// newFaultEnv starts Pebble, points every name (and kept.test) at
// 127.0.0.1, and serves TLS for the current Manager. A nil cache is a
// DirCache in a temporary directory. Goroutine leaks are checked after
// every Manager is closed and the Env is stopped.
func newFaultEnv(t *testing.T, cache autocert.Cache, dnsCheck bool, names ...string) *faultEnv {
	t.Helper()
	checkLeaks(t)
	env := pebbletest.Start(t, pebbletest.Options{})
	names = append([]string{keptName}, names...)
	for _, n := range names {
		env.DNS.SetA(n, "127.0.0.1")
	}
	if cache == nil {
		cache = autocert.DirCache(t.TempDir())
	}
	f := &faultEnv{Env: env, cache: cache, names: names, dnsCheck: dnsCheck, logs: &syncBuffer{}}
	env.ServeTLS(t, &tls.Config{GetConfigForClient: func(*tls.ClientHelloInfo) (*tls.Config, error) {
		m := f.cur.Load()
		if m == nil {
			return nil, errors.New("fault_test: no Manager")
		}
		return m.TLSConfig(), nil
	}}, nil)
	t.Cleanup(func() {
		// Runs once every Manager is closed, before the Env stops.
		f.checkBudget(t)
		t.Logf("slowest handshake: %v", time.Duration(f.slowest.Load()).Round(time.Millisecond))
		if t.Failed() {
			t.Logf("certmgr log:\n%s", f.logs)
		}
	})
	return f
}

// config returns the row's usual Config: the env's cache, a fresh client,
// the names allowed, the short handshake timeout and, if on, the DNS
// pre-check. mod, if not nil, changes it.
func (f *faultEnv) config(mod func(*Config)) Config {
	cfg := Config{
		Autocert: &autocert.Manager{
			Cache:      f.cache,
			Client:     f.NewClient(),
			HostPolicy: autocert.HostWhitelist(f.names...),
		},
		Logger:           newTestLogger(f.logs),
		HandshakeTimeout: faultHSTimeout,
	}
	if f.dnsCheck {
		cfg = dnsConfig(f.Env, cfg)
	}
	if mod != nil {
		mod(&cfg)
	}
	return cfg
}

// start makes the Manager the listener serves; it is closed when t ends.
func (f *faultEnv) start(t *testing.T, cfg Config) *Manager {
	t.Helper()
	m, err := New(cfg)
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	t.Cleanup(func() { m.Close() })
	f.cur.Store(m)
	return m
}

// handshake connects with SNI name and fails t unless the handshake ends
// within HandshakeTimeout plus the margin. A nil conf verifies the chain
// against Pebble's root.
func (f *faultEnv) handshake(t *testing.T, name string, conf *tls.Config) *x509.Certificate {
	t.Helper()
	leaf, err := f.tryHandshake(t, name, conf)
	if err != nil {
		t.Fatalf("handshake %s: %v", name, err)
	}
	return leaf
}

// tryHandshake is handshake returning the handshake's error.
func (f *faultEnv) tryHandshake(t *testing.T, name string, conf *tls.Config) (*x509.Certificate, error) {
	t.Helper()
	start := time.Now()
	leaf, err := (&testEnv{Env: f.Env}).handshake(t, name, conf)
	took := time.Since(start)
	if bound := faultHSTimeout + faultHSMargin; took > bound {
		t.Errorf("handshake %s took %v, want at most %v", name, took, bound)
	}
	for {
		old := f.slowest.Load()
		if int64(took) <= old || f.slowest.CompareAndSwap(old, int64(took)) {
			break
		}
	}
	return leaf, err
}

// expectFallback handshakes name and wants the self-signed fallback.
func (f *faultEnv) expectFallback(t *testing.T, name string) {
	t.Helper()
	if leaf := f.handshake(t, name, insecure); !isFallbackLeaf(leaf) {
		t.Errorf("handshake %s got %v, want the fallback", name, leaf.Subject)
	}
}

// expectIssued handshakes name and wants a certificate Pebble issued,
// verified against env.Roots.
func (f *faultEnv) expectIssued(t *testing.T, name string) *x509.Certificate {
	t.Helper()
	leaf, err := f.tryHandshake(t, name, nil)
	if err != nil {
		served := f.handshake(t, name, insecure) // tell what was served instead
		t.Fatalf("handshake %s: %v; served %q, want a certificate issued by Pebble", name, err, served.Subject)
	}
	return leaf
}

// handshakeAny handshakes name accepting whatever is served (a fallback or
// a certificate): for outcomes a row does not pin down.
func (f *faultEnv) handshakeAny(t *testing.T, name string) *x509.Certificate {
	t.Helper()
	return f.handshake(t, name, insecure)
}

func isFallbackLeaf(leaf *x509.Certificate) bool {
	return strings.Contains(leaf.Subject.String(), "certmgr fallback") && leaf.Issuer.String() == leaf.Subject.String()
}

// provisionKept provisions kept.test with m, before any fault.
func (f *faultEnv) provisionKept(t *testing.T, m *Manager) {
	t.Helper()
	if err := m.Provision(context.Background(), keptName); err != nil {
		t.Fatalf("Provision(%s) before the fault: %v", keptName, err)
	}
	f.kept = f.expectIssued(t, keptName)
}

// checkKept wants kept.test still served with the certificate Pebble
// issued before the fault.
func (f *faultEnv) checkKept(t *testing.T) {
	t.Helper()
	if f.kept == nil {
		t.Fatal("kept.test was never provisioned")
	}
	if leaf := f.expectIssued(t, keptName); !leaf.Equal(f.kept) {
		t.Errorf("%s: served serial %v, want the one provisioned before the fault (%v)", keptName, leaf.SerialNumber, f.kept.SerialNumber)
	}
}

// checkBudget wants every name's failed authorizations within the budget.
func (f *faultEnv) checkBudget(t *testing.T, extra ...string) {
	t.Helper()
	for _, n := range slices.Concat(f.names, extra) {
		if c := f.Proxy.Counts(n); c.FailedAuthzs > faultBudget {
			t.Errorf("%s: %d failed authorizations, budget %d", n, c.FailedAuthzs, faultBudget)
		}
	}
}

// closeWithin closes m and fails t unless Close returns within d.
func closeWithin(t *testing.T, m *Manager, d time.Duration) {
	t.Helper()
	start := time.Now()
	done := make(chan struct{})
	go func() { m.Close(); close(done) }()
	select {
	case <-done:
		if took := time.Since(start); took > d {
			t.Errorf("Close took %v, want at most %v", took, d)
		}
	case <-time.After(30 * time.Second):
		t.Fatalf("Close did not return in 30 s")
	}
}

// waitNoLeaks waits until no goroutine of certmgr, autocert or acme runs.
func waitNoLeaks(t *testing.T, d time.Duration) {
	t.Helper()
	if left := settle(d, nil); len(left) > 0 {
		t.Fatalf("%d goroutine(s) still running %v after Close:\n%s", len(left), d, strings.Join(left, "\n\n"))
	}
}

// failureOf returns a copy of name's failure record, from inside m.
func failureOf(m *Manager, name string) failureRecord {
	m.stateMu.Lock()
	defer m.stateMu.Unlock()
	if d := m.domains[name]; d != nil {
		f := d.fail
		f.Spends = append([]spend(nil), f.Spends...)
		return f
	}
	return failureRecord{}
}

// waitFailed waits until name's Status shows n failures and returns it.
func waitFailed(t *testing.T, m *Manager, name string, n int) Status {
	t.Helper()
	waitFor(t, 15*time.Second, fmt.Sprintf("%s to fail %d time(s)", name, n), func() bool {
		st := m.Status(name)
		return st.Failures >= n && st.State != StateObtaining
	})
	st := m.Status(name)
	if st.Failures != n {
		t.Errorf("%s: %d failures, want %d", name, st.Failures, n)
	}
	return st
}

// waitOutcome waits until the attempt a handshake or Provision started for
// name has an outcome (valid, backoff or waiting-dns) and returns Status.
func waitOutcome(t *testing.T, m *Manager, name string) Status {
	t.Helper()
	waitFor(t, 15*time.Second, name+"'s attempt to end", func() bool {
		switch m.Status(name).State {
		case StateValid, StateBackoff, StateWaitingDNS:
			return true
		}
		return false
	})
	return m.Status(name)
}

// persisted returns the failure records persisted in cache.
func persisted(t *testing.T, cache autocert.Cache) map[string]failureRecord {
	t.Helper()
	data, err := cache.Get(context.Background(), stateKey)
	if errors.Is(err, autocert.ErrCacheMiss) {
		return nil
	}
	if err != nil {
		t.Fatalf("reading the persisted state: %v", err)
	}
	recs, bad, err := decodeState(data, time.Now())
	if err != nil || len(bad) > 0 {
		t.Fatalf("persisted state unreadable: %v %v", err, bad)
	}
	return recs
}

// faultCache wraps a Cache and fails its reads or writes on demand: a
// read-only directory (writes fail) or an unreadable one (reads fail too).
// Tests run as root, so chmod cannot make a directory read-only.
type faultCache struct {
	inner            autocert.Cache
	failGet, failPut atomic.Bool
	getErrs, putErrs atomic.Int64
}

var errInjectedCache = errors.New("fault_test: injected cache error")

func (c *faultCache) Get(ctx context.Context, key string) ([]byte, error) {
	if c.failGet.Load() {
		c.getErrs.Add(1)
		return nil, fmt.Errorf("read %s: %w", key, errInjectedCache)
	}
	return c.inner.Get(ctx, key)
}

func (c *faultCache) Put(ctx context.Context, key string, data []byte) error {
	if c.failPut.Load() {
		c.putErrs.Add(1)
		return fmt.Errorf("write %s: %w", key, errInjectedCache)
	}
	return c.inner.Put(ctx, key, data)
}

func (c *faultCache) Delete(ctx context.Context, key string) error {
	if c.failPut.Load() {
		return fmt.Errorf("delete %s: %w", key, errInjectedCache)
	}
	return c.inner.Delete(ctx, key)
}

// ---------------------------------------------------------------------------
// The CA

// TestFaultCAUnreachable: the CA refuses connections. kept.test, in the
// cache, is still served by a Manager that cannot reach the CA; a new
// domain gets the fallback, its attempt fails at once and is recorded, and
// the next handshake makes no attempt.
func TestFaultCAUnreachable(t *testing.T) {
	const name = "down.test"
	f := newFaultEnv(t, nil, false, name)
	m1 := f.start(t, f.config(nil))
	f.provisionKept(t, m1)
	closeWithin(t, m1, time.Second)

	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	dir := "https://" + ln.Addr().String() + "/dir"
	ln.Close() // nothing listens there now: connections are refused
	m := f.start(t, f.config(func(c *Config) {
		c.Autocert.Client = &acme.Client{DirectoryURL: dir}
	}))
	before := f.Proxy.Requests(pebbletest.ClassAny)

	f.checkKept(t)
	start := time.Now()
	f.expectFallback(t, name)
	st := waitFailed(t, m, name, 1)
	if took := time.Since(start); took > 2*time.Second {
		t.Errorf("the attempt failed after %v, want at once", took)
	}
	if st.State != StateBackoff || st.LastError == nil || !strings.Contains(st.LastError.Error(), "connection refused") {
		t.Errorf("Status = %+v, want backoff with connection refused", st)
	}
	if ahead := time.Until(st.NextAttempt); ahead < 50*time.Second || ahead > 70*time.Second {
		t.Errorf("NextAttempt %v ahead, want about a minute", ahead)
	}
	f.expectFallback(t, name)
	if err := m.Provision(context.Background(), name); !errors.Is(err, ErrBackoff) {
		t.Errorf("Provision in backoff = %v, want ErrBackoff", err)
	}
	if st := m.Status(name); st.Failures != 1 {
		t.Errorf("a handshake in backoff made another attempt: %+v", st)
	}
	f.checkKept(t)
	if n := f.Proxy.Requests(pebbletest.ClassAny) - before; n != 0 {
		t.Errorf("%d requests reached Pebble", n)
	}
	if rec := failureOf(m, name); len(rec.Spends) != 0 {
		t.Errorf("an unreachable CA spent budget: %+v", rec.Spends)
	}
	closeWithin(t, m, time.Second)
}

// TestFaultCAHangs: the CA accepts connections and never answers. Each
// ACME request is cut at requestTimeout, so the attempt fails and is
// recorded; Close during a held request returns well before that timeout
// and the attempt it cut is not a failure of the domain.
func TestFaultCAHangs(t *testing.T) {
	const (
		name       = "hang.test"
		closedName = "hang-close.test"
		reqTimeout = time.Second
	)
	f := newFaultEnv(t, nil, false, name, closedName)
	m := f.start(t, f.config(func(c *Config) { c.hooks.requestTimeout = reqTimeout }))
	f.provisionKept(t, m)
	waitDetached(t) // kept.test's clean-up requests are done
	remove := f.Proxy.AddRule(pebbletest.Rule{Hold: true})
	defer remove()

	before := f.Proxy.Requests(pebbletest.ClassAny)
	start := time.Now()
	f.expectFallback(t, name)
	st := waitFailed(t, m, name, 1)
	took := time.Since(start)
	if took < reqTimeout-50*time.Millisecond || took > reqTimeout+3*time.Second {
		t.Errorf("the attempt failed after %v, want about the request timeout %v", took, reqTimeout)
	}
	if st.State != StateBackoff || st.LastError == nil || !strings.Contains(st.LastError.Error(), "deadline exceeded") {
		t.Errorf("Status = %+v, want backoff after a request that timed out", st)
	}
	if n := f.Proxy.Requests(pebbletest.ClassAny) - before; n < 1 {
		t.Errorf("no request reached the proxy")
	}
	f.expectFallback(t, name)
	f.checkKept(t)
	if rec := failureOf(m, name); len(rec.Spends) != 0 {
		t.Errorf("a silent CA spent budget: %+v", rec.Spends)
	}

	// Close while a request is held.
	held := f.Proxy.Requests(pebbletest.ClassAny)
	f.expectFallback(t, closedName)
	waitFor(t, 5*time.Second, "a held request", func() bool { return f.Proxy.Requests(pebbletest.ClassAny) > held })
	if st := m.Status(closedName); st.State != StateObtaining {
		t.Fatalf("Status(%s) = %+v, want obtaining", closedName, st)
	}
	closeWithin(t, m, reqTimeout/2)
	waitNoLeaks(t, 5*time.Second)
	if st := m.Status(closedName); st.Failures != 0 || st.State != StateNone {
		t.Errorf("Status(%s) after Close = %+v, want none: Close is no failure of the domain", closedName, st)
	}
	if rec, ok := persisted(t, f.cache)[closedName]; ok && !rec.empty(time.Now()) {
		t.Errorf("Close persisted a failure for %s: %+v", closedName, rec)
	}
	f.checkKept(t) // served after Close
}

// TestFaultCAServerErrors: the CA answers 500, or 503, to every request;
// 503 with Retry-After to every request; 503 with Retry-After to new-order
// only. Each attempt fails after a few bounded retries, spends nothing, and
// a Retry-After sets the next attempt.
func TestFaultCAServerErrors(t *testing.T) {
	for _, tt := range []struct {
		name       string
		rule       pebbletest.Rule
		retryAfter time.Duration // the CA's; 0 for none
	}{
		{"500-every-request", pebbletest.Rule{Status: http.StatusInternalServerError}, 0},
		{"503-every-request", pebbletest.Rule{Status: http.StatusServiceUnavailable}, 0},
		{"503-retry-after-every-request", pebbletest.Rule{Status: http.StatusServiceUnavailable, RetryAfter: "120"}, 120 * time.Second},
		{"503-retry-after-new-order", pebbletest.Rule{Class: pebbletest.ClassNewOrder, Status: http.StatusServiceUnavailable, RetryAfter: "120"}, 120 * time.Second},
	} {
		t.Run(tt.name, func(t *testing.T) {
			const name = "fivexx.test"
			f := newFaultEnv(t, nil, false, name)
			m := f.start(t, f.config(nil))
			f.provisionKept(t, m)
			waitDetached(t)
			f.Proxy.AddRule(tt.rule)

			before := f.Proxy.Requests(pebbletest.ClassAny)
			f.expectFallback(t, name)
			st := waitFailed(t, m, name, 1)
			failedAt := time.Now()
			var ae *acme.Error
			if st.State != StateBackoff || !errors.As(st.LastError, &ae) || ae.StatusCode != tt.rule.Status {
				t.Errorf("Status = %+v, want backoff with the CA's %d", st, tt.rule.Status)
			}
			if tt.retryAfter > 0 {
				if ahead := st.NextAttempt.Sub(failedAt); ahead < tt.retryAfter-2*time.Second {
					t.Errorf("NextAttempt %v ahead, want at least the CA's Retry-After %v", ahead, tt.retryAfter)
				}
			} else if ahead := st.NextAttempt.Sub(failedAt); ahead < 50*time.Second || ahead > 70*time.Second {
				t.Errorf("NextAttempt %v ahead, want about a minute", ahead)
			}
			sent := f.Proxy.Requests(pebbletest.ClassAny) - before
			if sent < 1 || sent > 8 {
				t.Errorf("the attempt sent %d requests, want 1 to 8 (a few bounded retries)", sent)
			}
			f.expectFallback(t, name)
			if err := m.Provision(context.Background(), name); !errors.Is(err, ErrBackoff) {
				t.Errorf("Provision in backoff = %v, want ErrBackoff", err)
			}
			if n := f.Proxy.Requests(pebbletest.ClassAny) - before; n != sent {
				t.Errorf("%d more requests in backoff", n-sent)
			}
			if rec := failureOf(m, name); len(rec.Spends) != 0 {
				t.Errorf("spent %+v on a CA error", rec.Spends)
			}
			if c := f.Proxy.Counts(name); c.FailedAuthzs != 0 {
				t.Errorf("proxy counted %+v", c)
			}
			f.checkKept(t)
			t.Logf("%d requests; NextAttempt %v ahead; LastError: %v", sent, st.NextAttempt.Sub(failedAt).Round(time.Second), st.LastError)
		})
	}
}

// TestFaultCARateLimited: new-order answers 429 rateLimited with
// Retry-After 3600: one request, no retry, and no attempt for an hour.
func TestFaultCARateLimited(t *testing.T) {
	const name = "limited-fault.test"
	f := newFaultEnv(t, nil, false, name)
	m := f.start(t, f.config(nil))
	f.provisionKept(t, m)
	f.Proxy.AddRule(pebbletest.Rule{Class: pebbletest.ClassNewOrder, Identifier: name, Status: http.StatusTooManyRequests,
		RetryAfter: "3600", Detail: "too many new orders recently"})

	f.expectFallback(t, name)
	st := waitFailed(t, m, name, 1)
	if ahead := time.Until(st.NextAttempt); ahead < 3599*time.Second {
		t.Errorf("NextAttempt %v ahead, want at least the CA's Retry-After of 3600 s", ahead)
	}
	if st.State != StateBackoff || st.LastError == nil || !strings.Contains(st.LastError.Error(), "too many new orders recently") {
		t.Errorf("Status = %+v, want backoff with the CA's detail", st)
	}
	f.expectFallback(t, name)
	if err := m.Provision(context.Background(), name); !errors.Is(err, ErrBackoff) {
		t.Errorf("Provision = %v, want ErrBackoff", err)
	}
	m.Retry(name) // the operator cannot override the CA's Retry-After
	if err := m.Provision(context.Background(), name); !errors.Is(err, ErrBackoff) {
		t.Errorf("Provision after Retry = %v, want ErrBackoff", err)
	}
	if n := f.Proxy.Requests(pebbletest.ClassNewOrder); n != 2 { // kept.test's and the 429
		t.Errorf("%d new-order requests, want 2", n)
	}
	if c := f.Proxy.Counts(name); c.FailedAuthzs != 0 || c.Orders != 0 {
		t.Errorf("proxy counted %+v", c)
	}
	f.checkKept(t)
}

// TestFaultCABadNonce: new-order answers badNonce. Three in a row are
// retried and the attempt succeeds; an endless storm fails the attempt
// after a bounded number of retries without spending the budget.
func TestFaultCABadNonce(t *testing.T) {
	const (
		name  = "nonce.test"
		storm = "nonce-storm.test"
	)
	badNonce := "urn:ietf:params:acme:error:badNonce"
	f := newFaultEnv(t, nil, false, name, storm)
	m := f.start(t, f.config(nil))
	f.provisionKept(t, m)
	f.Proxy.AddRule(pebbletest.Rule{Class: pebbletest.ClassNewOrder, Identifier: name, Status: http.StatusBadRequest,
		ProblemType: badNonce, Detail: "JWS has an invalid anti-replay nonce", Times: 3})
	f.Proxy.AddRule(pebbletest.Rule{Class: pebbletest.ClassNewOrder, Identifier: storm, Status: http.StatusBadRequest,
		ProblemType: badNonce, Detail: "JWS has an invalid anti-replay nonce"})

	t.Run("three", func(t *testing.T) {
		start := time.Now()
		f.handshakeAny(t, name)
		if st := waitOutcome(t, m, name); st.State != StateValid || st.Failures != 0 {
			t.Fatalf("Status = %+v, want valid: three badNonce answers are retried", st)
		}
		t.Logf("valid %v after the handshake", time.Since(start).Round(time.Millisecond))
		f.expectIssued(t, name)
		if c := f.Proxy.Counts(name); c.Orders != 1 || c.FailedAuthzs != 0 {
			t.Errorf("proxy counted %+v, want 1 order", c)
		}
	})
	t.Run("storm", func(t *testing.T) {
		before := f.Proxy.Requests(pebbletest.ClassNewOrder)
		f.expectFallback(t, storm)
		st := waitFailed(t, m, storm, 1)
		if st.State != StateBackoff {
			t.Errorf("Status = %+v, want backoff", st)
		}
		if n := f.Proxy.Requests(pebbletest.ClassNewOrder) - before; n < 2 || n > 8 {
			t.Errorf("%d new-order requests, want a few bounded retries", n)
		}
		rec := failureOf(m, storm)
		if len(rec.Spends) != 0 || !rec.budgetFree(time.Now(), 1, faultBudget).Before(time.Now().Add(time.Second)) {
			t.Errorf("the storm spent budget: %+v", rec)
		}
		if c := f.Proxy.Counts(storm); c.Orders != 0 || c.FailedAuthzs != 0 {
			t.Errorf("proxy counted %+v", c)
		}
		f.expectFallback(t, storm)
	})
	f.checkKept(t)
}

// TestFaultCAMalformedDirectory: the directory is not JSON. A Manager
// started during the fault still serves kept.test from the cache; a new
// domain's attempt fails before any order, and succeeds once the directory
// is right again.
func TestFaultCAMalformedDirectory(t *testing.T) {
	const name = "baddir.test"
	f := newFaultEnv(t, nil, false, name)
	m1 := f.start(t, f.config(nil))
	f.provisionKept(t, m1)
	closeWithin(t, m1, time.Second)
	waitDetached(t)
	remove := f.Proxy.AddRule(pebbletest.Rule{Class: pebbletest.ClassDirectory, Status: http.StatusOK, Body: "{not json"})

	m := f.start(t, f.config(nil)) // a new client: the directory is read again
	orders := f.Proxy.Requests(pebbletest.ClassNewOrder)
	dirs := f.Proxy.Requests(pebbletest.ClassDirectory)
	f.checkKept(t)
	f.expectFallback(t, name)
	st := waitFailed(t, m, name, 1)
	if st.State != StateBackoff || st.LastError == nil {
		t.Errorf("Status = %+v, want backoff", st)
	}
	if n := f.Proxy.Requests(pebbletest.ClassNewOrder) - orders; n != 0 {
		t.Errorf("%d new-order requests without a directory", n)
	}
	if rec := failureOf(m, name); len(rec.Spends) != 0 {
		t.Errorf("a malformed directory spent budget: %+v", rec.Spends)
	}
	if n := f.Proxy.Requests(pebbletest.ClassDirectory) - dirs; n < 1 || n > 4 {
		t.Errorf("%d directory requests, want 1 to 4", n)
	}
	f.expectFallback(t, name)

	remove()
	m.Retry(name)
	if err := m.Provision(context.Background(), name); err != nil {
		t.Fatalf("Provision once the directory is right: %v", err)
	}
	f.expectIssued(t, name)
	f.checkKept(t)
}

// ---------------------------------------------------------------------------
// DNS

// TestFaultDNS: with the pre-check on, SERVFAIL, NXDOMAIN, a silent
// server, and a CNAME loop stop the attempt before any order, serve the
// fallback in time and are not asked again before the recheck; a truncated
// UDP answer is asked again over TCP and the certificate is obtained.
func TestFaultDNS(t *testing.T) {
	const (
		servfail = "servfail-fault.test"
		nx       = "nx-fault.test"
		silent   = "silent-fault.test"
		loop     = "loop-fault.test"
		loopB    = "loop-b-fault.test"
		trunc    = "trunc-fault.test"
	)
	f := newFaultEnv(t, nil, true, servfail, nx, silent, loop, trunc)
	m := f.start(t, f.config(nil))
	f.provisionKept(t, m)

	for _, tt := range []struct {
		name  string
		setup func()
		want  string // in the error
	}{
		{servfail, func() { f.DNS.SetRcode(servfail, dns.RcodeServerFailure) }, "SERVFAIL"},
		{nx, func() { f.DNS.SetRcode(nx, dns.RcodeNameError) }, "NXDOMAIN"},
		{silent, func() { f.DNS.SetSilent(silent, true) }, "timed out"},
		{loop, func() {
			f.DNS.Remove(loop)
			f.DNS.SetCNAME(loop, loopB)
			f.DNS.SetCNAME(loopB, loop)
		}, "CNAME loop"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			tt.setup()
			f.expectFallback(t, tt.name)
			start := time.Now()
			err := m.Provision(context.Background(), tt.name)
			if !errors.Is(err, ErrDNSNotReady) || !strings.Contains(err.Error(), tt.want) {
				t.Errorf("Provision = %v, want ErrDNSNotReady naming %q", err, tt.want)
			}
			if took := time.Since(start); took > 3*time.Second {
				t.Errorf("Provision took %v", took)
			}
			st := m.Status(tt.name)
			if st.State != StateWaitingDNS || time.Until(st.NextAttempt) < 20*time.Second {
				t.Errorf("Status = %+v, want waiting-dns with a recheck about 30 s ahead", st)
			}
			qa, qaaaa := f.DNS.Queries(tt.name, dns.TypeA), f.DNS.Queries(tt.name, dns.TypeAAAA)
			f.expectFallback(t, tt.name)
			if err := m.Provision(context.Background(), tt.name); !errors.Is(err, ErrDNSNotReady) {
				t.Errorf("second Provision = %v, want ErrDNSNotReady", err)
			}
			if a, aaaa := f.DNS.Queries(tt.name, dns.TypeA), f.DNS.Queries(tt.name, dns.TypeAAAA); a != qa || aaaa != qaaaa {
				t.Errorf("DNS asked again before the recheck: A %d→%d, AAAA %d→%d", qa, a, qaaaa, aaaa)
			}
			if c := f.Proxy.Counts(tt.name); c.Orders != 0 {
				t.Errorf("proxy counted %+v, want no order", c)
			}
			f.checkKept(t)
		})
	}
	t.Run(trunc, func(t *testing.T) {
		f.DNS.SetTruncate(trunc, true)
		if err := m.Provision(context.Background(), trunc); err != nil {
			t.Fatalf("Provision = %v, want the certificate (the pre-check must ask again over TCP)", err)
		}
		f.expectIssued(t, trunc)
		if n := f.DNS.Queries(trunc, dns.TypeA); n < 2 {
			t.Errorf("%d A queries, want the truncated UDP one and the TCP one", n)
		}
		if c := f.Proxy.Counts(trunc); c.Orders != 1 || c.FailedAuthzs != 0 {
			t.Errorf("proxy counted %+v, want 1 order", c)
		}
		f.checkKept(t)
	})
	f.checkBudget(t, loopB)
}

// ---------------------------------------------------------------------------
// The cache

// TestFaultCacheWriteFails: the cache directory is read-only. A
// certificate obtained meanwhile is served from memory, and written once
// the directory is writable again; a restart then serves it.
func TestFaultCacheWriteFails(t *testing.T) {
	const name = "readonly.test"
	fc := &faultCache{inner: autocert.DirCache(t.TempDir())}
	f := newFaultEnv(t, fc, false, name)
	cfg := f.config(func(c *Config) { c.hooks.cacheRetry = 50 * time.Millisecond })
	m := f.start(t, cfg)
	f.provisionKept(t, m)

	fc.failPut.Store(true)
	f.checkKept(t)
	f.handshakeAny(t, name)
	if st := waitOutcome(t, m, name); st.State != StateValid {
		t.Fatalf("Status = %+v, want valid: a failed write does not fail the attempt", st)
	}
	leaf := f.expectIssued(t, name) // from memory
	if _, err := fc.inner.Get(context.Background(), name); !errors.Is(err, autocert.ErrCacheMiss) {
		t.Fatalf("inner cache holds %s while writes fail: %v", name, err)
	}
	if !strings.Contains(f.logs.String(), "cache error") {
		t.Error("the failed write was not logged")
	}
	waitFor(t, 5*time.Second, "the write to be retried", func() bool { return fc.putErrs.Load() >= 3 })

	fc.failPut.Store(false)
	waitFor(t, 5*time.Second, "the certificate written to the cache", func() bool {
		data, err := fc.inner.Get(context.Background(), name)
		if err != nil {
			return false
		}
		c, err := parseCert(certKey{domain: name}, data, time.Now())
		return err == nil && c.Leaf.Equal(leaf)
	})
	f.expectIssued(t, name)
	f.checkKept(t)

	// Nothing obtained is lost: a restart serves it from the cache.
	closeWithin(t, m, time.Second)
	orders := f.Proxy.Counts(name).Orders
	f.start(t, f.config(nil))
	if got := f.expectIssued(t, name); !got.Equal(leaf) {
		t.Errorf("after restart %s has serial %v, want %v", name, got.SerialNumber, leaf.SerialNumber)
	}
	f.checkKept(t)
	if n := f.Proxy.Counts(name).Orders; n != orders {
		t.Errorf("%d orders after restart, want %d", n, orders)
	}
}

// TestFaultCacheReadFails: reads and writes fail. kept.test, in memory, is
// still served; a new domain gets the fallback in time, no order and no
// failure. An unreadable cache is certmgr's own failure, not the CA's: it
// must not move the domain's schedule, so the domain is obtained as soon
// as the cache works again, without the operator's Retry.
func TestFaultCacheReadFails(t *testing.T) {
	const name = "unreadable.test"
	fc := &faultCache{inner: autocert.DirCache(t.TempDir())}
	f := newFaultEnv(t, fc, false, name)
	m := f.start(t, f.config(func(c *Config) { c.hooks.cacheRetry = 50 * time.Millisecond }))
	f.provisionKept(t, m)

	fc.failGet.Store(true)
	fc.failPut.Store(true)
	f.checkKept(t)
	// While the cache cannot be read, a valid certificate may be in it:
	// certmgr orders none (a duplicate would spend the CA's limits) and
	// records no failure.
	leaf := f.handshakeAny(t, name)
	f.handshakeAny(t, name)
	st := m.Status(name)
	if st.State != StateNone || st.Failures != 0 {
		t.Errorf("Status with the cache unreadable = %+v, want none and no failure", st)
	}
	if n := f.Proxy.Counts(name).Orders; n != 0 {
		t.Errorf("%d orders while the cache was unreadable", n)
	}
	if !strings.Contains(f.logs.String(), "cache error") {
		t.Error("the cache errors were not logged")
	}
	t.Logf("with the cache unreadable: first handshake got %q; Status %+v", leaf.Subject, st)

	fc.failGet.Store(false)
	fc.failPut.Store(false)
	if err := m.Provision(context.Background(), name); err != nil {
		t.Errorf("Provision once the cache works, without Retry: %v; want the certificate: an unreadable cache is no failure at the CA and must not move the schedule", err)
		m.Retry(name)
		if err := m.Provision(context.Background(), name); err != nil {
			t.Fatalf("Provision after Retry: %v", err)
		}
	}
	got := f.expectIssued(t, name)
	waitFor(t, 5*time.Second, "the certificate written to the cache", func() bool {
		data, err := fc.inner.Get(context.Background(), name)
		if err != nil {
			return false
		}
		c, err := parseCert(certKey{domain: name}, data, time.Now())
		return err == nil && c.Leaf.Equal(got)
	})
	f.checkKept(t)
}

// TestFaultCacheDirUnderFile: the DirCache's parent is a regular file, so
// that every read and write fails (ENOTDIR). A Manager started meanwhile
// answers every handshake in time without a crash; once the directory is
// back, kept.test is served from it, not replaced by a new order.
func TestFaultCacheDirUnderFile(t *testing.T) {
	const name = "nodir.test"
	root := t.TempDir()
	parent := filepath.Join(root, "parent")
	dir := filepath.Join(parent, "certs")
	f := newFaultEnv(t, autocert.DirCache(dir), false, name)
	m1 := f.start(t, f.config(nil))
	f.provisionKept(t, m1)
	closeWithin(t, m1, time.Second)
	waitDetached(t)

	if err := os.Rename(parent, parent+".saved"); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(parent, []byte("a file, not a directory\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	m := f.start(t, f.config(func(c *Config) { c.hooks.cacheRetry = 50 * time.Millisecond }))
	f.handshakeAny(t, keptName) // unreadable: the fallback at worst, in time
	f.expectFallback(t, name)
	waitFor(t, 15*time.Second, "the attempts' outcome", func() bool {
		return m.Status(name).State != StateObtaining && m.Status(keptName).State != StateObtaining
	})
	f.handshakeAny(t, keptName)
	f.handshakeAny(t, name)
	if n := f.Proxy.Counts(keptName).Orders; n != 1 {
		t.Errorf("%d orders for %s while its cache entry was unreadable, want 1: it was replaced", n, keptName)
	}
	if !strings.Contains(f.logs.String(), "cache error") {
		t.Error("the cache errors were not logged")
	}

	if err := os.Remove(parent); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(parent+".saved", parent); err != nil {
		t.Fatal(err)
	}
	m.Retry(name)
	f.checkKept(t) // without the operator's Retry
	if err := m.Provision(context.Background(), name); err != nil {
		t.Fatalf("Provision once the directory is back: %v", err)
	}
	f.expectIssued(t, name)
	if n := f.Proxy.Counts(keptName).Orders; n != 1 {
		t.Errorf("%d orders for %s, want 1", n, keptName)
	}
}

// TestFaultCacheCorruptCert: a certificate entry holds garbage. The
// handshake answers in time without a crash, the attempt replaces the
// entry with a valid certificate, and the others are untouched.
func TestFaultCacheCorruptCert(t *testing.T) {
	const (
		anchor   = "anchor.test"
		badKey   = "badkey.test"
		badChain = "badchain.test"
	)
	dir := t.TempDir()
	cache := autocert.DirCache(dir)
	f := newFaultEnv(t, cache, false, anchor, badKey, badChain)
	m1 := f.start(t, f.config(nil))
	f.provisionKept(t, m1)
	for _, n := range []string{anchor, badKey, badChain} {
		if err := m1.Provision(context.Background(), n); err != nil {
			t.Fatal(err)
		}
	}
	anchorLeaf := f.expectIssued(t, anchor)
	closeWithin(t, m1, time.Second)
	waitDetached(t)

	ctx := context.Background()
	garbage := make([]byte, 512)
	for i := range garbage {
		garbage[i] = byte(rand.Uint32())
	}
	corrupt := map[string][]byte{keptName: garbage}
	// A private key block whose content is not a key, then the chain.
	data, err := cache.Get(ctx, badKey)
	if err != nil {
		t.Fatal(err)
	}
	_, chain := pem.Decode(data)
	corrupt[badKey] = append(pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: garbage[:121]}), chain...)
	// A chain cut short, as by a torn write.
	data, err = cache.Get(ctx, badChain)
	if err != nil {
		t.Fatal(err)
	}
	corrupt[badChain] = data[:len(data)*2/3]
	for k, v := range corrupt {
		if err := cache.Put(ctx, k, v); err != nil {
			t.Fatal(err)
		}
	}

	m := f.start(t, f.config(nil))
	if got := f.expectIssued(t, anchor); !got.Equal(anchorLeaf) {
		t.Errorf("%s: another certificate was served", anchor)
	}
	for _, n := range []string{keptName, badKey, badChain} {
		t.Run(n, func(t *testing.T) {
			f.handshakeAny(t, n)
			waitFor(t, 15*time.Second, "the attempt's outcome", func() bool {
				st := m.Status(n)
				return st.State == StateValid || st.Failures > 0
			})
			if st := m.Status(n); st.State != StateValid {
				t.Errorf("the attempt did not replace the corrupt entry: Status = %+v", st)
				m.Retry(n)
				err := m.Provision(context.Background(), n)
				t.Fatalf("and after the operator's Retry, Provision = %v", err)
			}
			leaf := f.expectIssued(t, n)
			data, err := cache.Get(ctx, n)
			if err != nil {
				t.Fatal(err)
			}
			if c, err := parseCert(certKey{domain: n}, data, time.Now()); err != nil || !c.Leaf.Equal(leaf) {
				t.Errorf("the cache entry was not replaced by the certificate served: %v", err)
			}
		})
	}
}

// TestFaultCacheCorruptState: the persisted failure cache is corrupt, as
// a whole or entry by entry. New still works and logs it; valid entries
// are kept; a persisted wait beyond the schedule's longest is cut to it;
// domains are obtained; the next write is readable.
func TestFaultCacheCorruptState(t *testing.T) {
	const (
		backoff = "backoff-state.test"
		future  = "future-state.test"
		fresh   = "fresh-state.test"
	)
	for _, tt := range []struct {
		name  string
		state func(good []byte) []byte
	}{
		{"garbage", func([]byte) []byte { return []byte("{not json") }},
		{"version", func([]byte) []byte { return []byte(`{"version":99,"domains":{}}`) }},
		{"entries", func(good []byte) []byte {
			bad := `"domains":{` +
				`"bad-type.test":{"failures":"x"},` +
				`"bad-next.test":{"failures":2},` +
				`"bad-count.test":{"failures":-1,"next_attempt":"2030-01-01T00:00:00Z"},` +
				`"Bad..Name":{"failures":1,"next_attempt":"2030-01-01T00:00:00Z"},` +
				`"` + future + `":{"failures":1,"last_error":"from a clock far ahead","next_attempt":"9999-01-01T00:00:00Z","last_failure":"9999-01-01T00:00:00Z"},`
			return []byte(strings.Replace(string(good), `"domains":{`, bad, 1))
		}},
	} {
		t.Run(tt.name, func(t *testing.T) {
			cache := autocert.DirCache(t.TempDir())
			f := newFaultEnv(t, cache, false, backoff, future, fresh, "bad-type.test", "bad-next.test", "bad-count.test")
			m1 := f.start(t, f.config(nil))
			f.provisionKept(t, m1)
			f.Proxy.AddRule(pebbletest.Rule{Class: pebbletest.ClassNewOrder, Identifier: backoff, Status: http.StatusForbidden,
				ProblemType: "urn:ietf:params:acme:error:rejectedIdentifier", Detail: "policy forbids it", Times: 1})
			if err := m1.Provision(context.Background(), backoff); err == nil {
				t.Fatal("Provision succeeded through a 403")
			}
			first := m1.Status(backoff)
			closeWithin(t, m1, time.Second)
			good, err := cache.Get(context.Background(), stateKey)
			if err != nil {
				t.Fatal(err)
			}
			if err := cache.Put(context.Background(), stateKey, tt.state(good)); err != nil {
				t.Fatal(err)
			}

			before := strings.Count(f.logs.String(), "cache error")
			m := f.start(t, f.config(nil))
			if strings.Count(f.logs.String(), "cache error") == before {
				t.Error("the corrupt state was not logged")
			}
			f.checkKept(t)
			st := m.Status(backoff)
			if tt.name == "entries" {
				if st.State != StateBackoff || st.Failures != 1 || !st.NextAttempt.Equal(first.NextAttempt) {
					t.Errorf("Status(%s) = %+v, want the valid entry kept: %+v", backoff, st, first)
				}
				longest := defaultBackoff.delay(len(defaultBackoff.Steps), 1)
				if st := m.Status(future); st.State != StateBackoff || time.Until(st.NextAttempt) > longest {
					t.Errorf("before first use: Status(%s) = %+v, want a wait of at most the schedule's longest (%v)", future, st, longest)
				}
				f.expectFallback(t, future)
				if st := m.Status(future); st.State != StateBackoff || time.Until(st.NextAttempt) > longest {
					t.Errorf("after a handshake: Status(%s) = %+v, want a wait of at most the schedule's longest (%v)", future, st, longest)
				}
				for _, n := range []string{"bad-type.test", "bad-next.test", "bad-count.test"} {
					if st := m.Status(n); st.State != StateNone || st.Failures != 0 {
						t.Errorf("Status(%s) = %+v, want none: the corrupt entry dropped", n, st)
					}
				}
			} else if st.State != StateNone {
				t.Errorf("Status(%s) = %+v, want none: the state was unreadable", backoff, st)
			}
			if err := m.Provision(context.Background(), fresh); err != nil {
				t.Fatalf("Provision(%s): %v", fresh, err)
			}
			f.expectIssued(t, fresh)
			recs := persisted(t, cache) // readable again
			if tt.name == "entries" {
				if _, ok := recs[backoff]; !ok {
					t.Errorf("the valid entry was not written back: %v", recs)
				}
			}
		})
	}
}

// ---------------------------------------------------------------------------
// Lifecycle

// TestFaultCloseDuringAttempt: Close while the CA holds a request of an
// attempt (its new order, or its finalization once the order exists)
// returns at once, leaves no goroutine and records no failure; an order
// sent without an answer keeps its reservation in the budget (the CA may
// have made it), one whose authorization was seen valid spends nothing;
// certificates obtained are still served.
func TestFaultCloseDuringAttempt(t *testing.T) {
	for _, held := range []pebbletest.Class{pebbletest.ClassNewOrder, pebbletest.ClassFinalize} {
		t.Run(held.String(), func(t *testing.T) {
			const (
				name  = "inflight.test"
				after = "after-close.test"
			)
			f := newFaultEnv(t, nil, false, name, after)
			m := f.start(t, f.config(nil)) // requestTimeout: the default 30 s
			f.provisionKept(t, m)
			f.Proxy.AddRule(pebbletest.Rule{Class: held, Identifier: name, Hold: true})

			requests := f.Proxy.Requests(held)
			f.expectFallback(t, name)
			waitFor(t, 5*time.Second, "the held request", func() bool { return f.Proxy.Requests(held) > requests })
			if st := m.Status(name); st.State != StateObtaining {
				t.Fatalf("Status = %+v, want obtaining", st)
			}
			closeWithin(t, m, time.Second)
			waitNoLeaks(t, 5*time.Second)
			if st := m.Status(name); st.State != StateNone || st.Failures != 0 {
				t.Errorf("Status after Close = %+v, want none: Close is no failure of the domain", st)
			}
			wantSpent := 0
			if held == pebbletest.ClassNewOrder {
				wantSpent = 1
			}
			if rec := failureOf(m, name); rec.spentSince(time.Now().Add(-budgetWindow), time.Now()) != wantSpent {
				t.Errorf("after Close the budget holds %+v, want %d authorization(s) spent", rec.Spends, wantSpent)
			}
			if rec := persisted(t, f.cache)[name]; rec.Failures != 0 || rec.spentSince(time.Now().Add(-budgetWindow), time.Now()) != wantSpent {
				t.Errorf("Close persisted %+v, want no failure and %d authorization(s) spent", rec, wantSpent)
			}
			f.checkKept(t)
			f.expectFallback(t, after)
			if n := f.Proxy.Requests(held) - requests; n != 1 {
				t.Errorf("%d %v requests, want the held one", n, held)
			}
		})
	}
}

// TestFaultRestart: a second Manager on the same cache after the first
// one closed with domains in every state: none, obtaining (its order
// held), backing off, waiting for DNS, valid.
func TestFaultRestart(t *testing.T) {
	const (
		none      = "none.test"
		obtaining = "obtaining.test"
		backoff   = "backoff.test"
		waitDNS   = "waitdns.test"
		valid     = "valid.test"
	)
	f := newFaultEnv(t, nil, true, none, obtaining, backoff, waitDNS, valid)
	cfg := func() Config {
		return f.config(func(c *Config) {
			// Validation fails at 127.0.0.3, which the pre-check accepts.
			c.DNS.KnownIPs = append(c.DNS.KnownIPs, netip.MustParseAddr("127.0.0.3"))
		})
	}
	m1 := f.start(t, cfg())
	f.provisionKept(t, m1)

	if err := m1.Provision(context.Background(), valid); err != nil {
		t.Fatal(err)
	}
	validLeaf := f.expectIssued(t, valid)
	f.DNS.SetA(backoff, "127.0.0.3")
	if err := m1.Provision(context.Background(), backoff); err == nil {
		t.Fatal("Provision succeeded; validation should fail")
	}
	backoffSt := m1.Status(backoff)
	if backoffSt.State != StateBackoff {
		t.Fatalf("Status(%s) = %+v", backoff, backoffSt)
	}
	f.DNS.SetA(waitDNS, "127.0.0.2")
	if err := m1.Provision(context.Background(), waitDNS); !errors.Is(err, ErrDNSNotReady) {
		t.Fatalf("Provision(%s) = %v", waitDNS, err)
	}
	remove := f.Proxy.AddRule(pebbletest.Rule{Class: pebbletest.ClassNewOrder, Identifier: obtaining, Hold: true})
	orders := f.Proxy.Requests(pebbletest.ClassNewOrder)
	f.expectFallback(t, obtaining)
	waitFor(t, 5*time.Second, "the held order", func() bool { return f.Proxy.Requests(pebbletest.ClassNewOrder) > orders })
	if st := m1.Status(obtaining); st.State != StateObtaining {
		t.Fatalf("Status(%s) = %+v", obtaining, st)
	}
	closeWithin(t, m1, time.Second)
	remove()
	waitDetached(t)

	m2 := f.start(t, cfg())
	for _, tt := range []struct {
		name  string
		state []State // acceptable before first use
	}{
		{none, []State{StateNone}},
		{obtaining, []State{StateNone}},
		{backoff, []State{StateBackoff}},
		{waitDNS, []State{StateNone, StateWaitingDNS}},
		{valid, []State{StateNone, StateValid}},
	} {
		st := m2.Status(tt.name)
		ok := false
		for _, s := range tt.state {
			ok = ok || st.State == s
		}
		if !ok {
			t.Errorf("after restart, before use: Status(%s) = %+v, want one of %v", tt.name, st, tt.state)
		}
		if tt.name != backoff && st.Failures != 0 {
			t.Errorf("after restart: Status(%s) = %+v, want no failure", tt.name, st)
		}
	}
	if st := m2.Status(backoff); st.Failures != 1 || !st.NextAttempt.Equal(backoffSt.NextAttempt) || st.LastError == nil {
		t.Errorf("after restart: Status(%s) = %+v, want %+v", backoff, st, backoffSt)
	}

	t.Run("backoff", func(t *testing.T) {
		before := f.Proxy.Requests(pebbletest.ClassAny)
		f.expectFallback(t, backoff)
		if err := m2.Provision(context.Background(), backoff); !errors.Is(err, ErrBackoff) {
			t.Errorf("Provision = %v, want ErrBackoff", err)
		}
		if n := f.Proxy.Requests(pebbletest.ClassAny) - before; n != 0 {
			t.Errorf("%d ACME requests in backoff", n)
		}
	})
	t.Run("valid", func(t *testing.T) {
		before := f.Proxy.Requests(pebbletest.ClassAny)
		f.checkKept(t)
		if got := f.expectIssued(t, valid); !got.Equal(validLeaf) {
			t.Errorf("%s: another certificate served after restart", valid)
		}
		if st := m2.Status(valid); st.State != StateValid || !st.NotAfter.Equal(validLeaf.NotAfter) {
			t.Errorf("Status = %+v, want valid until %v", st, validLeaf.NotAfter)
		}
		if n := f.Proxy.Requests(pebbletest.ClassAny) - before; n != 0 {
			t.Errorf("%d ACME requests to serve cached certificates", n)
		}
	})
	t.Run("waiting-dns", func(t *testing.T) {
		f.expectFallback(t, waitDNS)
		if st := m2.Status(waitDNS); st.State != StateWaitingDNS {
			t.Errorf("Status = %+v, want waiting-dns", st)
		}
		f.DNS.SetA(waitDNS, "127.0.0.1")
		m2.Retry(waitDNS)
		if err := m2.Provision(context.Background(), waitDNS); err != nil {
			t.Fatalf("Provision once DNS is right: %v", err)
		}
		f.expectIssued(t, waitDNS)
	})
	for _, n := range []string{none, obtaining} {
		t.Run(n, func(t *testing.T) {
			f.handshakeAny(t, n)
			// Provision joins the attempt the handshake started, if any.
			if err := m2.Provision(context.Background(), n); err != nil {
				t.Fatalf("Provision = %v, want the certificate", err)
			}
			f.expectIssued(t, n)
			if st := m2.Status(n); st.Failures != 0 {
				t.Errorf("Status = %+v", st)
			}
		})
	}
	for n, want := range map[string]int{none: 1, obtaining: 1, waitDNS: 1, valid: 1, keptName: 1} {
		if c := f.Proxy.Counts(n); c.Orders != want {
			t.Errorf("%s: %d orders, want %d", n, c.Orders, want)
		}
	}
}

// TestFaultClockJump: the system clock jumps back a day after a failure:
// the domain waits at most the schedule's longest wait; it jumps forward a
// day: attempts resume. Served certificates are served throughout, and a
// restart with the clock a day behind serves the cached ones.
func TestFaultClockJump(t *testing.T) {
	const (
		back = "back.test"
		fwd  = "fwd.test"
	)
	clock := &fakeClock{t: time.Now()}
	schedule := Backoff{Steps: []time.Duration{time.Minute, 10 * time.Minute}, Jitter: -1}
	longest := 10 * time.Minute
	f := newFaultEnv(t, nil, false, back, fwd)
	cfg := func(now func() time.Time) Config {
		return f.config(func(c *Config) {
			c.hooks.now = now
			c.hooks.rand = func() float64 { return 0 }
			c.Backoff = schedule
		})
	}
	m := f.start(t, cfg(clock.now))
	f.provisionKept(t, m)

	t.Run("backward", func(t *testing.T) {
		f.DNS.SetA(back, "127.0.0.3") // validation fails
		if err := m.Provision(context.Background(), back); err == nil {
			t.Fatal("Provision succeeded; validation should fail")
		}
		if st := m.Status(back); st.State != StateBackoff || !st.NextAttempt.Equal(clock.now().Add(time.Minute)) {
			t.Fatalf("Status = %+v, want backoff for a minute", st)
		}
		orders := f.Proxy.Counts(back).Orders
		clock.advance(-24 * time.Hour)
		if st := m.Status(back); st.NextAttempt.Sub(clock.now()) > longest {
			t.Errorf("after the jump back, Status.NextAttempt is %v ahead, want at most the schedule's longest wait %v",
				st.NextAttempt.Sub(clock.now()), longest)
		}
		f.checkKept(t)
		f.expectFallback(t, back)
		if err := m.Provision(context.Background(), back); !errors.Is(err, ErrBackoff) {
			t.Errorf("Provision right after the jump = %v, want ErrBackoff", err)
		}
		if st := m.Status(back); st.NextAttempt.Sub(clock.now()) > longest {
			t.Errorf("after a handshake, Status.NextAttempt is %v ahead, want at most %v", st.NextAttempt.Sub(clock.now()), longest)
		}
		if n := f.Proxy.Counts(back).Orders; n != orders {
			t.Errorf("%d orders in backoff", n-orders)
		}
		f.DNS.SetA(back, "127.0.0.1")
		clock.advance(longest)
		if err := m.Provision(context.Background(), back); err != nil {
			t.Fatalf("Provision once the longest wait passed: %v", err)
		}
		f.expectIssued(t, back)
		f.checkKept(t)
	})
	t.Run("forward", func(t *testing.T) {
		f.DNS.SetA(fwd, "127.0.0.3")
		if err := m.Provision(context.Background(), fwd); err == nil {
			t.Fatal("Provision succeeded; validation should fail")
		}
		if err := m.Provision(context.Background(), fwd); !errors.Is(err, ErrBackoff) {
			t.Errorf("Provision = %v, want ErrBackoff", err)
		}
		f.DNS.SetA(fwd, "127.0.0.1")
		clock.advance(24 * time.Hour)
		if st := m.Status(fwd); st.State != StateBackoff || !st.NextAttempt.IsZero() {
			t.Errorf("after the jump forward Status = %+v, want backoff with the next attempt due now", st)
		}
		if err := m.Provision(context.Background(), fwd); err != nil {
			t.Fatalf("Provision after the jump forward: %v", err)
		}
		f.expectIssued(t, fwd)
		f.expectIssued(t, back)
		f.checkKept(t)
	})
	t.Run("restart-behind", func(t *testing.T) {
		closeWithin(t, m, time.Second)
		orders := f.Proxy.Requests(pebbletest.ClassNewOrder)
		behind := &fakeClock{t: time.Now().Add(-24 * time.Hour)}
		f.start(t, cfg(behind.now))
		f.checkKept(t)
		f.expectIssued(t, back)
		if n := f.Proxy.Requests(pebbletest.ClassNewOrder) - orders; n != 0 {
			t.Errorf("%d orders to serve cached certificates with the clock behind", n)
		}
	})
}

// ---------------------------------------------------------------------------
// Abuse

// abuseNames is how many distinct random SNI names an abuse row sends.
const abuseNames = 100_000

// randomNames returns n distinct random names under suffix.
func randomNames(n int, suffix string) []string {
	names := make([]string, n)
	for i := range names {
		names[i] = fmt.Sprintf("r%d-%016x%s", i, rand.Uint64(), suffix)
	}
	return names
}

func heapAlloc() uint64 {
	runtime.GC()
	runtime.GC()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	return ms.HeapAlloc
}

// abuse sends every name to m.GetCertificate from a few goroutines and
// returns the slowest call; check judges each answer.
func abuse(t *testing.T, m *Manager, names []string, check func(name string, c *tls.Certificate, err error) error) time.Duration {
	t.Helper()
	var (
		next    atomic.Int64
		slowest atomic.Int64
		errMu   sync.Mutex
		errs    []error
		wg      sync.WaitGroup
	)
	for range 4 {
		wg.Go(func() {
			for {
				i := int(next.Add(1)) - 1
				if i >= len(names) {
					return
				}
				start := time.Now()
				c, err := m.GetCertificate(&tls.ClientHelloInfo{ServerName: names[i], SupportedVersions: []uint16{tls.VersionTLS13}})
				took := time.Since(start)
				for {
					old := slowest.Load()
					if int64(took) <= old || slowest.CompareAndSwap(old, int64(took)) {
						break
					}
				}
				if e := check(names[i], c, err); e != nil {
					errMu.Lock()
					errs = append(errs, e)
					errMu.Unlock()
				}
			}
		})
	}
	wg.Wait()
	if len(errs) > 0 {
		t.Errorf("%d bad answers, first: %v", len(errs), errs[0])
	}
	return time.Duration(slowest.Load())
}

// dnsQueries returns the most queries any one name got, and the total.
func dnsQueries(f *faultEnv, names []string) (most, total int) {
	for _, n := range names {
		for _, q := range []uint16{dns.TypeA, dns.TypeAAAA, dns.TypeCAA} {
			c := f.DNS.Queries(n, q)
			most = max(most, c)
			total += c
		}
	}
	return most, total
}

// TestFaultAbuseRefused: 100,000 random names the HostPolicy refuses leave
// no domain, no fallback, no DNS query and no ACME request.
func TestFaultAbuseRefused(t *testing.T) {
	f := newFaultEnv(t, nil, true)
	m := f.start(t, f.config(func(c *Config) {
		c.Autocert.HostPolicy = func(_ context.Context, name string) error {
			if name == keptName {
				return nil
			}
			return errors.New("not ours")
		}
	}))
	f.provisionKept(t, m)
	names := randomNames(abuseNames, ".abuse.test")
	requests := f.Proxy.Requests(pebbletest.ClassAny)
	heap := heapAlloc()
	start := time.Now()
	slowest := abuse(t, m, names, func(name string, c *tls.Certificate, err error) error {
		if c != nil || !errors.Is(err, ErrHostNotAllowed) {
			return fmt.Errorf("GetCertificate(%s) = %v, %v; want ErrHostNotAllowed", name, c, err)
		}
		return nil
	})
	took := time.Since(start)
	growth := int64(heapAlloc()) - int64(heap)
	if n := len(m.Domains()); n != 1 {
		t.Errorf("%d domains, want kept.test only", n)
	}
	if n := m.fallbacks.len(); n != 0 {
		t.Errorf("%d fallbacks", n)
	}
	if _, total := dnsQueries(f, names); total != 0 {
		t.Errorf("%d DNS queries for refused names", total)
	}
	if n := f.Proxy.Requests(pebbletest.ClassAny) - requests; n != 0 {
		t.Errorf("%d ACME requests", n)
	}
	if growth > 10<<20 {
		t.Errorf("heap grew by %d MB", growth>>20)
	}
	if bound := faultHSTimeout + faultHSMargin; slowest > bound {
		t.Errorf("slowest GetCertificate took %v, want at most %v", slowest, bound)
	}
	f.checkKept(t)
	t.Logf("%d refused names in %v (slowest %v); heap growth %d KB", len(names), took.Round(time.Millisecond), slowest, growth>>10)
}

// TestFaultAbuseWildcard: 100,000 random names under a wildcard the
// HostPolicy accepts, none of which resolves (NXDOMAIN), with the DNS
// pre-check on: memory, domains and fallbacks stay bounded, each name is
// asked of DNS at most once per record type, no ACME request is made, and
// every answer is a fallback in time.
func TestFaultAbuseWildcard(t *testing.T) {
	const maxDomains, maxFallbacks = 1000, 500
	f := newFaultEnv(t, nil, true)
	m := f.start(t, f.config(func(c *Config) {
		c.Autocert.HostPolicy = func(_ context.Context, name string) error {
			if name == keptName || strings.HasSuffix(name, ".abuse.test") {
				return nil
			}
			return errors.New("not ours")
		}
		c.MaxDomains = maxDomains
		c.MaxFallbacks = maxFallbacks
	}))
	f.provisionKept(t, m)
	names := randomNames(abuseNames, ".abuse.test")
	requests := f.Proxy.Requests(pebbletest.ClassAny)
	heap := heapAlloc()
	start := time.Now()
	slowest := abuse(t, m, names, func(name string, c *tls.Certificate, err error) error {
		if err != nil || !IsFallback(c) {
			return fmt.Errorf("GetCertificate(%s) = %v; want the fallback", name, err)
		}
		return nil
	})
	took := time.Since(start)
	domains := len(m.Domains())
	fallbacks := m.fallbacks.len()
	growth := int64(heapAlloc()) - int64(heap)
	if domains > maxDomains {
		t.Errorf("%d domains, MaxDomains %d", domains, maxDomains)
	}
	if fallbacks > maxFallbacks {
		t.Errorf("%d fallbacks, MaxFallbacks %d", fallbacks, maxFallbacks)
	}
	most, total := dnsQueries(f, names)
	if most > 1 || total > 2*len(names) {
		t.Errorf("DNS: %d queries for one name and type at most, %d in all; want at most 1 and %d", most, total, 2*len(names))
	}
	if total == 0 {
		t.Error("no DNS query at all: the pre-check did not run")
	}
	if n := f.Proxy.Requests(pebbletest.ClassAny) - requests; n != 0 {
		t.Errorf("%d ACME requests", n)
	}
	if growth > 10<<20 {
		t.Errorf("heap grew by %d MB", growth>>20)
	}
	if bound := faultHSTimeout + faultHSMargin; slowest > bound {
		t.Errorf("slowest GetCertificate took %v, want at most %v", slowest, bound)
	}
	f.checkKept(t)
	t.Logf("%d accepted names in %v (slowest %v); %d domains, %d fallbacks, %d DNS queries; heap growth %d KB",
		len(names), took.Round(time.Millisecond), slowest, domains, fallbacks, total, growth>>10)
}
