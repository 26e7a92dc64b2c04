package certmgr

import "time"

// Backoff is a retry schedule: how long to wait after consecutive failures.
// The zero value is usable: it selects the schedule's documented default.
type Backoff struct {
	// Steps are the waits after the 1st, 2nd, 3rd, ... consecutive failure;
	// the last step repeats for every failure after that.
	// If empty, the default of the field that holds the Backoff is used.
	Steps []time.Duration

	// Jitter is the largest fraction of a wait added at random, so that
	// a fleet of servers does not retry in step. It only ever adds:
	// a wait is never shorter than its step.
	// If zero, 0.1 (up to 10% more). If negative, no jitter.
	Jitter float64
}

// defaultBackoff is the ACME retry schedule used when Config.Backoff is
// zero, after Let's Encrypt's integration guide: about a minute after the
// first failure, ten minutes after the second, 100 minutes after the third,
// then once a day.
var defaultBackoff = Backoff{
	Steps:  []time.Duration{time.Minute, 10 * time.Minute, 100 * time.Minute, 24 * time.Hour},
	Jitter: 0.1,
}

// defaultDNSRecheck is the DNS recheck schedule used when Config.DNSRecheck
// is zero: 30 seconds, growing to at most 10 minutes.
var defaultDNSRecheck = Backoff{
	Steps:  []time.Duration{30 * time.Second, time.Minute, 2 * time.Minute, 5 * time.Minute, 10 * time.Minute},
	Jitter: 0.1,
}

// withDefaults returns b with its zero fields taken from def.
func (b Backoff) withDefaults(def Backoff) Backoff {
	if len(b.Steps) == 0 {
		b.Steps = def.Steps
	}
	if b.Jitter == 0 {
		b.Jitter = def.Jitter
	}
	return b
}

// step returns the wait after the n-th consecutive failure (n >= 1),
// without jitter.
func (b Backoff) step(n int) time.Duration {
	if len(b.Steps) == 0 {
		return 0
	}
	n = min(max(n, 1), len(b.Steps))
	return b.Steps[n-1]
}

// longest returns the longest wait the schedule can ask for, jitter
// included.
func (b Backoff) longest() time.Duration {
	return b.delay(len(b.Steps), 1)
}

// delay returns the wait after the n-th consecutive failure, with jitter
// drawn from r in [0, 1).
func (b Backoff) delay(n int, r float64) time.Duration {
	d := b.step(n)
	if b.Jitter > 0 {
		d += time.Duration(float64(d) * b.Jitter * r)
	}
	return d
}

// budgetWindow is the rolling window of the failed-authorization budget,
// the window of Let's Encrypt's "failed validations" limit.
const budgetWindow = time.Hour

// maxRetryAfter bounds how far ahead a CA's Retry-After is obeyed. Let's
// Encrypt's longest rate-limit window is a week.
const maxRetryAfter = 8 * 24 * time.Hour

// spend is one attempt's failed authorizations.
type spend struct {
	At    time.Time `json:"at"`
	Authz int       `json:"authz"`
}

// failureRecord is what certmgr remembers of a domain's failed ACME
// attempts. It is persisted, so it holds only plain values.
type failureRecord struct {
	Failures    int       // consecutive failed attempts
	LastError   string    // the CA's problem detail, or the attempt's error
	LastFailure time.Time // when the last attempt failed
	NextAttempt time.Time // no attempt before this (schedule and CA's Retry-After)
	RetryAfter  time.Time // the CA's own Retry-After; the operator's Retry keeps it
	Spends      []spend   // failed authorizations in the last budgetWindow
}

// maxSpends bounds Spends: the budget never allows more attempts than
// this in one window.
const maxSpends = 16

// spentSince returns the failed authorizations spent after t.
func (f *failureRecord) spentSince(t time.Time) int {
	n := 0
	for _, s := range f.Spends {
		if s.At.After(t) {
			n += s.Authz
		}
	}
	return n
}

