package etcdcache

import (
	"context"
	"crypto/tls"
	"fmt"
	"io"
	"log/slog"
	"net"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"golang.org/x/crypto/acme/autocert"

	"github.com/certmgr/certmgr"
	"github.com/certmgr/certmgr/certmgrtest"
	"github.com/certmgr/certmgr/etcdcache/internal/etcdtest"
	"github.com/certmgr/certmgr/internal/testsupport"
)

// The benchmarks of replicas on etcd (see BENCHMARKS.md, "Replicas on
// etcd"). Each sets one process on an autocert.DirCache beside replicas on
// an etcd server in this process. -count repeats each sub-benchmark back
// to back; for runs whose sides alternate, repeat the command instead:
//
//	go test -run '^$' -bench BenchmarkReplicaGetCertificateCached .
//	go test -run '^$' -bench 'BenchmarkReplicaFirstCertificate$' -benchtime 10x .
//	go test -run '^$' -bench BenchmarkReplicaFirstCertificateSlowCA -benchtime 5x .
//	go test -run '^$' -bench BenchmarkLockHandoff -benchtime 20x .

// cacheTB returns a Cache on cli with the default lease TTL, closed in
// tb's cleanup before cli.
func cacheTB(tb testing.TB, cli *clientv3.Client, prefix string) *Cache {
	tb.Helper()
	c, err := New(cli, Options{Prefix: prefix})
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { c.Close() })
	return c
}

// replicaTB returns a Manager on cache, closed in tb's cleanup before
// cache (cleanups run last first). policy accepts the names it serves.
func replicaTB(tb testing.TB, ca *certmgrtest.Server, cache autocert.Cache, policy autocert.HostPolicy) *certmgr.Manager {
	tb.Helper()
	m, err := certmgr.New(certmgr.Config{
		Autocert: &autocert.Manager{Cache: cache, Client: ca.NewClient(), HostPolicy: policy},
		Logger:   slog.New(slog.NewTextHandler(io.Discard, nil)),
	})
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { m.Close() })
	return m
}

// suffixPolicy accepts the names that end with suffix.
func suffixPolicy(suffix string) autocert.HostPolicy {
	return func(_ context.Context, host string) error {
		if !strings.HasSuffix(host, suffix) {
			return fmt.Errorf("%q is not under %q", host, suffix)
		}
		return nil
	}
}

// serveReplicas serves the CA's validation connections (and its other
// TLS connections) by the Managers that current holds, each in turn, as a
// round-robin load balancer would.
func serveReplicas(tb testing.TB, ca *certmgrtest.Server, current *atomic.Pointer[[]*certmgr.Manager]) {
	tb.Helper()
	var next atomic.Uint64
	err := ca.ServeTLS(&tls.Config{GetConfigForClient: func(*tls.ClientHelloInfo) (*tls.Config, error) {
		ms := *current.Load()
		return ms[next.Add(1)%uint64(len(ms))].TLSConfig(), nil
	}}, nil)
	if err != nil {
		tb.Fatal(err)
	}
}

// countingKV counts the requests made through an etcd client's KV.
type countingKV struct {
	clientv3.KV
	n atomic.Int64
}

func (k *countingKV) Get(ctx context.Context, key string, opts ...clientv3.OpOption) (*clientv3.GetResponse, error) {
	k.n.Add(1)
	return k.KV.Get(ctx, key, opts...)
}

func (k *countingKV) Put(ctx context.Context, key, val string, opts ...clientv3.OpOption) (*clientv3.PutResponse, error) {
	k.n.Add(1)
	return k.KV.Put(ctx, key, val, opts...)
}

func (k *countingKV) Delete(ctx context.Context, key string, opts ...clientv3.OpOption) (*clientv3.DeleteResponse, error) {
	k.n.Add(1)
	return k.KV.Delete(ctx, key, opts...)
}

