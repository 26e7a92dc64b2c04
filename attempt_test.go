package certmgr

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/crypto/acme"
	"golang.org/x/crypto/acme/autocert"

	"github.com/certmgr/certmgr/certmgrtest"
)

// startAttempt makes d's attempt in flight, as begin does, without its
// goroutine.
func startAttempt(m *Manager, d *domain, path Path) *attempt {
	a := &attempt{path: path, start: m.now(), done: make(chan struct{})}
	m.stateMu.Lock()
	d.attempt = a
	if path != PathRenewal {
		m.inFlight++
	}
	m.stateMu.Unlock()
	return a
}

// TestFinishRecordsOutcome: finish records what the attempt's error says.
// certmgr's own failures (Close, DNS, the schedule, a local refusal, the
// Cache) do not move the schedule, unless the CA already failed an
// authorization; the CA's failures do, with its detail, its Retry-After
// and its rate limit. finish itself spends no budget: orders reserve it.
func TestFinishRecordsOutcome(t *testing.T) {
	t0 := newFakeClock().Now()
	retryAt := t0.Add(2 * time.Hour)
	rateLimited := &acme.Error{StatusCode: http.StatusTooManyRequests, ProblemType: "urn:ietf:params:acme:error:rateLimited",
		Detail: "too many", Header: http.Header{"Retry-After": {retryAt.Format(http.TimeFormat)}}}
	refused := observation{order: true, authzFailed: true, problem: "Connection refused"}
	for _, tt := range []struct {
		name      string
		err       error
		observed  observation // what the CA said during the attempt
		failures  int
		next      time.Time // the schedule's NextAttempt
		localNext time.Time
		events    []EventKind
		lastErr   string
	}{
		{name: "closed", err: errClosed},
		{name: "dns", err: fmt.Errorf("%w: a.test: no A or AAAA record", ErrDNSNotReady)},
		{name: "backoff", err: fmt.Errorf("%w: a.test: not yet", ErrBackoff)},
		{name: "loading", err: errLoading},
		{name: "cache", err: &cacheError{op: "get", key: "a.test", err: errInjectedCache}, localNext: t0.Add(30 * time.Second)},
		{name: "closed after a failed authorization", err: errClosed, observed: refused,
			failures: 1, next: t0.Add(time.Minute), events: []EventKind{EventFailed, EventBackoff}, lastErr: "certmgr: a.test: Connection refused"},
		{name: "ca-refused", err: errors.New("acme/autocert: missing certificate"), observed: refused,
			failures: 1, next: t0.Add(time.Minute), events: []EventKind{EventFailed, EventBackoff}, lastErr: "certmgr: a.test: Connection refused"},
		{name: "ca-unreachable", err: errors.New("dial tcp: connection refused"),
			failures: 1, next: t0.Add(time.Minute), events: []EventKind{EventFailed, EventBackoff}, lastErr: "certmgr: a.test: dial tcp: connection refused"},
		{name: "ca-rate-limited", err: rateLimited,
			failures: 1, next: retryAt, events: []EventKind{EventFailed, EventRateLimited}, lastErr: "certmgr: a.test: 429 urn:ietf:params:acme:error:rateLimited: too many"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			var events []EventKind
			m := newPureManager(t, newFakeClock(), func(c *Config) { c.OnEvent = func(e Event) { events = append(events, e.Kind) } })
			d, err := m.domainFor("a.test")
			if err != nil {
				t.Fatal(err)
			}
			a := startAttempt(m, d, PathHandshake)
			if tt.observed != (observation{}) {
				m.observed("a.test", tt.observed)
			}
			m.finish(d, a, nil, tt.err)
			<-a.done
			m.stateMu.Lock()
			defer m.stateMu.Unlock()
			if d.attempt != nil || m.inFlight != 0 {
				t.Errorf("attempt %v, %d in flight after finish", d.attempt, m.inFlight)
			}
			if d.fail.Failures != tt.failures || !d.fail.NextAttempt.Equal(tt.next) || !d.localNext.Equal(tt.localNext) {
				t.Errorf("failures %d, next %v, localNext %v; want %d, %v, %v", d.fail.Failures, d.fail.NextAttempt, d.localNext, tt.failures, tt.next, tt.localNext)
			}
			if fmt.Sprint(events) != fmt.Sprint(tt.events) {
				t.Errorf("events %v, want %v", events, tt.events)
			}
			if len(d.fail.Spends) != 0 {
				t.Errorf("finish spent %+v", d.fail.Spends)
			}
			if tt.lastErr == "" {
				if d.lastErr != nil || !errors.Is(a.err, tt.err) {
					t.Errorf("lastErr %v, attempt's error %v; want none and %v", d.lastErr, a.err, tt.err)
				}
				return
			}
			var ae *AttemptError
			if !errors.As(d.lastErr, &ae) || d.lastErr.Error() != tt.lastErr || !errors.Is(d.lastErr, tt.err) || a.err != d.lastErr {
				t.Errorf("lastErr %v, want an *AttemptError %q wrapping %v", d.lastErr, tt.lastErr, tt.err)
			}
		})
	}
}

