package certmgr

import (
	"bytes"
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	crand "crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"math/rand/v2"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/crypto/acme"
	"golang.org/x/crypto/acme/autocert"

	"github.com/certmgr/certmgr/certmgrtest"
	"github.com/certmgr/certmgr/internal/testsupport"
)

// replicas is a cluster of Managers on one in-memory store, served on
// the test CA's one TLS listener in turn, as a round-robin load balancer
// would: the CA's validation connections reach any of them.
type replicas struct {
	ca    *certmgrtest.Server
	store *certmgrtest.MemoryStore
	ms    []*Manager
	next  atomic.Uint64
}

// startReplicas starts n Managers allowing names on one store, concurrently.
func startReplicas(t *testing.T, n int, names ...string) *replicas {
	t.Helper()
	return startWrappedReplicas(t, n, nil, names...)
}

// unwrapCache wraps a Cache, and is no Coordinator itself: certmgr finds
// the one it wraps through Unwrap.
type unwrapCache struct{ autocert.Cache }

func (c unwrapCache) Unwrap() autocert.Cache { return c.Cache }

// startWrappedReplicas is startReplicas with each replica's Cache wrapped
// by wrap, if not nil.
func startWrappedReplicas(t *testing.T, n int, wrap func(autocert.Cache) autocert.Cache, names ...string) *replicas {
	t.Helper()
	checkLeaks(t)
	r := &replicas{ca: certmgrtest.Start(t, certmgrtest.Options{}), store: certmgrtest.NewMemoryStore()}
	for _, name := range names {
		r.ca.DNS.SetA(name, "127.0.0.1")
	}
	r.ms = make([]*Manager, n)
	var wg sync.WaitGroup
	errs := make([]error, n)
	for i := range n {
		wg.Go(func() {
			var cache autocert.Cache = r.store.Open()
			if wrap != nil {
				cache = wrap(cache)
			}
			r.ms[i], errs[i] = New(Config{
				Autocert: &autocert.Manager{Cache: cache, Client: r.ca.NewClient(), HostPolicy: autocert.HostWhitelist(names...)},
				Logger:   newTestLogger(&testsupport.Buffer{}),
			})
		})
	}
	wg.Wait()
	for i, err := range errs {
		if err != nil {
			t.Fatalf("replica %d: %v", i, err)
		}
		t.Cleanup(func() { r.ms[i].Close() })
	}
	if err := r.ca.ServeTLS(&tls.Config{GetConfigForClient: func(*tls.ClientHelloInfo) (*tls.Config, error) {
		return r.ms[r.next.Add(1)%uint64(n)].TLSConfig(), nil
	}}, nil); err != nil {
		t.Fatal(err)
	}
	return r
}

// TestReplicasOrderOnce: a burst of handshakes for a fresh name on every
// replica makes one order; the validation reaches replicas that did not
// order; every replica serves the one certificate, through the store's
// watch, without a handshake of its own.
func TestReplicasOrderOnce(t *testing.T) {
	t.Parallel()
	const name = "cluster.test"
	r := startReplicas(t, 3, name)
	var wg sync.WaitGroup
	for i := range 60 {
		wg.Go(func() {
			c, err := r.ms[i%3].GetCertificate(&tls.ClientHelloInfo{ServerName: name,
				SupportedVersions: []uint16{tls.VersionTLS13}})
			if err != nil {
				t.Errorf("handshake %d: %v", i, err)
			} else if c == nil {
				t.Errorf("handshake %d: no certificate", i)
			}
		})
	}
	wg.Wait()
	if n := r.ca.Proxy.Counts(name).Orders; n != 1 {
		t.Errorf("%d orders for a burst on 3 replicas, want 1", n)
	}
	var serial string
	waitFor(t, 10*time.Second, "every replica to serve the certificate", func() bool {
		serials := map[string]bool{}
		for _, m := range r.ms {
			c := m.servedCert(certKey{domain: name})
			if c == nil {
				return false
			}
			serials[c.Leaf.SerialNumber.String()] = true
			serial = c.Leaf.SerialNumber.String()
		}
		return len(serials) == 1
	})
	for i := range 3 {
		cs, err := r.ca.Handshake(context.Background(), name) // round robin: each replica once
		if err != nil {
			t.Fatal(err)
		}
		if got := cs.PeerCertificates[0].SerialNumber.String(); got != serial {
			t.Errorf("handshake %d got serial %s, want %s", i, got, serial)
		}
	}
	if n := r.ca.Proxy.Counts(name).Orders; n != 1 {
		t.Errorf("%d orders in all, want 1", n)
	}
}

// keyReads is a replica's store that counts the reads of one key.
type keyReads struct {
	*certmgrtest.MemoryReplica
	key string
	n   atomic.Int64
}

func (k *keyReads) Get(ctx context.Context, key string) ([]byte, error) {
	if key == k.key {
		k.n.Add(1)
	}
	return k.MemoryReplica.Get(ctx, key)
}

func (k *keyReads) GetRevision(ctx context.Context, key string) ([]byte, int64, error) {
	if key == k.key {
		k.n.Add(1)
	}
	return k.MemoryReplica.GetRevision(ctx, key)
}

// TestReplicasWatchServesAtOnce: a certificate one replica obtains is
// served by the others within a second, without a Cache read of theirs.
func TestReplicasWatchServesAtOnce(t *testing.T) {
	t.Parallel()
	const name = "watch.test"
	r := startWrappedReplicas(t, 3, func(c autocert.Cache) autocert.Cache {
		return &keyReads{MemoryReplica: c.(*certmgrtest.MemoryReplica), key: name}
	}, name)
	if err := r.ms[0].Provision(context.Background(), name); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	waitFor(t, time.Second, "the other replicas to serve it", func() bool {
		return r.ms[1].servedCert(certKey{domain: name}) != nil && r.ms[2].servedCert(certKey{domain: name}) != nil
	})
	t.Logf("served everywhere %v after Provision returned", time.Since(start))
	for _, i := range []int{1, 2} {
		if n := r.ms[i].cfg.Autocert.Cache.(*keyReads).n.Load(); n != 0 {
			t.Errorf("replica %d read the certificate from the store %d times, want none", i, n)
		}
	}
}

// TestReplicasShareOneAccount: replicas starting together make one ACME
// account key between them, even when each of them reads it missing.
func TestReplicasShareOneAccount(t *testing.T) {
	ca := certmgrtest.Start(t, certmgrtest.Options{})
	store := certmgrtest.NewMemoryStore()
	var readers sync.WaitGroup
	readers.Add(3)
	ms := make([]*Manager, 3)
	for i := range ms {
		cache := &barrierReplica{MemoryReplica: store.Open(), readers: &readers}
		m, err := New(Config{Autocert: &autocert.Manager{Cache: cache, Client: ca.NewClient()}, Logger: newTestLogger(&testsupport.Buffer{})})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { m.Close() })
		ms[i] = m
	}
	keys := make([]crypto.PublicKey, 3)
	var wg sync.WaitGroup
	for i, m := range ms {
		wg.Go(func() {
			k, err := m.accountKey(context.Background())
			if err != nil {
				t.Errorf("replica %d: %v", i, err)
				return
			}
			keys[i] = k.Public()
		})
	}
	wg.Wait()
	for i := 1; i < 3; i++ {
		if pub, ok := keys[i].(interface{ Equal(crypto.PublicKey) bool }); !ok || !pub.Equal(keys[0]) {
			t.Errorf("replica %d has another account key", i)
		}
	}
}

// barrierReplica is a replica whose first read of the account key returns
// only once every replica's has begun: all of them find it missing.
type barrierReplica struct {
	*certmgrtest.MemoryReplica
	readers *sync.WaitGroup
	once    sync.Once
}

func (r *barrierReplica) Get(ctx context.Context, key string) ([]byte, error) {
	if key == accountKeyName {
		data, err := r.MemoryReplica.Get(ctx, key)
		r.once.Do(func() {
			r.readers.Done()
			r.readers.Wait()
		})
		return data, err
	}
	return r.MemoryReplica.Get(ctx, key)
}

// TestReplicaOrdersOnlyUnderItsLock: while another replica holds the
// domain's lock, an attempt here waits and orders nothing, and an order
// that comes meanwhile (autocert's renewal timer) is refused.
func TestReplicaOrdersOnlyUnderItsLock(t *testing.T) {
	t.Parallel()
	const name = "locked.test"
	r := startReplicas(t, 2, name)
	other := r.store.Open() // a third replica, that holds the lock
	_, _, unlock, err := other.Lock(context.Background(), lockName(name))
	if err != nil {
		t.Fatal(err)
	}
	m := r.ms[0]
	provisioned := make(chan error, 1)
	go func() { provisioned <- m.Provision(context.Background(), name) }()
	waitFor(t, 5*time.Second, "the attempt", func() bool { return m.Status(name).State == StateObtaining })
	m.stateMu.Lock()
	am := m.domains[name].am
	m.stateMu.Unlock()
	req, _ := http.NewRequest("POST", "https://ca.invalid/new-order", nil)
	req = req.WithContext(context.WithValue(req.Context(), senderKey{}, am))
	if _, err := m.admitOrder(req, name); !errors.Is(err, errLockLost) {
		t.Errorf("an order while the attempt waits for the lock: %v, want errLockLost", err)
	}
	if n := r.ca.Proxy.Counts(name).Orders; n != 0 {
		t.Errorf("%d orders while another replica held the lock", n)
	}
	unlock()
	if err := <-provisioned; err != nil {
		t.Fatalf("Provision once the lock was free: %v", err)
	}
	if n := r.ca.Proxy.Counts(name).Orders; n != 1 {
		t.Errorf("%d orders, want 1", n)
	}
}

