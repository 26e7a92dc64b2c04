package certmgr

import (
	"crypto/x509"
	"slices"
	"time"
)

// This file holds a domain's failure record: its consecutive failures and
// when the next attempt is due (after the Backoff schedule and the CA's
// Retry-After), and its budget of failed authorizations, with the
// reservations an order holds until the CA answers. The record is what is
// persisted, and in a cluster what replicas share.

// spend is failed authorizations counted against the budget. One with an
// ID is a reservation: an order's one authorization, counted from before
// the order went out until its outcome is known (settle). A reservation
// that is never settled, because the process died or closed before the
// CA answered, stays counted: the CA may have counted it too.
type spend struct {
	At    time.Time `json:"at"`
	Authz int       `json:"authz"`
	ID    string    `json:"id,omitempty"`
}

// failureRecord is what certmgr remembers of a domain's failed ACME
// attempts. It is persisted, so it holds only plain values.
type failureRecord struct {
	Failures    int       // consecutive failed attempts
	LastError   string    // the CA's problem detail, or the attempt's error
	LastFailure time.Time // when the last attempt failed
	NextAttempt time.Time // no attempt before this (schedule and CA's Retry-After)
	RetryAfter  time.Time // the CA's own Retry-After; the operator's Retry keeps it
	Spends      []spend   // failed and reserved authorizations in the last budgetWindow, oldest first
	// Renewed is when a renewal last succeeded (in a cluster, on any
	// replica): no other renewal is made for a while after it.
	Renewed time.Time
	// NotBefore and NotAfter are the validity of the newest certificate
	// obtained (in a cluster, by any replica): a replica knows from them,
	// without reading the certificate, that the domain has one and when
	// it is due for renewal.
	NotBefore, NotAfter time.Time
}

// spentSince returns the failed and reserved authorizations after t. A
// spend dated after now counts as made at now.
func (f *failureRecord) spentSince(t, now time.Time) int {
	n := 0
	for _, s := range f.Spends {
		if minTime(s.At, now).After(t) {
			n += s.Authz
		}
	}
	return n
}

// budgetFree returns the earliest time at or after now when an attempt that
// may fail cost authorizations fits in the budget of failed
// authorizations per rolling budgetWindow: now when it fits at once, and
// never later than budgetWindow from now.
func (f *failureRecord) budgetFree(now time.Time, cost, budget int) time.Time {
	if cost <= 0 {
		return now
	}
	t := now
	// Spends are in time order: dropping the oldest ones, in turn, is the
	// only way the window frees up.
	for i := 0; ; i++ {
		if f.spentSince(t.Add(-budgetWindow), now)+cost <= budget {
			return t
		}
		if i >= len(f.Spends) {
			return t // cost > budget: never fits; let it run after the window
		}
		t = maxTime(t, minTime(f.Spends[i].At, now).Add(budgetWindow))
	}
}

// reserve counts one authorization against the budget at now, under id,
// before the order that may fail it goes out. A reservation that is there
// already (a replica's first record of a domain starts from its own, which
// holds it) is not counted twice.
func (f *failureRecord) reserve(now time.Time, id string) {
	for _, s := range f.Spends {
		if s.ID == id {
			return
		}
	}
	f.Spends = append(f.Spends, spend{At: now, Authz: 1, ID: id})
	f.prune(now)
}

// settle ends the reservation id: the authorization failed, and stays
// counted, or it did not (it is valid, or the order was never made), and
// no longer counts. It reports whether the record changed.
func (f *failureRecord) settle(id string, failed bool) bool {
	for i, s := range f.Spends {
		if s.ID != id {
			continue
		}
		if failed {
			f.Spends[i].ID = ""
		} else {
			f.Spends = append(f.Spends[:i], f.Spends[i+1:]...)
		}
		return true
	}
	return false
}

// fail records a failed attempt at now and schedules the next one: the
// schedule's wait, but never before retryAfter (the CA's word, obeyed for
// at most maxRetryAfter) or before the budget of the next attempt (cost
// authorizations) is free again. The authorizations the attempt spent were
// reserved by its orders.
func (f *failureRecord) fail(now time.Time, msg string, cost, budget int, b Backoff, retryAfter time.Time, r float64) {
	f.Failures++
	f.LastError = msg
	f.LastFailure = now
	f.prune(now)
	f.RetryAfter = maxTime(minTime(f.RetryAfter, now.Add(maxRetryAfter)), minTime(retryAfter, now.Add(maxRetryAfter)))
	next := now.Add(b.delay(f.Failures, r))
	next = maxTime(next, f.RetryAfter)
	f.NextAttempt = maxTime(next, f.budgetFree(next, cost, budget))
}

