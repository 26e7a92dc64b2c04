package certmgr

// The fault matrix: one row per fault of the CA, the DNS, the cache, the
// Manager's lifecycle and its clients, each against the in-process Pebble,
// the harness's DNS and the fault-injecting proxy. Each row runs in an env
// of its own where "kept.test" was provisioned before the fault; then
// fault injects the fault (returning what heals it, if the row heals it)
// and want checks the outcome. Every row checks, as it applies:
//
//   - handshakes answer within HandshakeTimeout plus a small margin
//     (envOptions.hsBound);
//   - failed authorizations stay within the budget (at most 4 an hour; the
//     env checks it);
//   - no goroutine is left behind after Close (the env checks it);
//   - no certificate that was in the cache is lost or replaced by a
//     fallback: kept.test must keep being served, verified against
//     Pebble's root (checkKept).

import (
	"context"
	"crypto/tls"
	"encoding/pem"
	"errors"
	"flag"
	"fmt"
	"math/rand/v2"
	"net"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/miekg/dns"
	"golang.org/x/crypto/acme"
	"golang.org/x/crypto/acme/autocert"

	"github.com/certmgr/certmgr/certmgrtest"
	"github.com/certmgr/certmgr/internal/testsupport"
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
)

// faultCase is one row of the fault matrix.
type faultCase struct {
	name string
	// env is the row's env: its names besides kept.test, the DNS
	// pre-check, its Cache, and what every Manager's Config has.
	env envOptions
	// fault injects the fault into e, whose current Manager served
	// kept.test before it, and returns what heals the fault, or nil. A
	// row without one (the abuse rows) has want send the faulty traffic.
	fault func(t *testing.T, e *env) (heal func())
	// want checks what the fault does to m, e's current Manager, and
	// what healing it does.
	want func(t *testing.T, e *env, m *Manager, heal func())
}

func TestFaultMatrix(t *testing.T) {
	for _, tc := range faultCases() {
		t.Run(tc.name, func(t *testing.T) {
			if !strings.HasPrefix(tc.name, "abuse-") {
				t.Parallel() // the abuse rows measure the heap: they run alone
			}
			o := tc.env
			o.names = append([]string{keptName}, o.names...)
			o.hsBound = faultHSTimeout + faultHSMargin
			rowConfig := o.config
			o.config = func(c *Config) {
				c.HandshakeTimeout = faultHSTimeout
				if rowConfig != nil {
					rowConfig(c)
				}
			}
			e := newEnv(t, o)
			e.provisionKept(t, e.start(t, nil))
			var heal func()
			if tc.fault != nil {
				heal = tc.fault(t, e)
			}
			if heal == nil {
				heal = func() { t.Fatal("the row's fault has no heal") }
			}
			tc.want(t, e, e.cur.Load(), heal)
		})
	}
}

// provisionKept provisions kept.test with m, before any fault.
func (e *env) provisionKept(t *testing.T, m *Manager) {
	t.Helper()
	if err := m.Provision(context.Background(), keptName); err != nil {
		t.Fatalf("Provision(%s) before the fault: %v", keptName, err)
	}
	e.kept = e.expectIssued(t, keptName)
}

// checkKept wants kept.test still served with the certificate Pebble
// issued before the fault.
func (e *env) checkKept(t *testing.T) {
	t.Helper()
	if e.kept == nil {
		t.Fatal("kept.test was never provisioned")
	}
	if leaf := e.expectIssued(t, keptName); !leaf.Equal(e.kept) {
		t.Errorf("%s: served serial %v, want the one provisioned before the fault (%v)", keptName, leaf.SerialNumber, e.kept.SerialNumber)
	}
}

// addRule is a fault: the proxy applies r, until healed.
func addRule(r certmgrtest.Rule) func(t *testing.T, e *env) func() {
	return func(t *testing.T, e *env) func() {
		waitDetached(t) // kept.test's clean-up requests are done
		return e.Proxy.AddRule(r)
	}
}

// restartOnCache closes e's current Manager and starts another on the same
// cache with mod.
func restartOnCache(t *testing.T, e *env, mod func(*Config)) *Manager {
	t.Helper()
	closeWithin(t, e.cur.Load(), time.Second)
	waitDetached(t)
	return e.start(t, mod)
}