// TestRenewalWaitsForTheLockBriefly: autocert's renewal timer on a
// replica whose domain's lock another replica holds orders nothing, and
// that is no failure of the store: the domain can attempt again at once.
func TestRenewalWaitsForTheLockBriefly(t *testing.T) {
	t.Parallel()
	const name = "renewing.test"
	r := startReplicas(t, 1, name)
	m := r.ms[0]
	d, err := m.domainFor(name)
	if err != nil {
		t.Fatal(err)
	}
	am, err := m.domainAutocert(context.Background(), d)
	if err != nil {
		t.Fatal(err)
	}
	other := r.store.Open()
	_, _, unlock, err := other.Lock(context.Background(), lockName(name))
	if err != nil {
		t.Fatal(err)
	}
	defer unlock()
	req, _ := http.NewRequest("POST", "https://ca.invalid/new-order", nil)
	req = req.WithContext(context.WithValue(req.Context(), senderKey{}, am))
	if _, err := m.admitOrder(req, name); !errors.Is(err, ErrBackoff) {
		t.Errorf("a renewal while another replica holds the lock: %v, want ErrBackoff", err)
	}
	m.stateMu.Lock()
	gate := m.checkAttemptLocked(d)
	inFlight := d.attempt
	m.stateMu.Unlock()
	if gate != nil || inFlight != nil {
		t.Errorf("after the refused renewal: gate %v, attempt %v; want the domain free to attempt", gate, inFlight)
	}
}

// TestReplicasShareOneFailureRecord: while validation fails, a burst on
// every replica makes one attempt for the cluster, and every replica
// then shows the same next attempt.
func TestReplicasShareOneFailureRecord(t *testing.T) {
	const name = "failing.test"
	r := startReplicas(t, 3, name)
	r.ca.DNS.SetA(name, "127.0.0.3") // nothing listens there: validation fails
	var wg sync.WaitGroup
	for i := range 30 {
		wg.Go(func() {
			r.ms[i%3].GetCertificate(&tls.ClientHelloInfo{ServerName: name, SupportedVersions: []uint16{tls.VersionTLS13}})
		})
	}
	wg.Wait()
	waitFor(t, 10*time.Second, "every replica to show the failure", func() bool {
		for _, m := range r.ms {
			if st := m.Status(name); st.Failures != 1 || st.NextAttempt.IsZero() {
				return false
			}
		}
		return true
	})
	next := r.ms[0].Status(name).NextAttempt
	for i, m := range r.ms {
		if st := m.Status(name); !st.NextAttempt.Equal(next) {
			t.Errorf("replica %d: NextAttempt %v, want the cluster's %v", i, st.NextAttempt, next)
		}
	}
	if c := r.ca.Proxy.Counts(name); c.ChallengeResponses != 1 {
		t.Errorf("%d validations for the cluster, want 1 (%+v)", c.ChallengeResponses, c)
	}
}

// TestRetryReachesReplicasThatNeverSawTheName: a Retry on a replica that
// never saw a failing name lifts the cluster's backoff, so that another
// replica's next attempt starts at once; a Retry of a name that no
// replica knows writes no record.
func TestRetryReachesReplicasThatNeverSawTheName(t *testing.T) {
	t.Parallel()
	const name, unknown = "failing.test", "unknown.test"
	r := startReplicas(t, 2, name, unknown)
	r.ca.DNS.SetA(name, "127.0.0.3") // nothing listens there: validation fails
	if err := r.ms[0].Provision(context.Background(), name); err == nil {
		t.Fatal("validation succeeded")
	}
	if st := r.ms[0].Status(name); st.NextAttempt.IsZero() {
		t.Fatal("no backoff after a failure")
	}
	r.ms[1].Retry(name) // it never saw name
	waitFor(t, 5*time.Second, "the Retry to reach the replica that failed", func() bool {
		return r.ms[0].Status(name).NextAttempt.IsZero()
	})
	if err := r.ms[0].Provision(context.Background(), name); errors.Is(err, ErrBackoff) {
		t.Errorf("the attempt after the Retry: %v, want one made", err)
	}
	if n := r.ca.Proxy.Counts(name).Orders; n != 2 {
		t.Errorf("%d orders, want 2", n)
	}

	r.ms[1].Retry(unknown)
	if _, err := r.store.Open().Get(context.Background(), recordPrefix+unknown); !errors.Is(err, autocert.ErrCacheMiss) {
		t.Errorf("a Retry of a name no replica knows left a record: %v", err)
	}
	// The records are the domains' own keys: no replica writes the
	// single-process entry of every domain, which would outgrow the store.
	if _, err := r.store.Open().Get(context.Background(), stateKey); !errors.Is(err, autocert.ErrCacheMiss) {
		t.Errorf("the replicas wrote %s: %v", stateKey, err)
	}
}

// TestReplicasShareOneBudget: Retry on one replica, an attempt on the
// next, in turn: the cluster spends at most 4 failed authorizations in
// the hour, and then every replica refuses.
func TestReplicasShareOneBudget(t *testing.T) {
	t.Parallel()
	const name = "budget.test"
	r := startReplicas(t, 3, name)
	r.ca.DNS.SetA(name, "127.0.0.3")
	refused := 0
	for i := range 6 {
		m := r.ms[i%3]
		r.ms[(i+2)%3].Retry(name) // the previous one's operator
		waitFor(t, 5*time.Second, "the Retry to reach the replica", func() bool {
			st := m.Status(name)
			return st.NextAttempt.IsZero() || st.NextAttempt.Sub(time.Now()) > 30*time.Minute // free, or the budget binds
		})
		err := m.Provision(context.Background(), name)
		switch {
		case errors.Is(err, ErrBackoff):
			refused++
		case err == nil:
			t.Fatal("Provision succeeded; validation should fail")
		}
	}
	if c := r.ca.Proxy.Counts(name); c.ChallengeResponses > 4 || refused < 2 {
		t.Errorf("%d validations, %d refusals over 6 attempts in turn, want at most 4 and the rest refused", c.ChallengeResponses, refused)
	}
	for i, m := range r.ms {
		if err := m.Provision(context.Background(), name); !errors.Is(err, ErrBackoff) {
			t.Errorf("replica %d after the budget is spent: %v, want ErrBackoff", i, err)
		}
	}
}

// TestReplicasTakeUpTheSingleProcessState: a store that holds the
// single-process failure cache (certmgr+state) seeds the cluster's record
// of a domain the first time it is written: a Retry-After there binds
// every replica.
func TestReplicasTakeUpTheSingleProcessState(t *testing.T) {
	const name = "migrated.test"
	ca := certmgrtest.Start(t, certmgrtest.Options{})
	store := certmgrtest.NewMemoryStore()
	until := time.Now().Add(72 * time.Hour).Truncate(time.Second)
	data, err := encodeState(map[string]failureRecord{name: {Failures: 1, LastError: "rate limited",
		LastFailure: time.Now().Add(-time.Minute), NextAttempt: until, RetryAfter: until}})
	if err != nil {
		t.Fatal(err)
	}
	if err := store.Open().Put(context.Background(), stateKey, data); err != nil {
		t.Fatal(err)
	}
	ms := make([]*Manager, 2)
	for i := range ms {
		m, err := New(Config{Autocert: &autocert.Manager{Cache: store.Open(), Client: ca.NewClient(),
			HostPolicy: autocert.HostWhitelist(name)}, Logger: newTestLogger(&testsupport.Buffer{})})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { m.Close() })
		ms[i] = m
	}
	ms[0].Retry(name) // writes the domain's first record: it keeps the CA's Retry-After
	if _, _, err := store.Open().GetRevision(context.Background(), recordPrefix+name); err != nil {
		t.Fatalf("no cluster record after Retry: %v", err)
	}
	for i, m := range ms {
		if err := m.Provision(context.Background(), name); !errors.Is(err, ErrBackoff) {
			t.Errorf("replica %d: Provision = %v, want ErrBackoff until %v", i, err, until)
		}
		if st := m.Status(name); !st.NextAttempt.Equal(until) {
			t.Errorf("replica %d: NextAttempt %v, want %v", i, st.NextAttempt, until)
		}
	}
	if n := ca.Proxy.Counts(name).Orders; n != 0 {
		t.Errorf("%d orders", n)
	}
}

