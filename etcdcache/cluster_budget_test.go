package etcdcache

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/certmgr/certmgr"
	"github.com/certmgr/certmgr/certmgrtest"
	"github.com/certmgr/certmgr/internal/testsupport"
)

// TestBudgetBindsEveryReplica: with validation failing, Retry on one
// replica and then an attempt on the next, in turn: the first 4 attempts
// reach the CA and each fails one authorization; the 5th is refused with
// ErrBackoff on every replica, since Retry lifts the backoff but never
// the cluster's budget of 4 failed authorizations per rolling hour, and
// no order reaches the CA for it.
func TestBudgetBindsEveryReplica(t *testing.T) {
	t.Parallel()
	const name = "budget.test"
	c := startCluster(t, clusterOptions{names: []string{name}})
	c.ca.DNS.SetA(name, "127.0.0.3") // nothing listens there: validation fails
	ms := c.managers()
	for i := range 4 {
		m := ms[i%3]
		ms[(i+2)%3].Retry(name) // the previous replica's operator
		// Free: the Retry seen, and the budget not binding (a NextAttempt
		// an hour ahead, the budget's, would time this wait out). A
		// NextAttempt far ahead may also be the backoff of failure 3 (100
		// minutes) with the Retry not seen yet, so it is not accepted.
		waitFor(t, 5*time.Second, fmt.Sprintf("replica %d to see failure %d and the Retry, with the budget free", i%3, i), func() bool {
			st := m.Status(name)
			return st.Failures == i && st.NextAttempt.IsZero()
		})
		ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
		err := m.Provision(ctx, name)
		cancel()
		if ae := (*certmgr.AttemptError)(nil); !errors.As(err, &ae) {
			t.Fatalf("attempt %d on replica %d: %v, want the CA's failure (an *AttemptError); the CA failed %d authorizations so far, within the budget of 4",
				i+1, i%3, err, c.ca.Proxy.Counts(name).FailedAuthzs)
		}
		if got := c.ca.Proxy.Counts(name); got.Orders != i+1 || got.FailedAuthzs != i+1 {
			t.Fatalf("after attempt %d: %d orders and %d failed authorizations, want %d and %d (%+v)",
				i+1, got.Orders, got.FailedAuthzs, i+1, i+1, got)
		}
	}

	// The 5th: the Retry lifts the backoff, and the budget binds.
	m := ms[4%3]
	ms[(4+2)%3].Retry(name)
	waitFor(t, 5*time.Second, "the next replica to see the 4th failure and the Retry", func() bool {
		// The budget's wait (about an hour after the first failure), not
		// the 4th failure's backoff (a day) that the Retry lifts.
		st := m.Status(name)
		d := time.Until(st.NextAttempt)
		return st.Failures == 4 && d > 30*time.Minute && d < 2*time.Hour
	})
	for _, i := range []int{4 % 3, (4 + 1) % 3, (4 + 2) % 3} {
		err := ms[i].Provision(t.Context(), name)
		if !errors.Is(err, certmgr.ErrBackoff) {
			t.Errorf("replica %d with the budget spent: Provision = %v, want ErrBackoff", i, err)
		}
		if st := ms[i].Status(name); time.Until(st.NextAttempt) < 30*time.Minute {
			t.Errorf("replica %d: NextAttempt %v, want when the budget frees up, about an hour after the first failure", i, st.NextAttempt)
		}
	}
	if got := c.ca.Proxy.Counts(name); got.Orders != 4 || got.FailedAuthzs != 4 {
		t.Errorf("%d orders and %d failed authorizations in all, want 4 and 4 (%+v)", got.Orders, got.FailedAuthzs, got)
	}
	if n := c.ca.Proxy.Requests(certmgrtest.ClassNewOrder); n != 4 {
		t.Errorf("%d new-order requests reached the CA, want 4", n)
	}
}