func (k *countingKV) Compact(ctx context.Context, rev int64, opts ...clientv3.CompactOption) (*clientv3.CompactResponse, error) {
	k.n.Add(1)
	return k.KV.Compact(ctx, rev, opts...)
}

func (k *countingKV) Do(ctx context.Context, op clientv3.Op) (clientv3.OpResponse, error) {
	k.n.Add(1)
	return k.KV.Do(ctx, op)
}

func (k *countingKV) Txn(ctx context.Context) clientv3.Txn {
	k.n.Add(1)
	return k.KV.Txn(ctx)
}

// countKV makes cli count the requests of its KV, and returns the count.
func countKV(cli *clientv3.Client) *countingKV {
	k := &countingKV{KV: cli.KV}
	cli.KV = k
	return k
}

// byteProxy forwards TCP connections to target and counts the bytes
// that pass, both ways.
type byteProxy struct {
	l      net.Listener
	target string
	n      atomic.Int64
	mu     sync.Mutex // guards conns
	conns  map[net.Conn]bool
	wg     sync.WaitGroup
}

// startByteProxy starts a byteProxy to target on a loopback port, closed
// in tb's cleanup.
func startByteProxy(tb testing.TB, target string) *byteProxy {
	tb.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		tb.Fatal(err)
	}
	p := &byteProxy{l: l, target: target, conns: make(map[net.Conn]bool)}
	p.wg.Go(func() {
		for {
			in, err := l.Accept()
			if err != nil {
				return
			}
			p.wg.Go(func() { p.forward(in) })
		}
	})
	tb.Cleanup(func() {
		l.Close()
		p.mu.Lock()
		for c := range p.conns {
			c.Close()
		}
		p.mu.Unlock()
		p.wg.Wait()
	})
	return p
}

func (p *byteProxy) addr() string { return p.l.Addr().String() }

// bytes returns how many bytes passed so far, both ways.
func (p *byteProxy) bytes() int64 { return p.n.Load() }

func (p *byteProxy) forward(in net.Conn) {
	out, err := net.Dial("tcp", p.target)
	if err != nil {
		in.Close()
		return
	}
	p.mu.Lock()
	p.conns[in], p.conns[out] = true, true
	p.mu.Unlock()
	var wg sync.WaitGroup
	wg.Go(func() { io.Copy(out, countingReader{in, &p.n}); out.Close() })
	wg.Go(func() { io.Copy(in, countingReader{out, &p.n}); in.Close() })
	wg.Wait()
}

type countingReader struct {
	r io.Reader
	n *atomic.Int64
}

func (c countingReader) Read(b []byte) (int, error) {
	n, err := c.r.Read(b)
	c.n.Add(int64(n))
	return n, err
}

// revision returns the etcd store's current revision.
func revision(tb testing.TB, cli *clientv3.Client) int64 {
	tb.Helper()
	resp, err := cli.Get(context.Background(), "revision", clientv3.WithCountOnly())
	if err != nil {
		tb.Fatal(err)
	}
	return resp.Header.Revision
}