// TestReplicaCutOffFromTheStore: a replica that cannot reach the store
// orders nothing (it can read no certificate and take no lock), answers
// every handshake within HandshakeTimeout and keeps serving what it has;
// once the store is back, the name that waited gets one order at its
// next handshakes.
func TestReplicaCutOffFromTheStore(t *testing.T) {
	t.Parallel()
	const (
		kept = "kept.test"
		name = "waiting.test"
	)
	ca := certmgrtest.Start(t, certmgrtest.Options{})
	ca.DNS.SetA(kept, "127.0.0.1")
	ca.DNS.SetA(name, "127.0.0.1")
	replica := certmgrtest.NewMemoryStore().Open()
	m, err := New(Config{Autocert: &autocert.Manager{Cache: replica, Client: ca.NewClient(),
		HostPolicy: autocert.HostWhitelist(kept, name)}, Logger: newTestLogger(&testsupport.Buffer{}),
		HandshakeTimeout: 200 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { m.Close() })
	if err := ca.ServeTLS(m.TLSConfig(), nil); err != nil {
		t.Fatal(err)
	}
	if err := m.Provision(context.Background(), kept); err != nil {
		t.Fatal(err)
	}
	replica.Disconnect()
	hello := func(n string) *tls.ClientHelloInfo {
		return &tls.ClientHelloInfo{ServerName: n, SupportedVersions: []uint16{tls.VersionTLS13}}
	}
	if c, err := m.GetCertificate(hello(kept)); err != nil || IsFallback(c) {
		t.Errorf("the certificate in memory: %v, fallback %v", err, IsFallback(c))
	}
	start := time.Now()
	c, err := m.GetCertificate(hello(name))
	if err != nil || !IsFallback(c) {
		t.Errorf("a new name with the store cut off: %v, want the fallback", err)
	}
	if took := time.Since(start); took > 2*time.Second {
		t.Errorf("the handshake took %v, want about HandshakeTimeout", took)
	}
	if n := ca.Proxy.Counts(name).Orders; n != 0 {
		t.Errorf("%d orders without the store", n)
	}
	replica.Reconnect()
	waitFor(t, 10*time.Second, "the next handshakes to get the certificate", func() bool {
		c, err := m.GetCertificate(hello(name))
		return err == nil && !IsFallback(c)
	})
	if n := ca.Proxy.Counts(name).Orders; n != 1 {
		t.Errorf("%d orders once the store is back, want 1", n)
	}
}

// TestReplicasObeyOneRateLimit: the CA's 429 with a Retry-After, met by
// one replica, binds every replica, and Retry on any of them keeps it.
func TestReplicasObeyOneRateLimit(t *testing.T) {
	const name = "limited.test"
	r := startReplicas(t, 3, name)
	r.ca.Proxy.AddRule(certmgrtest.Rule{Class: certmgrtest.ClassNewOrder, Identifier: name,
		Status: http.StatusTooManyRequests, RetryAfter: "3600", Detail: "too many new orders recently"})
	if err := r.ms[0].Provision(context.Background(), name); err == nil {
		t.Fatal("Provision succeeded against a 429")
	}
	r.ms[1].Retry(name) // the operator cannot override the CA
	waitFor(t, 5*time.Second, "every replica to hold the CA's Retry-After", func() bool {
		for _, m := range r.ms {
			if time.Until(m.Status(name).NextAttempt) < 3590*time.Second {
				return false
			}
		}
		return true
	})
	for i, m := range r.ms {
		if err := m.Provision(context.Background(), name); !errors.Is(err, ErrBackoff) {
			t.Errorf("replica %d: Provision = %v, want ErrBackoff", i, err)
		}
	}
	if n := r.ca.Proxy.Requests(certmgrtest.ClassNewOrder); n != 1 {
		t.Errorf("%d new-order requests, want the one the CA refused", n)
	}
}

// TestReplicasKeepOneBudgetFor48Hours: over 48 simulated hours of
// continuous failure, three replicas taking turns (handshake attempts and
// autocert's renewals alike) spend at most 4 failed authorizations in
// any rolling hour for the cluster, and at most 2 a day after the first.
// With a Backoff of a minute, the cluster's budget of 4 binds every hour.
func TestReplicasKeepOneBudgetFor48Hours(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		http01  bool
		backoff Backoff
	}{{false, Backoff{}}, {true, Backoff{}}, {false, Backoff{Steps: []time.Duration{time.Minute}, Jitter: -1}}} {
		clock := newFakeClock()
		rng := rand.New(rand.NewPCG(1, 2))
		store := certmgrtest.NewMemoryStore()
		ms := make([]*Manager, 3)
		for i := range ms {
			ms[i] = newPureManager(t, clock, func(c *Config) {
				c.Autocert.Cache = store.Open()
				c.hooks.rand = rng.Float64
				c.Backoff = tc.backoff
			})
			ms[i].http01.Store(tc.http01)
		}
		spends := simulateFailures(t, clock, ms)
		what := fmt.Sprintf("3 replicas, http01=%v", tc.http01)
		if tc.backoff.Steps != nil {
			what = "3 replicas, backoff of a minute"
			if n := countIn(spends, newFakeClock().Now(), time.Hour); n != 4 {
				t.Errorf("%s: %d failed authorizations in the first hour, want the budget's 4", what, n)
			}
		}
		checkBudget48h(t, what, spends, newFakeClock().Now(), tc.backoff.Steps == nil)
	}
}

// TestReplicasRacingKeepOneBudget: three replicas attempt one failing
// name at once, round after round, each after its operator's Retry: the
// cluster fails at most 4 authorizations at the CA in the hour, and its
// record holds what the CA failed.
func TestReplicasRacingKeepOneBudget(t *testing.T) {
	t.Parallel()
	const name = "racing.test"
	r := startReplicas(t, 3, name)
	r.ca.DNS.SetA(name, "127.0.0.3") // nothing listens there: validation fails
	for range 4 {
		var wg sync.WaitGroup
		for _, m := range r.ms {
			wg.Go(func() {
				m.Retry(name)
				ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
				defer cancel()
				m.Provision(ctx, name)
			})
		}
		wg.Wait()
	}
	c := r.ca.Proxy.Counts(name)
	if c.FailedAuthzs > 4 || c.FailedAuthzs < 2 {
		t.Errorf("%d failed authorizations at the CA over 4 rounds of 3 racing replicas, want at most the budget of 4 (and a few)", c.FailedAuthzs)
	}
	data, _, err := r.store.Open().GetRevision(context.Background(), recordPrefix+name)
	if err != nil {
		t.Fatal(err)
	}
	spent := 0
	for _, s := range decodeRecord(data, time.Now()).Spends {
		spent += s.Authz
	}
	if spent != c.FailedAuthzs {
		t.Errorf("the cluster's record holds %d spends, the CA failed %d authorizations", spent, c.FailedAuthzs)
	}
}

// TestReplicaTakesOverALostLock: the replica ordering a domain loses its
// lease mid-order (its challenge is held by the CA): it sends no more of
// that order's requests, so it never finalizes, and another replica then
// takes the lock, orders, and gets the certificate.
func TestReplicaTakesOverALostLock(t *testing.T) {
	t.Parallel()
	const name = "takeover.test"
	ca := certmgrtest.Start(t, certmgrtest.Options{})
	ca.DNS.SetA(name, "127.0.0.1")
	store := certmgrtest.NewMemoryStore()
	replicas := []*certmgrtest.MemoryReplica{store.Open(), store.Open()}
	ms := make([]*Manager, 2)
	for i := range ms {
		m, err := New(Config{Autocert: &autocert.Manager{Cache: replicas[i], Client: ca.NewClient(),
			HostPolicy: autocert.HostWhitelist(name)}, Logger: newTestLogger(&testsupport.Buffer{})})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { m.Close() })
		ms[i] = m
	}
	var next atomic.Uint64
	if err := ca.ServeTLS(&tls.Config{GetConfigForClient: func(*tls.ClientHelloInfo) (*tls.Config, error) {
		return ms[next.Add(1)%2].TLSConfig(), nil
	}}, nil); err != nil {
		t.Fatal(err)
	}
	ca.Proxy.AddRule(certmgrtest.Rule{Class: certmgrtest.ClassChallenge, Identifier: name, Hold: true, Times: 1})
	first := make(chan error, 1)
	go func() { first <- ms[0].Provision(context.Background(), name) }()
	waitFor(t, 10*time.Second, "the first replica's held challenge", func() bool {
		return ca.Proxy.Requests(certmgrtest.ClassChallenge) == 1
	})
	replicas[0].Lose() // a crash or partition: its lease ends
	ms[0].stateMu.Lock()
	a := ms[0].domains[name].attempt
	refused := a != nil && lockLostLocked(a)
	ms[0].stateMu.Unlock()
	if !refused {
		t.Error("the first replica's attempt does not know its lock is lost")
	}
	ca.Proxy.Release()
	if err := <-first; err == nil {
		t.Error("the replica that lost its lock mid-order got a certificate")
	}
	if n := ca.Proxy.Requests(certmgrtest.ClassFinalize); n != 0 {
		t.Errorf("%d finalizations by the replica that lost its lock, want 0", n)
	}
	if err := ms[1].Provision(context.Background(), name); err != nil {
		t.Fatalf("the second replica after the takeover: %v", err)
	}
	if n := ca.Proxy.Counts(name).Orders; n != 2 {
		t.Errorf("%d orders, want the lost one's and the survivor's", n)
	}
}