// TestAdmitOrderGatesRenewals: an order autocert's timer makes passes the
// domain's gate like any attempt and reserves one authorization of the
// budget, settled by what the CA says of it; orders for an unknown domain,
// from a retired autocert.Manager or during a load are refused.
func TestAdmitOrderGatesRenewals(t *testing.T) {
	clock := newFakeClock()
	m := newPureManager(t, clock, nil)
	d, err := m.domainFor("a.test")
	if err != nil {
		t.Fatal(err)
	}
	current := m.newAutocert(nil, m.cache)
	d.am = current
	order := func(am *autocert.Manager) *http.Request {
		req, _ := http.NewRequest("POST", "https://ca.invalid/new-order", nil)
		return req.WithContext(context.WithValue(req.Context(), senderKey{}, am))
	}
	if _, err := m.admitOrder(order(current), "b.test"); err == nil || !strings.Contains(err.Error(), "unknown domain") {
		t.Errorf("order for an unknown domain: %v", err)
	}
	if _, err := m.admitOrder(order(m.newAutocert(nil, m.cache)), "a.test"); err == nil || !strings.Contains(err.Error(), "retired") {
		t.Errorf("order from a retired autocert.Manager: %v", err)
	}
	m.stateMu.Lock()
	d.loading = 1
	m.stateMu.Unlock()
	if _, err := m.admitOrder(order(current), "a.test"); !errors.Is(err, errLoading) {
		t.Errorf("order during a load: %v, want errLoading", err)
	}
	m.stateMu.Lock()
	d.loading = 0
	d.fail.fail(clock.Now(), "failed", 1, 4, m.cfg.Backoff, time.Time{}, 0)
	m.stateMu.Unlock()
	if _, err := m.admitOrder(order(current), "a.test"); !errors.Is(err, ErrBackoff) {
		t.Errorf("order in backoff: %v, want ErrBackoff", err)
	}
	if n := m.refusedOrders.Load(); n != 4 {
		t.Errorf("%d orders refused, want 4", n)
	}
	clock.Advance(time.Hour)
	id, err := m.admitOrder(order(current), "a.test")
	if err != nil || id == "" {
		t.Fatalf("due order: %q, %v", id, err)
	}
	m.stateMu.Lock()
	renewal, spent := d.attempt, d.fail.spentSince(clock.Now().Add(-time.Hour), clock.Now())
	m.stateMu.Unlock()
	if renewal == nil || renewal.path != PathRenewal || spent != 1 {
		t.Fatalf("attempt %+v, %d authorization(s) reserved; want a renewal in flight and 1", renewal, spent)
	}
	id2, err := m.admitOrder(order(current), "a.test")
	if err != nil {
		t.Errorf("the renewal's next order: %v, want it to pass", err)
	}
	// The CA says: the first order's authorization is valid (nothing
	// spent), the second's failed (spent).
	m.observed("a.test", observation{reservation: id, authzValid: true})
	m.observed("a.test", observation{reservation: id2, authzFailed: true, problem: "Connection refused"})
	m.stateMu.Lock()
	spent = d.fail.spentSince(clock.Now().Add(-time.Hour), clock.Now())
	settled := len(d.fail.Spends) == 1 && d.fail.Spends[0].ID == ""
	m.stateMu.Unlock()
	if spent != 1 || !settled {
		t.Errorf("budget %+v, want the failed authorization spent and settled", d.fail.Spends)
	}
	m.finish(d, renewal, nil, errors.New("renewal failed"))
	if st := m.Status("a.test"); st.Failures != 2 || st.State != StateBackoff {
		t.Errorf("Status = %+v, want the failed renewal counted", st)
	}
}

