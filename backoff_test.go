package certmgr

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"net/http"
	"testing"
	"time"

	"github.com/certmgr/certmgr/internal/testsupport"
)

// TestBackoffDelays: the default schedule's waits, with at most 10%
// jitter added; no jitter when negative; a custom schedule's last step
// repeats.
func TestBackoffDelays(t *testing.T) {
	b := defaultBackoff
	for n, want := range []time.Duration{time.Minute, 10 * time.Minute, 100 * time.Minute, 24 * time.Hour, 24 * time.Hour} {
		if got := b.delay(n+1, 0); got != want {
			t.Errorf("delay(%d, 0) = %v, want %v", n+1, got, want)
		}
		if got, max := b.delay(n+1, 0.999), want+want/10; got < want || got > max {
			t.Errorf("delay(%d, 0.999) = %v, want in [%v, %v]", n+1, got, want, max)
		}
	}
	if got := (Backoff{Jitter: -1}).withDefaults(defaultBackoff).delay(1, 0.9); got != time.Minute {
		t.Errorf("negative jitter: delay = %v, want exactly 1m", got)
	}
	custom := Backoff{Steps: []time.Duration{time.Second}}.withDefaults(defaultBackoff)
	if got := custom.delay(7, 0); got != time.Second {
		t.Errorf("custom schedule: delay(7) = %v, want 1s", got)
	}
}

// TestBudgetFree: the budget frees up as the oldest spends leave the
// rolling hour.
func TestBudgetFree(t *testing.T) {
	t0 := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	f := failureRecord{Spends: []spend{{At: t0, Authz: 2}, {At: t0.Add(time.Minute), Authz: 2}}}
	if got := f.budgetFree(t0.Add(2*time.Minute), 1, 4); !got.Equal(t0.Add(time.Hour)) {
		t.Errorf("budgetFree = %v, want when the first spend leaves the window (%v)", got, t0.Add(time.Hour))
	}
	if got := f.budgetFree(t0.Add(2*time.Minute), 2, 4); !got.Equal(t0.Add(time.Hour)) {
		t.Errorf("budgetFree(cost 2) = %v, want %v", got, t0.Add(time.Hour))
	}
	if got := f.budgetFree(t0.Add(3*time.Hour), 2, 4); !got.Equal(t0.Add(3 * time.Hour)) {
		t.Errorf("budgetFree after the window = %v, want now", got)
	}
}

// TestScheduleKeepsBudget: over 48 simulated hours of continuous failure,
// first issuance and renewal attempts alike, the failed authorizations in
// every rolling hour stay within the budget of 4, and after the first day
// within 2 a day.
func TestScheduleKeepsBudget(t *testing.T) {
	for _, http01 := range []bool{false, true} {
		clock := newFakeClock()
		m := newPureManager(t, clock, func(c *Config) { c.hooks.rand = rand.New(rand.NewPCG(1, 2)).Float64 })
		m.http01.Store(http01)
		spends := simulateFailures(t, clock, []*Manager{m})
		checkBudget48h(t, fmt.Sprintf("http01=%v", http01), spends, newFakeClock().Now())
	}
}

// simName is the domain of simulateFailures.
const simName = "sim.test"

// simulateFailures runs 48 simulated hours of continuous failure on the
// Managers ms, which share clock and take turns a minute each: autocert's
// renewal timer and handshake attempts alternate, every authorization
// fails. It returns the time of each failed authorization.
func simulateFailures(t *testing.T, clock *testsupport.Clock, ms []*Manager) []time.Time {
	t.Helper()
	ds := make([]*domain, len(ms))
	for i, m := range ms {
		d, err := m.domainFor(simName)
		if err != nil {
			t.Fatal(err)
		}
		ds[i] = d
	}
	start := clock.Now()
	var spends []time.Time // one per failed authorization
	req, _ := http.NewRequest("POST", "https://ca.invalid/new-order", nil)
	for i := 0; clock.Now().Sub(start) < 48*time.Hour; i++ {
		m, d := ms[i%len(ms)], ds[i%len(ms)]
		// One order: admitted (its authorization reserved) or refused,
		// then its authorization fails.
		order := func() bool {
			id, err := m.admitOrder(req, simName)
			if err != nil {
				return false
			}
			m.observed(simName, observation{reservation: id, order: true})
			m.observed(simName, observation{reservation: id, authzFailed: true, problem: "Connection refused"})
			spends = append(spends, clock.Now())
			return true
		}
		orders := func() {
			for range m.cost() {
				if !order() {
					break
				}
			}
		}
		if i%2 == 0 {
			// A renewal by autocert's timer: its orders are admitted or
			// refused; it ends once every challenge type failed.
			orders()
			m.stateMu.Lock()
			a := d.attempt
			m.stateMu.Unlock()
			if a != nil {
				m.finish(d, a, nil, errors.New("acme/autocert: renewal failed"))
			}
		} else {
			// A handshake: begin's gate, the cluster's lock and record if
			// there is one, then a failed attempt.
			m.stateMu.Lock()
			gate := m.checkAttemptLocked(d)
			var a *attempt
			if gate == nil {
				a = &attempt{path: PathHandshake, start: clock.Now(), done: make(chan struct{})}
				d.attempt = a
				m.inFlight++
			}
			m.stateMu.Unlock()
			if gate != nil {
				if !errors.Is(gate, ErrBackoff) {
					t.Fatalf("gate: %v", gate)
				}
				clock.Advance(time.Minute)
				continue
			}
			err := m.lockDomain(context.Background(), d, a)
			if err == nil && m.coord != nil {
				err = m.checkClusterRecord(context.Background(), d)
			}
			if err == nil {
				orders()
				err = errors.New("acme/autocert: missing certificate")
			}
			m.finish(d, a, nil, err)
		}
		clock.Advance(time.Minute)
	}
	return spends
}

