package etcdcache

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"

	"github.com/certmgr/certmgr"
	"github.com/certmgr/certmgr/certmgrtest"
	"github.com/certmgr/certmgr/internal/leakcheck"
)

// leaseOf returns the ID of the lease r's Cache holds its locks under.
func leaseOf(t *testing.T, r *replica) clientv3.LeaseID {
	t.Helper()
	r.mu.Lock()
	cache := r.cache
	r.mu.Unlock()
	cache.mu.Lock()
	defer cache.mu.Unlock()
	if cache.sess == nil {
		t.Fatal("the replica's Cache has no lease")
	}
	return cache.sess.s.Lease()
}

// TestCrashTakeover: the replica ordering a name stops mid-order (its
// challenge held at the CA) as a crashed or frozen one would: it is cut
// off from etcd, and the load balancer takes it out of the rotation. The
// survivor, asked for the same name meanwhile, orders only once etcd has
// expired the holder's lease, never before, and a few seconds after at
// most; it gets the certificate. The holder sends nothing more for its
// order once it counts its lease lost: the CA sees one finalization, the
// survivor's. When it is back, the holder serves the survivor's
// certificate.
func TestCrashTakeover(t *testing.T) {
	t.Parallel()
	const name = "takeover.test"
	c := startCluster(t, clusterOptions{names: []string{name}})
	holder, survivor := c.replicas[0], c.replicas[1]
	c.ca.Proxy.AddRule(certmgrtest.Rule{Class: certmgrtest.ClassChallenge, Identifier: name, Hold: true, Times: 1})
	ctx, cancel := context.WithTimeout(t.Context(), 60*time.Second)
	defer cancel()
	held := make(chan error, 1)
	go func() { held <- holder.manager().Provision(ctx, name) }()
	waitFor(t, 10*time.Second, "the holder's challenge at the CA", func() bool {
		return c.ca.Proxy.Requests(certmgrtest.ClassChallenge) == 1
	})
	lease := leaseOf(t, holder)
	holder.link.cut()
	c.tlsLB.SetDown(0, true)
	cut := time.Now()
	took := make(chan error, 1)
	go func() { took <- survivor.manager().Provision(ctx, name) }()

	direct := clientOf(t, c.etcd.Endpoint())
	var expired, ordered time.Time
	for ordered.IsZero() {
		// The order count is read before the lease: an order seen while
		// the lease is still alive came before its expiry.
		orders := c.ca.Proxy.Counts(name).Orders
		resp, err := direct.TimeToLive(ctx, lease)
		if err != nil {
			t.Fatal(err)
		}
		now := time.Now()
		if resp.TTL == -1 && expired.IsZero() {
			expired = now
		}
		if orders > 1 {
			if expired.IsZero() {
				t.Fatalf("the survivor ordered %v after the cut, while the holder's lease was alive", now.Sub(cut))
			}
			ordered = now
		}
		if now.Sub(cut) > 30*time.Second {
			t.Fatalf("no takeover 30 s after the cut (lease expired: %v)", !expired.IsZero())
		}
		time.Sleep(10 * time.Millisecond)
	}
	t.Logf("lease expired %v after the cut; the survivor ordered %v after that",
		expired.Sub(cut).Round(time.Millisecond), ordered.Sub(expired).Round(time.Millisecond))
	if d := ordered.Sub(expired); d > 5*time.Second {
		t.Errorf("the survivor ordered %v after the lease expired, want a few seconds at most", d)
	}
	if err := <-took; err != nil {
		t.Fatalf("the survivor: %v", err)
	}
	c.ca.Proxy.Release()
	if err := <-held; err == nil {
		t.Error("the holder got a certificate for an order it went on with after losing its lock")
	}
	if n := c.ca.Proxy.Requests(certmgrtest.ClassFinalize); n != 1 {
		t.Errorf("%d finalizations, want the survivor's alone", n)
	}
	holder.link.heal()
	c.tlsLB.SetDown(0, false)
	waitFor(t, 30*time.Second, "every replica serving the survivor's certificate", func() bool {
		s := c.serials(name)
		return s[0] != "" && s[0] == s[1] && s[1] == s[2]
	})
	if n := c.ca.Proxy.Counts(name).Orders; n != 2 {
		t.Errorf("%d orders, want the lost holder's and the survivor's", n)
	}
}