// budgetFree returns the earliest time at or after now when an attempt that
// may fail cost authorizations fits in the budget of failed
// authorizations per rolling budgetWindow. It returns now when it fits at once.
func (f *failureRecord) budgetFree(now time.Time, cost, budget int) time.Time {
	if cost <= 0 {
		return now
	}
	t := now
	// Spends are in time order: dropping the oldest ones, in turn, is the
	// only way the window frees up.
	for i := 0; ; i++ {
		if f.spentSince(t.Add(-budgetWindow))+cost <= budget {
			return t
		}
		if i >= len(f.Spends) {
			return t // cost > budget: never fits; let it run after the window
		}
		t = maxTime(t, f.Spends[i].At.Add(budgetWindow))
	}
}

// fail records a failed attempt at now that spent authz failed
// authorizations, and schedules the next attempt: the schedule's wait, but
// never before retryAfter (the CA's word) or before the budget of the
// next attempt (cost authorizations) is free again.
func (f *failureRecord) fail(now time.Time, msg string, authz, cost, budget int, b Backoff, retryAfter time.Time, r float64) {
	f.Failures++
	f.LastError = msg
	f.LastFailure = now
	if authz > 0 {
		f.Spends = append(f.Spends, spend{At: now, Authz: authz})
	}
	f.prune(now)
	// Trust the CA's Retry-After, but not beyond maxRetryAfter: a wrong
	// answer must not lock a domain out for years.
	f.RetryAfter = maxTime(f.RetryAfter, minTime(retryAfter, now.Add(maxRetryAfter)))
	next := now.Add(b.delay(f.Failures, r))
	next = maxTime(next, f.RetryAfter)
	f.NextAttempt = maxTime(next, f.budgetFree(next, cost, budget))
}

// prune drops spends that left the window, and the oldest beyond maxSpends.
func (f *failureRecord) prune(now time.Time) {
	keep := f.Spends[:0]
	for _, s := range f.Spends {
		s.At = minTime(s.At, now) // the clock went back: not in the future
		if s.At.After(now.Add(-budgetWindow)) {
			keep = append(keep, s)
		}
	}
	if len(keep) > maxSpends {
		keep = keep[len(keep)-maxSpends:]
	}
	f.Spends = keep
}

// succeed clears the record after a successful attempt. Spent
// authorizations stay: the CA counts them for the rest of their window.
func (f *failureRecord) succeed(now time.Time) {
	*f = failureRecord{Spends: f.Spends}
	f.prune(now)
}

// retryNow clears the schedule's wait for the operator's early retry, but
// keeps the CA's Retry-After and the failed-authorization budget.
func (f *failureRecord) retryNow(now time.Time, cost, budget int) {
	f.prune(now)
	f.NextAttempt = maxTime(f.RetryAfter, f.budgetFree(now, cost, budget))
}

// nextAttempt returns when the next attempt may start, bounded against
// now: never later than the schedule's longest wait from now, or the CA's
// Retry-After if that is later, and never later than maxRetryAfter from
// now, whatever the record says (the clock went back, or the record came
// from a far future or a hostile store).
func (f *failureRecord) nextAttempt(now time.Time, b Backoff) time.Time {
	retryAfter := minTime(f.RetryAfter, now.Add(maxRetryAfter))
	return minTime(f.NextAttempt, maxTime(now.Add(b.longest()), retryAfter))
}

// empty reports whether the record carries no information any more.
func (f *failureRecord) empty(now time.Time) bool {
	f.prune(now)
	return f.Failures == 0 && len(f.Spends) == 0 && !now.Before(f.RetryAfter)
}

func minTime(a, b time.Time) time.Time {
	if b.Before(a) {
		return b
	}
	return a
}

func maxTime(a, b time.Time) time.Time {
	if b.After(a) {
		return b
	}
	return a
}