// checkBudget48h fails t if spends, failed authorizations from start on,
// are fewer than 4 (the simulation did not run), more than 4 in any
// rolling hour, or more than 2 in any day after the first.
func checkBudget48h(t *testing.T, what string, spends []time.Time, start time.Time) {
	t.Helper()
	if len(spends) < 4 {
		t.Fatalf("%s: only %d failed authorizations in 48h; the simulation did not run", what, len(spends))
	}
	for _, s := range spends {
		if n := countIn(spends, s, time.Hour); n > 4 {
			t.Errorf("%s: %d failed authorizations in the hour from %v", what, n, s.Sub(start))
		}
		if s.Sub(start) >= 24*time.Hour {
			if n := countIn(spends, s, 24*time.Hour); n > 2 {
				t.Errorf("%s: %d failed authorizations in the day from %v", what, n, s.Sub(start))
			}
		}
	}
	t.Logf("%s: %d failed authorizations in 48h, at %v", what, len(spends), offsets(spends, start))
}

// countIn counts the times in [from, from+window).
func countIn(ts []time.Time, from time.Time, window time.Duration) int {
	n := 0
	for _, t := range ts {
		if !t.Before(from) && t.Before(from.Add(window)) {
			n++
		}
	}
	return n
}

func offsets(ts []time.Time, start time.Time) []time.Duration {
	out := make([]time.Duration, len(ts))
	for i, t := range ts {
		out[i] = t.Sub(start).Round(time.Minute)
	}
	return out
}

// TestFailureRecordRetryKeepsRetryAfter: the operator's early retry keeps
// the CA's Retry-After; a success clears the record.
func TestFailureRecordRetryKeepsRetryAfter(t *testing.T) {
	t0 := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	var f failureRecord
	f.fail(t0, "rate limited", 1, 4, defaultBackoff, t0.Add(time.Hour), 0)
	if !f.NextAttempt.Equal(t0.Add(time.Hour)) {
		t.Fatalf("NextAttempt = %v, want the CA's Retry-After", f.NextAttempt)
	}
	f.retryNow(t0.Add(time.Minute), 1, 4)
	if !f.NextAttempt.Equal(t0.Add(time.Hour)) {
		t.Errorf("after retryNow NextAttempt = %v, want the CA's Retry-After kept", f.NextAttempt)
	}
	f.succeed(t0.Add(2 * time.Hour))
	if f.Failures != 0 || f.LastError != "" || !f.NextAttempt.IsZero() || !f.empty(t0.Add(2*time.Hour)) {
		t.Errorf("after success: %+v", f)
	}
}

// TestFailureRecordFail: each failure counts and schedules the next
// attempt by the schedule, never before the CA's Retry-After (trusted for
// at most a week) nor before the budget can pay for the next attempt.
func TestFailureRecordFail(t *testing.T) {
	t0 := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	b := Backoff{Steps: []time.Duration{time.Minute, 10 * time.Minute}, Jitter: -1}
	var f failureRecord
	f.fail(t0, "one", 1, 4, b, time.Time{}, 0)
	f.fail(t0.Add(time.Minute), "two", 1, 4, b, time.Time{}, 0)
	if f.Failures != 2 || f.LastError != "two" || !f.LastFailure.Equal(t0.Add(time.Minute)) || !f.NextAttempt.Equal(t0.Add(11*time.Minute)) {
		t.Errorf("after two failures: %+v", f)
	}
	// Four failed authorizations in the hour: the next attempt, which may
	// fail two, waits until two of them left the window.
	for i := range 4 {
		id := fmt.Sprint(i)
		f.reserve(t0.Add(time.Duration(i)*time.Minute), id)
		f.settle(id, true)
	}
	f.fail(t0.Add(4*time.Minute), "three", 2, 4, b, time.Time{}, 0)
	if want := t0.Add(61 * time.Minute); !f.NextAttempt.Equal(want) {
		t.Errorf("NextAttempt %v, want %v when the budget can pay", f.NextAttempt, want)
	}
	var g failureRecord
	g.fail(t0, "limited", 1, 4, b, t0.Add(30*24*time.Hour), 0)
	if want := t0.Add(maxRetryAfter); !g.NextAttempt.Equal(want) || !g.RetryAfter.Equal(want) {
		t.Errorf("a Retry-After a month ahead: next %v, retry-after %v; want a week (%v)", g.NextAttempt, g.RetryAfter, want)
	}
	if len(g.Spends) != 0 {
		t.Errorf("a failure spent %+v: only orders reserve the budget", g.Spends)
	}
}

