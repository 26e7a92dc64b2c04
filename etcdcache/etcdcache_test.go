package etcdcache

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/certmgr/certmgr"
	"github.com/certmgr/certmgr/certmgrtest"
	"github.com/certmgr/certmgr/etcdcache/internal/etcdtest"
	"github.com/certmgr/certmgr/internal/leakcheck"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"
	"golang.org/x/crypto/acme/autocert"
)

var (
	_ certmgr.Coordinator     = (*Cache)(nil)
	_ certmgrtest.Coordinator = (*Cache)(nil)
	_ autocert.Cache          = (*Cache)(nil)
)

// testTTL is the lease TTL of the tests' Caches: as short as etcd allows
// with its default timing.
const testTTL = 2 * time.Second

// clientOf returns a client of the etcd server at endpoint, closed in
// t's cleanup.
func clientOf(t testing.TB, endpoint string) *clientv3.Client {
	t.Helper()
	cli, err := clientv3.New(clientv3.Config{
		Endpoints:   []string{endpoint},
		DialTimeout: 5 * time.Second,
		Logger:      zap.NewNop(),
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cli.Close() })
	return cli
}

// newCache returns a Cache on cli, closed in t's cleanup (before cli,
// cleanups running last first).
func newCache(t testing.TB, cli *clientv3.Client, prefix string) *Cache {
	t.Helper()
	c, err := New(cli, Options{Prefix: prefix, LeaseTTL: testTTL})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := c.Close(); err != nil {
			t.Errorf("Close: %v", err)
		}
	})
	return c
}

func testContext(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(t.Context(), 50*time.Second)
	t.Cleanup(cancel)
	return ctx
}

// TestConformance runs certmgrtest's suite with replicas on clients of
// their own, each through a TCP proxy. A replica is lost when its proxy
// cuts it off: its client can no longer reach etcd, and its lease
// expires a TTL after its last keep-alive, as in a partition. (Closing
// the client is not a loss: the Cache may still revoke the lease as the
// client closes.) The partition heals once etcd has expired the lease,
// as the suite asks: the same Cache then gets locks with a new lease.
func TestConformance(t *testing.T) {
	t.Parallel()
	srv := etcdtest.Start(t)
	direct := clientOf(t, srv.Endpoint())
	var (
		mu      sync.Mutex // guards proxies
		proxies = make(map[*Cache]*proxy)
		healing sync.WaitGroup
	)
	t.Cleanup(healing.Wait)
	open := func() certmgrtest.Coordinator {
		p := startProxy(t, srv.Host())
		c := newCache(t, clientOf(t, "http://"+p.addr()), "/conformance/")
		mu.Lock()
		proxies[c] = p
		mu.Unlock()
		return c
	}
	lose := func(c certmgrtest.Coordinator) {
		cache := c.(*Cache)
		mu.Lock()
		p := proxies[cache]
		mu.Unlock()
		cache.mu.Lock()
		sess := cache.sess
		cache.mu.Unlock()
		if sess == nil {
			t.Fatal("lose: the Cache has no lease")
		}
		lease := sess.s.Lease()
		p.cut()
		cut := time.Now()
		healing.Go(func() {
			defer p.heal()
			for t.Context().Err() == nil {
				resp, err := direct.TimeToLive(t.Context(), lease)
				if err == nil && resp.TTL == -1 {
					t.Logf("lose: etcd expired the lease %v after the cut; healed", time.Since(cut).Round(time.Millisecond))
					return
				}
				time.Sleep(50 * time.Millisecond)
			}
		})
	}
	start := time.Now()
	certmgrtest.CoordinatorConformance(t, open, lose)
	t.Logf("conformance suite: %v", time.Since(start).Round(time.Millisecond))
}

// proxy forwards TCP connections to an address until it is cut.
type proxy struct {
	l      net.Listener
	target string
	mu     sync.Mutex // guards isCut, conns
	isCut  bool
	conns  map[net.Conn]bool
	wg     sync.WaitGroup
}

// startProxy starts a proxy to target on a loopback port, and closes it
// in t's cleanup.
func startProxy(t *testing.T, target string) *proxy {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := &proxy{l: l, target: target, conns: make(map[net.Conn]bool)}
	p.wg.Go(p.serve)
	t.Cleanup(p.close)
	return p
}

func (p *proxy) addr() string { return p.l.Addr().String() }

func (p *proxy) serve() {
	for {
		in, err := p.l.Accept()
		if err != nil {
			return
		}
		p.wg.Go(func() { p.forward(in) })
	}
}

