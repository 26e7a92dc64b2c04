package etcdcache

import (
	"context"
	"errors"
	"net/http"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/certmgr/certmgr"
	"github.com/certmgr/certmgr/certmgrtest"
)

// TestCARetryAfterBindsEveryReplica: the CA's 429 with a Retry-After of
// an hour, met by one replica, binds every replica: each shows the next
// attempt at least an hour ahead, refuses Provision with ErrBackoff
// without sending a new order, and the operator's Retry on another
// replica does not lift it, neither there nor in the cluster's record (a
// restarted replica, which reads the record from etcd, refuses too).
func TestCARetryAfterBindsEveryReplica(t *testing.T) {
	const name = "limited.test"
	c := startCluster(t, clusterOptions{names: []string{name}})
	c.ca.Proxy.AddRule(certmgrtest.Rule{Class: certmgrtest.ClassNewOrder, Identifier: name,
		Status: http.StatusTooManyRequests, RetryAfter: "3600", Detail: "too many new orders recently"})
	ms := c.managers()
	start := time.Now()
	ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
	err := ms[0].Provision(ctx, name)
	cancel()
	if ae := (*certmgr.AttemptError)(nil); !errors.As(err, &ae) {
		t.Fatalf("Provision against a 429: %v, want the CA's refusal (an *AttemptError)", err)
	}
	if n := c.ca.Proxy.Requests(certmgrtest.ClassNewOrder); n != 1 {
		t.Fatalf("%d new-order requests, want the one the CA refused", n)
	}
	// The Retry-After is counted from the CA's answer, after start.
	limit := start.Add(time.Hour - time.Second)
	holds := func(m *certmgr.Manager) bool { return m.Status(name).NextAttempt.After(limit) }
	waitFor(t, 5*time.Second, "every replica to hold the CA's Retry-After", func() bool {
		return holds(ms[0]) && holds(ms[1]) && holds(ms[2])
	})
	for _, i := range []int{1, 2} {
		if err := ms[i].Provision(t.Context(), name); !errors.Is(err, certmgr.ErrBackoff) {
			t.Errorf("replica %d: Provision = %v, want ErrBackoff", i, err)
		}
	}
	if n := c.ca.Proxy.Requests(certmgrtest.ClassNewOrder); n != 1 {
		t.Fatalf("%d new-order requests after the other replicas' Provision, want 1", n)
	}

	ms[1].Retry(name) // the operator cannot override the CA
	for i, m := range ms {
		if err := m.Provision(t.Context(), name); !errors.Is(err, certmgr.ErrBackoff) {
			t.Errorf("replica %d after Retry: Provision = %v, want ErrBackoff", i, err)
		}
		if !holds(m) {
			t.Errorf("replica %d after Retry: NextAttempt %v, want after %v", i, m.Status(name).NextAttempt, limit)
		}
	}
	// A replica that starts now knows the domain only from etcd: the
	// record the Retry wrote there still holds the Retry-After.
	r := c.replicas[2]
	r.restart()
	if err := r.manager().Provision(t.Context(), name); !errors.Is(err, certmgr.ErrBackoff) {
		t.Errorf("restarted replica after Retry: Provision = %v, want ErrBackoff", err)
	}
	if !holds(r.manager()) {
		t.Errorf("restarted replica after Retry: NextAttempt %v, want after %v", r.manager().Status(name).NextAttempt, limit)
	}
	if n := c.ca.Proxy.Requests(certmgrtest.ClassNewOrder); n != 1 {
		t.Errorf("%d new-order requests in all, want the one the CA refused", n)
	}
}

// simClock is a clock that moves only when told.
type simClock struct {
	mu sync.Mutex
	t  time.Time
}

func (c *simClock) now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.t
}

func (c *simClock) advance(d time.Duration) {
	c.mu.Lock()
	c.t = c.t.Add(d)
	c.mu.Unlock()
}

// TestBudgetHoldsFor48SimulatedHours: for 48 simulated hours of failing
// validation, a handshake every simulated minute on the replicas in turn,
// one replica restarted every 6 hours and one cut off from etcd for a
// while: the cluster fails at most 4 authorizations (the budget) in any
// rolling hour. The backoff is a minute after every failure, so that the
// budget is what binds.
func TestBudgetHoldsFor48SimulatedHours(t *testing.T) {
	const name = "sim.test"
	clock := &simClock{t: time.Now()}
	c := startCluster(t, clusterOptions{
		names: []string{name},
		now:   clock.now,
		config: func(_ int, cfg *certmgr.Config) {
			cfg.Backoff = certmgr.Backoff{Steps: []time.Duration{time.Minute}, Jitter: -1}
			cfg.HandshakeTimeout = 2 * time.Second
		},
	})
	c.ca.DNS.SetA(name, "127.0.0.3") // nothing listens there: validation fails
	start := clock.now()
	var (
		spends   []time.Time // on the simulated clock, one per failed authorization
		restarts int
		cut      *replica
	)
	for step := 0; clock.now().Sub(start) < 48*time.Hour; step++ {
		elapsed := clock.now().Sub(start)
		switch {
		case step > 0 && elapsed%(6*time.Hour) == 0:
			c.replicas[restarts%3].restart()
			restarts++
		case elapsed == 27*time.Hour:
			cut = c.replicas[1]
			cut.link.cut()
		case elapsed == 27*time.Hour+10*time.Minute:
			cut.link.heal()
			waitFor(t, 30*time.Second, "the replica cut off to reach etcd again", func() bool {
				cut.mu.Lock()
				cli := cut.cli
				cut.mu.Unlock()
				ctx, cancel := context.WithTimeout(t.Context(), time.Second)
				defer cancel()
				_, err := cli.Get(ctx, "/cluster/probe")
				return err == nil
			})
		}
		r := c.replicas[step%3]
		if _, err := r.getCertificate(name); err != nil {
			t.Fatalf("at %v: handshake on replica %d: %v", elapsed, step%3, err)
		}
		// Attempts outlive a handshake that timed out: the minute ends
		// when none is in flight.
		waitFor(t, 30*time.Second, "no attempt in flight", func() bool {
			for _, m := range c.managers() {
				if m.Status(name).State == certmgr.StateObtaining {
					return false
				}
			}
			return true
		})
		for n := c.ca.Proxy.Counts(name).FailedAuthzs; len(spends) < n; {
			spends = append(spends, clock.now())
		}
		clock.advance(time.Minute)
	}

	offsets := make([]time.Duration, len(spends))
	for i, s := range spends {
		offsets[i] = s.Sub(start)
	}
	if len(spends) < 8 {
		t.Fatalf("only %d failed authorizations in 48 simulated hours, at %v; the simulation made too few attempts to test the budget",
			len(spends), offsets)
	}
	most := 0
	for i, s := range spends {
		j := i + slices.IndexFunc(spends[i:], func(u time.Time) bool { return !u.Before(s.Add(time.Hour)) })
		if j < i {
			j = len(spends)
		}
		most = max(most, j-i)
		if n := j - i; n > 4 {
			t.Errorf("%d failed authorizations in the hour from %v, want at most 4: at %v", n, offsets[i], offsets[i:j])
		}
	}
	t.Logf("%d failed authorizations in 48 simulated hours (%d restarts), at most %d in any rolling hour", len(spends), restarts, most)
}