// TestEtcdRestartUnderLiveReplicas stops etcd under three live replicas
// (their connections dropped, as a crash would) and starts it again on
// the same data. Meanwhile every replica keeps serving the certificate it
// has; a name none has is answered with the fallback within the
// handshake timeout, and no order is made for it (no order without a
// reservation in the store). Once etcd is back, the same replicas, not
// restarted, resume by themselves: the name that waited gets one order,
// and every replica serves its certificate.
func TestEtcdRestartUnderLiveReplicas(t *testing.T) {
	t.Parallel()
	const served, waited = "served.test", "waited.test"
	const handshakeTimeout = time.Second
	c := startCluster(t, clusterOptions{names: []string{served, waited},
		config: func(_ int, cfg *certmgr.Config) { cfg.HandshakeTimeout = handshakeTimeout }})
	ms := c.managers()
	ctx, cancel := context.WithTimeout(t.Context(), 60*time.Second)
	defer cancel()
	if err := ms[0].Provision(ctx, served); err != nil {
		t.Fatal(err)
	}
	var before []string
	waitFor(t, 10*time.Second, "every replica serving the first certificate", func() bool {
		before = c.serials(served)
		return before[0] != "" && before[0] == before[1] && before[1] == before[2]
	})

	for _, r := range c.replicas {
		r.link.cut()
	}
	c.etcd.Stop()
	stopped := time.Now()
	if after := c.serials(served); strings.Join(after, " ") != strings.Join(before, " ") {
		t.Errorf("serials served while etcd is down: %v, want %v", after, before)
	}
	for i, r := range c.replicas {
		leaf := fallbackHandshake(t, r, waited, handshakeTimeout+3*time.Second)
		if _, err := leaf.Verify(x509.VerifyOptions{DNSName: waited, Roots: c.ca.Roots}); err == nil {
			t.Errorf("replica %d served a CA-issued certificate for %s while etcd is down", i, waited)
		}
	}
	// And all along, until every replica's lease has expired.
	for {
		since := time.Since(stopped)
		if after := c.serials(served); strings.Join(after, " ") != strings.Join(before, " ") {
			t.Fatalf("serials served %v after etcd went down: %v, want %v", since.Round(time.Millisecond), after, before)
		}
		if since > 2*testTTL {
			break
		}
		time.Sleep(200 * time.Millisecond) // paces the handshakes; no outcome is waited for
	}
	if n := c.ca.Proxy.Counts(waited).Orders; n != 0 {
		t.Errorf("%d orders while etcd is down, want none", n)
	}

	c.etcd.Start(t)
	for _, r := range c.replicas {
		r.link.heal()
	}
	// Every replica's client has reconnected before the first handshake
	// orders: the CA may validate through any of them, and one that
	// cannot read the store yet has no token to answer with.
	for i, r := range c.replicas {
		waitFor(t, 30*time.Second, fmt.Sprintf("replica %d to reach etcd again", i), r.reachesEtcd)
	}
	t.Cleanup(func() {
		if t.Failed() {
			for i, m := range ms {
				t.Logf("replica %d: %+v", i, m.Status(waited))
			}
			t.Logf("orders: %+v", c.ca.Proxy.Counts(waited))
		}
	})
	waitFor(t, 30*time.Second, "every replica serving the waiting name's certificate", func() bool {
		s := c.serials(waited)
		return s[0] != "" && s[0] == s[1] && s[1] == s[2]
	})
	if n := c.ca.Proxy.Counts(waited).Orders; n != 1 {
		t.Errorf("%d orders for the name that waited, want 1", n)
	}
	for i, r := range c.replicas {
		if r.manager() != ms[i] || r.restarts != 0 {
			t.Errorf("replica %d was replaced", i)
		}
	}
}

// fallbackHandshake completes a handshake with r for name without
// verifying the chain, within timeout, and returns the leaf.
func fallbackHandshake(t *testing.T, r *replica, name string, timeout time.Duration) *x509.Certificate {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), timeout)
	defer cancel()
	d := tls.Dialer{Config: &tls.Config{ServerName: name, InsecureSkipVerify: true}}
	conn, err := d.DialContext(ctx, "tcp", r.tlsL.Addr().String())
	if err != nil {
		t.Fatalf("handshake for %s within %v: %v", name, timeout, err)
	}
	defer conn.Close()
	return conn.(*tls.Conn).ConnectionState().PeerCertificates[0]
}