// TestCARetryAfterBindsEveryReplica: the CA's 429 with a Retry-After of
// an hour, met by one replica, binds every replica: each shows the next
// attempt at least an hour ahead, refuses Provision with ErrBackoff
// without sending a new order, and the operator's Retry on another
// replica does not lift it, neither there nor in the cluster's record (a
// restarted replica, which reads the record from etcd, refuses too).
func TestCARetryAfterBindsEveryReplica(t *testing.T) {
	t.Parallel()
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

// TestRenewalOnceForTheCluster: renewal falls due on all three replicas
// at once (each restarted with RenewBefore covering the certificate's
// whole life: it takes the domain up from the cluster's record, or at a
// handshake, and its autocert's renewal timer fires at once): the cluster
// makes exactly one renewal order, and every replica serves the renewed
// certificate within a second of its issuance.
func TestRenewalOnceForTheCluster(t *testing.T) {
	t.Parallel()
	const name = "renewal.test"
	var renewing atomic.Bool // the replicas opened from now on renew at once
	type renewal struct {
		replica int
		at      time.Time
	}
	var (
		renewalsMu sync.Mutex
		renewals   []renewal // every renewal, in order
	)
	renewed := make(chan renewal, 16) // the first ones
	c := startCluster(t, clusterOptions{
		names:  []string{name},
		caOpts: certmgrtest.Options{CertValidity: time.Hour},
		config: func(i int, cfg *certmgr.Config) {
			cfg.OnEvent = func(e certmgr.Event) {
				if e.Kind == certmgr.EventRenewed && e.Domain == name {
					r := renewal{i, time.Now()}
					renewalsMu.Lock()
					renewals = append(renewals, r)
					renewalsMu.Unlock()
					select {
					case renewed <- r:
					default:
					}
				}
			}
			if renewing.Load() {
				// autocert renews when the certificate has less than
				// RenewBefore (and up to an hour of jitter) left: at once.
				cfg.Autocert.RenewBefore = 24 * time.Hour
			}
		},
	})
	ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
	defer cancel()
	if err := c.replicas[0].manager().Provision(ctx, name); err != nil {
		t.Fatal(err)
	}
	var first string
	waitFor(t, 5*time.Second, "every replica to serve the first certificate", func() bool {
		s := c.serials(name)
		first = s[0]
		return s[0] != "" && s[0] == s[1] && s[1] == s[2]
	})
	// The CA dates certificates to the second: the renewed one must be
	// issued in a later second than the first, or the two would tie.
	cert, err := c.replicas[0].getCertificate(name)
	if err != nil {
		t.Fatal(err)
	}
	waitFor(t, 5*time.Second, "a second past the first certificate's NotBefore", func() bool {
		return time.Now().After(cert.Leaf.NotBefore.Add(time.Second))
	})

	locks := watchLockEntries(t, c, name)
	// The test holds the domain's lock while the renewals fall due, as a
	// replica busy with the domain would: the three renewals are then in
	// flight together, each waiting for the lock, before any renewed.
	_, _, unlock, err := newCache(t, clientOf(t, c.etcd.Endpoint()), "/cluster/").Lock(ctx, "domain/"+name)
	if err != nil {
		t.Fatal(err)
	}
	renewing.Store(true)
	for _, r := range c.replicas {
		r.restart()
	}
	// A handshake on each, at once: certmgr loads the certificate from
	// etcd into the replica's autocert, whose renewal timer fires now.
	var wg sync.WaitGroup
	for i, r := range c.replicas {
		wg.Go(func() {
			cs, err := r.handshake(ctx, name)
			if err != nil {
				t.Errorf("replica %d: handshake: %v", i, err)
			} else if got := cs.PeerCertificates[0].SerialNumber.String(); got != first {
				t.Errorf("replica %d: serves %s after its restart, want the stored %s", i, got, first)
			}
		})
	}
	wg.Wait()
	waitFor(t, 10*time.Second, "the three renewals to wait for the lock", func() bool {
		return locks.count() == 4 // the test's entry and the replicas'
	})
	unlock()

	var ev renewal
	select {
	case ev = <-renewed:
	case <-time.After(30 * time.Second):
		t.Fatalf("no renewal within 30 s (orders %+v)", c.ca.Proxy.Counts(name))
	}
	// Every replica serves the renewed certificate within a second.
	var last []string
	converged := func() bool {
		last = c.serials(name)
		return last[0] != "" && last[0] != first && last[0] == last[1] && last[1] == last[2]
	}
	deadline := ev.at.Add(time.Second)
	ok := converged()
	for ; !ok && time.Now().Before(deadline); ok = converged() {
		time.Sleep(10 * time.Millisecond)
	}
	if !ok {
		behind := last
		lateBy := "not within 10 s more"
		for end := time.Now().Add(10 * time.Second); time.Now().Before(end); time.Sleep(10 * time.Millisecond) {
			if converged() {
				lateBy = fmt.Sprintf("%v after the renewal", time.Since(ev.at).Round(time.Millisecond))
				break
			}
		}
		t.Errorf("1 s after replica %d renewed, the replicas serve %v (first certificate %s); one renewed certificate everywhere: %s",
			ev.replica, behind, first, lateBy)
	} else {
		t.Logf("replica %d renewed; every replica served %s %v after", ev.replica, last[0], time.Since(ev.at).Round(time.Millisecond))
	}

	// Every replica's renewal has ended once none holds or waits for the
	// domain's lock any more.
	waitFor(t, 30*time.Second, "every replica's renewal to release the lock", func() bool {
		return locks.count() == 0
	})
	if got := c.ca.Proxy.Counts(name); got.Orders != 2 {
		renewalsMu.Lock()
		var seen []string
		for _, r := range renewals {
			seen = append(seen, fmt.Sprintf("replica %d at +%v", r.replica, r.at.Sub(ev.at).Round(time.Millisecond)))
		}
		renewalsMu.Unlock()
		t.Errorf("%d orders in all, want 2: the first certificate and one renewal for the cluster (%+v); renewals: %v",
			got.Orders, got, seen)
	}
	for i, m := range c.managers() {
		if st := m.Status(name); st.State != certmgr.StateValid || st.Failures != 0 {
			t.Errorf("replica %d: Status %+v, want valid without failures", i, st)
		}
	}
	if s := c.serials(name); s[0] == first || s[0] != s[1] || s[1] != s[2] {
		t.Errorf("the replicas serve %v at the end, want one renewed certificate (first %s)", s, first)
	}
}

// lockEntries follows the etcd entries of one domain's cluster lock:
// every replica's Lock puts its entry (one per lease), and its unlock,
// or its giving up, deletes it.
type lockEntries struct {
	mu   sync.Mutex
	live map[string]bool // entries put since the watch began and not deleted yet
}

// watchLockEntries watches the entries of name's cluster lock in c's
// etcd from now on, until t ends.
func watchLockEntries(t *testing.T, c *cluster, name string) *lockEntries {
	t.Helper()
	cli := clientOf(t, c.etcd.Endpoint())
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel) // before cli's Close
	le := &lockEntries{live: make(map[string]bool)}
	wch := cli.Watch(ctx, "/cluster/locks/domain/"+name+"/", clientv3.WithPrefix(), clientv3.WithCreatedNotify())
	if resp, ok := <-wch; !ok || !resp.Created {
		t.Fatalf("watching the lock entries of %s: %v", name, resp.Err())
	}
	go func() {
		for resp := range wch {
			le.mu.Lock()
			for _, ev := range resp.Events {
				k := string(ev.Kv.Key)
				if ev.Type == clientv3.EventTypePut {
					le.live[k] = true
				} else {
					delete(le.live, k)
				}
			}
			le.mu.Unlock()
		}
	}()
	return le
}