// track adds c to the connections that cut and close close, unless the
// proxy is cut.
func (p *proxy) track(c net.Conn) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.isCut {
		c.Close()
		return false
	}
	p.conns[c] = true
	return true
}

func (p *proxy) forward(in net.Conn) {
	if !p.track(in) {
		return
	}
	out, err := net.Dial("tcp", p.target)
	if err != nil {
		in.Close()
		return
	}
	if !p.track(out) {
		in.Close()
		return
	}
	var wg sync.WaitGroup
	wg.Go(func() { io.Copy(out, in); out.Close() })
	wg.Go(func() { io.Copy(in, out); in.Close() })
	wg.Wait()
}

// cut closes every connection, and those accepted until heal.
func (p *proxy) cut() {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.isCut = true
	for c := range p.conns {
		c.Close()
	}
	clear(p.conns)
}

func (p *proxy) heal() {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.isCut = false
}

func (p *proxy) close() {
	p.l.Close()
	p.cut()
	p.wg.Wait()
}

func TestCache(t *testing.T) {
	t.Parallel()
	ctx := testContext(t)
	srv := etcdtest.Start(t)
	cli := clientOf(t, srv.Endpoint())
	c := newCache(t, cli, "/a/")
	other := newCache(t, cli, "/b/")
	if _, err := c.Get(ctx, "k"); err != autocert.ErrCacheMiss {
		t.Fatalf("Get of a missing key: %v, want autocert.ErrCacheMiss itself", err)
	}
	if err := c.Put(ctx, "k", []byte("v")); err != nil {
		t.Fatal(err)
	}
	if v, err := c.Get(ctx, "k"); err != nil || string(v) != "v" {
		t.Fatalf("Get = %q, %v; want %q", v, err, "v")
	}
	if err := c.Put(ctx, "empty", nil); err != nil {
		t.Fatal(err)
	}
	if v, err := c.Get(ctx, "empty"); err != nil || v == nil || len(v) != 0 {
		t.Fatalf("Get of an empty value = %#v, %v; want []byte{}", v, err)
	}
	if _, err := other.Get(ctx, "k"); err != autocert.ErrCacheMiss {
		t.Fatalf("Get under another prefix: %v, want autocert.ErrCacheMiss", err)
	}
	resp, err := cli.Get(ctx, "/a/cache/k")
	if err != nil || len(resp.Kvs) != 1 || string(resp.Kvs[0].Value) != "v" {
		t.Fatalf("the etcd key /a/cache/k: %v, %v", resp, err)
	}
	if err := c.Delete(ctx, "k"); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Get(ctx, "k"); err != autocert.ErrCacheMiss {
		t.Fatalf("Get after Delete: %v, want autocert.ErrCacheMiss", err)
	}
	if err := c.Delete(ctx, "k"); err != nil {
		t.Fatalf("Delete of a missing key: %v", err)
	}

	// The locks' keys, and the fence that names one.
	fence, _, unlock, err := c.Lock(ctx, "example.com")
	if err != nil {
		t.Fatal(err)
	}
	resp, err = cli.Get(ctx, "/a/locks/example.com/", clientv3.WithPrefix())
	if err != nil || len(resp.Kvs) != 1 || resp.Kvs[0].Lease == 0 {
		t.Fatalf("the lock's etcd key: %v, %v", resp, err)
	}
	if kv := resp.Kvs[0]; fence != fmt.Sprintf("%s@%d", kv.Key, kv.CreateRevision) {
		t.Fatalf("fence %q, want the lock's key %s @ its create revision %d", fence, kv.Key, kv.CreateRevision)
	}
	unlock()

	if _, err := New(nil, Options{}); err == nil {
		t.Error("New(nil) succeeded")
	}
	if _, err := New(cli, Options{LeaseTTL: -time.Second}); err == nil {
		t.Error("New with a negative LeaseTTL succeeded")
	}
	d, err := New(cli, Options{})
	if err != nil {
		t.Fatal(err)
	}
	if d.prefix != "/certmgr/" || d.ttl != 15 {
		t.Errorf("defaults: prefix %q, TTL %d s; want /certmgr/, 15 s", d.prefix, d.ttl)
	}
	if err := d.Close(); err != nil {
		t.Fatal(err)
	}
}