// TestWholeClusterRestart stops every replica and starts them all again
// on the same etcd: the certificate is served at once with no new order,
// and a failing name's backoff holds: no order for it before its next
// attempt, on any replica, which all show the same one.
func TestWholeClusterRestart(t *testing.T) {
	t.Parallel()
	const good, failing = "good.test", "failing.test"
	c := startCluster(t, clusterOptions{names: []string{good, failing},
		config: func(_ int, cfg *certmgr.Config) { cfg.HandshakeTimeout = 5 * time.Second }})
	c.ca.DNS.SetA(failing, "127.0.0.3") // nothing listens there: validation fails
	ctx, cancel := context.WithTimeout(t.Context(), 60*time.Second)
	defer cancel()
	ms := c.managers()
	if err := ms[0].Provision(ctx, good); err != nil {
		t.Fatal(err)
	}
	if err := ms[1].Provision(ctx, failing); err == nil {
		t.Fatal("validation succeeded for the failing name")
	}
	next := ms[1].Status(failing).NextAttempt
	if next.IsZero() {
		t.Fatal("no next attempt after a failure")
	}
	var serials []string
	waitFor(t, 10*time.Second, "every replica serving the certificate", func() bool {
		serials = c.serials(good)
		return serials[0] != "" && serials[0] == serials[1] && serials[1] == serials[2]
	})
	orders := map[string]int{good: c.ca.Proxy.Counts(good).Orders, failing: c.ca.Proxy.Counts(failing).Orders}

	for _, r := range c.replicas {
		r.stop()
	}
	for _, r := range c.replicas {
		r.open()
	}
	if after := c.serials(good); strings.Join(after, " ") != strings.Join(serials, " ") {
		t.Errorf("serials after the restart: %v, want %v", after, serials)
	}
	for i, r := range c.replicas {
		if err := r.manager().Provision(ctx, failing); err == nil {
			t.Errorf("replica %d: the failing name succeeded", i)
		}
		if got := r.manager().Status(failing).NextAttempt; !got.Equal(next) {
			t.Errorf("replica %d: next attempt %v after the restart, want %v", i, got, next)
		}
	}
	for name, n := range orders {
		if got := c.ca.Proxy.Counts(name).Orders; got != n {
			t.Errorf("%s: %d orders after the restart, want %d as before", name, got, n)
		}
	}
}

// TestReplicasLeaveNoGoroutine: once every replica's Manager, Cache and
// client are closed, none of their goroutines is left, nor any of
// autocert's.
func TestReplicasLeaveNoGoroutine(t *testing.T) {
	t.Parallel()
	leakcheck.Label(testLabel, t.Name()) // the goroutines it starts are its own: see goroutinesOf
	const name = "leak.test"
	before := len(clusterGoroutines(t))
	c := startCluster(t, clusterOptions{names: []string{name}})
	for _, r := range c.replicas {
		if _, err := r.getCertificate(name); err != nil {
			t.Fatal(err)
		}
	}
	if n := len(clusterGoroutines(t)); n <= before {
		t.Fatalf("%d goroutines of the replicas while they run, %d before: the check sees none", n, before)
	}
	for _, r := range c.replicas {
		r.stop()
	}
	waitGoroutinesGone(t, before, func() []string { return clusterGoroutines(t) })
}

// clusterGoroutines returns the stacks of the goroutines of certmgr,
// autocert, this package and etcd's client.
func clusterGoroutines(t *testing.T) []string {
	return goroutinesOf(t, "certmgr.(*", "acme/autocert.", "etcdcache.(*Cache)", "go.etcd.io/etcd/client/v3")
}

// readmeBound is how long etcdcache.New and certmgr.New may take together
// when etcd is down. It is an acceptance bound on a hang (they used to
// wait for etcd for as long as it was down), not a timing goal: they
// return in about a second (certmgr.New waits that long for the store's
// watch), and 2 s leaves room for a loaded machine.
const readmeBound = 2 * time.Second

