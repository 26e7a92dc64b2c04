package certmgr

import (
	"context"
	"errors"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/certmgr/certmgr/certmgrtest"
	"golang.org/x/crypto/acme/autocert"
)

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
	// The CA says: the first order made none (503), and the order sent
	// again has its authorization failed: one spent.
	m.observed("a.test", observation{reservation: id, orderFailed: true, unavailable: true, problem: "Service Unavailable"})
	id2, err := m.admitOrder(order(current), "a.test")
	if err != nil {
		t.Errorf("the renewal's order sent again: %v, want it to pass", err)
	}
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

// TestOrderBudgetBinds: the account makes at most OrderBudget orders in 3
// hours; the next is refused with ErrBackoff and a warning.
func TestOrderBudgetBinds(t *testing.T) {
	t.Parallel()
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

// TestOrdersInsideAnAttemptKeepTheBudget: an order made while an attempt
// is in flight (its own next order) passes only if the budget holds one
// more authorization, and
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
		m.stateMu.Lock()
		a.open = "" // autocert orders again once the order before ended; what the CA said comes below
		m.stateMu.Unlock()
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

// TestRenewalQuietAfterA5xx: a renewal by autocert's timer whose request
// the CA answered with a 5xx ends renewalQuiet later unless the CA answers
// again (acme.Client sent it again); any answer about the order, a
// pending poll included, restores renewalMaxAge from its start, and a 5xx
// never moves its end past that.
func TestRenewalQuietAfterA5xx(t *testing.T) {
	m := newPureManager(t, newFakeClock(), func(c *Config) { c.hooks.renewalQuiet = time.Minute })
	d, err := m.domainFor("a.test")
	if err != nil {
		t.Fatal(err)
	}
	d.am = m.newAutocert(nil, m.cache)
	req, _ := http.NewRequest("POST", "https://ca.invalid/new-order", nil)
	req = req.WithContext(context.WithValue(req.Context(), senderKey{}, d.am))
	id, err := m.admitOrder(req, "a.test")
	if err != nil {
		t.Fatal(err)
	}
	m.stateMu.Lock()
	a := d.attempt
	end := a.timerEnd
	m.stateMu.Unlock()
	firesAt := func() time.Time {
		m.stateMu.Lock()
		defer m.stateMu.Unlock()
		return a.timerAt
	}
	if !firesAt().Equal(end) {
		t.Fatalf("a new renewal ends at %v, want its renewalMaxAge (%v)", firesAt(), end)
	}
	before := time.Now()
	m.observed("a.test", observation{reservation: id, unavailable: true, problem: "Service Unavailable"})
	if got := firesAt(); got.Before(before.Add(time.Minute)) || got.After(time.Now().Add(time.Minute)) {
		t.Errorf("after a 5xx the renewal ends at %v, want renewalQuiet (a minute) from then", got)
	}
	m.observed("a.test", observation{reservation: id, answered: true}) // a pending poll
	if got := firesAt(); !got.Equal(end) {
		t.Errorf("after another answer the renewal ends at %v, want %v again", got, end)
	}
	m.stateMu.Lock()
	a.timerEnd = time.Now().Add(time.Second) // its renewalMaxAge nearly over
	m.stateMu.Unlock()
	m.observed("a.test", observation{reservation: id, unavailable: true, problem: "Service Unavailable"})
	if got := firesAt(); got.After(time.Now().Add(time.Second)) {
		t.Errorf("a 5xx moved the renewal's end to %v, past its renewalMaxAge", got)
	}
	m.finish(d, a, nil, errors.New("done"))
}

// TestOrderAfterA5xxDoesNotWait: when the CA answers an order's challenge
// with 503 until acme.Client gives up, autocert makes its next order in
// the same attempt at once: the first order counts as ended, so the next
// one does not wait for the attempt to end (its own), and the attempt
// fails with the CA's detail.
func TestOrderAfterA5xxDoesNotWait(t *testing.T) {
	t.Parallel()
	const name = "challenge-503.test"
	e := newEnv(t, envOptions{names: []string{name}})
	e.Proxy.AddRule(certmgrtest.Rule{Class: certmgrtest.ClassChallenge, Identifier: name,
		Status: http.StatusServiceUnavailable, Detail: "validation is down", Times: 12})
	m := e.start(t, nil)
	err := m.Provision(context.Background(), name)
	if err == nil || !strings.Contains(err.Error(), "validation is down") {
		t.Errorf("Provision: %v, want the CA's 503 detail", err)
	}
	if n := m.waitedOrders.Load(); n != 0 {
		t.Errorf("%d orders waited for an order in flight of their own attempt", n)
	}
	if n := e.Proxy.Counts(name).Orders; n < 2 {
		t.Errorf("%d orders, want autocert's next order after the 503s", n)
	}
	if st := m.Status(name); st.Failures != 1 {
		t.Errorf("Status %+v, want the CA's failure counted once", st)
	}
}