// TestLostReplicaKeepsToTheStoresToken: the TLS-ALPN-01 certificate of a
// name is one key that replicas share. A replica that lost its lock
// mid-order answers the CA's validation connections with the token in the
// store (the new holder's), not with the stale one in its autocert's
// memory; it answers none while it cannot read the store; and its
// autocert's clean-up of the order it gave up leaves the new holder's
// token in the store.
func TestLostReplicaKeepsToTheStoresToken(t *testing.T) {
	t.Parallel()
	const name = "token.test"
	ca := certmgrtest.Start(t, certmgrtest.Options{})
	ca.DNS.SetA(name, "127.0.0.1")
	store := certmgrtest.NewMemoryStore()
	lost, other := store.Open(), store.Open()
	m, err := New(Config{Autocert: &autocert.Manager{Cache: lost, Client: ca.NewClient(),
		HostPolicy: autocert.HostWhitelist(name)}, Logger: newTestLogger(&testsupport.Buffer{}), HandshakeTimeout: time.Second})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { m.Close() })
	ca.Proxy.AddRule(certmgrtest.Rule{Class: certmgrtest.ClassChallenge, Identifier: name, Hold: true, Times: 1})
	done := make(chan error, 1)
	go func() { done <- m.Provision(context.Background(), name) }()
	waitFor(t, 10*time.Second, "the replica's held challenge", func() bool {
		return ca.Proxy.Requests(certmgrtest.ClassChallenge) == 1
	})
	hello := &tls.ClientHelloInfo{ServerName: name, SupportedProtos: []string{acme.ALPNProto}}
	stale, err := m.TLSConfig().GetCertificate(hello)
	if err != nil {
		t.Fatal(err)
	}

	lost.Lose()
	waitFor(t, 5*time.Second, "the replica to count its lock lost", func() bool { return !m.holdsLock(name) })
	// The new holder's token, as its autocert writes it.
	key, err := ecdsa.GenerateKey(elliptic.P256(), crand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(42), DNSNames: []string{name},
		NotBefore: time.Now().Add(-time.Minute), NotAfter: time.Now().Add(time.Hour)}
	der, err := x509.CreateCertificate(crand.Reader, tmpl, tmpl, key.Public(), key)
	if err != nil {
		t.Fatal(err)
	}
	keyDER, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	theirs := append(pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: keyDER}),
		pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})...)
	if err := other.Put(context.Background(), name+"+token", theirs); err != nil {
		t.Fatal(err)
	}
	got, err := m.TLSConfig().GetCertificate(hello)
	if err != nil {
		t.Fatal(err)
	}
	if got.Leaf.SerialNumber.Cmp(big.NewInt(42)) != 0 {
		t.Errorf("the replica that lost its lock answered serial %v (its own was %v), want the store's, 42",
			got.Leaf.SerialNumber, stale.Leaf.SerialNumber)
	}
	lost.Disconnect()
	if c, err := m.TLSConfig().GetCertificate(hello); err == nil {
		t.Errorf("a replica cut off from the store answered a validation with serial %v", c.Leaf.SerialNumber)
	}
	lost.Reconnect()

	ca.Proxy.Release()
	if err := <-done; err == nil {
		t.Error("the replica that lost its lock got a certificate")
	}
	m.Close() // autocert's clean-up has run
	if data, err := other.Get(context.Background(), name+"+token"); err != nil || !bytes.Equal(data, theirs) {
		t.Errorf("the new holder's token after the lost replica's clean-up: %v, %v; want it kept", len(data), err)
	}
}

// TestWaitingHandshakeTakesTheWatchedCertificate: a handshake whose
// attempt waits for the domain's lock (another replica holds it) returns
// the certificate the store's watch serves, without waiting for the lock.
func TestWaitingHandshakeTakesTheWatchedCertificate(t *testing.T) {
	const name = "watched.test"
	ca := certmgrtest.Start(t, certmgrtest.Options{})
	store := certmgrtest.NewMemoryStore()
	m, err := New(Config{Autocert: &autocert.Manager{Cache: store.Open(), Client: ca.NewClient(),
		HostPolicy: autocert.HostWhitelist(name)}, Logger: newTestLogger(&testsupport.Buffer{}), HandshakeTimeout: time.Minute})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { m.Close() })
	other := store.Open() // the replica that holds the lock, and stores the certificate
	_, _, unlock, err := other.Lock(t.Context(), lockName(name))
	if err != nil {
		t.Fatal(err)
	}
	defer unlock()
	got := make(chan *tls.Certificate, 1)
	go func() {
		c, err := m.GetCertificate(helloFor(name))
		if err != nil {
			t.Error(err)
		}
		got <- c
	}()
	waitFor(t, 5*time.Second, "the handshake's attempt", func() bool { return m.Status(name).State == StateObtaining })
	cert := selfSigned(t, name, ecKey(t), "other replica", time.Now().Add(-time.Minute), time.Now().Add(time.Hour))
	if err := other.Put(t.Context(), name, pemCert(t, cert)); err != nil {
		t.Fatal(err)
	}
	select {
	case c := <-got:
		if c == nil || !c.Leaf.Equal(cert.Leaf) {
			t.Errorf("the handshake got %v, want the stored certificate", c)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the handshake still waits for the lock 10 s after the certificate was stored")
	}
}

// TestFirstFailureWithoutAnOrderCountsOnce: the first failure of a name
// whose attempt made no order (the CA's directory answers 503), so that
// the store has no record of it yet, counts once in the cluster's record,
// as with a Cache of one process: 1 failure, the next attempt a minute
// away.
func TestFirstFailureWithoutAnOrderCountsOnce(t *testing.T) {
	t.Parallel()
	const name = "first.test"
	r := startReplicas(t, 1, name)
	r.ca.Proxy.AddRule(certmgrtest.Rule{Class: certmgrtest.ClassDirectory, Status: 503})
	m := r.ms[0]
	if err := m.Provision(context.Background(), name); err == nil {
		t.Fatal("Provision succeeded with the directory answering 503")
	}
	if n := r.ca.Proxy.Counts(name).Orders; n != 0 {
		t.Fatalf("%d orders, want none", n)
	}
	st := m.Status(name)
	if ahead := time.Until(st.NextAttempt); st.Failures != 1 || ahead > 67*time.Second {
		t.Errorf("Status = %d failure(s), next attempt %v ahead; want 1 and about a minute", st.Failures, ahead.Round(time.Second))
	}
	data, _, err := r.store.Open().GetRevision(context.Background(), recordPrefix+name)
	if err != nil {
		t.Fatal(err)
	}
	if rec := decodeRecord(data, time.Now()); rec.Failures != 1 {
		t.Errorf("the store's record has %d failures, want 1", rec.Failures)
	}
}

// accountPutFails is a replica whose store refuses every write of the
// account key.
type accountPutFails struct{ *certmgrtest.MemoryReplica }

func (r accountPutFails) PutIf(ctx context.Context, key string, value []byte, rev int64, fence string) (int64, bool, error) {
	if key == accountKeyName {
		return 0, false, errors.New("store unavailable")
	}
	return r.MemoryReplica.PutIf(ctx, key, value, rev, fence)
}

// TestAccountKeyStoreErrorIsNoFailure: a store that cannot take the new
// account key fails the attempt for certmgr's own reason, not the CA's:
// no failure is recorded, and no order is made.
func TestAccountKeyStoreErrorIsNoFailure(t *testing.T) {
	t.Parallel()
	const name = "account.test"
	checkLeaks(t)
	ca := certmgrtest.Start(t, certmgrtest.Options{})
	ca.DNS.SetA(name, "127.0.0.1")
	m, err := New(Config{
		Autocert: &autocert.Manager{Cache: accountPutFails{certmgrtest.NewMemoryStore().Open()}, Client: ca.NewClient(),
			HostPolicy: autocert.HostWhitelist(name)},
		Logger: newTestLogger(&testsupport.Buffer{}),
	})
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	if err := m.Provision(context.Background(), name); err == nil || !strings.Contains(err.Error(), "account key") {
		t.Fatalf("Provision = %v, want the account key's write failure", err)
	}
	if st := m.Status(name); st.Failures != 0 {
		t.Errorf("Status = %+v, want no failure: the store failed, not the CA", st)
	}
	if n := ca.Proxy.Counts(name).Orders; n != 0 {
		t.Errorf("%d orders, want none", n)
	}
}

// TestFailedValidationLeavesNoToken: after a failed TLS-ALPN-01
// validation, the challenge's token certificate is gone from the store,
// although autocert deletes it only after the attempt released its lock.
func TestFailedValidationLeavesNoToken(t *testing.T) {
	t.Parallel()
	const name = "token.test"
	r := startReplicas(t, 1, name)
	r.ca.DNS.SetA(name, "127.0.0.3") // nothing listens there: validation fails
	if err := r.ms[0].Provision(context.Background(), name); err == nil {
		t.Fatal("Provision succeeded with validation failing")
	}
	if n := r.ca.Proxy.Counts(name).ChallengeResponses; n != 1 {
		t.Fatalf("%d challenge responses, want 1", n)
	}
	waitDetached(t) // autocert's own delete of the token is done
	if _, err := r.store.Open().Get(context.Background(), name+"+token"); !errors.Is(err, autocert.ErrCacheMiss) {
		t.Errorf("the token certificate is still in the store: %v", err)
	}
}