// openAsREADME opens r as the README shows: a client with no DialTimeout,
// whose calls wait for a connection (clientv3.New returns at once, etcd or
// not), then etcdcache.New and certmgr.New, whose time together it
// returns. If they do not return within readmeBound, it fails the test,
// after ending the hang by closing the client.
func (r *replica) openAsREADME(t *testing.T) time.Duration {
	t.Helper()
	cli, err := clientv3.New(clientv3.Config{Endpoints: []string{"http://" + r.link.addr()}, Logger: zap.NewNop()})
	if err != nil {
		t.Fatal(err)
	}
	type opened struct {
		cache *Cache
		m     *certmgr.Manager
		err   error
		took  time.Duration
	}
	done := make(chan opened, 1)
	go func() {
		start := time.Now()
		cache, err := New(cli, Options{Prefix: "/cluster/", LeaseTTL: testTTL})
		if err != nil {
			done <- opened{err: err}
			return
		}
		m, err := certmgr.New(r.config(cache))
		if err != nil {
			cache.Close()
		}
		done <- opened{cache, m, err, time.Since(start)}
	}()
	var o opened
	timer := time.NewTimer(readmeBound)
	defer timer.Stop()
	select {
	case o = <-done:
	case <-timer.C:
		cli.Close() // the calls waiting for etcd fail: New returns
		o = <-done
		if o.err == nil {
			o.m.Close()
			o.cache.Close()
		}
		t.Fatalf("etcdcache.New and certmgr.New did not return within %v with etcd down (they took %v, returning once the client was closed)", readmeBound, o.took)
	}
	if o.err != nil {
		cli.Close()
		t.Fatal(o.err)
	}
	r.mu.Lock()
	r.m, r.cache, r.cli = o.m, o.cache, cli
	r.mu.Unlock()
	return o.took
}

// TestReplicaStartsWhileEtcdIsDown starts a replica while etcd is down,
// with a client built as the README shows. etcdcache.New and certmgr.New
// return within readmeBound; the replica answers a handshake with the
// fallback and orders nothing; once etcd is back, the same replica, not
// restarted, serves the CA's certificate within 30 s.
func TestReplicaStartsWhileEtcdIsDown(t *testing.T) {
	t.Parallel()
	const name = "late.test"
	const handshakeTimeout = time.Second
	c := startCluster(t, clusterOptions{replicas: 1, names: []string{name},
		config: func(_ int, cfg *certmgr.Config) { cfg.HandshakeTimeout = handshakeTimeout }})
	r := c.replicas[0]
	r.stop()
	c.etcd.Stop()

	took := r.openAsREADME(t)
	t.Logf("etcdcache.New and certmgr.New took %v with etcd down", took.Round(time.Millisecond))
	m := r.manager()
	leaf := fallbackHandshake(t, r, name, handshakeTimeout+3*time.Second)
	if !certmgr.IsFallback(&tls.Certificate{Leaf: leaf}) {
		t.Errorf("served %q (issuer %q) while etcd is down, want the fallback", leaf.Subject, leaf.Issuer)
	}
	if n := c.ca.Proxy.Counts(name).Orders; n != 0 {
		t.Errorf("%d orders while etcd is down, want none", n)
	}

	c.etcd.Start(t)
	back := time.Now()
	waitFor(t, 30*time.Second, "the replica serving the CA's certificate", func() bool {
		ctx, cancel := context.WithTimeout(t.Context(), 5*time.Second)
		defer cancel()
		_, err := r.handshake(ctx, name) // verified against the CA's roots
		return err == nil
	})
	t.Logf("the CA's certificate served %v after etcd's return", time.Since(back).Round(time.Millisecond))
	if n := c.ca.Proxy.Counts(name).Orders; n != 1 {
		t.Errorf("%d orders, want 1", n)
	}
	if r.manager() != m || r.restarts != 0 {
		t.Error("the replica was replaced")
	}
}