func faultCases() []faultCase {
	const badNonce = "urn:ietf:params:acme:error:badNonce"
	return []faultCase{
		// -----------------------------------------------------------------
		// The CA

		{
			// The CA refuses connections. kept.test, in the cache, is still
			// served by a Manager that cannot reach the CA; a new domain
			// gets the fallback, its attempt fails at once and is recorded,
			// and the next handshake makes no attempt.
			name: "ca-unreachable",
			env:  envOptions{names: []string{"down.test"}},
			fault: func(t *testing.T, e *env) func() {
				ln, err := net.Listen("tcp", "127.0.0.1:0")
				if err != nil {
					t.Fatal(err)
				}
				dir := "https://" + ln.Addr().String() + "/dir"
				ln.Close() // nothing listens there now: connections are refused
				restartOnCache(t, e, func(c *Config) { c.Autocert.Client = &acme.Client{DirectoryURL: dir} })
				return nil
			},
			want: func(t *testing.T, e *env, m *Manager, _ func()) {
				const name = "down.test"
				before := e.Proxy.Requests(certmgrtest.ClassAny)
				e.checkKept(t)
				start := time.Now()
				e.expectFallback(t, name)
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
				e.expectFallback(t, name)
				if err := m.Provision(context.Background(), name); !errors.Is(err, ErrBackoff) {
					t.Errorf("Provision in backoff = %v, want ErrBackoff", err)
				}
				if st := m.Status(name); st.Failures != 1 {
					t.Errorf("a handshake in backoff made another attempt: %+v", st)
				}
				e.checkKept(t)
				if n := e.Proxy.Requests(certmgrtest.ClassAny) - before; n != 0 {
					t.Errorf("%d requests reached Pebble", n)
				}
				if rec := failureOf(m, name); len(rec.Spends) != 0 {
					t.Errorf("an unreachable CA spent budget: %+v", rec.Spends)
				}
				closeWithin(t, m, time.Second)
			},
		},
		{
			// The CA accepts connections and never answers. Each ACME
			// request is cut at requestTimeout, so the attempt fails and is
			// recorded; Close during a held request returns well before
			// that timeout and the attempt it cut is not a failure of the
			// domain.
			name: "ca-hangs",
			env: envOptions{names: []string{"hang.test", "hang-close.test"},
				config: func(c *Config) { c.hooks.requestTimeout = time.Second }},
			fault: func(t *testing.T, e *env) func() {
				t.Cleanup(addRule(certmgrtest.Rule{Hold: true})(t, e))
				return nil
			},
			want: func(t *testing.T, e *env, m *Manager, _ func()) {
				const (
					name       = "hang.test"
					closedName = "hang-close.test"
					reqTimeout = time.Second
				)
				before := e.Proxy.Requests(certmgrtest.ClassAny)
				start := time.Now()
				e.expectFallback(t, name)
				st := waitFailed(t, m, name, 1)
				took := time.Since(start)
				if took < reqTimeout-50*time.Millisecond || took > reqTimeout+3*time.Second {
					t.Errorf("the attempt failed after %v, want about the request timeout %v", took, reqTimeout)
				}
				if st.State != StateBackoff || st.LastError == nil || !strings.Contains(st.LastError.Error(), "deadline exceeded") {
					t.Errorf("Status = %+v, want backoff after a request that timed out", st)
				}
				if n := e.Proxy.Requests(certmgrtest.ClassAny) - before; n < 1 {
					t.Errorf("no request reached the proxy")
				}
				e.expectFallback(t, name)
				e.checkKept(t)
				if rec := failureOf(m, name); len(rec.Spends) != 0 {
					t.Errorf("a silent CA spent budget: %+v", rec.Spends)
				}

				// Close while a request is held.
				held := e.Proxy.Requests(certmgrtest.ClassAny)
				e.expectFallback(t, closedName)
				waitFor(t, 5*time.Second, "a held request", func() bool { return e.Proxy.Requests(certmgrtest.ClassAny) > held })
				if st := m.Status(closedName); st.State != StateObtaining {
					t.Fatalf("Status(%s) = %+v, want obtaining", closedName, st)
				}
				closeWithin(t, m, reqTimeout/2)
				waitNoLeaks(t, 5*time.Second)
				if st := m.Status(closedName); st.Failures != 0 || st.State != StateNone {
					t.Errorf("Status(%s) after Close = %+v, want none: Close is no failure of the domain", closedName, st)
				}
				if rec, ok := persisted(t, e.cache)[closedName]; ok && !rec.empty(time.Now()) {
					t.Errorf("Close persisted a failure for %s: %+v", closedName, rec)
				}
				e.checkKept(t) // served after Close
			},
		},
		// The CA answers 500, or 503, to every request; 503 with
		// Retry-After to every request; 503 with Retry-After to new-order
		// only. Each attempt fails after a few bounded retries, spends
		// nothing, and a Retry-After sets the next attempt.
		{
			name:  "ca-500-every-request",
			env:   envOptions{names: []string{"fivexx.test"}},
			fault: addRule(certmgrtest.Rule{Status: http.StatusInternalServerError}),
			want:  wantServerError(http.StatusInternalServerError, 0),
		},
		{
			name:  "ca-503-every-request",
			env:   envOptions{names: []string{"fivexx.test"}},
			fault: addRule(certmgrtest.Rule{Status: http.StatusServiceUnavailable}),
			want:  wantServerError(http.StatusServiceUnavailable, 0),
		},
		{
			name:  "ca-503-retry-after-every-request",
			env:   envOptions{names: []string{"fivexx.test"}},
			fault: addRule(certmgrtest.Rule{Status: http.StatusServiceUnavailable, RetryAfter: "120"}),
			want:  wantServerError(http.StatusServiceUnavailable, 120*time.Second),
		},
		{
			name:  "ca-503-retry-after-new-order",
			env:   envOptions{names: []string{"fivexx.test"}},
			fault: addRule(certmgrtest.Rule{Class: certmgrtest.ClassNewOrder, Status: http.StatusServiceUnavailable, RetryAfter: "120"}),
			want:  wantServerError(http.StatusServiceUnavailable, 120*time.Second),
		},
		{
			// New-order answers 429 rateLimited with Retry-After 3600: one
			// request, no retry, and no attempt for an hour, whatever the
			// operator's Retry.
			name: "ca-rate-limited",
			env:  envOptions{names: []string{"limited-fault.test"}},
			fault: addRule(certmgrtest.Rule{Class: certmgrtest.ClassNewOrder, Identifier: "limited-fault.test", Status: http.StatusTooManyRequests,
				RetryAfter: "3600", Detail: "too many new orders recently"}),
			want: func(t *testing.T, e *env, m *Manager, _ func()) {
				const name = "limited-fault.test"
				e.expectFallback(t, name)
				st := waitFailed(t, m, name, 1)
				if ahead := time.Until(st.NextAttempt); ahead < 3599*time.Second {
					t.Errorf("NextAttempt %v ahead, want at least the CA's Retry-After of 3600 s", ahead)
				}
				if st.State != StateBackoff || st.LastError == nil || !strings.Contains(st.LastError.Error(), "too many new orders recently") {
					t.Errorf("Status = %+v, want backoff with the CA's detail", st)
				}
				e.expectFallback(t, name)
				if err := m.Provision(context.Background(), name); !errors.Is(err, ErrBackoff) {
					t.Errorf("Provision = %v, want ErrBackoff", err)
				}
				m.Retry(name) // the operator cannot override the CA's Retry-After
				if err := m.Provision(context.Background(), name); !errors.Is(err, ErrBackoff) {
					t.Errorf("Provision after Retry = %v, want ErrBackoff", err)
				}
				if n := e.Proxy.Requests(certmgrtest.ClassNewOrder); n != 2 { // kept.test's and the 429
					t.Errorf("%d new-order requests, want 2", n)
				}
				if c := e.Proxy.Counts(name); c.FailedAuthzs != 0 || c.Orders != 0 {
					t.Errorf("proxy counted %+v", c)
				}
				e.checkKept(t)
			},
		},
		{
			// New-order answers badNonce. Three in a row are retried and
			// the attempt succeeds; an endless storm fails the attempt
			// after a bounded number of retries without spending the
			// budget.
			name: "ca-bad-nonce",
			env:  envOptions{names: []string{"nonce.test", "nonce-storm.test"}},
			fault: func(t *testing.T, e *env) func() {
				e.Proxy.AddRule(certmgrtest.Rule{Class: certmgrtest.ClassNewOrder, Identifier: "nonce.test", Status: http.StatusBadRequest,
					ProblemType: badNonce, Detail: "JWS has an invalid anti-replay nonce", Times: 3})
				e.Proxy.AddRule(certmgrtest.Rule{Class: certmgrtest.ClassNewOrder, Identifier: "nonce-storm.test", Status: http.StatusBadRequest,
					ProblemType: badNonce, Detail: "JWS has an invalid anti-replay nonce"})
				return nil
			},
			want: func(t *testing.T, e *env, m *Manager, _ func()) {
				const (
					name  = "nonce.test"
					storm = "nonce-storm.test"
				)
				t.Run("three", func(t *testing.T) {
					start := time.Now()
					e.handshakeAny(t, name)
					if st := waitOutcome(t, m, name); st.State != StateValid || st.Failures != 0 {
						t.Fatalf("Status = %+v, want valid: three badNonce answers are retried", st)
					}
					t.Logf("valid %v after the handshake", time.Since(start).Round(time.Millisecond))
					e.expectIssued(t, name)
					if c := e.Proxy.Counts(name); c.Orders != 1 || c.FailedAuthzs != 0 {
						t.Errorf("proxy counted %+v, want 1 order", c)
					}
				})
				t.Run("storm", func(t *testing.T) {
					before := e.Proxy.Requests(certmgrtest.ClassNewOrder)
					e.expectFallback(t, storm)
					st := waitFailed(t, m, storm, 1)
					if st.State != StateBackoff {
						t.Errorf("Status = %+v, want backoff", st)
					}
					if n := e.Proxy.Requests(certmgrtest.ClassNewOrder) - before; n < 2 || n > 8 {
						t.Errorf("%d new-order requests, want a few bounded retries", n)
					}
					rec := failureOf(m, storm)
					if len(rec.Spends) != 0 || !rec.budgetFree(time.Now(), 1, envBudget).Before(time.Now().Add(time.Second)) {
						t.Errorf("the storm spent budget: %+v", rec)
					}
					if c := e.Proxy.Counts(storm); c.Orders != 0 || c.FailedAuthzs != 0 {
						t.Errorf("proxy counted %+v", c)
					}
					e.expectFallback(t, storm)
				})
				e.checkKept(t)
			},
		},
		{
			// The directory is not JSON. A Manager started during the fault
			// still serves kept.test from the cache; a new domain's attempt
			// fails before any order, and succeeds once the directory is
			// right again.
			name: "ca-malformed-directory",
			env:  envOptions{names: []string{"baddir.test"}},
			fault: func(t *testing.T, e *env) func() {
				closeWithin(t, e.cur.Load(), time.Second)
				waitDetached(t)
				remove := e.Proxy.AddRule(certmgrtest.Rule{Class: certmgrtest.ClassDirectory, Status: http.StatusOK, Body: "{not json"})
				e.start(t, nil) // a new client: the directory is read again
				return remove
			},
			want: func(t *testing.T, e *env, m *Manager, heal func()) {
				const name = "baddir.test"
				orders := e.Proxy.Requests(certmgrtest.ClassNewOrder)
				dirs := e.Proxy.Requests(certmgrtest.ClassDirectory)
				e.checkKept(t)
				e.expectFallback(t, name)
				st := waitFailed(t, m, name, 1)
				if st.State != StateBackoff || st.LastError == nil {
					t.Errorf("Status = %+v, want backoff", st)
				}
				if n := e.Proxy.Requests(certmgrtest.ClassNewOrder) - orders; n != 0 {
					t.Errorf("%d new-order requests without a directory", n)
				}
				if rec := failureOf(m, name); len(rec.Spends) != 0 {
					t.Errorf("a malformed directory spent budget: %+v", rec.Spends)
				}
				if n := e.Proxy.Requests(certmgrtest.ClassDirectory) - dirs; n < 1 || n > 4 {
					t.Errorf("%d directory requests, want 1 to 4", n)
				}
				e.expectFallback(t, name)

				heal()
				m.Retry(name)
				if err := m.Provision(context.Background(), name); err != nil {
					t.Fatalf("Provision once the directory is right: %v", err)
				}
				e.expectIssued(t, name)
				e.checkKept(t)
			},
		},

		// -----------------------------------------------------------------
		// DNS: with the pre-check on, SERVFAIL, NXDOMAIN, a silent server
		// and a CNAME loop stop the attempt before any order, serve the
		// fallback in time and are not asked again before the recheck; a
		// truncated UDP answer is asked again over TCP and the certificate
		// is obtained.

		{
			name: "dns-servfail",
			env:  envOptions{names: []string{"servfail-fault.test"}, dnsCheck: true},
			fault: func(t *testing.T, e *env) func() {
				e.DNS.SetRcode("servfail-fault.test", dns.RcodeServerFailure)
				return nil
			},
			want: wantDNSNotReady("servfail-fault.test", "SERVFAIL"),
		},
		{
			name: "dns-nxdomain",
			env:  envOptions{names: []string{"nx-fault.test"}, dnsCheck: true},
			fault: func(t *testing.T, e *env) func() {
				e.DNS.SetRcode("nx-fault.test", dns.RcodeNameError)
				return nil
			},
			want: wantDNSNotReady("nx-fault.test", "NXDOMAIN"),
		},
		{
			name: "dns-silent",
			env:  envOptions{names: []string{"silent-fault.test"}, dnsCheck: true},
			fault: func(t *testing.T, e *env) func() {
				e.DNS.SetSilent("silent-fault.test", true)
				return nil
			},
			want: wantDNSNotReady("silent-fault.test", "timed out"),
		},
		{
			name: "dns-cname-loop",
			env:  envOptions{names: []string{"loop-fault.test", "loop-b-fault.test"}, dnsCheck: true},
			fault: func(t *testing.T, e *env) func() {
				e.DNS.Remove("loop-fault.test")
				e.DNS.Remove("loop-b-fault.test")
				e.DNS.SetCNAME("loop-fault.test", "loop-b-fault.test")
				e.DNS.SetCNAME("loop-b-fault.test", "loop-fault.test")
				return nil
			},
			want: wantDNSNotReady("loop-fault.test", "CNAME loop"),
		},
		{
			name: "dns-truncated",
			env:  envOptions{names: []string{"trunc-fault.test"}, dnsCheck: true},
			fault: func(t *testing.T, e *env) func() {
				e.DNS.SetTruncate("trunc-fault.test", true)
				return nil
			},
			want: func(t *testing.T, e *env, m *Manager, _ func()) {
				const trunc = "trunc-fault.test"
				if err := m.Provision(context.Background(), trunc); err != nil {
					t.Fatalf("Provision = %v, want the certificate (the pre-check must ask again over TCP)", err)
				}
				e.expectIssued(t, trunc)
				if n := e.DNS.Queries(trunc, dns.TypeA); n < 2 {
					t.Errorf("%d A queries, want the truncated UDP one and the TCP one", n)
				}
				if c := e.Proxy.Counts(trunc); c.Orders != 1 || c.FailedAuthzs != 0 {
					t.Errorf("proxy counted %+v, want 1 order", c)
				}
				e.checkKept(t)
			},
		},

		// -----------------------------------------------------------------
		// The cache

		{
			// The cache directory is read-only. A certificate obtained
			// meanwhile is served from memory, and written once the
			// directory is writable again; a restart then serves it.
			name: "cache-write-fails",
			env: envOptions{names: []string{"readonly.test"}, cache: newFaultCache,
				config: func(c *Config) { c.hooks.cacheRetry = 50 * time.Millisecond }},
			fault: func(t *testing.T, e *env) func() {
				fc := e.cache.(*faultCache)
				fc.failPut.Store(true)
				return func() { fc.failPut.Store(false) }
			},
			want: func(t *testing.T, e *env, m *Manager, heal func()) {
				const name = "readonly.test"
				fc := e.cache.(*faultCache)
				e.checkKept(t)
				e.handshakeAny(t, name)
				if st := waitOutcome(t, m, name); st.State != StateValid {
					t.Fatalf("Status = %+v, want valid: a failed write does not fail the attempt", st)
				}
				leaf := e.expectIssued(t, name) // from memory
				if _, err := fc.inner.Get(context.Background(), name); !errors.Is(err, autocert.ErrCacheMiss) {
					t.Fatalf("inner cache holds %s while writes fail: %v", name, err)
				}
				if !strings.Contains(e.logs.String(), "cache error") {
					t.Error("the failed write was not logged")
				}
				waitFor(t, 5*time.Second, "the write to be retried", func() bool { return fc.putErrs.Load() >= 3 })

				heal()
				waitFor(t, 5*time.Second, "the certificate written to the cache", func() bool {
					data, err := fc.inner.Get(context.Background(), name)
					if err != nil {
						return false
					}
					c, err := parseCert(certKey{domain: name}, data, time.Now())
					return err == nil && c.Leaf.Equal(leaf)
				})
				e.expectIssued(t, name)
				e.checkKept(t)

				// Nothing obtained is lost: a restart serves it from the cache.
				closeWithin(t, m, time.Second)
				orders := e.Proxy.Counts(name).Orders
				e.start(t, func(c *Config) { c.hooks.cacheRetry = 0 }) // the default
				if got := e.expectIssued(t, name); !got.Equal(leaf) {
					t.Errorf("after restart %s has serial %v, want %v", name, got.SerialNumber, leaf.SerialNumber)
				}
				e.checkKept(t)
				if n := e.Proxy.Counts(name).Orders; n != orders {
					t.Errorf("%d orders after restart, want %d", n, orders)
				}
			},
		},
		{
			// Reads and writes fail. kept.test, in memory, is still served;
			// a new domain gets the fallback in time, no order and no
			// failure. An unreadable cache is certmgr's own failure, not the
			// CA's: it must not move the domain's schedule, so the domain is
			// obtained as soon as the cache works again, without the
			// operator's Retry.
			name: "cache-read-fails",
			env: envOptions{names: []string{"unreadable.test"}, cache: newFaultCache,
				config: func(c *Config) { c.hooks.cacheRetry = 50 * time.Millisecond }},
			fault: func(t *testing.T, e *env) func() {
				fc := e.cache.(*faultCache)
				fc.failGet.Store(true)
				fc.failPut.Store(true)
				return func() {
					fc.failGet.Store(false)
					fc.failPut.Store(false)
				}
			},
			want: func(t *testing.T, e *env, m *Manager, heal func()) {
				const name = "unreadable.test"
				fc := e.cache.(*faultCache)
				e.checkKept(t)
				// While the cache cannot be read, a valid certificate may be
				// in it: certmgr orders none (a duplicate would spend the
				// CA's limits) and records no failure.
				leaf := e.handshakeAny(t, name)
				e.handshakeAny(t, name)
				st := m.Status(name)
				if st.State != StateNone || st.Failures != 0 {
					t.Errorf("Status with the cache unreadable = %+v, want none and no failure", st)
				}
				if n := e.Proxy.Counts(name).Orders; n != 0 {
					t.Errorf("%d orders while the cache was unreadable", n)
				}
				if !strings.Contains(e.logs.String(), "cache error") {
					t.Error("the cache errors were not logged")
				}
				t.Logf("with the cache unreadable: first handshake got %q; Status %+v", leaf.Subject, st)

				heal()
				if err := m.Provision(context.Background(), name); err != nil {
					t.Errorf("Provision once the cache works, without Retry: %v; want the certificate: an unreadable cache is no failure at the CA and must not move the schedule", err)
					m.Retry(name)
					if err := m.Provision(context.Background(), name); err != nil {
						t.Fatalf("Provision after Retry: %v", err)
					}
				}
				got := e.expectIssued(t, name)
				waitFor(t, 5*time.Second, "the certificate written to the cache", func() bool {
					data, err := fc.inner.Get(context.Background(), name)
					if err != nil {
						return false
					}
					c, err := parseCert(certKey{domain: name}, data, time.Now())
					return err == nil && c.Leaf.Equal(got)
				})
				e.checkKept(t)
			},
		},
		{
			// The DirCache's parent is a regular file, so that every read
			// and write fails (ENOTDIR). A Manager started meanwhile answers
			// every handshake in time without a crash; once the directory is
			// back, kept.test is served from it, not replaced by a new
			// order.
			name: "cache-dir-under-file",
			env: envOptions{names: []string{"nodir.test"}, cache: func(dir string) autocert.Cache {
				return autocert.DirCache(filepath.Join(dir, "parent", "certs"))
			}},
			fault: func(t *testing.T, e *env) func() {
				closeWithin(t, e.cur.Load(), time.Second)
				waitDetached(t)
				parent := filepath.Dir(string(e.cache.(autocert.DirCache)))
				if err := os.Rename(parent, parent+".saved"); err != nil {
					t.Fatal(err)
				}
				if err := os.WriteFile(parent, []byte("a file, not a directory\n"), 0o600); err != nil {
					t.Fatal(err)
				}
				e.start(t, func(c *Config) { c.hooks.cacheRetry = 50 * time.Millisecond })
				return func() {
					if err := os.Remove(parent); err != nil {
						t.Fatal(err)
					}
					if err := os.Rename(parent+".saved", parent); err != nil {
						t.Fatal(err)
					}
				}
			},
			want: func(t *testing.T, e *env, m *Manager, heal func()) {
				const name = "nodir.test"
				e.handshakeAny(t, keptName) // unreadable: the fallback at worst, in time
				e.expectFallback(t, name)
				waitFor(t, 15*time.Second, "the attempts' outcome", func() bool {
					return m.Status(name).State != StateObtaining && m.Status(keptName).State != StateObtaining
				})
				e.handshakeAny(t, keptName)
				e.handshakeAny(t, name)
				if n := e.Proxy.Counts(keptName).Orders; n != 1 {
					t.Errorf("%d orders for %s while its cache entry was unreadable, want 1: it was replaced", n, keptName)
				}
				if !strings.Contains(e.logs.String(), "cache error") {
					t.Error("the cache errors were not logged")
				}

				heal()
				m.Retry(name)
				e.checkKept(t) // without the operator's Retry
				if err := m.Provision(context.Background(), name); err != nil {
					t.Fatalf("Provision once the directory is back: %v", err)
				}
				e.expectIssued(t, name)
				if n := e.Proxy.Counts(keptName).Orders; n != 1 {
					t.Errorf("%d orders for %s, want 1", n, keptName)
				}
			},
		},
		{
			// Certificate entries hold garbage (kept.test's), a private key
			// block that is no key, or a chain cut short as by a torn write.
			// The handshake answers in time without a crash, the attempt
			// replaces the entry with a valid certificate, and the others
			// are untouched.
			name: "cache-corrupt-cert",
			env:  envOptions{names: []string{"anchor.test", "badkey.test", "badchain.test"}},
			fault: func(t *testing.T, e *env) func() {
				m1 := e.cur.Load()
				for _, n := range []string{"anchor.test", "badkey.test", "badchain.test"} {
					if err := m1.Provision(context.Background(), n); err != nil {
						t.Fatal(err)
					}
				}
				e.expectIssued(t, "anchor.test")
				closeWithin(t, m1, time.Second)
				waitDetached(t)

				ctx := context.Background()
				garbage := make([]byte, 512)
				for i := range garbage {
					garbage[i] = byte(rand.Uint32())
				}
				corrupt := map[string][]byte{keptName: garbage}
				// A private key block whose content is not a key, then the chain.
				data, err := e.cache.Get(ctx, "badkey.test")
				if err != nil {
					t.Fatal(err)
				}
				_, chain := pem.Decode(data)
				corrupt["badkey.test"] = append(pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: garbage[:121]}), chain...)
				// A chain cut short, as by a torn write.
				data, err = e.cache.Get(ctx, "badchain.test")
				if err != nil {
					t.Fatal(err)
				}
				corrupt["badchain.test"] = data[:len(data)*2/3]
				for k, v := range corrupt {
					if err := e.cache.Put(ctx, k, v); err != nil {
						t.Fatal(err)
					}
				}
				e.start(t, nil)
				return nil
			},
			want: func(t *testing.T, e *env, m *Manager, _ func()) {
				const anchor = "anchor.test"
				anchorLeaf := e.started[0].servedCert(certKey{domain: anchor}).Leaf
				if got := e.expectIssued(t, anchor); !got.Equal(anchorLeaf) {
					t.Errorf("%s: another certificate was served", anchor)
				}
				for _, n := range []string{keptName, "badkey.test", "badchain.test"} {
					t.Run(n, func(t *testing.T) {
						e.handshakeAny(t, n)
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
						leaf := e.expectIssued(t, n)
						data, err := e.cache.Get(context.Background(), n)
						if err != nil {
							t.Fatal(err)
						}
						if c, err := parseCert(certKey{domain: n}, data, time.Now()); err != nil || !c.Leaf.Equal(leaf) {
							t.Errorf("the cache entry was not replaced by the certificate served: %v", err)
						}
					})
				}
			},
		},
		// The persisted failure cache is corrupt, as a whole or entry by
		// entry. New still works and logs it; valid entries are kept; a
		// persisted wait beyond the schedule's longest is cut to it;
		// domains are obtained; the next write is readable.
		{
			name:  "cache-state-garbage",
			env:   envOptions{names: corruptStateNames},
			fault: corruptState(func([]byte) []byte { return []byte("{not json") }),
			want:  wantCorruptState(false),
		},
		{
			name:  "cache-state-unknown-version",
			env:   envOptions{names: corruptStateNames},
			fault: corruptState(func([]byte) []byte { return []byte(`{"version":99,"domains":{}}`) }),
			want:  wantCorruptState(false),
		},
		{
			name: "cache-state-corrupt-entries",
			env:  envOptions{names: corruptStateNames},
			fault: corruptState(func(good []byte) []byte {
				bad := `"domains":{` +
					`"bad-type.test":{"failures":"x"},` +
					`"bad-next.test":{"failures":2},` +
					`"bad-count.test":{"failures":-1,"next_attempt":"2030-01-01T00:00:00Z"},` +
					`"Bad..Name":{"failures":1,"next_attempt":"2030-01-01T00:00:00Z"},` +
					`"future-state.test":{"failures":1,"last_error":"from a clock far ahead","next_attempt":"9999-01-01T00:00:00Z","last_failure":"9999-01-01T00:00:00Z"},`
				return []byte(strings.Replace(string(good), `"domains":{`, bad, 1))
			}),
			want: wantCorruptState(true),
		},

		// -----------------------------------------------------------------
		// Lifecycle

		// Close while the CA holds a request of an attempt (its new order,
		// or its finalization once the order exists) returns at once,
		// leaves no goroutine and records no failure; an order sent without
		// an answer keeps its reservation in the budget (the CA may have
		// made it), one whose authorization was seen valid spends nothing;
		// certificates obtained are still served. requestTimeout is the
		// default 30 s.
		{
			name:  "close-during-new-order",
			env:   envOptions{names: []string{"inflight.test", "after-close.test"}},
			fault: addRule(certmgrtest.Rule{Class: certmgrtest.ClassNewOrder, Identifier: "inflight.test", Hold: true}),
			want:  wantCloseCutsAttempt(certmgrtest.ClassNewOrder),
		},
		{
			name:  "close-during-finalize",
			env:   envOptions{names: []string{"inflight.test", "after-close.test"}},
			fault: addRule(certmgrtest.Rule{Class: certmgrtest.ClassFinalize, Identifier: "inflight.test", Hold: true}),
			want:  wantCloseCutsAttempt(certmgrtest.ClassFinalize),
		},
		{
			// A second Manager on the same cache after the first one closed
			// with domains in every state: none, obtaining (its order held),
			// backing off, waiting for DNS, valid.
			name: "restart-in-every-state",
			env: envOptions{names: []string{"none.test", "obtaining.test", "backoff.test", "waitdns.test", "valid.test"}, dnsCheck: true,
				config: func(c *Config) {
					// Validation fails at 127.0.0.3, which the pre-check accepts.
					c.DNS.KnownIPs = append(c.DNS.KnownIPs, netip.MustParseAddr("127.0.0.3"))
				}},
			fault: func(t *testing.T, e *env) func() {
				m1 := e.cur.Load()
				if err := m1.Provision(context.Background(), "valid.test"); err != nil {
					t.Fatal(err)
				}
				e.expectIssued(t, "valid.test")
				e.DNS.SetA("backoff.test", "127.0.0.3")
				if err := m1.Provision(context.Background(), "backoff.test"); err == nil {
					t.Fatal("Provision succeeded; validation should fail")
				}
				if st := m1.Status("backoff.test"); st.State != StateBackoff {
					t.Fatalf("Status(backoff.test) = %+v", st)
				}
				e.DNS.SetA("waitdns.test", "127.0.0.2")
				if err := m1.Provision(context.Background(), "waitdns.test"); !errors.Is(err, ErrDNSNotReady) {
					t.Fatalf("Provision(waitdns.test) = %v", err)
				}
				remove := e.Proxy.AddRule(certmgrtest.Rule{Class: certmgrtest.ClassNewOrder, Identifier: "obtaining.test", Hold: true})
				orders := e.Proxy.Requests(certmgrtest.ClassNewOrder)
				e.expectFallback(t, "obtaining.test")
				waitFor(t, 5*time.Second, "the held order", func() bool { return e.Proxy.Requests(certmgrtest.ClassNewOrder) > orders })
				if st := m1.Status("obtaining.test"); st.State != StateObtaining {
					t.Fatalf("Status(obtaining.test) = %+v", st)
				}
				closeWithin(t, m1, time.Second)
				remove()
				waitDetached(t)
				e.start(t, nil)
				return nil
			},
			want: func(t *testing.T, e *env, m2 *Manager, _ func()) {
				const (
					none      = "none.test"
					obtaining = "obtaining.test"
					backoff   = "backoff.test"
					waitDNS   = "waitdns.test"
					valid     = "valid.test"
				)
				m1 := e.started[0]
				backoffSt := m1.Status(backoff) // Status writes nothing, before and after Close
				validLeaf := m1.servedCert(certKey{domain: valid}).Leaf
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
					before := e.Proxy.Requests(certmgrtest.ClassAny)
					e.expectFallback(t, backoff)
					if err := m2.Provision(context.Background(), backoff); !errors.Is(err, ErrBackoff) {
						t.Errorf("Provision = %v, want ErrBackoff", err)
					}
					if n := e.Proxy.Requests(certmgrtest.ClassAny) - before; n != 0 {
						t.Errorf("%d ACME requests in backoff", n)
					}
				})
				t.Run("valid", func(t *testing.T) {
					before := acmeFlowRequests(e.Proxy)
					e.checkKept(t)
					if got := e.expectIssued(t, valid); !got.Equal(validLeaf) {
						t.Errorf("%s: another certificate served after restart", valid)
					}
					if st := m2.Status(valid); st.State != StateValid || !st.NotAfter.Equal(validLeaf.NotAfter) {
						t.Errorf("Status = %+v, want valid until %v", st, validLeaf.NotAfter)
					}
					if n := acmeFlowRequests(e.Proxy) - before; n != 0 {
						t.Errorf("%d ACME requests to serve cached certificates", n)
					}
				})
				t.Run("waiting-dns", func(t *testing.T) {
					e.expectFallback(t, waitDNS)
					if st := m2.Status(waitDNS); st.State != StateWaitingDNS {
						t.Errorf("Status = %+v, want waiting-dns", st)
					}
					e.DNS.SetA(waitDNS, "127.0.0.1")
					m2.Retry(waitDNS)
					if err := m2.Provision(context.Background(), waitDNS); err != nil {
						t.Fatalf("Provision once DNS is right: %v", err)
					}
					e.expectIssued(t, waitDNS)
				})
				for _, n := range []string{none, obtaining} {
					t.Run(n, func(t *testing.T) {
						e.handshakeAny(t, n)
						// Provision joins the attempt the handshake started, if any.
						if err := m2.Provision(context.Background(), n); err != nil {
							t.Fatalf("Provision = %v, want the certificate", err)
						}
						e.expectIssued(t, n)
						if st := m2.Status(n); st.Failures != 0 {
							t.Errorf("Status = %+v", st)
						}
					})
				}
				for n, want := range map[string]int{none: 1, obtaining: 1, waitDNS: 1, valid: 1, keptName: 1} {
					if c := e.Proxy.Counts(n); c.Orders != want {
						t.Errorf("%s: %d orders, want %d", n, c.Orders, want)
					}
				}
			},
		},

		// -----------------------------------------------------------------
		// The clock: the Managers run on e.clock, with a schedule of 1 then
		// 10 minutes and no jitter. Served certificates are served
		// throughout.

		{
			// The clock jumps back a day after a failure: the domain waits
			// at most the schedule's longest wait.
			name: "clock-jumps-back",
			env:  envOptions{names: []string{"back.test"}, clock: true, config: clockJumpConfig},
			fault: func(t *testing.T, e *env) func() {
				m := e.cur.Load()
				e.DNS.SetA("back.test", "127.0.0.3") // validation fails
				if err := m.Provision(context.Background(), "back.test"); err == nil {
					t.Fatal("Provision succeeded; validation should fail")
				}
				if st := m.Status("back.test"); st.State != StateBackoff || !st.NextAttempt.Equal(e.clock.Now().Add(time.Minute)) {
					t.Fatalf("Status = %+v, want backoff for a minute", st)
				}
				e.clock.Advance(-24 * time.Hour)
				return func() { e.DNS.SetA("back.test", "127.0.0.1") }
			},
			want: func(t *testing.T, e *env, m *Manager, heal func()) {
				const back = "back.test"
				longest := 10 * time.Minute
				orders := e.Proxy.Counts(back).Orders
				if st := m.Status(back); st.NextAttempt.Sub(e.clock.Now()) > longest {
					t.Errorf("after the jump back, Status.NextAttempt is %v ahead, want at most the schedule's longest wait %v",
						st.NextAttempt.Sub(e.clock.Now()), longest)
				}
				e.checkKept(t)
				e.expectFallback(t, back)
				if err := m.Provision(context.Background(), back); !errors.Is(err, ErrBackoff) {
					t.Errorf("Provision right after the jump = %v, want ErrBackoff", err)
				}
				if st := m.Status(back); st.NextAttempt.Sub(e.clock.Now()) > longest {
					t.Errorf("after a handshake, Status.NextAttempt is %v ahead, want at most %v", st.NextAttempt.Sub(e.clock.Now()), longest)
				}
				if n := e.Proxy.Counts(back).Orders; n != orders {
					t.Errorf("%d orders in backoff", n-orders)
				}
				heal()
				e.clock.Advance(longest)
				if err := m.Provision(context.Background(), back); err != nil {
					t.Fatalf("Provision once the longest wait passed: %v", err)
				}
				e.expectIssued(t, back)
				e.checkKept(t)
			},
		},
		{
			// The clock jumps forward a day after a failure: attempts
			// resume at once.
			name: "clock-jumps-forward",
			env:  envOptions{names: []string{"fwd.test"}, clock: true, config: clockJumpConfig},
			fault: func(t *testing.T, e *env) func() {
				m := e.cur.Load()
				e.DNS.SetA("fwd.test", "127.0.0.3")
				if err := m.Provision(context.Background(), "fwd.test"); err == nil {
					t.Fatal("Provision succeeded; validation should fail")
				}
				if err := m.Provision(context.Background(), "fwd.test"); !errors.Is(err, ErrBackoff) {
					t.Errorf("Provision = %v, want ErrBackoff", err)
				}
				e.DNS.SetA("fwd.test", "127.0.0.1")
				e.clock.Advance(24 * time.Hour)
				return nil
			},
			want: func(t *testing.T, e *env, m *Manager, _ func()) {
				const fwd = "fwd.test"
				if st := m.Status(fwd); st.State != StateBackoff || !st.NextAttempt.IsZero() {
					t.Errorf("after the jump forward Status = %+v, want backoff with the next attempt due now", st)
				}
				if err := m.Provision(context.Background(), fwd); err != nil {
					t.Fatalf("Provision after the jump forward: %v", err)
				}
				e.expectIssued(t, fwd)
				e.checkKept(t)
			},
		},
		{
			// A restart with the clock a day behind serves the cached
			// certificates without an order.
			name: "clock-behind-at-restart",
			env:  envOptions{clock: true, config: clockJumpConfig},
			fault: func(t *testing.T, e *env) func() {
				closeWithin(t, e.cur.Load(), time.Second)
				behind := testsupport.NewClock(time.Now().Add(-24 * time.Hour))
				e.start(t, func(c *Config) { c.hooks.now = behind.Now })
				return nil
			},
			want: func(t *testing.T, e *env, m *Manager, _ func()) {
				orders := e.Proxy.Requests(certmgrtest.ClassNewOrder)
				e.checkKept(t)
				if n := e.Proxy.Requests(certmgrtest.ClassNewOrder) - orders; n != 0 {
					t.Errorf("%d orders to serve cached certificates with the clock behind", n)
				}
			},
		},

		// -----------------------------------------------------------------
		// Abuse

		{
			// Random names (-abuse.names, 10,000 by default) that the
			// HostPolicy refuses leave no domain, no fallback, no DNS query
			// and no ACME request.
			name: "abuse-refused-names",
			env: envOptions{dnsCheck: true, config: func(c *Config) {
				c.Autocert.HostPolicy = func(_ context.Context, name string) error {
					if name == keptName {
						return nil
					}
					return errors.New("not ours")
				}
			}},
			want: func(t *testing.T, e *env, m *Manager, _ func()) {
				names := randomNames(*abuseNames, ".abuse.test")
				requests := e.Proxy.Requests(certmgrtest.ClassAny)
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
				if _, total := dnsQueries(e, names); total != 0 {
					t.Errorf("%d DNS queries for refused names", total)
				}
				if n := e.Proxy.Requests(certmgrtest.ClassAny) - requests; n != 0 {
					t.Errorf("%d ACME requests", n)
				}
				if growth > 10<<20 {
					t.Errorf("heap grew by %d MB", growth>>20)
				}
				if bound := faultHSTimeout + faultHSMargin; slowest > bound {
					t.Errorf("slowest GetCertificate took %v, want at most %v", slowest, bound)
				}
				e.checkKept(t)
				t.Logf("%d refused names in %v (slowest %v); heap growth %d KB", len(names), took.Round(time.Millisecond), slowest, growth>>10)
			},
		},
		{
			// Random names (-abuse.names) under a wildcard the HostPolicy
			// accepts, none of which resolves (NXDOMAIN), with the DNS pre-check on:
			// memory, domains and fallbacks stay bounded, each name is asked
			// of DNS at most once per record type, no ACME request is made,
			// and every answer is a fallback in time.
			name: "abuse-wildcard-names",
			env: envOptions{dnsCheck: true, config: func(c *Config) {
				c.Autocert.HostPolicy = func(_ context.Context, name string) error {
					if name == keptName || strings.HasSuffix(name, ".abuse.test") {
						return nil
					}
					return errors.New("not ours")
				}
				c.MaxDomains = 1000
				c.MaxFallbacks = 500
			}},
			want: func(t *testing.T, e *env, m *Manager, _ func()) {
				const maxDomains, maxFallbacks = 1000, 500
				names := randomNames(*abuseNames, ".abuse.test")
				requests := e.Proxy.Requests(certmgrtest.ClassAny)
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
				most, total := dnsQueries(e, names)
				if most > 1 || total > 2*len(names) {
					t.Errorf("DNS: %d queries for one name and type at most, %d in all; want at most 1 and %d", most, total, 2*len(names))
				}
				if total == 0 {
					t.Error("no DNS query at all: the pre-check did not run")
				}
				if n := e.Proxy.Requests(certmgrtest.ClassAny) - requests; n != 0 {
					t.Errorf("%d ACME requests", n)
				}
				if growth > 10<<20 {
					t.Errorf("heap grew by %d MB", growth>>20)
				}
				if bound := faultHSTimeout + faultHSMargin; slowest > bound {
					t.Errorf("slowest GetCertificate took %v, want at most %v", slowest, bound)
				}
				e.checkKept(t)
				t.Logf("%d accepted names in %v (slowest %v); %d domains, %d fallbacks, %d DNS queries; heap growth %d KB",
					len(names), took.Round(time.Millisecond), slowest, domains, fallbacks, total, growth>>10)
			},
		},
	}
}