// TestFreshReplicaKnowsTheClusterFromNew: a replica started on the store
// of a cluster, after the replica that obtained one name's certificate
// and failed another's closed, tells of both from New on, before any
// handshake: Status and Domains show the certificate valid with its
// expiry, and the failure with its count and next attempt; a burst of
// handshakes for the failed name makes no attempt.
func TestFreshReplicaKnowsTheClusterFromNew(t *testing.T) {
	t.Parallel()
	const good, bad = "good.test", "bad.test"
	r := startReplicas(t, 1, good, bad)
	r.ca.DNS.SetA(bad, "127.0.0.3") // nothing listens there: validation fails
	first := r.ms[0]
	if err := first.Provision(context.Background(), good); err != nil {
		t.Fatal(err)
	}
	if err := first.Provision(context.Background(), bad); err == nil {
		t.Fatal("Provision succeeded with validation failing")
	}
	want := map[string]Status{good: first.Status(good), bad: first.Status(bad)}
	first.Close()

	m, err := New(Config{
		Autocert: &autocert.Manager{Cache: r.store.Open(), Client: r.ca.NewClient(), HostPolicy: autocert.HostWhitelist(good, bad)},
		Logger:   newTestLogger(&testsupport.Buffer{}),
	})
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	got := map[string]Status{}
	for _, st := range m.Domains() {
		got[st.Domain] = st
	}
	for name, w := range want {
		st := m.Status(name)
		if st.State != w.State || !st.NotAfter.Equal(w.NotAfter) || st.Failures != w.Failures || !st.NextAttempt.Equal(w.NextAttempt) {
			t.Errorf("%s: Status right after New = %+v, want %+v", name, st, w)
		}
		if g, ok := got[name]; !ok || g.State != w.State {
			t.Errorf("%s: Domains right after New has %+v, want state %v", name, g, w.State)
		}
	}
	if want[good].State != StateValid || want[bad].State != StateBackoff {
		t.Fatalf("the first replica's Status: %+v, %+v; want valid and backoff", want[good], want[bad])
	}
	orders := r.ca.Proxy.Counts(bad).Orders
	for range 50 {
		c, err := m.GetCertificate(helloFor(bad))
		if err != nil || !IsFallback(c) {
			t.Fatalf("handshake for %s: %v; want the fallback", bad, err)
		}
	}
	if n := r.ca.Proxy.Counts(bad).Orders; n != orders {
		t.Errorf("%d orders for %s after the burst, want %d", n, bad, orders)
	}
	if st := m.Status(bad); st.Failures != want[bad].Failures {
		t.Errorf("Status after the burst = %+v, want %d failure(s)", st, want[bad].Failures)
	}
}

// TestCertificateRenewedWithoutTrafficAfterClusterRestart: after the
// replica that obtained a certificate is gone, two fresh replicas on the
// store renew it on time, once for the two, with no handshake at all and
// a CA without renewal information: each takes the domain up from the
// cluster's record, and autocert's timer renews.
func TestCertificateRenewedWithoutTrafficAfterClusterRestart(t *testing.T) {
	t.Parallel()
	const name = "quiet.test"
	checkLeaks(t)
	ca := certmgrtest.Start(t, certmgrtest.Options{CertValidity: time.Hour})
	ca.DNS.SetA(name, "127.0.0.1")
	store := certmgrtest.NewMemoryStore()
	logs := &testsupport.Buffer{}
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("logs:\n%s", logs)
		}
	})
	var serving atomic.Pointer[[]*Manager]
	if err := ca.ServeTLS(&tls.Config{GetConfigForClient: func(hello *tls.ClientHelloInfo) (*tls.Config, error) {
		ms := *serving.Load()
		return ms[rand.IntN(len(ms))].TLSConfig(), nil
	}}, nil); err != nil {
		t.Fatal(err)
	}
	start := func(renewBefore time.Duration) *Manager {
		m, err := New(Config{
			Autocert: &autocert.Manager{Cache: store.Open(), Client: ca.NewClient(), HostPolicy: autocert.HostWhitelist(name),
				RenewBefore: renewBefore},
			Logger: newTestLogger(logs),
		})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { m.Close() })
		return m
	}
	first := start(0) // autocert renews a one-hour certificate 20 minutes before it ends
	serving.Store(&[]*Manager{first})
	if err := first.Provision(context.Background(), name); err != nil {
		t.Fatal(err)
	}
	c, err := first.GetCertificate(helloFor(name))
	if err != nil {
		t.Fatal(err)
	}
	old := c.Leaf.NotAfter
	first.Close()
	// The CA dates certificates to the second: a renewed certificate's
	// expiry is later than this one's once a second has passed.
	waitFor(t, 5*time.Second, "a second past the first certificate's NotBefore", func() bool {
		return time.Now().After(c.Leaf.NotBefore.Add(time.Second))
	})

	// The CA has no renewal information from now on: autocert's timer
	// alone renews, and the fresh replicas renew at once (RenewBefore
	// exceeds the lifetime).
	res, err := ca.HTTPClient.Get(ca.DirectoryURL)
	if err != nil {
		t.Fatal(err)
	}
	var dir map[string]any
	err = json.NewDecoder(res.Body).Decode(&dir)
	res.Body.Close()
	if err != nil {
		t.Fatal(err)
	}
	delete(dir, "renewalInfo")
	body, err := json.Marshal(dir)
	if err != nil {
		t.Fatal(err)
	}
	ca.Proxy.AddRule(certmgrtest.Rule{Class: certmgrtest.ClassDirectory, Status: 200, Body: string(body)})
	fresh := []*Manager{start(2 * time.Hour), start(2 * time.Hour)}
	serving.Store(&fresh)
	waitFor(t, 30*time.Second, "the renewal, with no traffic", func() bool {
		return fresh[0].Status(name).NotAfter.After(old) && fresh[1].Status(name).NotAfter.After(old)
	})
	if n := ca.Proxy.Counts(name).Orders; n != 2 {
		t.Errorf("%d orders, want 2: the first certificate and one renewal for both replicas", n)
	}
}

// TestStaleRecordsAreDropped: records of names that failed long ago, and
// that nothing binds any more, are dropped from a replica's memory and
// from the store; the record of a name with a valid certificate, and of
// one that failed a moment ago, are kept.
func TestStaleRecordsAreDropped(t *testing.T) {
	t.Parallel()
	clock := testsupport.NewClock(time.Now())
	store := certmgrtest.NewMemoryStore()
	m, err := New(Config{
		Autocert: &autocert.Manager{Cache: store.Open(), HostPolicy: autocert.HostWhitelist("tracked.test")},
		Logger:   newTestLogger(&testsupport.Buffer{}),
		hooks:    testHooks{now: clock.Now},
	})
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	other := store.Open() // another replica's writes
	write := func(name string, rec failureRecord) {
		t.Helper()
		data, err := json.Marshal(persistedDomain(rec))
		if err != nil {
			t.Fatal(err)
		}
		_, rev, err := other.GetRevision(t.Context(), recordPrefix+name)
		if err != nil && !errors.Is(err, autocert.ErrCacheMiss) {
			t.Fatal(err)
		}
		if _, ok, err := other.PutIf(t.Context(), recordPrefix+name, data, rev, ""); err != nil || !ok {
			t.Fatalf("writing %s's record: %v, %v", name, ok, err)
		}
	}
	failed := func() failureRecord {
		now := clock.Now()
		return failureRecord{Failures: 1, LastError: "boom", LastFailure: now, NextAttempt: now.Add(time.Minute)}
	}
	for _, name := range []string{"old1.test", "old2.test", "recent.test"} {
		write(name, failed())
	}
	now := clock.Now()
	write("valid.test", failureRecord{NotBefore: now, NotAfter: now.Add(90 * 24 * time.Hour)})
	waitFor(t, 5*time.Second, "the records through the watch", func() bool {
		return m.Status("old2.test").Failures == 1 && m.Status("valid.test").State == StateValid
	})
	clock.Advance(3 * 24 * time.Hour)
	write("recent.test", failed()) // it failed again a moment ago
	waitFor(t, 5*time.Second, "recent.test's new record", func() bool {
		return m.Status("recent.test").NextAttempt.After(clock.Now())
	})

	m.sweepRecords()
	for _, name := range []string{"old1.test", "old2.test"} {
		if st := m.Status(name); st.Failures != 0 || st.State != StateNone {
			t.Errorf("%s after the sweep: %+v, want forgotten", name, st)
		}
		if _, _, err := other.GetRevision(t.Context(), recordPrefix+name); !errors.Is(err, autocert.ErrCacheMiss) {
			t.Errorf("%s's record is still in the store: %v", name, err)
		}
	}
	for _, name := range []string{"recent.test", "valid.test"} {
		if _, _, err := other.GetRevision(t.Context(), recordPrefix+name); err != nil {
			t.Errorf("%s's record is gone from the store: %v", name, err)
		}
	}
	if st := m.Status("valid.test"); st.State != StateValid {
		t.Errorf("valid.test after the sweep: %+v, want valid", st)
	}
}

// TestReplicasServeTheStoresLastCertificate: when two replicas each wrote
// a certificate for one name, issued in the same second (the first lost
// its lock while it ordered, the second took over), every replica ends
// serving the one the store holds last, and the first replica's own,
// served again as its attempt ends, does not replace it; a write of a
// certificate issued before the store's is not made. Serving the later
// issued, the last one seen on a tie, left the replicas serving different
// certificates.
func TestReplicasServeTheStoresLastCertificate(t *testing.T) {
	t.Parallel()
	t.Run("coordinator", func(t *testing.T) { t.Parallel(); testServeTheStoresLast(t, nil) })
	t.Run("wrapped", func(t *testing.T) { // a Cache that wraps the Coordinator
		t.Parallel()
		testServeTheStoresLast(t, func(c autocert.Cache) autocert.Cache { return unwrapCache{c} })
	})
}