// prune drops spends that left the window, dates none after now (the clock
// went back), and merges the oldest settled ones beyond maxSpends.
func (f *failureRecord) prune(now time.Time) {
	keep := f.Spends[:0]
	for _, s := range f.Spends {
		s.At = minTime(s.At, now)
		if s.At.After(now.Add(-budgetWindow)) {
			keep = append(keep, s)
		}
	}
	for i := 0; len(keep) > maxSpends && i+1 < len(keep); {
		if keep[i].ID != "" || keep[i+1].ID != "" {
			i++
			continue
		}
		keep[i+1].Authz += keep[i].Authz // the later time: counted for longer
		keep = append(keep[:i], keep[i+1:]...)
	}
	for len(keep) > maxSpends {
		// Only reservations left to merge: they stay counted, unsettled.
		keep[1].Authz += keep[0].Authz
		keep[1].ID = ""
		keep = keep[1:]
	}
	f.Spends = keep
}

// succeed clears the record after a successful attempt. Spent
// authorizations stay: the CA counts them for the rest of their window.
func (f *failureRecord) succeed(now time.Time) {
	*f = failureRecord{Spends: f.Spends, Renewed: f.Renewed, NotBefore: f.NotBefore, NotAfter: f.NotAfter}
	f.prune(now)
}

// obtained records leaf, a certificate obtained, unless a later one is.
func (f *failureRecord) obtained(leaf *x509.Certificate) {
	if leaf.NotBefore.Before(f.NotBefore) {
		return
	}
	f.NotBefore, f.NotAfter = leaf.NotBefore, leaf.NotAfter
}

// retryNow clears the schedule's wait for the operator's early retry, but
// keeps the CA's Retry-After and the failed-authorization budget.
func (f *failureRecord) retryNow(now time.Time, cost, budget int) {
	f.prune(now)
	f.NextAttempt = maxTime(minTime(f.RetryAfter, now.Add(maxRetryAfter)), f.budgetFree(now, cost, budget))
}

// merge adds what g knows to f: the later failure, the longer waits, and
// every spend of either (the same spend once).
func (f *failureRecord) merge(g failureRecord) {
	if g.LastFailure.After(f.LastFailure) {
		f.LastFailure, f.LastError = g.LastFailure, g.LastError
	}
	f.Failures = max(f.Failures, g.Failures)
	f.NextAttempt = maxTime(f.NextAttempt, g.NextAttempt)
	f.RetryAfter = maxTime(f.RetryAfter, g.RetryAfter)
	f.Renewed = maxTime(f.Renewed, g.Renewed)
	for _, s := range g.Spends {
		if !slices.Contains(f.Spends, s) {
			f.Spends = append(f.Spends, s)
		}
	}
	slices.SortStableFunc(f.Spends, func(a, b spend) int { return a.At.Compare(b.At) })
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

// empty reports whether the record carries no information any more. Renewed
// alone does not count: it guards against a loop for a while, and is kept
// as long as the record is.
func (f *failureRecord) empty(now time.Time) bool {
	f.prune(now)
	return f.Failures == 0 && len(f.Spends) == 0 && !now.Before(f.RetryAfter) && !now.Before(f.NotAfter)
}

// stale reports whether f tells nothing that still matters at now: no
// valid certificate, no wait of any kind (b's schedule, the CA's
// Retry-After, spent authorizations), and its last failure longer ago
// than b's longest wait and the budget's window together. A name that
// keeps failing, and a name with a certificate, keep their records.
func (f *failureRecord) stale(now time.Time, b Backoff) bool {
	f.prune(now)
	return !now.Before(f.NotAfter) && !now.Before(f.nextAttempt(now, b)) && !now.Before(f.RetryAfter) &&
		len(f.Spends) == 0 && now.Sub(f.LastFailure) > b.longest()+budgetWindow
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

// budgetWindow is the rolling window of the failed-authorization budget:
// the hour of Let's Encrypt's "failed validations" limit, and maxClockSkew
// more. A spend is dated with the clock of the replica that wrote it (or
// re-dated to the now of one whose clock is behind: see prune), so a
// replica whose clock is ahead sees it older than it is: with the margin,
// it still counts it for the CA's whole hour.
const budgetWindow = time.Hour + maxClockSkew

// maxClockSkew is how far apart the clocks of replicas may be without
// letting one of them free the budget's window before the CA does.
const maxClockSkew = 2 * time.Minute

// maxRetryAfter bounds how far ahead a CA's Retry-After is obeyed. Let's
// Encrypt's longest rate-limit window is a week.
const maxRetryAfter = 8 * 24 * time.Hour

// maxSpends bounds Spends. Beyond it the oldest settled spends are merged,
// so that no count is lost.
const maxSpends = 16