func TestClose(t *testing.T) {
	t.Parallel()
	ctx := testContext(t)
	srv := etcdtest.Start(t)
	cli := clientOf(t, srv.Endpoint())
	c := newCache(t, cli, "/close/")
	_, lost, _, err := c.Lock(ctx, "l")
	if err != nil {
		t.Fatal(err)
	}
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
	select {
	case <-lost:
	default:
		t.Fatal("Close did not close lost")
	}
	if _, _, _, err := c.Lock(ctx, "l"); err == nil {
		t.Fatal("Lock after Close succeeded")
	}
	// The lease is revoked: another Cache gets the lock at once.
	d := newCache(t, cli, "/close/")
	short, cancel := context.WithTimeout(ctx, time.Second)
	defer cancel()
	_, _, unlock, err := d.Lock(short, "l")
	if err != nil {
		t.Fatalf("Lock after the holder's Close: %v", err)
	}
	unlock()
	if err := c.Close(); err != nil {
		t.Fatalf("second Close: %v", err)
	}
}

// TestCloseUnreachable closes a Cache that holds a lock while etcd is
// unreachable: Close gives up on the revoke within its bound and says
// so, and nothing is left once the client is closed.
func TestCloseUnreachable(t *testing.T) {
	t.Parallel()
	leakcheck.Label(testLabel, t.Name()) // the goroutines it starts are its own: see goroutinesOf
	ctx := testContext(t)
	srv := etcdtest.Start(t)
	before := len(ours(t))
	p := startProxy(t, srv.Host())
	cli, err := clientv3.New(clientv3.Config{Endpoints: []string{"http://" + p.addr()}, Logger: zap.NewNop()})
	if err != nil {
		t.Fatal(err)
	}
	c, err := New(cli, Options{Prefix: "/unreachable/", LeaseTTL: 10 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	_, lost, _, err := c.Lock(ctx, "l")
	if err != nil {
		t.Fatal(err)
	}
	p.cut()
	start := time.Now()
	err = c.Close()
	if d := time.Since(start); err == nil || d > closeTimeout+time.Second {
		t.Fatalf("Close with etcd unreachable: %v after %v; want an error within %v", err, d, closeTimeout)
	}
	t.Logf("Close: %v", err)
	select {
	case <-lost:
	default:
		t.Fatal("Close did not close lost")
	}
	cli.Close()
	waitGoroutinesGone(t, before, func() []string { return ours(t) })
}

// TestRestart stops etcd under a Cache that holds a lock and watches,
// and starts it again on the same data and URLs: the lock is lost within
// the TTL, Locks fail meanwhile with their ctx's error, and afterwards
// the same Cache gets locks (with a new lease) and its watch goes on.
//
// The client reaches etcd through a proxy that drops the connections as
// etcd stops, as a crash would: etcd's own stop waits 7 s for the open
// watch and keep-alive streams to end.
func TestRestart(t *testing.T) {
	t.Parallel()
	ctx := testContext(t)
	srv := etcdtest.Start(t)
	p := startProxy(t, srv.Host())
	c := newCache(t, clientOf(t, "http://"+p.addr()), "/restart/")
	var (
		mu     sync.Mutex // guards events
		events []string
	)
	if err := c.Watch(ctx, "w/", 0, func(key string, value []byte, _ int64) {
		mu.Lock()
		events = append(events, fmt.Sprintf("%s=%s", key, value))
		mu.Unlock()
	}); err != nil {
		t.Fatal(err)
	}
	if err := c.Put(ctx, "w/before", []byte("1")); err != nil {
		t.Fatal(err)
	}
	fence, lost, unlock, err := c.Lock(ctx, "l")
	if err != nil {
		t.Fatal(err)
	}
	defer unlock()
	rev, ok, err := c.PutIf(ctx, "rec", []byte("1"), 0, fence)
	if err != nil || !ok {
		t.Fatalf("fenced PutIf: %v, %v", ok, err)
	}

	stopping := time.Now()
	p.cut()
	srv.Stop()
	stopped := time.Now()
	t.Logf("etcd stopped in %v", stopped.Sub(stopping).Round(time.Millisecond))
	select {
	case <-lost:
		t.Logf("lost closed %v after etcd stopped (TTL %v)", time.Since(stopped).Round(time.Millisecond), testTTL)
	case <-time.After(testTTL):
		t.Fatalf("lost not closed within the TTL, %v, of etcd's stop", testTTL)
	}
	if _, ok, _ := c.PutIf(ctx, "rec", []byte("2"), rev, fence); ok {
		t.Fatal("a fenced PutIf succeeded after the lock was lost")
	}
	short, cancel := context.WithTimeout(ctx, 300*time.Millisecond)
	defer cancel()
	if _, _, _, err := c.Lock(short, "l"); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Lock while etcd is down: %v, want context.DeadlineExceeded", err)
	}

	srv.Start(t)
	p.heal()
	restarted := time.Now()
	t.Logf("etcd restarted in %v", restarted.Sub(stopped).Round(time.Millisecond))
	fence2, lost2, unlock2, err := c.Lock(ctx, "l")
	if err != nil {
		t.Fatalf("Lock after etcd's restart: %v", err)
	}
	defer unlock2()
	t.Logf("Lock %v after etcd's restart", time.Since(restarted).Round(time.Millisecond))
	if _, ok, err := c.PutIf(ctx, "rec", []byte("2"), rev, fence); err != nil || ok {
		t.Fatalf("PutIf fenced by the lost hold, after the restart: %v, %v; want false", ok, err)
	}
	if _, ok, err := c.PutIf(ctx, "rec", []byte("2"), rev, fence2); err != nil || !ok {
		t.Fatalf("fenced PutIf after the restart: %v, %v", ok, err)
	}
	if err := c.Put(ctx, "w/after", []byte("2")); err != nil {
		t.Fatal(err)
	}
	want := "w/before=1 w/after=2"
	for deadline := time.Now().Add(10 * time.Second); ; {
		mu.Lock()
		got := strings.Join(events, " ")
		mu.Unlock()
		if got == want {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("watch reported %q, want %q", got, want)
		}
		time.Sleep(10 * time.Millisecond)
	}
	select {
	case <-lost2:
		t.Fatal("the new lock is lost")
	default:
	}
}

// TestWatchCompacted watches from a revision that etcd compacted: Watch
// reports the current value of each key written since, with its
// revision, and then the later writes.
func TestWatchCompacted(t *testing.T) {
	t.Parallel()
	ctx := testContext(t)
	srv := etcdtest.Start(t)
	cli := clientOf(t, srv.Endpoint())
	c := newCache(t, cli, "/compact/")
	var (
		mu     sync.Mutex // guards events
		events []string
	)
	// The watch starts from the revision current now...
	resp, err := cli.Get(ctx, "x")
	if err != nil {
		t.Fatal(err)
	}
	from := resp.Header.Revision
	for i := range 3 {
		if err := c.Put(ctx, "w/k", fmt.Appendf(nil, "%d", i)); err != nil { // from+1..3
			t.Fatal(err)
		}
	}
	if err := c.Put(ctx, "w/gone", []byte("x")); err != nil { // from+4
		t.Fatal(err)
	}
	if err := c.Delete(ctx, "w/gone"); err != nil { // from+5
		t.Fatal(err)
	}
	last, err := cli.Put(ctx, "/compact/cache/w/other", "o") // from+6
	if err != nil {
		t.Fatal(err)
	}
	// ...and everything up to the last write is compacted away.
	if _, err := cli.Compact(ctx, last.Header.Revision); err != nil {
		t.Fatal(err)
	}
	if err := c.Watch(ctx, "w/", from, func(key string, value []byte, rev int64) {
		mu.Lock()
		events = append(events, fmt.Sprintf("%s=%s@%d", key, value, rev-from))
		mu.Unlock()
	}); err != nil {
		t.Fatal(err)
	}
	if err := c.Put(ctx, "w/later", []byte("l")); err != nil { // from+7
		t.Fatal(err)
	}
	// The current values of the keys written since, then the later
	// writes; the deleted key is not reported.
	want := "w/k=2@3 w/other=o@6 w/later=l@7"
	for deadline := time.Now().Add(10 * time.Second); ; {
		mu.Lock()
		got := strings.Join(events, " ")
		mu.Unlock()
		if got == want {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("watch reported %q, want %q (revisions after %d)", got, want, from)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// TestFenceInTxn checks that etcd itself refuses a write fenced by a
// stale hold, were the Cache to let it through: one of an earlier hold
// of the same name with the same lease (the same key, an earlier create
// revision), and one whose lease was revoked behind the Cache's back,
// after which another Cache takes the lock before this one may notice.
func TestFenceInTxn(t *testing.T) {
	t.Parallel()
	ctx := testContext(t)
	srv := etcdtest.Start(t)
	cli := clientOf(t, srv.Endpoint())
	c := newCache(t, cli, "/txn/")
	other := newCache(t, clientOf(t, srv.Endpoint()), "/txn/")

	fence1, _, unlock, err := c.Lock(ctx, "l")
	if err != nil {
		t.Fatal(err)
	}
	c.mu.Lock()
	stale := c.holds[fence1]
	c.mu.Unlock()
	unlock()
	fence2, lost2, unlock, err := c.Lock(ctx, "l")
	if err != nil {
		t.Fatal(err)
	}
	c.mu.Lock()
	h2 := c.holds[fence2]
	c.mu.Unlock()
	if fence2 == fence1 || h2.key != stale.key {
		t.Fatalf("fences %q then %q: want the same key with another create revision", fence1, fence2)
	}
	// Only the transaction can refuse now.
	c.mu.Lock()
	c.holds[fence1] = stale
	c.mu.Unlock()
	if _, ok, err := c.PutIf(ctx, "k", []byte("x"), 0, fence1); err != nil || ok {
		t.Fatalf("PutIf fenced by an earlier hold of the same key: %v, %v; want false", ok, err)
	}
	rev, ok, err := c.PutIf(ctx, "k", []byte("v"), 0, fence2)
	if err != nil || !ok {
		t.Fatalf("PutIf fenced by the current hold: %v, %v", ok, err)
	}
	if ok, err := c.DeleteIf(ctx, "k", rev, fence1); err != nil || ok {
		t.Fatalf("DeleteIf fenced by an earlier hold of the same key: %v, %v; want false", ok, err)
	}
	c.mu.Lock()
	delete(c.holds, fence1)
	c.mu.Unlock()

	// An operator revokes the lease: another Cache gets the lock, while
	// the fenced writes of this one fail, whether or not it noticed.
	if _, err := cli.Revoke(ctx, h2.sess.s.Lease()); err != nil {
		t.Fatal(err)
	}
	c.mu.Lock()
	c.holds[fence2] = h2 // as if not noticed yet
	c.mu.Unlock()
	if _, ok, err := c.PutIf(ctx, "k", []byte("x"), rev, fence2); err != nil || ok {
		t.Fatalf("PutIf fenced by a revoked hold: %v, %v; want false", ok, err)
	}
	short, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	fence3, _, unlock3, err := other.Lock(short, "l")
	if err != nil {
		t.Fatalf("Lock after the holder's lease was revoked: %v", err)
	}
	defer unlock3()
	if _, ok, err := c.PutIf(ctx, "k", []byte("x"), rev, fence2); err != nil || ok {
		t.Fatalf("PutIf fenced by a revoked hold, with another holder: %v, %v; want false", ok, err)
	}
	if _, ok, err := other.PutIf(ctx, "k", []byte("o"), rev, fence3); err != nil || !ok {
		t.Fatalf("PutIf of the new holder: %v, %v", ok, err)
	}
	if _, ok, err := other.PutIf(ctx, "k", []byte("o"), rev, fence2); err != nil || ok {
		t.Fatalf("PutIf with another Cache's fence: %v, %v; want false", ok, err)
	}
	// The Cache notices the revoke at its next keep-alive.
	select {
	case <-lost2:
	case <-time.After(testTTL):
		t.Fatalf("lost not closed within %v of the revoke", testTTL)
	}
	unlock()
}

// TestCloseRevoked closes a Cache whose lease was revoked behind its
// back: the lease is gone, as Close wants, and Close does not fail.
func TestCloseRevoked(t *testing.T) {
	t.Parallel()
	ctx := testContext(t)
	srv := etcdtest.Start(t)
	cli := clientOf(t, srv.Endpoint())
	c, err := New(cli, Options{Prefix: "/revoked/", LeaseTTL: testTTL})
	if err != nil {
		t.Fatal(err)
	}
	if _, _, _, err := c.Lock(ctx, "l"); err != nil {
		t.Fatal(err)
	}
	c.mu.Lock()
	lease := c.sess.s.Lease()
	c.mu.Unlock()
	if _, err := cli.Revoke(ctx, lease); err != nil {
		t.Fatal(err)
	}
	if err := c.Close(); err != nil {
		t.Fatalf("Close after the lease was revoked: %v", err)
	}
}

// TestSameProcess checks that goroutines sharing a Cache (and so a
// lease) take turns with a lock, and that a waiting Lock that gives up
// leaves nothing behind.
func TestSameProcess(t *testing.T) {
	t.Parallel()
	ctx := testContext(t)
	srv := etcdtest.Start(t)
	c := newCache(t, clientOf(t, srv.Endpoint()), "/same/")
	var (
		inside, most int
		mu           sync.Mutex // guards inside, most
		wg           sync.WaitGroup
	)
	for range 20 {
		wg.Go(func() {
			for range 3 {
				_, _, unlock, err := c.Lock(ctx, "l")
				if err != nil {
					t.Error(err)
					return
				}
				mu.Lock()
				inside++
				most = max(most, inside)
				mu.Unlock()
				runtime.Gosched()
				mu.Lock()
				inside--
				mu.Unlock()
				unlock()
			}
		})
	}
	// Lock calls that give up at once, meanwhile. One may get the lock
	// within its millisecond (without the race detector, it does): it
	// unlocks as the others do.
	for range 20 {
		short, cancel := context.WithTimeout(ctx, time.Millisecond)
		if _, _, unlock, err := c.Lock(short, "l"); err == nil {
			unlock()
		}
		cancel()
	}
	wg.Wait()
	if most != 1 {
		t.Fatalf("%d goroutines held the lock at once", most)
	}
	_, _, unlock, err := c.Lock(ctx, "l")
	if err != nil {
		t.Fatal(err)
	}
	unlock()
}

// ours lists t's goroutines of Caches and of etcd clients.
func ours(t *testing.T) []string {
	return goroutinesOf(t, "etcdcache.(*Cache)", "go.etcd.io/etcd/client/v3")
}

// testLabel is the pprof label that names the test a goroutine is of: a
// test that sets it first (leakcheck.Label) sees only its own goroutines,
// even while other tests run in parallel.
const testLabel = "etcdcache-test"

// goroutinesOf returns the stacks of t's goroutines (see testLabel) that
// mention any of marks, but for those of the etcd server t runs.
func goroutinesOf(t *testing.T, marks ...string) []string {
	var found []string
	for _, g := range leakcheck.Labelled(testLabel, t.Name()) {
		if strings.Contains(g, "etcd/server/v3") {
			continue
		}
		for _, mark := range marks {
			if strings.Contains(g, mark) {
				found = append(found, g)
				break
			}
		}
	}
	return found
}

// waitGoroutinesGone waits until list returns no more goroutines than
// before, for 10 s at most.
func waitGoroutinesGone(t *testing.T, before int, list func() []string) {
	t.Helper()
	var left []string
	for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(20 * time.Millisecond) {
		if left = list(); len(left) <= before {
			return
		}
	}
	t.Fatalf("%d goroutines left after Close, %d before:\n%s", len(left), before, strings.Join(left, "\n\n"))
}

func TestNoGoroutinesLeft(t *testing.T) {
	t.Parallel()
	leakcheck.Label(testLabel, t.Name()) // the goroutines it starts are its own: see goroutinesOf
	ctx := testContext(t)
	srv := etcdtest.Start(t)
	before := len(ours(t))
	func() {
		var caches [2]*Cache
		for i := range caches {
			cli, err := clientv3.New(clientv3.Config{Endpoints: []string{srv.Endpoint()}, Logger: zap.NewNop()})
			if err != nil {
				t.Fatal(err)
			}
			defer cli.Close() // after the Cache's Close
			c, err := New(cli, Options{Prefix: "/leak/", LeaseTTL: testTTL})
			if err != nil {
				t.Fatal(err)
			}
			defer func() {
				if err := c.Close(); err != nil {
					t.Error(err)
				}
			}()
			caches[i] = c
		}
		a, b := caches[0], caches[1]
		if err := a.Watch(ctx, "", 0, func(string, []byte, int64) {}); err != nil {
			t.Fatal(err)
		}
		_, _, unlock, err := a.Lock(ctx, "l")
		if err != nil {
			t.Fatal(err)
		}
		// A Lock that waits (on b) and one that gives up (on a), an
		// unlock, and a lock left to Close.
		time.AfterFunc(100*time.Millisecond, unlock)
		_, _, unlockB, err := b.Lock(ctx, "l")
		if err != nil {
			t.Fatal(err)
		}
		short, cancel := context.WithTimeout(ctx, 100*time.Millisecond)
		defer cancel()
		a.Lock(short, "l")
		unlockB()
		fence, _, _, err := a.Lock(ctx, "l2")
		if err != nil {
			t.Fatal(err)
		}
		if _, _, err := a.PutIf(ctx, "k", []byte("v"), 0, fence); err != nil {
			t.Fatal(err)
		}
		if n := len(ours(t)); n <= before {
			t.Fatalf("%d goroutines of the Caches and clients while open, %d before: the check sees none", n, before)
		}
	}()
	waitGoroutinesGone(t, before, func() []string { return ours(t) })
}