func testServeTheStoresLast(t *testing.T, wrap func(autocert.Cache) autocert.Cache) {
	const name = "last.test"
	r := startWrappedReplicas(t, 2, wrap)
	ctx := context.Background()
	now := time.Now()
	k := certKey{domain: name}
	key := ecKey(t)
	first := selfSigned(t, name, key, "first", now.Add(-time.Minute), now.Add(90*24*time.Hour))
	last := selfSigned(t, name, key, "last", now.Add(-time.Minute), now.Add(90*24*time.Hour)) // issued in the same second

	if err := r.ms[0].cache.Put(ctx, k.cacheKey(), pemCert(t, first)); err != nil {
		t.Fatal(err)
	}
	serves := func(m *Manager, c *tls.Certificate) bool {
		s := m.servedCert(k)
		return s != nil && s.Leaf.Equal(c.Leaf)
	}
	waitFor(t, 5*time.Second, "both replicas to serve the first certificate", func() bool {
		return serves(r.ms[0], first) && serves(r.ms[1], first)
	})
	if err := r.ms[1].cache.Put(ctx, k.cacheKey(), pemCert(t, last)); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 5*time.Second, "both replicas to serve the store's last certificate", func() bool {
		return serves(r.ms[0], last) && serves(r.ms[1], last)
	})
	r.ms[0].serve(k, first) // as the first replica's attempt ends
	if !serves(r.ms[0], last) {
		t.Error("a certificate without a store revision replaced the store's")
	}
	// A write that waited for a retry (the store was out of reach) is
	// not made over a certificate issued after it.
	older := selfSigned(t, name, key, "older", now.Add(-3*time.Minute), now.Add(90*24*time.Hour))
	if err := r.ms[0].cache.Put(ctx, k.cacheKey(), pemCert(t, older)); err != nil {
		t.Fatal(err)
	}
	data, err := r.store.Open().Get(ctx, k.cacheKey())
	if err != nil {
		t.Fatal(err)
	}
	if c, err := parseCert(k, data, time.Now()); err != nil {
		t.Error(err)
	} else if !c.Leaf.Equal(last.Leaf) {
		t.Errorf("the store holds %v, want the last written", c.Leaf.Subject)
	}
	if !serves(r.ms[0], last) {
		t.Error("the replica serves a certificate older than the store's")
	}
}

// TestCertificateDeletedFromTheStoreStaysServed: a certificate deleted
// from the store (by an operator, or a store that lost it) stays served by
// every replica until it is replaced, and no replica orders on that
// account, also at a handshake on a replica that never read it; a valid
// certificate is never dropped for a store event. Revocation goes through
// the CA, whose renewal information has it replaced.
func TestCertificateDeletedFromTheStoreStaysServed(t *testing.T) {
	t.Parallel()
	const name = "deleted.test"
	r := startReplicas(t, 2, name)
	if err := r.ms[0].Provision(context.Background(), name); err != nil {
		t.Fatal(err)
	}
	k := certKey{domain: name}
	waitFor(t, 5*time.Second, "the other replica to serve it", func() bool { return r.ms[1].servedCert(k) != nil })
	want := r.ms[0].servedCert(k).Leaf.SerialNumber.String()
	if err := r.store.Open().Delete(context.Background(), k.cacheKey()); err != nil {
		t.Fatal(err)
	}
	for i := range 4 { // round robin: each replica twice
		cs, err := r.ca.Handshake(context.Background(), name)
		if err != nil {
			t.Fatalf("handshake %d: %v", i, err)
		}
		if got := cs.PeerCertificates[0].SerialNumber.String(); got != want {
			t.Errorf("handshake %d got serial %s, want the deleted certificate's %s", i, got, want)
		}
	}
	if n := r.ca.Proxy.Counts(name).Orders; n != 1 {
		t.Errorf("%d orders, want the first one only", n)
	}
}

// TestOneOrderAtATimePerAttempt: while an attempt's order is in flight
// (held at its finalization), an order of the domain's other key type by
// the same autocert.Manager (its RSA renewal timer, say) waits, and is
// not admitted into the attempt: it would outlive the attempt, and go on
// after the attempt released the domain's cluster lock, while another
// replica may order. Once the attempt ended, it is made under a lock of
// its own.
func TestOneOrderAtATimePerAttempt(t *testing.T) {
	t.Parallel()
	const name = "two-keys.test"
	r := startReplicas(t, 1, name)
	m := r.ms[0]
	remove := r.ca.Proxy.AddRule(certmgrtest.Rule{Class: certmgrtest.ClassFinalize, Identifier: name, Hold: true})
	released := false
	release := func() {
		if !released {
			released = true
			remove()
			r.ca.Proxy.Release()
		}
	}
	defer release()
	provisioned := make(chan error, 1)
	go func() { provisioned <- m.Provision(context.Background(), name) }()
	waitFor(t, 10*time.Second, "the first order's finalization to be held", func() bool {
		return r.ca.Proxy.Requests(certmgrtest.ClassFinalize) > 0
	})
	m.stateMu.Lock()
	am := m.domains[name].am
	m.stateMu.Unlock()
	rsa := make(chan *tls.Certificate, 1)
	go func() {
		c, err := am.GetCertificate(syntheticHello(certKey{domain: name, rsa: true}))
		if err != nil {
			t.Errorf("the RSA certificate: %v", err)
		}
		rsa <- c
	}()
	waitFor(t, 10*time.Second, "the RSA order to wait, or be made", func() bool {
		return m.waitedOrders.Load() > 0 || r.ca.Proxy.Counts(name).Orders > 1
	})
	if n := r.ca.Proxy.Counts(name).Orders; n != 1 {
		t.Errorf("%d orders while the attempt's order was in flight, want 1", n)
	}
	release()
	if err := <-provisioned; err != nil {
		t.Fatal(err)
	}
	if c := <-rsa; c != nil && !isRSA(c) {
		t.Error("the RSA order got an ECDSA certificate")
	}
	if n := r.ca.Proxy.Counts(name).Orders; n != 2 {
		t.Errorf("%d orders in all, want 2", n)
	}
	if st := m.Status(name); st.State != StateValid || st.Failures != 0 {
		t.Errorf("Status %+v, want valid with no failure", st)
	}
}