// wantServerError wants the attempt failed with the CA's status after a
// few bounded retries, no budget spent, and the next attempt about a
// minute ahead or, with the CA's retryAfter, no earlier than that.
func wantServerError(status int, retryAfter time.Duration) func(t *testing.T, e *env, m *Manager, _ func()) {
	return func(t *testing.T, e *env, m *Manager, _ func()) {
		const name = "fivexx.test"
		before := e.Proxy.Requests(certmgrtest.ClassAny)
		e.expectFallback(t, name)
		st := waitFailed(t, m, name, 1)
		failedAt := time.Now()
		var ae *acme.Error
		if st.State != StateBackoff || !errors.As(st.LastError, &ae) || ae.StatusCode != status {
			t.Errorf("Status = %+v, want backoff with the CA's %d", st, status)
		}
		if retryAfter > 0 {
			if ahead := st.NextAttempt.Sub(failedAt); ahead < retryAfter-2*time.Second {
				t.Errorf("NextAttempt %v ahead, want at least the CA's Retry-After %v", ahead, retryAfter)
			}
		} else if ahead := st.NextAttempt.Sub(failedAt); ahead < 50*time.Second || ahead > 70*time.Second {
			t.Errorf("NextAttempt %v ahead, want about a minute", ahead)
		}
		sent := e.Proxy.Requests(certmgrtest.ClassAny) - before
		if sent < 1 || sent > 8 {
			t.Errorf("the attempt sent %d requests, want 1 to 8 (a few bounded retries)", sent)
		}
		e.expectFallback(t, name)
		if err := m.Provision(context.Background(), name); !errors.Is(err, ErrBackoff) {
			t.Errorf("Provision in backoff = %v, want ErrBackoff", err)
		}
		if n := e.Proxy.Requests(certmgrtest.ClassAny) - before; n != sent {
			t.Errorf("%d more requests in backoff", n-sent)
		}
		if rec := failureOf(m, name); len(rec.Spends) != 0 {
			t.Errorf("spent %+v on a CA error", rec.Spends)
		}
		if c := e.Proxy.Counts(name); c.FailedAuthzs != 0 {
			t.Errorf("proxy counted %+v", c)
		}
		e.checkKept(t)
		t.Logf("%d requests; NextAttempt %v ahead; LastError: %v", sent, st.NextAttempt.Sub(failedAt).Round(time.Second), st.LastError)
	}
}