// GetCertificate for a name whose certificate is served: a Manager on an
// autocert.DirCache (one process) beside a Manager that is one of three
// replicas on etcd, in one run. Replica 1 orders the certificate; the
// measured replica 3 loads it from etcd at its first handshake (replica 2
// through the watch). The etcd replica's client goes through a TCP proxy
// that counts bytes, and its KV requests are counted: the loop must make
// none, and the store's revision must not move.
func BenchmarkReplicaGetCertificateCached(b *testing.B) {
	const name = "cached.bench.test"
	ctx := context.Background()
	endpoint := etcdtest.Start(b).Endpoint()
	direct := clientOf(b, endpoint)
	ca := certmgrtest.Start(b, certmgrtest.Options{})
	ca.DNS.SetA(name, "127.0.0.1")
	policy := autocert.HostWhitelist(name)
	var current atomic.Pointer[[]*certmgr.Manager]
	serveReplicas(b, ca, &current)

	ms := []*certmgr.Manager{
		replicaTB(b, ca, cacheTB(b, clientOf(b, endpoint), "/bench/"), policy),
		replicaTB(b, ca, cacheTB(b, clientOf(b, endpoint), "/bench/"), policy),
	}
	current.Store(&ms)
	if err := ms[0].Provision(ctx, name); err != nil {
		b.Fatal(err)
	}
	proxy := startByteProxy(b, strings.TrimPrefix(endpoint, "http://"))
	measured := clientOf(b, "http://"+proxy.addr())
	kv := countKV(measured)
	replica := replicaTB(b, ca, cacheTB(b, measured, "/bench/"), policy)
	ms = append(ms, replica)
	current.Store(&ms)

	// One process on a DirCache holding the same certificate.
	pem, err := cacheTB(b, direct, "/bench/").Get(ctx, name)
	if err != nil {
		b.Fatal(err)
	}
	dir := autocert.DirCache(b.TempDir())
	if err := dir.Put(ctx, name, pem); err != nil {
		b.Fatal(err)
	}
	single := replicaTB(b, ca, dir, policy)

	h := testsupport.Hello(name)
	var serial string
	for _, m := range []*certmgr.Manager{single, replica} {
		c, err := m.GetCertificate(h) // loads it from the store
		if err != nil || certmgr.IsFallback(c) {
			b.Fatalf("first handshake: %v", err)
		}
		if s := c.Leaf.SerialNumber.String(); serial != "" && s != serial {
			b.Fatalf("serials %s and %s", serial, s)
		} else {
			serial = s
		}
	}

	b.Run("dircache", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			if _, err := single.GetCertificate(h); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("etcd", func(b *testing.B) {
		rev, reqs, n := revision(b, direct), kv.n.Load(), proxy.bytes()
		b.ReportAllocs()
		for b.Loop() {
			if _, err := replica.GetCertificate(h); err != nil {
				b.Fatal(err)
			}
		}
		b.StopTimer()
		reqs, n = kv.n.Load()-reqs, proxy.bytes()-n
		b.ReportMetric(float64(reqs)/float64(b.N), "store-requests/op")
		b.ReportMetric(float64(n)/float64(b.N), "store-bytes/op")
		if reqs != 0 || n != 0 {
			b.Errorf("%d store requests, %d bytes to and from etcd in %d handshakes; want none", reqs, n, b.N)
		}
		if r := revision(b, direct); r != rev {
			b.Errorf("the store's revision moved from %d to %d", rev, r)
		}
	})
}

// burstSize is how many handshakes a burst for a fresh name sends.
const burstSize = 30

// burst sends burstSize handshakes for name to ms, each to the next
// Manager, all at once, and returns when every one has its certificate,
// with the time the first one took.
func burst(tb testing.TB, ms []*certmgr.Manager, name string) (first time.Duration) {
	tb.Helper()
	var wg sync.WaitGroup
	var failed atomic.Int64
	var once sync.Once
	start := time.Now()
	for i := range burstSize {
		wg.Go(func() {
			c, err := ms[i%len(ms)].GetCertificate(testsupport.Hello(name))
			if err != nil || certmgr.IsFallback(c) {
				failed.Add(1)
				return
			}
			once.Do(func() { first = time.Since(start) })
		})
	}
	wg.Wait()
	if n := failed.Load(); n > 0 {
		tb.Fatalf("%s: %d of %d handshakes got no certificate", name, n, burstSize)
	}
	return first
}

// The time to a fresh name's first certificate, for a burst of 30
// handshakes: on one Manager on an autocert.DirCache, on one replica on
// etcd, and spread over three replicas on etcd (each its own client and
// Cache), in one run; each iteration a fresh name, one order. Pebble
// issues in about 20 ms.
func BenchmarkReplicaFirstCertificate(b *testing.B) {
	benchFirstCertificate(b, certmgrtest.Options{})
}

// BenchmarkReplicaFirstCertificate with a CA that answers as a real one
// does, after x/crypto/acme's one-second polls (about 2 s per issuance).
func BenchmarkReplicaFirstCertificateSlowCA(b *testing.B) {
	benchFirstCertificate(b, certmgrtest.Options{NoSettle: true})
}

func benchFirstCertificate(b *testing.B, opts certmgrtest.Options) {
	const suffix = ".first.bench.test"
	endpoint := etcdtest.Start(b).Endpoint()
	ca := certmgrtest.Start(b, opts)
	policy := suffixPolicy(suffix)
	var current atomic.Pointer[[]*certmgr.Manager]
	serveReplicas(b, ca, &current)
	sets := []struct {
		name string
		ms   []*certmgr.Manager
	}{
		{"dircache-1", []*certmgr.Manager{replicaTB(b, ca, autocert.DirCache(b.TempDir()), policy)}},
		{"etcd-1", []*certmgr.Manager{replicaTB(b, ca, cacheTB(b, clientOf(b, endpoint), "/one/"), policy)}},
		{"etcd-3", []*certmgr.Manager{
			replicaTB(b, ca, cacheTB(b, clientOf(b, endpoint), "/three/"), policy),
			replicaTB(b, ca, cacheTB(b, clientOf(b, endpoint), "/three/"), policy),
			replicaTB(b, ca, cacheTB(b, clientOf(b, endpoint), "/three/"), policy),
		}},
	}
	seq := 0
	for _, set := range sets {
		current.Store(&set.ms)
		// The account is made, and the replicas' leases granted, before
		// the clock runs.
		warm := fmt.Sprintf("warm-%s%s", set.name, suffix)
		ca.DNS.SetA(warm, "127.0.0.1")
		burst(b, set.ms, warm)
		b.Run(set.name, func(b *testing.B) {
			orders, first := 0, time.Duration(0)
			for b.Loop() {
				seq++
				name := fmt.Sprintf("n%d%s", seq, suffix)
				ca.DNS.SetA(name, "127.0.0.1")
				first += burst(b, set.ms, name)
				orders += ca.Proxy.Counts(name).Orders
			}
			b.ReportMetric(float64(orders)/float64(b.N), "orders/op")
			b.ReportMetric(float64(first.Milliseconds())/float64(b.N), "ms-to-first/op")
		})
	}
}

// A lock's handoff between two Caches on one etcd: replica 2 asks for
// the lock that replica 1 holds, and replica 1 unlocks 10 ms later (as
// when it stores a certificate Pebble just issued), or 150 ms later;
// reported is how long after the unlock replica 2 holds the lock.
func BenchmarkLockHandoff(b *testing.B) {
	endpoint := etcdtest.Start(b).Endpoint()
	one := cacheTB(b, clientOf(b, endpoint), "/handoff/")
	two := cacheTB(b, clientOf(b, endpoint), "/handoff/")
	ctx := context.Background()
	for _, c := range []*Cache{one, two} { // the leases are granted
		_, _, unlock, err := c.Lock(ctx, "warm")
		if err != nil {
			b.Fatal(err)
		}
		unlock()
	}
	for _, hold := range []time.Duration{10 * time.Millisecond, 150 * time.Millisecond} {
		b.Run(fmt.Sprintf("hold-%v", hold), func(b *testing.B) {
			var after time.Duration
			for b.Loop() {
				_, _, unlock, err := one.Lock(ctx, "x")
				if err != nil {
					b.Fatal(err)
				}
				unlocked := make(chan time.Time, 1)
				time.AfterFunc(hold, func() { unlocked <- time.Now(); unlock() })
				_, _, unlock2, err := two.Lock(ctx, "x")
				if err != nil {
					b.Fatal(err)
				}
				after += time.Since(<-unlocked)
				unlock2()
				time.Sleep(20 * time.Millisecond) // the entry's delete lands
			}
			b.ReportMetric(float64(after.Microseconds())/1000/float64(b.N), "ms-after-unlock/op")
		})
	}
}
