package certmgr

import (
	"fmt"
	"testing"
	"time"
)

// TestBudgetFree: the budget frees up as the oldest spends leave the
// rolling window.
func TestBudgetFree(t *testing.T) {
	t0 := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	f := failureRecord{Spends: []spend{{At: t0, Authz: 2}, {At: t0.Add(time.Minute), Authz: 2}}}
	if got := f.budgetFree(t0.Add(2*time.Minute), 1, 4); !got.Equal(t0.Add(budgetWindow)) {
		t.Errorf("budgetFree = %v, want when the first spend leaves the window (%v)", got, t0.Add(budgetWindow))
	}
	if got := f.budgetFree(t0.Add(2*time.Minute), 2, 4); !got.Equal(t0.Add(budgetWindow)) {
		t.Errorf("budgetFree(cost 2) = %v, want %v", got, t0.Add(budgetWindow))
	}
	if got := f.budgetFree(t0.Add(3*time.Hour), 2, 4); !got.Equal(t0.Add(3 * time.Hour)) {
		t.Errorf("budgetFree after the window = %v, want now", got)
	}
}

// TestBudgetHoldsAcrossSkewedClocks: a replica whose clock is ahead of
// the others' by up to maxClockSkew does not free the budget before the
// CA's hour has passed, whether it reads spends dated by a replica with a
// slower clock, or its own spends re-dated by one (prune dates none after
// its now).
func TestBudgetHoldsAcrossSkewedClocks(t *testing.T) {
	t0 := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC) // true time of the spends
	ahead := func(true time.Time) time.Time { return true.Add(maxClockSkew) }
	lastSecond := t0.Add(time.Hour - time.Second) // still inside the CA's hour

	slow := failureRecord{Spends: []spend{{At: t0, Authz: 4}}} // written by a replica with the right time
	if got := slow.budgetFree(ahead(lastSecond), 1, 4); !got.After(ahead(lastSecond)) {
		t.Errorf("a replica ahead by %v frees the budget at %v, inside the CA's hour", maxClockSkew, got)
	}
	redated := failureRecord{Spends: []spend{{At: ahead(t0), Authz: 4}}} // its own, written ahead
	redated.prune(t0)                                                    // by a replica with the right time
	if got := redated.budgetFree(ahead(lastSecond), 1, 4); !got.After(ahead(lastSecond)) {
		t.Errorf("a replica ahead by %v frees its re-dated spends at %v, inside the CA's hour", maxClockSkew, got)
	}
	if got := slow.budgetFree(ahead(t0.Add(time.Hour)), 1, 4); got.After(ahead(t0.Add(time.Hour))) {
		t.Errorf("the budget is not free once the CA's hour passed, on the replica ahead: free at %v", got)
	}
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
	if want := t0.Add(time.Minute + budgetWindow); !f.NextAttempt.Equal(want) {
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