// TestReplicaClosedWhileEtcdIsDown: a replica started while etcd is down
// and closed before etcd is back leaves no goroutine (the watch's retries
// end with Close), and its Close does not wait for etcd.
func TestReplicaClosedWhileEtcdIsDown(t *testing.T) {
	t.Parallel()
	leakcheck.Label(testLabel, t.Name()) // the goroutines it starts are its own: see goroutinesOf
	const name = "closed.test"
	before := len(clusterGoroutines(t))
	c := startCluster(t, clusterOptions{replicas: 1, names: []string{name},
		config: func(_ int, cfg *certmgr.Config) { cfg.HandshakeTimeout = time.Second }})
	r := c.replicas[0]
	r.stop()
	c.etcd.Stop()
	r.openAsREADME(t)
	fallbackHandshake(t, r, name, 4*time.Second)
	m := r.manager()
	closed := make(chan struct{})
	go func() { m.Close(); close(closed) }()
	timer := time.NewTimer(readmeBound)
	defer timer.Stop()
	select {
	case <-closed:
	case <-timer.C:
		t.Fatalf("the Manager's Close did not return within %v with etcd down", readmeBound)
	}
	r.stop() // the Cache's Close may fail to revoke, with etcd down: not checked here
	waitGoroutinesGone(t, before, func() []string { return clusterGoroutines(t) })
}

// flakyWatch is a Cache whose Watch fails while fail is set, as one that
// cannot reach etcd would, and counts its calls.
type flakyWatch struct {
	*Cache
	fail  atomic.Bool
	calls atomic.Int64
}

func (f *flakyWatch) Watch(ctx context.Context, prefix string, fromRev int64, fn func(key string, value []byte, rev int64)) error {
	f.calls.Add(1)
	if f.fail.Load() {
		return errors.New("etcdcache test: the watch fails")
	}
	return f.Cache.Watch(ctx, prefix, fromRev, fn)
}

// TestFailedWatchIsRetried: a replica whose watch fails at New tries it
// again in the background, and reports the failure once, not at every
// try. Meanwhile it serves the certificate it read from etcd; another
// replica writes a new one for the same name; once the watch works, the
// replica serves that one, written while it did not watch, and then a
// later one, through the watch.
func TestFailedWatchIsRetried(t *testing.T) {
	t.Parallel()
	const name = "rewatch.test"
	flaky := &flakyWatch{}
	flaky.fail.Store(true)
	var watchErrors atomic.Int64
	c := startCluster(t, clusterOptions{replicas: 2, names: []string{name},
		config: func(i int, cfg *certmgr.Config) {
			if i != 1 {
				return
			}
			flaky.Cache = cfg.Autocert.Cache.(*Cache)
			cfg.Autocert.Cache = flaky
			cfg.OnEvent = func(ev certmgr.Event) {
				if ev.Kind == certmgr.EventCacheError && strings.Contains(ev.Err.Error(), "watch") {
					watchErrors.Add(1)
				}
			}
		}})
	writer, watcher := c.replicas[0], c.replicas[1]
	waitFor(t, 20*time.Second, "the watch tried three times", func() bool { return flaky.calls.Load() >= 3 })
	if n := watchErrors.Load(); n != 1 {
		t.Errorf("%d watch errors reported, want 1 for the outage", n)
	}

	ctx, cancel := context.WithTimeout(t.Context(), 60*time.Second)
	defer cancel()
	if err := writer.manager().Provision(ctx, name); err != nil {
		t.Fatal(err)
	}
	first := c.serials(name)
	if first[0] == "" || first[1] != first[0] {
		t.Fatalf("serials %v, want the first certificate on both replicas", first)
	}
	// Another replica writes a new certificate while the watch fails: a
	// renewal, say, signed here by a test CA of its own.
	issued, err := writer.cache.Get(ctx, name)
	if err != nil {
		t.Fatal(err)
	}
	sh := newShape(t, issued)
	put := func() string {
		t.Helper()
		data := sh.make(t, name)
		if err := writer.cache.Put(ctx, name, data); err != nil {
			t.Fatal(err)
		}
		c, err := tls.X509KeyPair(data, data)
		if err != nil {
			t.Fatal(err)
		}
		return c.Leaf.SerialNumber.String()
	}
	served := func() string {
		return fallbackHandshake(t, watcher, name, 5*time.Second).SerialNumber.String()
	}
	second := put()
	if got := served(); got != first[1] {
		t.Fatalf("serial %s served while the watch fails, want the first, %s", got, first[1])
	}

	flaky.fail.Store(false)
	waitFor(t, 20*time.Second, "the certificate written while the watch failed", func() bool { return served() == second })
	third := put()
	waitFor(t, 10*time.Second, "the certificate written once the watch works", func() bool { return served() == third })
	if n := watchErrors.Load(); n != 1 {
		t.Errorf("%d watch errors reported, want 1", n)
	}
}