// wantDNSNotReady wants name's pre-check to fail naming what, before any
// order, with the fallback served and DNS not asked again before the
// recheck.
func wantDNSNotReady(name, what string) func(t *testing.T, e *env, m *Manager, _ func()) {
	return func(t *testing.T, e *env, m *Manager, _ func()) {
		e.expectFallback(t, name)
		start := time.Now()
		err := m.Provision(context.Background(), name)
		if !errors.Is(err, ErrDNSNotReady) || !strings.Contains(err.Error(), what) {
			t.Errorf("Provision = %v, want ErrDNSNotReady naming %q", err, what)
		}
		if took := time.Since(start); took > 3*time.Second {
			t.Errorf("Provision took %v", took)
		}
		st := m.Status(name)
		if st.State != StateWaitingDNS || time.Until(st.NextAttempt) < 20*time.Second {
			t.Errorf("Status = %+v, want waiting-dns with a recheck about 30 s ahead", st)
		}
		qa, qaaaa := e.DNS.Queries(name, dns.TypeA), e.DNS.Queries(name, dns.TypeAAAA)
		e.expectFallback(t, name)
		if err := m.Provision(context.Background(), name); !errors.Is(err, ErrDNSNotReady) {
			t.Errorf("second Provision = %v, want ErrDNSNotReady", err)
		}
		if a, aaaa := e.DNS.Queries(name, dns.TypeA), e.DNS.Queries(name, dns.TypeAAAA); a != qa || aaaa != qaaaa {
			t.Errorf("DNS asked again before the recheck: A %d→%d, AAAA %d→%d", qa, a, qaaaa, aaaa)
		}
		if c := e.Proxy.Counts(name); c.Orders != 0 {
			t.Errorf("proxy counted %+v, want no order", c)
		}
		e.checkKept(t)
	}
}