// count returns how many entries there are: the lock's holder and its
// waiters.
func (le *lockEntries) count() int {
	le.mu.Lock()
	defer le.mu.Unlock()
	return len(le.live)
}

// TestBudgetHoldsFor48SimulatedHours: for 48 simulated hours of failing
// validation, a handshake every simulated minute on the replicas in turn,
// one replica restarted every 6 hours and one cut off from etcd for a
// while: the cluster fails at most 4 authorizations (the budget) in any
// rolling hour. The backoff is a minute after every failure, so that the
// budget is what binds.
func TestBudgetHoldsFor48SimulatedHours(t *testing.T) {
	t.Parallel()
	const name = "sim.test"
	clock := testsupport.NewClock(time.Now())
	c := startCluster(t, clusterOptions{
		names: []string{name},
		now:   clock.Now,
		config: func(_ int, cfg *certmgr.Config) {
			cfg.Backoff = certmgr.Backoff{Steps: []time.Duration{time.Minute}, Jitter: -1}
			cfg.HandshakeTimeout = 2 * time.Second
		},
	})
	c.ca.DNS.SetA(name, "127.0.0.3") // nothing listens there: validation fails
	start := clock.Now()
	var (
		spends   []time.Time // on the simulated clock, one per failed authorization
		restarts int
		cut      *replica
	)
	for step := 0; clock.Now().Sub(start) < 48*time.Hour; step++ {
		elapsed := clock.Now().Sub(start)
		switch {
		case step > 0 && elapsed%(6*time.Hour) == 0:
			c.replicas[restarts%3].restart()
			restarts++
		case elapsed == 27*time.Hour:
			cut = c.replicas[1]
			cut.link.cut()
		case elapsed == 27*time.Hour+10*time.Minute:
			cut.link.heal()
			waitFor(t, 30*time.Second, "the replica cut off to reach etcd again", cut.reachesEtcd)
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
			spends = append(spends, clock.Now())
		}
		clock.Advance(time.Minute)
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
