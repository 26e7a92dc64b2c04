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

// TestScheduleKeepsBudget: over 48 simulated hours of continuous failure,
// first issuance and renewal attempts alike, the failed authorizations in
// every rolling hour stay within the budget of 4, and after the first day
// within 2 a day.
//
// The default schedule alone keeps within the budget; with a Backoff of
// a minute, the default budget of 4 binds every hour.
func TestScheduleKeepsBudget(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		http01  bool
		backoff Backoff
	}{{false, Backoff{}}, {true, Backoff{}}, {false, Backoff{Steps: []time.Duration{time.Minute}, Jitter: -1}}} {
		clock := newFakeClock()
		m := newPureManager(t, clock, func(c *Config) {
			c.hooks.rand = rand.New(rand.NewPCG(1, 2)).Float64
			c.Backoff = tc.backoff
		})
		m.http01.Store(tc.http01)
		spends := simulateFailures(t, clock, []*Manager{m})
		what := fmt.Sprintf("http01=%v", tc.http01)
		if tc.backoff.Steps != nil {
			what = "backoff of a minute"
			if n := countIn(spends, newFakeClock().Now(), time.Hour); n != 4 {
				t.Errorf("%s: %d failed authorizations in the first hour, want the budget's 4", what, n)
			}
		}
		checkBudget48h(t, what, spends, newFakeClock().Now(), tc.backoff.Steps == nil)
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
// rolling hour, or, if daily, more than 2 in any day after the first.
func checkBudget48h(t *testing.T, what string, spends []time.Time, start time.Time, daily bool) {
	t.Helper()
	if len(spends) < 4 {
		t.Fatalf("%s: only %d failed authorizations in 48h; the simulation did not run", what, len(spends))
	}
	for _, s := range spends {
		if n := countIn(spends, s, time.Hour); n > 4 {
			t.Errorf("%s: %d failed authorizations in the hour from %v", what, n, s.Sub(start))
		}
		if daily && s.Sub(start) >= 24*time.Hour {
			if n := countIn(spends, s, 24*time.Hour); n > 2 {
				t.Errorf("%s: %d failed authorizations in the day from %v", what, n, s.Sub(start))
			}
		}
	}
	if len(spends) <= 20 {
		t.Logf("%s: %d failed authorizations in 48h, at %v", what, len(spends), offsets(spends, start))
	} else {
		t.Logf("%s: %d failed authorizations in 48h, the first at %v", what, len(spends), offsets(spends[:20], start))
	}
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