// TestRenewalEndsSoonAfterTheCAFails: a renewal by autocert's timer whose
// new order the CA answers with 503 every time ends once acme.Client
// stopped trying, and releases the domain's cluster lock then, not after
// renewalMaxAge (15 minutes) with no outcome; its failure carries the
// CA's detail.
func TestRenewalEndsSoonAfterTheCAFails(t *testing.T) {
	t.Parallel()
	checkLeaks(t)
	const name = "renew-503.test"
	ca := certmgrtest.Start(t, certmgrtest.Options{})
	ca.DNS.SetA(name, "127.0.0.1")
	store := certmgrtest.NewMemoryStore()
	now := time.Now()
	old := selfSigned(t, name, ecKey(t), "old", now.Add(-80*24*time.Hour), now.Add(10*24*time.Hour)) // due: renewed at once
	if err := store.Open().Put(context.Background(), name, pemCert(t, old)); err != nil {
		t.Fatal(err)
	}
	ca.Proxy.AddRule(certmgrtest.Rule{Class: certmgrtest.ClassNewOrder, Identifier: name, Status: http.StatusServiceUnavailable, Detail: "down for maintenance"})
	logs := &testsupport.Buffer{}
	defer func() {
		if t.Failed() {
			t.Log(logs.String())
		}
	}()
	m, err := New(Config{
		Autocert: &autocert.Manager{Cache: store.Open(), Client: ca.NewClient(), HostPolicy: autocert.HostWhitelist(name)},
		Logger:   newTestLogger(logs),
		hooks:    testHooks{renewalQuiet: 2 * time.Second}, // longer than acme.Client's retries (1.2 s)
	})
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	if c, err := m.GetCertificate(syntheticHello(certKey{domain: name})); err != nil || !c.Leaf.Equal(old.Leaf) {
		t.Fatalf("GetCertificate: %v, want the stored certificate", err)
	}
	waitFor(t, 10*time.Second, "the renewal's new orders", func() bool { return ca.Proxy.Requests(certmgrtest.ClassNewOrder) >= 4 })
	waitFor(t, 10*time.Second, "the renewal to end", func() bool { return m.Status(name).Failures > 0 })
	if st := m.Status(name); st.LastError == nil || !strings.Contains(st.LastError.Error(), "down for maintenance") {
		t.Errorf("the renewal's failure: %v, want the CA's detail", st.LastError)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	_, _, unlock, err := store.Open().Lock(ctx, lockName(name))
	if err != nil {
		t.Fatalf("the domain's lock after the renewal ended: %v", err)
	}
	unlock()
}

// recordReadBlocks is a replica's store whose first read of key, once
// armed, waits for release.
type recordReadBlocks struct {
	*certmgrtest.MemoryReplica
	key     string
	armed   atomic.Bool
	once    sync.Once
	entered chan struct{}
	release chan struct{}
}

func (b *recordReadBlocks) GetRevision(ctx context.Context, key string) ([]byte, int64, error) {
	first := false
	if key == b.key && b.armed.Load() {
		b.once.Do(func() { first = true })
	}
	if first {
		close(b.entered)
		select {
		case <-b.release:
		case <-ctx.Done():
			return nil, 0, ctx.Err()
		}
	}
	return b.MemoryReplica.GetRevision(ctx, key)
}

// TestRenewalHoldsItsOrderFromTheStart: an order autocert's timer makes
// (the other key type's renewal) while a renewal is between its lock and
// its reservation (reading the cluster's record) waits for that renewal,
// and is not admitted into it.
func TestRenewalHoldsItsOrderFromTheStart(t *testing.T) {
	t.Parallel()
	checkLeaks(t)
	const name = "setup.test"
	store := &recordReadBlocks{MemoryReplica: certmgrtest.NewMemoryStore().Open(), key: recordPrefix + name,
		entered: make(chan struct{}), release: make(chan struct{})}
	m, err := New(Config{
		Autocert: &autocert.Manager{Cache: store, HostPolicy: autocert.HostWhitelist(name)},
		Logger:   newTestLogger(&testsupport.Buffer{}),
	})
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	d, err := m.domainFor(name)
	if err != nil {
		t.Fatal(err)
	}
	am := m.newAutocert(nil, m.cache)
	m.stateMu.Lock()
	d.am = am
	m.stateMu.Unlock()
	order := func() *http.Request {
		req, _ := http.NewRequest("POST", "https://ca.invalid/new-order", nil)
		return req.WithContext(context.WithValue(req.Context(), senderKey{}, am))
	}
	store.armed.Store(true)
	type result struct {
		id  string
		err error
	}
	first, second := make(chan result, 1), make(chan result, 1)
	go func() { id, err := m.admitOrder(order(), name); first <- result{id, err} }()
	<-store.entered // the renewal holds the lock and reads the record
	go func() { id, err := m.admitOrder(order(), name); second <- result{id, err} }()
	var early result
	waitFor(t, 5*time.Second, "the second order to wait, or be admitted", func() bool {
		select {
		case early = <-second:
			return true
		default:
			return m.waitedOrders.Load() > 0
		}
	})
	if early.id != "" || early.err != nil {
		t.Errorf("the second order was answered (%q, %v) while the renewal set up its own", early.id, early.err)
	}
	close(store.release)
	r := <-first
	if r.err != nil {
		t.Fatalf("the renewal's order: %v", r.err)
	}
	m.stateMu.Lock()
	renewal := d.attempt
	m.stateMu.Unlock()
	m.finish(d, renewal, nil, errors.New("the CA failed it"))
	if early.id == "" && early.err == nil {
		<-second // admitted or refused as an attempt of its own, now that the renewal ended
	}
}

// slowReplay is a replica's store that delivers a replay of the records
// (a watch from revision 1) after delay: a large cluster's.
type slowReplay struct {
	*certmgrtest.MemoryReplica
	delay time.Duration
}

func (s slowReplay) Watch(ctx context.Context, prefix string, fromRev int64, f func(key string, value []byte, rev int64)) error {
	if fromRev != 1 {
		return s.MemoryReplica.Watch(ctx, prefix, fromRev, f)
	}
	var once sync.Once
	return s.MemoryReplica.Watch(ctx, prefix, fromRev, func(key string, value []byte, rev int64) {
		once.Do(func() {
			t := time.NewTimer(s.delay) // the store's latency, injected
			defer t.Stop()
			select {
			case <-t.C:
			case <-ctx.Done():
			}
		})
		f(key, value, rev)
	})
}

// TestNewWaitsForASlowReplay: a store that answers at once but replays
// the records more slowly than storeWait, as a large cluster's does, holds
// New until the replay is done: a fresh replica's Status tells of a
// domain's failures right after New. (New waits storeWait only for a
// store that does not answer.)
func TestNewWaitsForASlowReplay(t *testing.T) {
	t.Parallel()
	checkLeaks(t)
	const name = "slow-replay.test"
	store := certmgrtest.NewMemoryStore()
	now := time.Now()
	rec := failureRecord{Failures: 2, LastError: "refused", LastFailure: now, NextAttempt: now.Add(time.Hour)}
	data, err := json.Marshal(persistedDomain(rec))
	if err != nil {
		t.Fatal(err)
	}
	if err := store.Open().Put(context.Background(), recordPrefix+name, data); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	m, err := New(Config{
		Autocert: &autocert.Manager{Cache: slowReplay{store.Open(), storeWait + 500*time.Millisecond}, HostPolicy: autocert.HostWhitelist(name)},
		Logger:   newTestLogger(&testsupport.Buffer{}),
	})
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	if st := m.Status(name); st.Failures != 2 || !st.NextAttempt.Equal(rec.NextAttempt.Truncate(0)) {
		t.Errorf("Status right after New (%v): %+v, want the store's record", time.Since(start).Round(time.Millisecond), st)
	}
}

// TestLostReplicaDropsItsOwnToken: a replica that lost its lock while its
// validation ran leaves no token in the store once its attempt ended: no
// holder after it wrote another, so it deletes its own (unfenced, by the
// token's revision). The fault campaign left such a token behind (seed
// 1796612828209737969) when no other replica tried the name again.
func TestLostReplicaDropsItsOwnToken(t *testing.T) {
	t.Parallel()
	checkLeaks(t)
	const name = "own-token.test"
	ca := certmgrtest.Start(t, certmgrtest.Options{})
	ca.DNS.SetA(name, "127.0.0.1")
	store := certmgrtest.NewMemoryStore()
	lost, other := store.Open(), store.Open()
	m, err := New(Config{Autocert: &autocert.Manager{Cache: lost, Client: ca.NewClient(),
		HostPolicy: autocert.HostWhitelist(name)}, Logger: newTestLogger(&testsupport.Buffer{})})
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	remove := ca.Proxy.AddRule(certmgrtest.Rule{Class: certmgrtest.ClassChallenge, Identifier: name, Hold: true, Times: 1})
	defer remove()
	done := make(chan error, 1)
	go func() { done <- m.Provision(context.Background(), name) }()
	waitFor(t, 10*time.Second, "the replica's held challenge", func() bool {
		return ca.Proxy.Requests(certmgrtest.ClassChallenge) == 1
	})
	if _, err := other.Get(context.Background(), name+"+token"); err != nil {
		t.Fatalf("the replica's token: %v", err)
	}
	lost.Lose()
	waitFor(t, 5*time.Second, "the replica to count its lock lost", func() bool { return !m.holdsLock(name) })
	ca.Proxy.Release()
	if err := <-done; err == nil {
		t.Fatal("the replica that lost its lock got a certificate")
	}
	if n := m.waitedOrders.Load(); n != 0 {
		t.Errorf("%d orders waited for the attempt that lost its lock: it orders nothing more, and its next order is refused at once", n)
	}
	waitFor(t, 5*time.Second, "the lost replica's token to leave the store", func() bool {
		_, err := other.Get(context.Background(), name+"+token")
		return errors.Is(err, autocert.ErrCacheMiss)
	})
}

// putFailsOnce is a replica's store whose first write of a certificate
// key fails, as a write does while etcd elects a leader.
type putFailsOnce struct {
	*certmgrtest.MemoryReplica
	failed atomic.Bool
}

func (s *putFailsOnce) PutIf(ctx context.Context, key string, value []byte, rev int64, fence string) (int64, bool, error) {
	if isCertKey(key) && s.failed.CompareAndSwap(false, true) {
		return 0, false, errors.New("etcdserver: leader changed")
	}
	return s.MemoryReplica.PutIf(ctx, key, value, rev, fence)
}

// TestCertificateWriteRetriedAtOnce: a certificate write that fails for a
// moment is tried again within the attempt (which holds the domain's
// lock), so that it lands before another replica can find no certificate
// and order again; it is not left for the retry every cacheRetry.
func TestCertificateWriteRetriedAtOnce(t *testing.T) {
	t.Parallel()
	checkLeaks(t)
	store := &putFailsOnce{MemoryReplica: certmgrtest.NewMemoryStore().Open()}
	m, err := New(Config{Autocert: &autocert.Manager{Cache: store}, Logger: newTestLogger(&testsupport.Buffer{})})
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	now := time.Now()
	c := selfSigned(t, "retried.test", ecKey(t), "test", now.Add(-time.Minute), now.Add(time.Hour))
	if err := m.cache.Put(context.Background(), "retried.test", pemCert(t, c)); err != nil {
		t.Fatalf("Put: %v, want it written on a second try", err)
	}
	if !store.failed.Load() {
		t.Fatal("the first write did not fail")
	}
	if _, err := store.Get(context.Background(), "retried.test"); err != nil {
		t.Errorf("the certificate in the store: %v", err)
	}
}

// tokenDeletesFail is a replica's store whose first n deletes of a
// TLS-ALPN-01 token fail, as they do while etcd elects a leader.
type tokenDeletesFail struct {
	*certmgrtest.MemoryReplica
	left atomic.Int64
}

func (s *tokenDeletesFail) DeleteIf(ctx context.Context, key string, rev int64, fence string) (bool, error) {
	if strings.HasSuffix(key, "+token") && s.left.Add(-1) >= 0 {
		return false, errors.New("etcdserver: leader changed")
	}
	return s.MemoryReplica.DeleteIf(ctx, key, rev, fence)
}

// TestFailedTokenDeleteIsTriedAgain: when the holder's delete of its
// token fails (the 30-minute campaign left one in etcd across a leader
// move), it is tried again, under the lock and then in the background,
// until the token is gone.
func TestFailedTokenDeleteIsTriedAgain(t *testing.T) {
	t.Parallel()
	checkLeaks(t)
	const name = "token-retry.test"
	ca := certmgrtest.Start(t, certmgrtest.Options{})
	ca.DNS.SetA(name, "127.0.0.3") // nothing listens there: validation fails
	store := &tokenDeletesFail{MemoryReplica: certmgrtest.NewMemoryStore().Open()}
	store.left.Store(8) // more than the tries under the lock
	m, err := New(Config{Autocert: &autocert.Manager{Cache: store, Client: ca.NewClient(),
		HostPolicy: autocert.HostWhitelist(name)}, Logger: newTestLogger(&testsupport.Buffer{})})
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	if err := m.Provision(context.Background(), name); err == nil {
		t.Fatal("Provision succeeded with validation failing")
	}
	waitFor(t, 15*time.Second, "the token to leave the store", func() bool {
		_, err := store.MemoryReplica.Get(context.Background(), name+"+token")
		return errors.Is(err, autocert.ErrCacheMiss)
	})
}

// TestRecordWriteOfALostHoldDoesNotLand: a record write under a hold the
// store has ended lands nowhere. A holder that has not heard yet (paused
// while its lease expired) writes with the hold's fence, which the store
// refuses; one that has heard (lost closed) sends the store no write.
func TestRecordWriteOfALostHoldDoesNotLand(t *testing.T) {
	t.Parallel()
	const name = "fenced.test"
	store := certmgrtest.NewMemoryStore()
	replica := &countingStore{MemoryReplica: store.Open()} // handshake_test.go
	m, err := New(Config{Autocert: &autocert.Manager{Cache: replica}, Logger: newTestLogger(&testsupport.Buffer{})})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { m.Close() })
	fence, lost, unlock, err := replica.Lock(t.Context(), name)
	if err != nil {
		t.Fatal(err)
	}
	defer unlock()
	replica.Lose() // the store ends the hold, and gives the lock to the next
	other := store.Open()
	_, _, unlockOther, err := other.Lock(t.Context(), name)
	if err != nil {
		t.Fatal(err)
	}
	defer unlockOther()

	write := func(r *failureRecord) error { r.Failures = 7; return nil }
	notHeard := make(chan struct{}) // the holder's view: still held
	if err := m.updateRecord(t.Context(), name, fence, notHeard, nil, write); err == nil {
		t.Error("the paused holder's write succeeded")
	}
	if data, err := other.Get(t.Context(), recordPrefix+name); !errors.Is(err, autocert.ErrCacheMiss) {
		t.Errorf("the paused holder's record landed: %q, %v", data, err)
	}
	n := replica.n.Load()
	if err := m.updateRecord(t.Context(), name, fence, lost, nil, write); !errors.Is(err, errLockLost) {
		t.Errorf("the write of a holder that knows it lost the lock: %v, want errLockLost", err)
	}
	if sent := replica.n.Load() - n; sent != 0 {
		t.Errorf("a holder that knows it lost the lock sent %d requests to the store, want none", sent)
	}
}

