package certmgr

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/crypto/acme"

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

// TestHandshakesShareOneAttempt: with validation failing, 500 handshakes
// spread over 5 s start exactly one attempt; each gets the fallback;
// Status shows the backoff; the ACME observer keeps nothing of the
// attempt once it ended. (That a handshake waits no longer than
// HandshakeTimeout is TestHandshakeTimeoutDefault's.)
func TestHandshakesShareOneAttempt(t *testing.T) {
	t.Parallel()
	const name = "refused.test"
	e := newEnv(t, envOptions{cache: memoryCache, names: []string{name}})
	m := e.start(t, nil)
	e.DNS.SetA(name, "127.0.0.3") // the VA connects there; nothing answers
	var (
		wg   sync.WaitGroup
		mu   sync.Mutex
		errs []error
	)
	tick := time.NewTicker(10 * time.Millisecond) // 500 handshakes over 5 s
	defer tick.Stop()
	for i := 0; i < 500; i++ {
		<-tick.C
		wg.Add(1)
		go func() {
			defer wg.Done()
			leaf, err := e.dial(t, name, insecure)
			mu.Lock()
			defer mu.Unlock()
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
	tracked := len(m.obs.urls) + len(m.obs.byName) + len(m.obs.failed) + len(m.obs.erred) + len(m.obs.accepted)
	m.obs.urlsMu.Unlock()
	if tracked != 0 {
		t.Errorf("the ACME observer still tracks %d entries", tracked)
	}
	t.Logf("proxy: %+v", c)
}

// TestRateLimitShowsInStatusAtOnce: the CA holds new-order for 3 s, then
// answers 429 with Retry-After 3600. The handshake gets the fallback after
// its 1 s timeout, not the CA's 3 s; the rate limit shows in Status within 1 s of the 429,
// with the CA's error reachable by errors.As; no further order is made.
func TestRateLimitShowsInStatusAtOnce(t *testing.T) {
	t.Parallel()
	const name = "limited.test"
	e := newEnv(t, envOptions{cache: memoryCache, names: []string{name}})
	m := e.start(t, func(c *Config) { c.HandshakeTimeout = time.Second })
	e.Proxy.AddRule(certmgrtest.Rule{Class: certmgrtest.ClassNewOrder, Identifier: name, Delay: 3 * time.Second,
		Status: http.StatusTooManyRequests, RetryAfter: "3600",
		Detail: "too many failed authorizations (5) for \"limited.test\" in the last 1h0m0s"})

	start := time.Now()
	leaf := e.handshake(t, name, insecure)
	took := time.Since(start)
	// Well before the CA's 3 s hold ends, with room for a loaded machine.
	if !isFallbackLeaf(leaf) || took > 2*time.Second {
		t.Errorf("handshake got %v after %v, want the fallback within 2 s", leaf.Subject, took)
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
	t.Parallel()
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
	t.Parallel()
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
	t.Parallel()
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
		// autocert's timer and the handshake alone: a renewal the CA's
		// renewal information asks for could replace the expired
		// certificate before the handshake does.
		c.hooks.noRenewalInfo = true
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
	t.Parallel()
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

// TestRenewalCutAtTransportEnds: a renewal whose request gets no answer
// (the CA holds it past the request timeout) ends at once, failed and
// logged, instead of holding the domain until autocert's next order.
func TestRenewalCutAtTransportEnds(t *testing.T) {
	t.Parallel()
	const name = "renew.test"
	e := newEnv(t, envOptions{names: []string{name}, pebble: certmgrtest.Options{CertValidity: time.Minute}})
	if err := e.start(t, nil).Provision(context.Background(), name); err != nil {
		t.Fatal(err)
	}
	e.cur.Load().Close()
	// From now on the CA takes every finalization and never answers.
	e.Proxy.AddRule(certmgrtest.Rule{Class: certmgrtest.ClassFinalize, Identifier: name, Hold: true})

	// Restarted with renewal due at once (RenewBefore covers the life),
	// by autocert's timer alone: the CA's renewal information, whose
	// window for a certificate of a minute opens at once too, would race
	// it (CI saw it win).
	events := &eventLog{}
	m := e.start(t, func(c *Config) {
		c.Autocert.RenewBefore = time.Hour
		c.OnEvent = events.add
		c.hooks.requestTimeout = 500 * time.Millisecond
		c.hooks.noRenewalInfo = true
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

// TestGracefulRestartsSpendAtMostTheBudget: six graceful restarts in a
// row, each right after the CA failed a validation (Close cuts the
// client's poll of the authorization), give the CA at most 4 failed
// validations: what an attempt may have spent is stored before its
// order goes out.
func TestGracefulRestartsSpendAtMostTheBudget(t *testing.T) {
	t.Parallel()
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

// TestCAThatLeavesAuthorizationsPending: a CA that leaves a failed
// validation pending (step-ca v0.30, imitated by the test CA) with 10
// handshakes a second: the attempt ends as one failed authorization soon
// after the grace, with the CA's detail; only the first handshake waits
// for it, the later ones get the fallback at once; and the CA's orders
// and failed validations, and the spends recorded, agree.
func TestCAThatLeavesAuthorizationsPending(t *testing.T) {
	t.Parallel()
	const name = "pending.test"
	e := newEnv(t, envOptions{names: []string{name}, pebble: certmgrtest.Options{PendingFailures: true}})
	e.DNS.SetA(name, "127.0.0.3") // nothing listens there
	events := &eventLog{}
	m := e.start(t, func(c *Config) {
		c.HandshakeTimeout = 200 * time.Millisecond
		c.hooks.challengeGrace = 500 * time.Millisecond // autocert polls every second
		c.hooks.cacheRetry = 50 * time.Millisecond      // handshakes read the Cache again, and find the attempt
		c.OnEvent = events.add
	})
	tick := time.NewTicker(100 * time.Millisecond)
	defer tick.Stop()
	handshakes := 0
	for events.count(EventFailed) == 0 {
		if handshakes == 300 {
			t.Fatalf("the attempt still runs after %d handshakes at 10 a second", handshakes)
		}
		<-tick.C
		if leaf := e.handshake(t, name, insecure); !isFallbackLeaf(leaf) {
			t.Fatalf("handshake %d got %v, want the fallback", handshakes, leaf.Subject)
		}
		handshakes++
	}
	if n := m.waitedShakes.Load(); n != 1 || handshakes < 3 {
		t.Errorf("%d of %d handshakes waited for the attempt, want the first only (and more than 2 handshakes)", n, handshakes)
	}
	ev := events.last(EventFailed)
	if ev.Duration > 15*time.Second {
		t.Errorf("the attempt took %v, want it ended within 15 s", ev.Duration)
	}
	st := waitFailed(t, m, name, 1)
	if st.LastError == nil || !strings.Contains(st.LastError.Error(), "Failed to connect to 127.0.0.3") {
		t.Errorf("Status.LastError = %v, want the CA's detail", st.LastError)
	}
	spent := 0
	for _, s := range failureOf(m, name).Spends {
		spent += s.Authz
	}
	if c := e.Proxy.Counts(name); c.Orders != 1 || c.FailedAuthzs != 1 || spent != 1 {
		t.Errorf("%d orders and %d failed validations at the CA, %d spends recorded; want 1 of each", c.Orders, c.FailedAuthzs, spent)
	}
}