// corruptStateNames are the names of the corrupt-state rows.
var corruptStateNames = []string{"backoff-state.test", "future-state.test", "fresh-state.test", "bad-type.test", "bad-next.test", "bad-count.test"}

// corruptState is a fault: backoff-state.test fails once (a 403), then the
// Manager closes, the persisted state is replaced by what state makes of
// it, and another Manager starts on it.
func corruptState(state func(good []byte) []byte) func(t *testing.T, e *env) func() {
	return func(t *testing.T, e *env) func() {
		const backoff = "backoff-state.test"
		m1 := e.cur.Load()
		e.Proxy.AddRule(certmgrtest.Rule{Class: certmgrtest.ClassNewOrder, Identifier: backoff, Status: http.StatusForbidden,
			ProblemType: "urn:ietf:params:acme:error:rejectedIdentifier", Detail: "policy forbids it", Times: 1})
		if err := m1.Provision(context.Background(), backoff); err == nil {
			t.Fatal("Provision succeeded through a 403")
		}
		closeWithin(t, m1, time.Second)
		good, err := e.cache.Get(context.Background(), stateKey)
		if err != nil {
			t.Fatal(err)
		}
		if err := e.cache.Put(context.Background(), stateKey, state(good)); err != nil {
			t.Fatal(err)
		}
		logged := strings.Count(e.logs.String(), "cache error")
		e.start(t, nil)
		if strings.Count(e.logs.String(), "cache error") == logged {
			t.Error("the corrupt state was not logged")
		}
		return nil
	}
}