// laggingReads is a replica's store whose reads of key return a stale
// record (a serializable read from a lagging etcd member) and whose watch
// leaves key's writes out, until a conditional write of key fails: the
// conflict sends its next read to the leader.
type laggingReads struct {
	*certmgrtest.MemoryReplica
	key string

	mu    sync.Mutex
	stale []byte // nil once a write conflicted
	rev   int64
}

func (l *laggingReads) lagging() ([]byte, int64) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.stale, l.rev
}

func (l *laggingReads) GetRevision(ctx context.Context, key string) ([]byte, int64, error) {
	if stale, rev := l.lagging(); key == l.key && stale != nil {
		return stale, rev, nil
	}
	return l.MemoryReplica.GetRevision(ctx, key)
}

func (l *laggingReads) PutIf(ctx context.Context, key string, value []byte, rev int64, fence string) (int64, bool, error) {
	newRev, ok, err := l.MemoryReplica.PutIf(ctx, key, value, rev, fence)
	if key == l.key && err == nil && !ok {
		l.mu.Lock()
		l.stale = nil
		l.mu.Unlock()
	}
	return newRev, ok, err
}

func (l *laggingReads) Watch(ctx context.Context, prefix string, fromRev int64, f func(key string, value []byte, rev int64)) error {
	return l.MemoryReplica.Watch(ctx, prefix, fromRev, func(key string, value []byte, rev int64) {
		if stale, _ := l.lagging(); key != l.key || stale == nil {
			f(key, value, rev)
		}
	})
}

// TestClusterBudgetCheckedOnTheRecordWritten: a replica whose reads of a
// domain's record lag behind the store (another replica's failures, not
// seen yet) makes no order past the cluster's budget: the order's
// reservation is checked against the record it is written over, which
// it reads again after the write conflicts.
func TestClusterBudgetCheckedOnTheRecordWritten(t *testing.T) {
	t.Parallel()
	const name = "lagging.test"
	ca := certmgrtest.Start(t, certmgrtest.Options{})
	ca.DNS.SetA(name, "127.0.0.3") // were an order made, its validation would fail
	store := certmgrtest.NewMemoryStore()
	writer := store.Open()
	now := time.Now()
	record := func(spends int) []byte {
		t.Helper()
		rec := failureRecord{Failures: spends, LastFailure: now.Add(-time.Minute), LastError: "failed"}
		for i := range spends {
			rec.Spends = append(rec.Spends, spend{At: now.Add(time.Duration(i-10) * time.Minute), Authz: 1})
		}
		data, err := json.Marshal(persistedDomain(rec))
		if err != nil {
			t.Fatal(err)
		}
		return data
	}
	key := recordPrefix + name
	staleRev, ok, err := writer.PutIf(t.Context(), key, record(3), 0, "") // one authorization left of 4; no backoff
	if !ok || err != nil {
		t.Fatalf("writing the record: %v, %v", ok, err)
	}
	if _, ok, err := writer.PutIf(t.Context(), key, record(4), staleRev, ""); !ok || err != nil {
		t.Fatalf("writing the record: %v, %v", ok, err)
	}
	lag := &laggingReads{MemoryReplica: store.Open(), key: key, stale: record(3), rev: staleRev}
	m, err := New(Config{Autocert: &autocert.Manager{Cache: lag, Client: ca.NewClient(), HostPolicy: autocert.HostWhitelist(name)},
		Logger: newTestLogger(&testsupport.Buffer{})})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { m.Close() })
	if err := m.Provision(t.Context(), name); !errors.Is(err, ErrBackoff) {
		t.Errorf("Provision = %v, want ErrBackoff: the budget is spent", err)
	}
	if n := ca.Proxy.Requests(certmgrtest.ClassNewOrder); n != 0 {
		t.Errorf("%d orders reached the CA, want none", n)
	}
	data, _, err := writer.GetRevision(t.Context(), key)
	if rec := decodeRecord(data, time.Now()); err != nil || len(rec.Spends) != 4 {
		t.Errorf("the store's record: %d spends (%v), want the 4 it held", len(rec.Spends), err)
	}
}

// TestTokenWrittenOnlyUnderTheLock: with a Coordinator, a domain's
// TLS-ALPN-01 certificate is written or deleted through certmgr's Cache
// only while an attempt of this replica holds the domain's lock (an
// autocert.Manager of another flow, a renewal timer say, writes none);
// other keys are written whatever the lock.
func TestTokenWrittenOnlyUnderTheLock(t *testing.T) {
	t.Parallel()
	const name = "token.test"
	store := certmgrtest.NewMemoryStore()
	m, err := New(Config{Autocert: &autocert.Manager{Cache: store.Open()}, Logger: newTestLogger(&testsupport.Buffer{})})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { m.Close() })
	d, err := m.domainFor(name)
	if err != nil {
		t.Fatal(err)
	}
	reader := store.Open()
	if err := m.cache.Put(t.Context(), name+"+token", []byte("token")); err != nil {
		t.Fatal(err)
	}
	if data, err := reader.Get(t.Context(), name+"+token"); !errors.Is(err, autocert.ErrCacheMiss) {
		t.Errorf("a token written without the lock landed: %q, %v", data, err)
	}
	if err := m.cache.Put(t.Context(), name, []byte("certificate")); err != nil {
		t.Fatal(err)
	}
	if data, err := reader.Get(t.Context(), name); err != nil || string(data) != "certificate" {
		t.Errorf("another key written without the lock: %q, %v; want it written", data, err)
	}
	// An attempt that holds the lock writes it.
	a := &attempt{key: certKey{domain: name}, path: PathProvision, done: make(chan struct{})}
	m.stateMu.Lock()
	d.attempt = a
	m.stateMu.Unlock()
	if err := m.lockDomain(t.Context(), d, a); err != nil {
		t.Fatal(err)
	}
	if err := m.cache.Put(t.Context(), name+"+token", []byte("token")); err != nil {
		t.Fatal(err)
	}
	if data, err := reader.Get(t.Context(), name+"+token"); err != nil || string(data) != "token" {
		t.Errorf("the lock holder's token: %q, %v", data, err)
	}
	m.stateMu.Lock()
	unlock := a.unlock
	d.attempt = nil
	m.stateMu.Unlock()
	unlock()
}