// TestHandshakesShareOneAttempt: with validation failing, 500 handshakes
// spread over 5 s start exactly one attempt; each gets the fallback within
// HandshakeTimeout + 100 ms; Status shows the backoff; the ACME observer
// keeps nothing of the attempt once it ended.
func TestHandshakesShareOneAttempt(t *testing.T) {
	const name = "refused.test"
	e := newEnv(t, envOptions{cache: memoryCache, names: []string{name}})
	m := e.start(t, nil)
	e.DNS.SetA(name, "127.0.0.3") // the VA connects there; nothing answers
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
			leaf, err := e.dial(t, name, insecure)
			took := time.Since(start)
			mu.Lock()
			defer mu.Unlock()
			slowest = max(slowest, took)
			if err != nil {
				errs = append(errs, err)
			} else if !isFallbackLeaf(leaf) {
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
	st := m.Status(name)
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
	m.obs.urlsMu.Lock()
	tracked := len(m.obs.urls) + len(m.obs.byName) + len(m.obs.failed)
	m.obs.urlsMu.Unlock()
	if tracked != 0 {
		t.Errorf("the ACME observer still tracks %d entries", tracked)
	}
	t.Logf("slowest of 500 handshakes: %v; proxy: %+v", slowest, c)
}

// TestRateLimitShowsInStatusAtOnce: the CA holds new-order for 3 s, then
// answers 429 with Retry-After 3600. The handshake gets the fallback after
// its 1 s timeout; the rate limit shows in Status within 1 s of the 429,
// with the CA's error reachable by errors.As; no further order is made.
func TestRateLimitShowsInStatusAtOnce(t *testing.T) {
	const name = "limited.test"
	e := newEnv(t, envOptions{cache: memoryCache, names: []string{name}})
	m := e.start(t, func(c *Config) { c.HandshakeTimeout = time.Second })
	e.Proxy.AddRule(certmgrtest.Rule{Class: certmgrtest.ClassNewOrder, Identifier: name, Delay: 3 * time.Second,
		Status: http.StatusTooManyRequests, RetryAfter: "3600",
		Detail: "too many failed authorizations (5) for \"limited.test\" in the last 1h0m0s"})

	start := time.Now()
	leaf := e.handshake(t, name, insecure)
	took := time.Since(start)
	if !isFallbackLeaf(leaf) || took > 1100*time.Millisecond {
		t.Errorf("handshake got %v after %v, want the fallback within 1.1 s", leaf.Subject, took)
	}
	waitFor(t, 5*time.Second, "the 429", func() bool { return e.Proxy.Requests(certmgrtest.ClassNewOrder) >= 1 && len(e.Proxy.Problems()) > 0 })
	answered := time.Now()
	waitFor(t, time.Second, "Status to show the rate limit", func() bool { return m.Status(name).Failures == 1 })
	if d := time.Since(answered); d > time.Second {
		t.Errorf("Status showed the failure %v after the 429", d)
	}
	st := m.Status(name)
	if ahead := time.Until(st.NextAttempt); ahead < 3599*time.Second {
		t.Errorf("NextAttempt %v ahead, want at least 3599 s", ahead)
	}
	var ae *acme.Error
	if !errors.As(st.LastError, &ae) || ae.StatusCode != http.StatusTooManyRequests {
		t.Errorf("LastError = %#v, want an *acme.Error with status 429 reachable by errors.As", st.LastError)
	}
	e.handshake(t, name, insecure)
	if err := m.Provision(context.Background(), name); !errors.Is(err, ErrBackoff) {
		t.Errorf("Provision = %v, want ErrBackoff", err)
	}
	if n := e.Proxy.Requests(certmgrtest.ClassNewOrder); n != 1 {
		t.Errorf("%d new-order requests, want 1", n)
	}
	if !strings.Contains(e.logs.String(), "rate limited by CA") {
		t.Error("no rate-limit line in the log")
	}
}

// TestLateSuccessIsRecordedAndServed: an attempt that outlives the
// handshake timeout is recorded when it succeeds later, and served from
// then on.
func TestLateSuccessIsRecordedAndServed(t *testing.T) {
	const name = "late.test"
	e := newEnv(t, envOptions{cache: memoryCache, names: []string{name}})
	m := e.start(t, func(c *Config) { c.HandshakeTimeout = 200 * time.Millisecond })
	e.Proxy.AddRule(certmgrtest.Rule{Class: certmgrtest.ClassNewOrder, Identifier: name, Delay: time.Second})

	if leaf := e.handshake(t, name, insecure); !isFallbackLeaf(leaf) {
		t.Fatalf("first handshake got %v, want the fallback", leaf.Subject)
	}
	if st := m.Status(name); st.State != StateObtaining {
		t.Errorf("Status while the order is held = %v, want obtaining", st.State)
	}
	waitFor(t, 10*time.Second, "the late certificate", func() bool { return m.Status(name).State == StateValid })
	leaf, err := e.dial(t, name, nil)
	if err != nil {
		t.Fatalf("handshake after the late success: %v", err)
	}
	st := m.Status(name)
	if st.Failures != 0 || st.LastError != nil || !st.NotAfter.Equal(leaf.NotAfter) {
		t.Errorf("Status = %+v, want valid, no failure, NotAfter %v", st, leaf.NotAfter)
	}
	if n := e.Proxy.Counts(name).Orders; n != 1 {
		t.Errorf("%d orders, want 1", n)
	}
}

// TestFailedRenewalKeepsServing: a renewal whose validation fails shows in
// Status (valid, with the failure) while the valid certificate keeps
// being served, and the rest of autocert's renewal flow is refused
// locally by the schedule.
func TestFailedRenewalKeepsServing(t *testing.T) {
	const name = "renew.test"
	e := newEnv(t, envOptions{names: []string{name}, pebble: certmgrtest.Options{CertValidity: time.Minute}})
	if err := e.start(t, nil).Provision(context.Background(), name); err != nil {
		t.Fatal(err)
	}
	e.cur.Load().Close()
	// Validation fails from now on, and the CA forgets the old authorization.
	e.DNS.SetA(name, "127.0.0.3")
	if n := e.Proxy.ExpireAuthorizations(name); n != 1 {
		t.Fatalf("expired %d authorizations, want 1", n)
	}

	// A restarted Manager whose RenewBefore covers the certificate's whole
	// life: autocert's timer renews as soon as the certificate is loaded.
	m := e.start(t, func(c *Config) { c.Autocert.RenewBefore = time.Hour })
	leaf := e.handshake(t, name, nil)
	waitFor(t, 10*time.Second, "the failed renewal", func() bool { return m.Status(name).Failures == 1 })
	st := m.Status(name)
	if st.State != StateValid || st.LastError == nil || !strings.Contains(st.LastError.Error(), "127.0.0.3") ||
		!st.NotAfter.Equal(leaf.NotAfter) || time.Until(st.NextAttempt) < 50*time.Second {
		t.Errorf("Status = %+v, want valid with the renewal's failure and a next attempt a minute ahead", st)
	}
	waitFor(t, 10*time.Second, "autocert's next renewal order to be refused", func() bool { return m.refusedOrders.Load() >= 1 })
	again, err := e.dial(t, name, nil)
	if err != nil || !again.Equal(leaf) {
		t.Errorf("handshake after the failed renewal: %v (same certificate: %v)", err, err == nil && again.Equal(leaf))
	}
	if c := e.Proxy.Counts(name); c.Orders != 2 || c.FailedAuthzs != 1 {
		t.Errorf("proxy counted %+v, want 2 orders (issuance, renewal) and 1 failed authorization", c)
	}
	if !strings.Contains(e.logs.String(), "path=renewal") {
		t.Errorf("the renewal failure was not logged")
	}
}

// TestExpiredCertificateIsReplacedAfterFailedRenewals: renewals fail until
// the certificate expires; once validation works again, the next handshake
// gets a new certificate from a new order, not the expired one autocert
// still holds in memory.
func TestExpiredCertificateIsReplacedAfterFailedRenewals(t *testing.T) {
	const name = "expiring.test"
	e := newEnv(t, envOptions{names: []string{name}, pebble: certmgrtest.Options{CertValidity: 3 * time.Second}})
	if err := e.start(t, nil).Provision(context.Background(), name); err != nil {
		t.Fatal(err)
	}
	e.cur.Load().Close()
	e.DNS.SetA(name, "127.0.0.3")
	e.Proxy.ExpireAuthorizations(name)

	// Restarted, with renewal due at once and a short backoff.
	m := e.start(t, func(c *Config) {
		c.Autocert.RenewBefore = time.Hour
		c.Backoff = Backoff{Steps: []time.Duration{50 * time.Millisecond}, Jitter: -1}
	})
	old := e.handshake(t, name, nil)
	waitFor(t, 10*time.Second, "the failed renewal", func() bool { return m.Status(name).Failures >= 1 })
	waitFor(t, 10*time.Second, "the certificate to expire", func() bool { return time.Now().After(old.NotAfter) })
	e.DNS.SetA(name, "127.0.0.1")
	waitFor(t, 10*time.Second, "a new certificate", func() bool {
		leaf, err := e.dial(t, name, insecure)
		return err == nil && leaf.NotAfter.After(old.NotAfter) && !isFallbackLeaf(leaf)
	})
	if st := m.Status(name); st.State != StateValid || st.Failures != 0 {
		t.Errorf("Status = %+v, want valid", st)
	}
	if n := strings.Count(e.logs.String(), "certificate obtained"); n != 2 {
		t.Errorf("%d certificates obtained, want 2 (the first, and one after the expiry)", n)
	}
	if c := e.Proxy.Counts(name); c.Orders < 3 {
		t.Errorf("proxy counted %+v, want the renewal's and a new order", c)
	}
}

// TestDNSCheckTimeoutIsNoFailure: a pre-check that runs out of time is
// "DNS not ready", not a failed attempt: nothing is spent, no backoff.
func TestDNSCheckTimeoutIsNoFailure(t *testing.T) {
	const name = "slowdns.test"
	e := newEnv(t, envOptions{cache: memoryCache, names: []string{name}, dnsCheck: true})
	m := e.start(t, func(c *Config) {
		c.hooks.dnsCheckTimeout = 200 * time.Millisecond
		c.DNS.Timeout = 5 * time.Second // one query outlives the whole check
	})
	e.DNS.SetSilent(name, true)
	if err := m.Provision(context.Background(), name); !errors.Is(err, ErrDNSNotReady) {
		t.Fatalf("Provision = %v, want ErrDNSNotReady", err)
	}
	if st := m.Status(name); st.State != StateWaitingDNS || st.Failures != 0 {
		t.Errorf("Status = %+v, want waiting-dns without failures", st)
	}
	if strings.Contains(e.logs.String(), "certificate attempt failed") {
		t.Error("the DNS timeout was logged as a failed attempt")
	}
}

// TestOrderOfUnknownOrRetiredManagerIsRefused: an order for a domain
// certmgr does not track, or from an autocert.Manager it retired, is
// refused and counted.
func TestOrderOfUnknownOrRetiredManagerIsRefused(t *testing.T) {
	m := newPureManager(t, nil, nil)
	req := httptest.NewRequest(http.MethodPost, "https://ca.test/new-order", nil)
	if _, err := m.admitOrder(req, "gone.test"); err == nil {
		t.Error("an order for a domain certmgr does not track was admitted")
	}
	d, err := m.domainFor("kept.test")
	if err != nil {
		t.Fatal(err)
	}
	current, retired := &autocert.Manager{}, &autocert.Manager{}
	m.stateMu.Lock()
	d.am = current
	m.stateMu.Unlock()
	fromRetired := req.WithContext(context.WithValue(req.Context(), senderKey{}, retired))
	if _, err := m.admitOrder(fromRetired, "kept.test"); err == nil || !strings.Contains(err.Error(), "retired") {
		t.Errorf("an order from a retired autocert.Manager: %v, want refused", err)
	}
	if n := m.refusedOrders.Load(); n != 2 {
		t.Errorf("%d orders refused, want 2", n)
	}
}

// TestRenewalCutAtTransportEnds: a renewal whose request gets no answer
// (the CA holds it past the request timeout) ends at once, failed and
// logged, instead of holding the domain until autocert's next order.
func TestRenewalCutAtTransportEnds(t *testing.T) {
	const name = "renew.test"
	e := newEnv(t, envOptions{names: []string{name}, pebble: certmgrtest.Options{CertValidity: time.Minute}})
	if err := e.start(t, nil).Provision(context.Background(), name); err != nil {
		t.Fatal(err)
	}
	e.cur.Load().Close()
	// From now on the CA takes every finalization and never answers.
	e.Proxy.AddRule(certmgrtest.Rule{Class: certmgrtest.ClassFinalize, Identifier: name, Hold: true})

	// Restarted with renewal due at once (RenewBefore covers the life).
	events := &eventLog{}
	m := e.start(t, func(c *Config) {
		c.Autocert.RenewBefore = time.Hour
		c.OnEvent = events.add
		c.hooks.requestTimeout = 500 * time.Millisecond
	})
	e.handshake(t, name, nil)
	waitFor(t, 20*time.Second, "the renewal's failure", func() bool { return events.count(EventFailed) > 0 })
	if ev := events.last(EventFailed); ev.Path != PathRenewal {
		t.Errorf("failure event %+v, want the renewal's", ev)
	}
	if st := m.Status(name); st.State != StateValid || st.Failures != 1 {
		t.Errorf("Status = %+v, want valid with the renewal's failure", st)
	}
	m.stateMu.Lock()
	inFlight := m.domains[name].attempt
	m.stateMu.Unlock()
	if inFlight != nil {
		t.Errorf("the renewal is still in flight after its failure")
	}
}

// TestOrderBudgetBinds: the account makes at most OrderBudget orders in 3
// hours; the next is refused with ErrBackoff and a warning.
func TestOrderBudgetBinds(t *testing.T) {
	names := []string{"o1.test", "o2.test", "o3.test"}
	e := newEnv(t, envOptions{names: append([]string{keptName}, names...)})
	events := &eventLog{}
	m := e.start(t, func(c *Config) {
		c.OrderBudget = 3 // kept.test's and two more
		c.OnEvent = events.add
	})
	e.provisionKept(t, m)
	for _, n := range names[:2] {
		if err := m.Provision(context.Background(), n); err != nil {
			t.Fatalf("Provision %s: %v", n, err)
		}
	}
	err := m.Provision(context.Background(), names[2])
	if !errors.Is(err, ErrBackoff) || !strings.Contains(err.Error(), "OrderBudget") {
		t.Errorf("Provision beyond the budget = %v, want ErrBackoff naming OrderBudget", err)
	}
	if n := e.Proxy.Counts(names[2]).Orders; n != 0 {
		t.Errorf("%d orders beyond the budget", n)
	}
	if n := events.count(EventOrderBudget); n != 1 {
		t.Errorf("%d order-budget events, want 1", n)
	}
	if st := m.Status(names[2]); st.Failures != 0 {
		t.Errorf("a local refusal counted as the domain's failure: %+v", st)
	}
}

// TestGracefulRestartsSpendAtMostTheBudget: six graceful restarts in a
// row, each right after the CA failed a validation (Close cuts the
// client's poll of the authorization), give the CA at most 4 failed
// validations: what an attempt may have spent is stored before its
// order goes out.
func TestGracefulRestartsSpendAtMostTheBudget(t *testing.T) {
	const name = "restart.test"
	e := newEnv(t, envOptions{names: []string{keptName, name}, hsBound: faultHSTimeout + faultHSMargin,
		config: func(c *Config) { c.HandshakeTimeout = faultHSTimeout }})
	e.DNS.SetA(name, "127.0.0.3") // nothing listens there: validation fails
	refused := 0
	for round := range 6 {
		m := e.start(t, func(c *Config) {
			c.Backoff = Backoff{Steps: []time.Duration{time.Millisecond}, Jitter: -1} // only the budget binds
		})
		pass := e.Proxy.AddRule(certmgrtest.Rule{Class: certmgrtest.ClassAuthz, Identifier: name, Times: 1})
		hold := e.Proxy.AddRule(certmgrtest.Rule{Class: certmgrtest.ClassAuthz, Identifier: name, Hold: true})
		authz := e.Proxy.Requests(certmgrtest.ClassAuthz)
		done := make(chan error, 1)
		go func() { done <- m.Provision(context.Background(), name) }()
		var err error
		waitFor(t, 10*time.Second, "the poll after the failed validation, or a refusal", func() bool {
			select {
			case err = <-done:
				return true
			default:
				return e.Proxy.Requests(certmgrtest.ClassAuthz) >= authz+2
			}
		})
		if err != nil {
			if !errors.Is(err, ErrBackoff) {
				t.Fatalf("round %d: Provision = %v, want ErrBackoff or an attempt cut by Close", round, err)
			}
			refused++
		}
		closeWithin(t, m, time.Second)
		pass()
		hold()
		waitDetached(t)
	}
	c := e.Proxy.Counts(name)
	if c.ChallengeResponses > 4 {
		t.Errorf("%d validations failed at the CA over 6 restarts, want at most 4", c.ChallengeResponses)
	}
	if c.ChallengeResponses == 0 || refused == 0 {
		t.Errorf("%d validations, %d refusals: the scenario did not run", c.ChallengeResponses, refused)
	}
	if rec := persisted(t, e.cache)[name]; rec.spentSince(time.Now().Add(-budgetWindow), time.Now()) < c.ChallengeResponses {
		t.Errorf("persisted %+v, want the %d failed validations counted", rec, c.ChallengeResponses)
	}
}

// TestOrdersInsideAnAttemptKeepTheBudget: an order made while an attempt
// is in flight (its own second order, or autocert's renewal of the other
// key type) passes only if the budget holds one more authorization, and
// a failure the CA reports after the attempt ended still counts: the
// order's reservation was stored before it went out.
func TestOrdersInsideAnAttemptKeepTheBudget(t *testing.T) {
	clock := newFakeClock()
	m := newPureManager(t, clock, nil)
	d, err := m.domainFor("a.test")
	if err != nil {
		t.Fatal(err)
	}
	req, _ := http.NewRequest("POST", "https://ca.invalid/new-order", nil)
	a := &attempt{path: PathHandshake, start: clock.Now(), done: make(chan struct{})}
	m.stateMu.Lock()
	d.attempt = a
	m.inFlight++
	m.stateMu.Unlock()
	var ids []string
	for i := range 5 {
		id, err := m.admitOrder(req, "a.test")
		if i < 4 && err != nil {
			t.Fatalf("order %d inside the attempt: %v", i+1, err)
		}
		if i == 4 && !errors.Is(err, ErrBackoff) {
			t.Fatalf("a 5th order in the hour: %v, want ErrBackoff", err)
		}
		if err == nil {
			ids = append(ids, id)
		}
	}
	m.observed("a.test", observation{reservation: ids[0], authzValid: true}) // settled: spends nothing
	m.finish(d, a, nil, errors.New("acme/autocert: missing certificate"))
	m.observed("a.test", observation{reservation: ids[1], authzFailed: true}) // after the end: still counts
	rec := failureOf(m, "a.test")
	if got := rec.spentSince(clock.Now().Add(-budgetWindow), clock.Now()); got != 3 {
		t.Errorf("%d authorizations counted, want 3: two reserved, one failed after the end", got)
	}
	stored := persistedAt(t, m.cache, clock.Now())["a.test"]
	if got := stored.spentSince(clock.Now().Add(-budgetWindow), clock.Now()); got != 3 {
		t.Errorf("persisted %+v, want the same 3", stored)
	}
}

// TestFailedLocally: what failed for certmgr's own reasons leaves the
// failure record alone; what the CA failed or rate-limited does not, even
// at Close; an attempt that lost its cluster lock leaves the record to the
// replica that took the lock over.
func TestFailedLocally(t *testing.T) {
	caErr := errors.New("urn:ietf:params:acme:error:connection")
	for _, tt := range []struct {
		name        string
		err         error
		closing     bool
		authzFailed int
		rateLimited bool
		lockLost    bool
		want        bool
	}{
		{name: "success", err: nil, want: false},
		{name: "success while closing", err: nil, closing: true, want: false},
		{name: "success after the lock was lost", err: nil, lockLost: true, want: false},
		{name: "the CA's failure", err: caErr, want: false},
		{name: "closed", err: errClosed, want: true},
		{name: "any error while closing", err: caErr, closing: true, want: true},
		{name: "DNS not ready", err: fmt.Errorf("%w: a.test", ErrDNSNotReady), want: true},
		{name: "backoff", err: fmt.Errorf("%w: a.test", ErrBackoff), want: true},
		{name: "loading", err: errLoading, want: true},
		{name: "the Cache unreadable", err: &cacheError{op: "get", key: "a.test", err: caErr}, want: true},
		{name: "closed after an authorization failed", err: errClosed, authzFailed: 1, want: false},
		{name: "closing after an authorization failed", err: caErr, closing: true, authzFailed: 2, want: false},
		{name: "backoff after a rate limit", err: fmt.Errorf("%w: a.test", ErrBackoff), rateLimited: true, want: false},
		{name: "the CA's failure after the lock was lost", err: caErr, authzFailed: 1, lockLost: true, want: true},
		{name: "rate-limited after the lock was lost", err: caErr, rateLimited: true, lockLost: true, want: true},
	} {
		if got := failedLocally(tt.err, tt.closing, tt.authzFailed, tt.rateLimited, tt.lockLost); got != tt.want {
			t.Errorf("%s: failedLocally = %v, want %v", tt.name, got, tt.want)
		}
	}
}