// TestFailureRecordReservations: an order reserves one authorization; the
// CA's word settles it: spent if the authorization failed, freed if not.
func TestFailureRecordReservations(t *testing.T) {
	t0 := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	var f failureRecord
	f.reserve(t0, "r1")
	f.reserve(t0, "r2")
	f.reserve(t0, "r1") // a replica's first record starts from its own, which holds r1
	if n := f.spentSince(t0.Add(-time.Hour), t0); n != 2 {
		t.Errorf("%d reserved, want 2", n)
	}
	if !f.settle("r1", false) || !f.settle("r2", true) || f.settle("r3", true) {
		t.Error("settle did not find the reservations, or found one never made")
	}
	if n := f.spentSince(t0.Add(-time.Hour), t0); n != 1 || len(f.Spends) != 1 || f.Spends[0].ID != "" {
		t.Errorf("after settling: %+v, want the failed one spent", f.Spends)
	}
}

// TestFailureRecordPrune: spends leave after the hour, a spend from the
// future is dated now, and beyond maxSpends the oldest settled ones are
// merged, their authorizations still counted.
func TestFailureRecordPrune(t *testing.T) {
	t0 := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	var f failureRecord
	for i := range maxSpends + 4 {
		f.Spends = append(f.Spends, spend{At: t0.Add(time.Duration(i) * time.Second), Authz: 1})
	}
	f.Spends = append(f.Spends, spend{At: t0.Add(time.Hour), Authz: 1})
	now := t0.Add(time.Minute)
	f.prune(now)
	if len(f.Spends) != maxSpends || !f.Spends[maxSpends-1].At.Equal(now) || f.spentSince(t0.Add(-time.Hour), now) != maxSpends+5 {
		t.Errorf("after prune: %d spends of %d authorizations, last at %v", len(f.Spends), f.spentSince(t0.Add(-time.Hour), now), f.Spends[len(f.Spends)-1].At)
	}
	f.prune(t0.Add(2 * time.Hour))
	if len(f.Spends) != 0 || !f.empty(t0.Add(2*time.Hour)) {
		t.Errorf("after the window: %+v", f)
	}
	g := failureRecord{RetryAfter: t0.Add(time.Hour)}
	if g.empty(t0) || !g.empty(t0.Add(time.Hour)) {
		t.Error("a record with only the CA's Retry-After is empty only once it passed")
	}
}

// TestNextAttemptIsBounded: whatever a record says, the next attempt is
// at most the schedule's longest wait from now, or the CA's Retry-After
// if later, and never beyond a week.
func TestNextAttemptIsBounded(t *testing.T) {
	now := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	b := Backoff{Steps: []time.Duration{time.Minute, 10 * time.Minute}, Jitter: -1}
	for _, tt := range []struct {
		f    failureRecord
		want time.Time
	}{
		{failureRecord{}, time.Time{}},
		{failureRecord{NextAttempt: now.Add(time.Minute)}, now.Add(time.Minute)},
		{failureRecord{NextAttempt: now.Add(time.Hour)}, now.Add(10 * time.Minute)},
		{failureRecord{NextAttempt: now.Add(time.Hour), RetryAfter: now.Add(30 * time.Minute)}, now.Add(30 * time.Minute)},
		{failureRecord{NextAttempt: now.Add(1000 * time.Hour), RetryAfter: now.Add(1000 * time.Hour)}, now.Add(maxRetryAfter)},
	} {
		if got := tt.f.nextAttempt(now, b); !got.Equal(tt.want) {
			t.Errorf("nextAttempt(%+v) = %v, want %v", tt.f, got, tt.want)
		}
	}
	if got := b.longest(); got != 10*time.Minute {
		t.Errorf("longest = %v", got)
	}
	if got := defaultBackoff.longest(); got != 24*time.Hour+24*time.Hour/10 {
		t.Errorf("default longest = %v, want a day plus 10%%", got)
	}
}