// wantCorruptState wants New to have worked on the corrupt state: with
// entries, the valid entry kept, the one from a far future cut to the
// schedule's longest wait and the corrupt ones dropped; otherwise no
// state at all. Domains are obtained, and the next write is readable.
func wantCorruptState(entries bool) func(t *testing.T, e *env, m *Manager, _ func()) {
	return func(t *testing.T, e *env, m *Manager, _ func()) {
		const (
			backoff = "backoff-state.test"
			future  = "future-state.test"
			fresh   = "fresh-state.test"
		)
		first := e.started[0].Status(backoff)
		if first.State != StateBackoff {
			t.Fatalf("the first Manager's Status(%s) = %+v, want backoff", backoff, first)
		}
		e.checkKept(t)
		st := m.Status(backoff)
		if entries {
			if st.State != StateBackoff || st.Failures != 1 || !st.NextAttempt.Equal(first.NextAttempt) {
				t.Errorf("Status(%s) = %+v, want the valid entry kept: %+v", backoff, st, first)
			}
			longest := defaultBackoff.delay(len(defaultBackoff.Steps), 1)
			if st := m.Status(future); st.State != StateBackoff || time.Until(st.NextAttempt) > longest {
				t.Errorf("before first use: Status(%s) = %+v, want a wait of at most the schedule's longest (%v)", future, st, longest)
			}
			e.expectFallback(t, future)
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
		e.expectIssued(t, fresh)
		recs := persisted(t, e.cache) // readable again
		if entries {
			if _, ok := recs[backoff]; !ok {
				t.Errorf("the valid entry was not written back: %v", recs)
			}
		}
	}
}

// wantCloseCutsAttempt starts inflight.test's attempt, whose request of
// class held the CA holds, and wants Close to cut it: at once, without a
// goroutine left or a failure recorded, and with a held order's
// reservation kept.
func wantCloseCutsAttempt(held certmgrtest.Class) func(t *testing.T, e *env, m *Manager, _ func()) {
	return func(t *testing.T, e *env, m *Manager, _ func()) {
		const (
			name  = "inflight.test"
			after = "after-close.test"
		)
		requests := e.Proxy.Requests(held)
		e.expectFallback(t, name)
		waitFor(t, 5*time.Second, "the held request", func() bool { return e.Proxy.Requests(held) > requests })
		if st := m.Status(name); st.State != StateObtaining {
			t.Fatalf("Status = %+v, want obtaining", st)
		}
		closeWithin(t, m, time.Second)
		waitNoLeaks(t, 5*time.Second)
		if st := m.Status(name); st.State != StateNone || st.Failures != 0 {
			t.Errorf("Status after Close = %+v, want none: Close is no failure of the domain", st)
		}
		wantSpent := 0
		if held == certmgrtest.ClassNewOrder {
			wantSpent = 1
		}
		if rec := failureOf(m, name); rec.spentSince(time.Now().Add(-budgetWindow), time.Now()) != wantSpent {
			t.Errorf("after Close the budget holds %+v, want %d authorization(s) spent", rec.Spends, wantSpent)
		}
		if rec := persisted(t, e.cache)[name]; rec.Failures != 0 || rec.spentSince(time.Now().Add(-budgetWindow), time.Now()) != wantSpent {
			t.Errorf("Close persisted %+v, want no failure and %d authorization(s) spent", rec, wantSpent)
		}
		e.checkKept(t)
		e.expectFallback(t, after)
		if n := e.Proxy.Requests(held) - requests; n != 1 {
			t.Errorf("%d %v requests, want the held one", n, held)
		}
	}
}

// clockJumpConfig is the clock rows' schedule: 1 then 10 minutes, no
// jitter.
func clockJumpConfig(c *Config) {
	c.hooks.rand = func() float64 { return 0 }
	c.Backoff = Backoff{Steps: []time.Duration{time.Minute, 10 * time.Minute}, Jitter: -1}
}

// abuseNames is how many distinct random SNI names an abuse row sends:
// ten times MaxDomains and twenty times MaxFallbacks of those rows, so
// that every bound is reached many times over. -abuse.names 100000 is the
// long run.
var abuseNames = flag.Int("abuse.names", 10_000, "how many distinct random SNI names each abuse row of TestFaultMatrix sends")

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
				c, err := m.GetCertificate(helloFor(names[i]))
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
func dnsQueries(e *env, names []string) (most, total int) {
	for _, n := range names {
		for _, q := range []uint16{dns.TypeA, dns.TypeAAAA, dns.TypeCAA} {
			c := e.DNS.Queries(n, q)
			most = max(most, c)
			total += c
		}
	}
	return most, total
}

// newFaultCache is a faultCache over a DirCache in dir.
func newFaultCache(dir string) autocert.Cache {
	return &faultCache{inner: autocert.DirCache(dir)}
}

// acmeFlowRequests counts the requests that obtain certificates: all but
// the directory and the renewal information polls, which run in the
// background for every certificate served.
func acmeFlowRequests(p *certmgrtest.Proxy) int {
	return p.Requests(certmgrtest.ClassAny) - p.Requests(certmgrtest.ClassDirectory) - p.Requests(certmgrtest.ClassOther)
}
