package etcdcache

import (
	"bufio"
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha1"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"math/big"
	"os"
	"os/exec"
	"runtime"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"go.etcd.io/etcd/api/v3/mvccpb"
	clientv3 "go.etcd.io/etcd/client/v3"
	"golang.org/x/crypto/acme/autocert"

	"github.com/certmgr/certmgr"
	"github.com/certmgr/certmgr/certmgrtest"
	"github.com/certmgr/certmgr/etcdcache/internal/etcdtest"
	"github.com/certmgr/certmgr/internal/testsupport"
)

var (
	scale        = flag.Bool("scale", false, "run TestScale at -scale.domains domains rather than 1,000")
	scaleDomains = flag.Int("scale.domains", 10000, "how many domains TestScale puts in the store with -scale")
)

// scaleEtcdEnv, set, makes TestScaleEtcdProcess run the etcd server of
// TestScale.
const scaleEtcdEnv = "CERTMGR_SCALE_ETCD"

// TestScaleEtcdProcess is the etcd server of TestScale, run by it in a
// process of its own (this test binary), so that TestScale's heap holds
// the replicas and not etcd. It prints its endpoint and serves until its
// standard input ends.
func TestScaleEtcdProcess(t *testing.T) {
	if os.Getenv(scaleEtcdEnv) == "" {
		t.Skip("the etcd server of TestScale, which runs it")
	}
	fmt.Printf("etcd-endpoint %s\n", etcdtest.Start(t).Endpoint())
	io.Copy(io.Discard, os.Stdin)
}

// startEtcdProcess runs TestScaleEtcdProcess and returns its endpoint and
// process, which ends in t's cleanup.
func startEtcdProcess(t *testing.T) (string, *os.Process) {
	t.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^TestScaleEtcdProcess$", "-test.count=1")
	cmd.Env = append(os.Environ(), scaleEtcdEnv+"=1")
	cmd.Stderr = os.Stderr
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		stdin.Close()
		done := make(chan struct{})
		go func() { cmd.Wait(); close(done) }()
		select {
		case <-done:
		case <-time.After(30 * time.Second):
			cmd.Process.Kill()
			<-done
		}
	})
	lines := bufio.NewScanner(stdout)
	for lines.Scan() {
		if ep, ok := strings.CutPrefix(lines.Text(), "etcd-endpoint "); ok {
			go io.Copy(io.Discard, stdout)
			return ep, cmd.Process
		}
	}
	t.Fatal("the etcd process printed no endpoint")
	return "", nil
}

const scaleSuffix = ".scale.test"

// scaleName is the i-th domain of TestScale: 21 characters.
func scaleName(i int) string { return fmt.Sprintf("site%06d%s", i, scaleSuffix) }

// keyClass names what a Cache key holds.
func keyClass(key string) string {
	switch {
	case strings.HasPrefix(key, "certmgr+record+"):
		return "record"
	case strings.HasPrefix(key, "certmgr+ari+"):
		return "poll" // a certificate's renewal-information poll, shared
	case key == "certmgr+state":
		return "state"
	case key == "acme_account+key":
		return "account"
	case strings.HasSuffix(key, "+token"), strings.HasSuffix(key, "+http-01"):
		return "token"
	case !strings.Contains(key, "+"), strings.HasSuffix(key, "+rsa"):
		return "certificate"
	}
	return "other"
}

// traffic counts writes and deletes by class, and the bytes of the
// values written.
type traffic struct {
	puts, dels map[string]int
	bytes      map[string]int
}

func newTraffic() traffic {
	return traffic{puts: map[string]int{}, dels: map[string]int{}, bytes: map[string]int{}}
}

func (tr traffic) add(class string, value []byte, deleted bool) {
	if deleted {
		tr.dels[class]++
	} else {
		tr.puts[class]++
		tr.bytes[class] += len(value)
	}
}

// events returns the writes and deletes, all or of class.
func (tr traffic) events(class string) int {
	if class != "" {
		return tr.puts[class] + tr.dels[class]
	}
	n := 0
	for _, m := range []map[string]int{tr.puts, tr.dels} {
		for _, v := range m {
			n += v
		}
	}
	return n
}

// size returns the bytes of the values written, all or of class.
func (tr traffic) size(class string) int {
	if class != "" {
		return tr.bytes[class]
	}
	n := 0
	for _, v := range tr.bytes {
		n += v
	}
	return n
}

func (tr traffic) String() string {
	var parts []string
	for _, c := range []string{"certificate", "record", "poll", "state", "token", "account", "lock", "other"} {
		if p, d := tr.puts[c], tr.dels[c]; p+d > 0 {
			parts = append(parts, fmt.Sprintf("%s %d put (%d B) %d delete", c, p, tr.bytes[c], d))
		}
	}
	return strings.Join(parts, ", ")
}

// tally counts what a watch delivers, until take.
type tally struct {
	mu   sync.Mutex
	tr   traffic
	last time.Time
}

func newTally() *tally { return &tally{tr: newTraffic()} }

func (w *tally) f(key string, value []byte, _ int64) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.tr.add(keyClass(key), value, value == nil)
	w.last = time.Now()
}

// take returns what was delivered since the last take.
func (w *tally) take() traffic {
	w.mu.Lock()
	defer w.mu.Unlock()
	tr := w.tr
	w.tr = newTraffic()
	return tr
}

// quiet waits until nothing was delivered for d.
func (w *tally) quiet(t *testing.T, d time.Duration) {
	t.Helper()
	deadline := time.Now().Add(time.Minute)
	for {
		w.mu.Lock()
		last := w.last
		w.mu.Unlock()
		if time.Since(last) >= d {
			return
		}
		if time.Now().After(deadline) {
			t.Fatal("the store did not settle within a minute")
		}
		time.Sleep(d / 4) // polling with a deadline
	}
}

// watchLocks counts the writes and deletes of lock entries under prefix.
func watchLocks(t *testing.T, cli *clientv3.Client, prefix string) *tally {
	w := newTally()
	wch := cli.Watch(t.Context(), prefix+"locks/", clientv3.WithPrefix())
	go func() {
		for resp := range wch {
			for _, ev := range resp.Events {
				w.mu.Lock()
				w.tr.add("lock", nil, ev.Type == mvccpb.DELETE)
				w.last = time.Now()
				w.mu.Unlock()
			}
		}
	}()
	return w
}

// scan calls f for each key under prefix, read at one revision in pages.
func scan(t *testing.T, cli *clientv3.Client, prefix string, f func(kv *mvccpb.KeyValue)) {
	t.Helper()
	end := clientv3.GetPrefixRangeEnd(prefix)
	key, rev := prefix, int64(0)
	for {
		opts := []clientv3.OpOption{clientv3.WithRange(end), clientv3.WithLimit(500)}
		if rev != 0 {
			opts = append(opts, clientv3.WithRev(rev))
		}
		resp, err := cli.Get(t.Context(), key, opts...)
		if err != nil {
			t.Fatal(err)
		}
		rev = resp.Header.Revision
		for _, kv := range resp.Kvs {
			f(kv)
		}
		if !resp.More || len(resp.Kvs) == 0 {
			return
		}
		key = string(resp.Kvs[len(resp.Kvs)-1].Key) + "\x00"
	}
}

// atRest is what the store holds under a prefix, by class.
type atRest struct {
	keys, bytes map[string]int // bytes of keys and values
}

func restOf(t *testing.T, cli *clientv3.Client, prefix string) atRest {
	t.Helper()
	r := atRest{keys: map[string]int{}, bytes: map[string]int{}}
	scan(t, cli, prefix, func(kv *mvccpb.KeyValue) {
		class := "lock"
		if key, ok := strings.CutPrefix(string(kv.Key), prefix+"cache/"); ok {
			class = keyClass(key)
		}
		r.keys[class]++
		r.bytes[class] += len(kv.Key) + len(kv.Value)
	})
	return r
}

func (r atRest) total() (keys, bytes int) {
	for c := range r.keys {
		keys += r.keys[c]
		bytes += r.bytes[c]
	}
	return keys, bytes
}

func (r atRest) String() string {
	var parts []string
	for _, c := range []string{"certificate", "record", "poll", "state", "token", "account", "lock", "other"} {
		if r.keys[c] > 0 {
			parts = append(parts, fmt.Sprintf("%s %d keys %d B", c, r.keys[c], r.bytes[c]))
		}
	}
	return strings.Join(parts, ", ")
}

// liveHeap returns the bytes of live heap objects, after two collections.
func liveHeap() int64 {
	runtime.GC()
	runtime.GC()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	return int64(ms.HeapAlloc)
}

// waitPolled waits until the CA has answered the renewal information of
// want certificates, as counted by polled (see scaleReplica), for at most
// 10 minutes: 8 polls in flight, each a read and two writes of the shared
// poll (certmgr+ari+) besides the CA's answer.
func waitPolled(t *testing.T, polled *atomic.Int64, want int) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Minute)
	for polled.Load() < int64(want) {
		if time.Now().After(deadline) {
			t.Fatalf("renewal information answered for %d certificates within 10 minutes; want %d", polled.Load(), want)
		}
		time.Sleep(50 * time.Millisecond) // polling with a deadline
	}
}

// waitQuiet waits until kv has seen no request for 2 s, for at most a
// minute: the writes of the shared polls the CA answered last are done,
// and what follows counts the handshakes' requests alone.
func waitQuiet(t *testing.T, kv *countingKV) {
	t.Helper()
	deadline := time.Now().Add(time.Minute)
	last, since := kv.n.Load(), time.Now()
	for time.Since(since) < 2*time.Second {
		if time.Now().After(deadline) {
			t.Fatalf("the store still gets requests a minute after the last poll was answered (%d in all)", kv.n.Load())
		}
		time.Sleep(100 * time.Millisecond) // polling with a deadline
		if n := kv.n.Load(); n != last {
			last, since = n, time.Now()
		}
	}
}

// shape makes certificates of the shape of one that Pebble issued, as
// autocert stores them: the ECDSA P-256 key in PEM, then the leaf and its
// chain. The leaf copies the issued one's fields but the name, serial
// and key; the intermediate copies Pebble's, with a key of its own,
// under a root of its own.
type shape struct {
	leaf      *x509.Certificate
	serialLen int
	inter     *x509.Certificate
	interKey  *ecdsa.PrivateKey
	rest      [][]byte // the issued chain after the leaf, the first replaced by inter
}

func newShape(t *testing.T, issued []byte) *shape {
	t.Helper()
	var ders [][]byte
	for rest := issued; ; {
		var b *pem.Block
		b, rest = pem.Decode(rest)
		if b == nil {
			break
		}
		if b.Type == "CERTIFICATE" {
			ders = append(ders, b.Bytes)
		}
	}
	if len(ders) < 2 {
		t.Fatalf("the issued chain has %d certificates", len(ders))
	}
	leaf, err := x509.ParseCertificate(ders[0])
	if err != nil {
		t.Fatal(err)
	}
	pebbleInter, err := x509.ParseCertificate(ders[1])
	if err != nil {
		t.Fatal(err)
	}
	rootKey := genKey(t)
	rootTmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "certmgr scale test root"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().AddDate(10, 0, 0), IsCA: true,
		BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign}
	rootDER, err := x509.CreateCertificate(rand.Reader, rootTmpl, rootTmpl, &rootKey.PublicKey, rootKey)
	if err != nil {
		t.Fatal(err)
	}
	root, _ := x509.ParseCertificate(rootDER)
	s := &shape{leaf: leaf, serialLen: len(leaf.SerialNumber.Bytes()), interKey: genKey(t)}
	interTmpl := *pebbleInter
	interTmpl.SubjectKeyId = nil
	interDER, err := x509.CreateCertificate(rand.Reader, &interTmpl, root, &s.interKey.PublicKey, rootKey)
	if err != nil {
		t.Fatal(err)
	}
	if s.inter, err = x509.ParseCertificate(interDER); err != nil {
		t.Fatal(err)
	}
	s.rest = append([][]byte{interDER}, ders[2:]...)
	return s
}

func genKey(t *testing.T) *ecdsa.PrivateKey {
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	return k
}

// make returns the Cache value of a certificate for name.
func (s *shape) make(t *testing.T, name string) []byte {
	key := genKey(t)
	tmpl := *s.leaf
	serial := make([]byte, s.serialLen)
	rand.Read(serial)
	serial[0] |= 0x40 // as long as the issued one's, and positive
	serial[0] &= 0x7f
	tmpl.SerialNumber = new(big.Int).SetBytes(serial)
	tmpl.DNSNames = []string{name}
	if tmpl.Subject.CommonName != "" {
		tmpl.Subject = pkix.Name{CommonName: name}
	}
	if len(tmpl.SubjectKeyId) > 0 {
		pub, _ := x509.MarshalPKIXPublicKey(&key.PublicKey)
		h := sha1.Sum(pub)
		tmpl.SubjectKeyId = h[:]
	}
	tmpl.AuthorityKeyId = nil
	der, err := x509.CreateCertificate(rand.Reader, &tmpl, s.inter, &key.PublicKey, s.interKey)
	if err != nil {
		t.Fatal(err)
	}
	kb, err := x509.MarshalECPrivateKey(key) // autocert's encodeECDSAKey
	if err != nil {
		t.Fatal(err)
	}
	var buf bytes.Buffer
	pem.Encode(&buf, &pem.Block{Type: "EC PRIVATE KEY", Bytes: kb})
	for _, b := range append([][]byte{der}, s.rest...) {
		pem.Encode(&buf, &pem.Block{Type: "CERTIFICATE", Bytes: b})
	}
	return buf.Bytes()
}

// putAll writes kvs (etcd keys and values) in transactions of 100.
func putAll(t *testing.T, cli *clientv3.Client, kvs [][2]string) {
	t.Helper()
	for chunk := range slices.Chunk(kvs, 100) {
		ops := make([]clientv3.Op, len(chunk))
		for i, kv := range chunk {
			ops[i] = clientv3.OpPut(kv[0], kv[1])
		}
		if _, err := cli.Txn(t.Context()).Then(ops...).Commit(); err != nil {
			t.Fatal(err)
		}
	}
}

// scaleReplica returns a Manager on a Cache of its own on a client of its
// own, for TestScale, a count of its client's KV requests, and a count of
// the certificates whose renewal information the CA has answered (usable
// or not); it counts the Cache errors it reports in errs.
func scaleReplica(t *testing.T, ca *certmgrtest.Server, endpoint, prefix string, policy autocert.HostPolicy, errs *atomic.Int64) (*certmgr.Manager, *Cache, *countingKV, *atomic.Int64) {
	t.Helper()
	cli := clientOf(t, endpoint)
	kv := countKV(cli)
	cache := newCache(t, cli, prefix)
	polled := new(atomic.Int64)
	m, err := certmgr.New(certmgr.Config{
		Autocert:   &autocert.Manager{Cache: cache, Client: ca.NewClient(), HostPolicy: policy},
		Logger:     slog.New(slog.NewTextHandler(io.Discard, nil)),
		MaxDomains: 1 << 20,
		OnEvent: func(ev certmgr.Event) {
			switch ev.Kind {
			case certmgr.EventCacheError:
				errs.Add(1)
				t.Logf("cache error: %v", ev.Err)
			case certmgr.EventRenewalScheduled, certmgr.EventRenewalInfoUnusable: // a certificate's first answer
				polled.Add(1)
			}
		},
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { m.Close() })
	return m, cache, kv, polled
}

func closeReplica(t *testing.T, m *certmgr.Manager, c *Cache) {
	t.Helper()
	m.Close()
	if err := c.Close(); err != nil {
		t.Error(err)
	}
}

// TestScale measures replicas on etcd at scale (see BENCHMARKS.md,
// "Replicas on etcd"), and checks what it measures. It runs with 1,000
// domains in the suite (about 40 s under -race, beside the other tests),
// and with -scale.domains (10,000 by default) with -scale:
//
//	go test -run TestScale -scale -v .
//
// It issues ten certificates through Pebble to three replicas (five by
// a burst of 30 handshakes spread over the three, five by one handshake
// to one) and counts what the store's watch delivers per issuance; it
// fills the store with -scale.domains domains in all, of the shape of
// those issued, each with the failure record certmgr wrote for them; and
// it measures the keys and bytes at rest, the heap of a replica that
// serves them all, the store reads of a replica's first handshake and of
// its restart, and the writes of one more issuance at that size. The
// etcd server runs in a process of its own, so that the heap measured is
// the replicas'.
func TestScale(t *testing.T) {
	n := 1000
	if *scale {
		n = *scaleDomains
	} else {
		// Beside the other tests: the live heap it logs then counts
		// theirs too; only its assertions matter here.
		t.Parallel()
	}
	const prefix = "/scale/"
	start := time.Now()
	endpoint, etcdProc := startEtcdProcess(t)
	direct := clientOf(t, endpoint)
	ca := certmgrtest.Start(t, certmgrtest.Options{})
	policy := suffixPolicy(scaleSuffix)
	var current atomic.Pointer[[]*certmgr.Manager]
	serveReplicas(t, ca, &current)
	var cacheErrs atomic.Int64

	// What a Manager's watch of the whole prefix delivers, and the lock
	// entries' writes, which no Manager watches.
	watched := newTally()
	if err := newCache(t, clientOf(t, endpoint), prefix).Watch(t.Context(), "", 0, watched.f); err != nil {
		t.Fatal(err)
	}
	locks := watchLocks(t, direct, prefix)

	// 1. Ten issuances through Pebble on three replicas.
	type replica struct {
		m     *certmgr.Manager
		cache *Cache
	}
	var rs []replica
	var ms []*certmgr.Manager
	for range 3 {
		m, c, _, _ := scaleReplica(t, ca, endpoint, prefix, policy, &cacheErrs)
		rs = append(rs, replica{m, c})
		ms = append(ms, m)
	}
	current.Store(&ms)
	issue := func(name string, ms []*certmgr.Manager, handshakes int) (traffic, traffic) {
		t.Helper()
		ca.DNS.SetA(name, "127.0.0.1")
		watched.take()
		locks.take()
		if handshakes == 1 {
			if c, err := ms[0].GetCertificate(testsupport.Hello(name)); err != nil || certmgr.IsFallback(c) {
				t.Fatalf("%s: %v", name, err)
			}
		} else {
			burst(t, ms, name)
		}
		if o := ca.Proxy.Counts(name).Orders; o != 1 {
			t.Errorf("%s: %d orders", name, o)
		}
		watched.quiet(t, 300*time.Millisecond)
		locks.quiet(t, 300*time.Millisecond)
		return watched.take(), locks.take()
	}
	perIssuance := func(what string, trs, lks []traffic) (deliveries float64) {
		var ev, rec, by, recBy, lk int
		for i, tr := range trs {
			t.Logf("%s %d: %v; %v", what, i, tr, lks[i])
			if n := tr.events("state"); n > 0 {
				t.Errorf("%s %d: %d writes of certmgr+state; a replica writes none", what, i, n)
			}
			ev += tr.events("")
			rec += tr.events("record")
			by += tr.size("")
			recBy += tr.size("record")
			lk += lks[i].events("")
		}
		k := float64(len(trs))
		t.Logf("%s, mean per issuance: %.1f events under cache/ (%.0f B of values), of which %.1f of the record (%.0f B); "+
			"%.1f lock entry events; a Manager (one watch of the prefix) gets %.1f deliveries",
			what, float64(ev)/k, float64(by)/k, float64(rec)/k, float64(recBy)/k, float64(lk)/k, float64(ev)/k)
		return float64(ev) / k
	}
	var burstTr, burstLk, oneTr, oneLk []traffic
	for i := range 5 {
		tr, lk := issue(scaleName(i), ms, burstSize)
		burstTr, burstLk = append(burstTr, tr), append(burstLk, lk)
	}
	for i := 5; i < 10; i++ {
		tr, lk := issue(scaleName(i), ms, 1)
		oneTr, oneLk = append(oneTr, tr), append(oneLk, lk)
	}
	perIssuance("burst of 30 over 3 replicas", burstTr, burstLk)
	perIssuance("one handshake on one of 3 replicas", oneTr, oneLk)

	rest := restOf(t, direct, prefix)
	t.Logf("at rest, 10 domains, 3 replicas running: %v", rest)
	if rest.keys["token"] > 0 || rest.keys["lock"] > 0 || rest.keys["other"] > 0 {
		t.Errorf("at rest: %d token keys, %d lock entries, %d other keys; want none", rest.keys["token"], rest.keys["lock"], rest.keys["other"])
	}
	for _, r := range rs {
		closeReplica(t, r.m, r.cache)
	}

	// Sizes of what was issued, and the record certmgr wrote.
	var certSizes []int
	var issued, record []byte
	scan(t, direct, prefix+"cache/", func(kv *mvccpb.KeyValue) {
		key := strings.TrimPrefix(string(kv.Key), prefix+"cache/")
		switch {
		case keyClass(key) == "certificate":
			certSizes = append(certSizes, len(kv.Value))
			issued = kv.Value
		case key == "certmgr+record+"+scaleName(0):
			record = kv.Value
		}
	})
	t.Logf("issued certificates, value bytes: %v; PEM blocks %v", certSizes, pemBlocks(issued))
	t.Logf("a record after one order (%d B): %s", len(record), record)

	// 2. The store filled to n domains of that shape.
	sh := newShape(t, issued)
	var kvs [][2]string
	var filledSize int
	fillStart := time.Now()
	for i := 10; i < n; i++ {
		name := scaleName(i)
		v := sh.make(t, name)
		filledSize += len(v)
		kvs = append(kvs, [2]string{prefix + "cache/" + name, string(v)}, [2]string{prefix + "cache/certmgr+record+" + name, string(record)})
	}
	putAll(t, direct, kvs)
	kvs = nil
	t.Logf("filled %d domains in %v; mean certificate value %d B", n-10, time.Since(fillStart).Round(time.Millisecond), filledSize/max(n-10, 1))

	// 3. A replica serves them all: its first handshake of each.
	m, mc, kv, polled := scaleReplica(t, ca, endpoint, prefix, policy, &cacheErrs)
	current.Store(&[]*certmgr.Manager{m})
	heap0, reqs0 := liveHeap(), kv.n.Load()
	loadStart := time.Now()
	var next atomic.Int64
	var wg sync.WaitGroup
	for range 8 {
		wg.Go(func() {
			for i := int(next.Add(1)) - 1; i < n; i = int(next.Add(1)) - 1 {
				if c, err := m.GetCertificate(testsupport.Hello(scaleName(i))); err != nil || certmgr.IsFallback(c) {
					t.Errorf("%s: %v", scaleName(i), err)
					return
				}
			}
		})
	}
	wg.Wait()
	loadTime, loadReqs := time.Since(loadStart), kv.n.Load()-reqs0
	polledThen := polled.Load()
	waitPolled(t, polled, n)
	polledTime := time.Since(loadStart)
	heap1 := liveHeap()
	served := float64(heap1-heap0) / float64(n)
	t.Logf("a replica's first handshake of %d domains: %v (8 at a time), %d store requests (%.2f per domain); "+
		"renewal information answered for %d certificates by then, for all %d after %v; live heap %d -> %d B: %.0f B per served domain",
		n, loadTime.Round(time.Millisecond), loadReqs, float64(loadReqs)/float64(n), polledThen, n,
		polledTime.Round(time.Millisecond), heap0, heap1, served)
	waitQuiet(t, kv)
	reqs0 = kv.n.Load()
	for i := range n {
		if _, err := m.GetCertificate(testsupport.Hello(scaleName(i))); err != nil {
			t.Fatal(err)
		}
	}
	if r := kv.n.Load() - reqs0; r != 0 {
		t.Errorf("%d store requests for %d handshakes of served domains; want none", r, n)
	} else {
		t.Logf("%d more handshakes, one per domain: 0 store requests", n)
	}

	// One more issuance at that size: what every replica's watch gets.
	tr, lk := issue(scaleName(n), []*certmgr.Manager{m}, 1)
	perIssuance(fmt.Sprintf("one handshake on one replica serving %d domains", n), []traffic{tr}, []traffic{lk})
	// Its poll of the new certificate's renewal information answered and
	// shared: a poll claimed and never answered would hold every other
	// replica's for the claim's 30 s.
	waitPolled(t, polled, n+1)
	runtime.KeepAlive(m)
	closeReplica(t, m, mc)

	// 4. A replica restarts with them: New, which finds no certmgr+state
	// (no replica writes it), then the watch serves them.
	sentinel := "zzz-sentinel" + scaleSuffix
	refuseSentinel := func(ctx context.Context, host string) error {
		if host == sentinel {
			return fmt.Errorf("%s is refused", host)
		}
		return policy(ctx, host)
	}
	heap0 = liveHeap()
	newStart := time.Now()
	m2, mc2, kv2, polled2 := scaleReplica(t, ca, endpoint, prefix, refuseSentinel, &cacheErrs)
	newTime, newReqs := time.Since(newStart), kv2.n.Load()
	heap1 = liveHeap()
	t.Logf("a replica's New with %d domains in the store: %v, %d store requests, %d domains known; live heap %+d B",
		n+1, newTime.Round(time.Microsecond), newReqs, len(m2.Domains()), heap1-heap0)
	if newReqs > 4 {
		t.Errorf("New made %d store requests with %d domains in the store; want a few (2, and 2 more if the watch opened late), whatever the number of domains",
			newReqs, n+1)
	}
	// Every certificate written again, then the sentinel's: the watch
	// serves each, in order.
	var rewrite [][2]string
	scan(t, direct, prefix+"cache/", func(kv *mvccpb.KeyValue) {
		if keyClass(strings.TrimPrefix(string(kv.Key), prefix+"cache/")) == "certificate" {
			rewrite = append(rewrite, [2]string{string(kv.Key), string(kv.Value)})
		}
	})
	rewrite = append(rewrite, [2]string{prefix + "cache/" + sentinel, string(sh.make(t, sentinel))})
	watchStart := time.Now()
	putAll(t, direct, rewrite)
	rewritten := len(rewrite) - 1
	rewrite = nil
	deadline := time.Now().Add(2 * time.Minute)
	for {
		if _, err := m2.GetCertificate(testsupport.Hello(sentinel)); err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the watch did not serve the sentinel within 2 minutes")
		}
		time.Sleep(50 * time.Millisecond) // polling with a deadline
	}
	watchTime := time.Since(watchStart)
	tracked := m2.Domains()
	polledThen = polled2.Load()
	waitPolled(t, polled2, rewritten+1) // and the sentinel's
	polledTime = time.Since(watchStart)
	heap2 := liveHeap()
	byWatch := float64(heap2-heap0) / float64(rewritten) // from before New
	t.Logf("%d certificates written again, served by the watch of the restarted replica in %v; "+
		"renewal information answered for %d certificates by then, for all %d after %v; live heap +%d B since before New (%.0f B per domain); "+
		"it tracks %d domains (the sentinel, which its HostPolicy refuses, among them: %v)",
		rewritten, watchTime.Round(time.Millisecond), polledThen, rewritten+1, polledTime.Round(time.Millisecond),
		heap2-heap0, byWatch, len(tracked), slices.ContainsFunc(tracked, func(s certmgr.Status) bool { return s.Domain == sentinel }))
	reqs0 = kv2.n.Load()
	for i := range n {
		if c, err := m2.GetCertificate(testsupport.Hello(scaleName(i))); err != nil || certmgr.IsFallback(c) {
			t.Fatalf("%s: %v", scaleName(i), err)
		}
	}
	if r := kv2.n.Load() - reqs0; r != 0 {
		t.Errorf("then a handshake for each of %d domains the watch served: %d store requests, want none", n, r)
	} else {
		t.Logf("then a handshake for each of %d domains: 0 store requests", n)
	}
	runtime.KeepAlive(m2)
	closeReplica(t, m2, mc2)

	// 5. At rest.
	rest = restOf(t, direct, prefix)
	keys, size := rest.total()
	domains := rest.keys["certificate"] // n, the one issued at size and the sentinel
	t.Logf("at rest, %d domains, no replica running: %v", domains, rest)
	t.Logf("at rest: %d keys, %d B: %.3f keys and %.0f B per domain; certificate and record alone: %.0f B per domain",
		keys, size, float64(keys)/float64(domains), float64(size)/float64(domains),
		float64(rest.bytes["certificate"]+rest.bytes["record"])/float64(domains))
	if rest.keys["token"] > 0 || rest.keys["lock"] > 0 || rest.keys["other"] > 0 || rest.keys["state"] > 0 {
		t.Errorf("at rest: %d token keys, %d lock entries, %d certmgr+state, %d other keys; want none",
			rest.keys["token"], rest.keys["lock"], rest.keys["state"], rest.keys["other"])
	}
	resp, err := direct.Get(t.Context(), "x", clientv3.WithCountOnly())
	if err != nil {
		t.Fatal(err)
	}
	if _, err := direct.Compact(t.Context(), resp.Header.Revision, clientv3.WithCompactPhysical()); err != nil {
		t.Fatal(err)
	}
	if _, err := direct.Defragment(t.Context(), endpoint); err != nil {
		t.Fatal(err)
	}
	st, err := direct.Status(t.Context(), endpoint)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("etcd after compaction and defragmentation: db %d B, in use %d B (%.0f B per domain); etcd process %s",
		st.DbSize, st.DbSizeInUse, float64(st.DbSizeInUse)/float64(domains), rss(etcdProc.Pid))

	// 6. Projection.
	const N, R = 100000, 10
	perDomain := float64(rest.bytes["certificate"]+rest.bytes["record"]) / float64(domains)
	t.Logf("projection, %d domains and %d replicas: certificates and records %.0f MB (%.0f MB of etcd database); "+
		"heap per replica %.0f MB (first handshake of every domain) or %.0f MB (restart, then served by the watch)",
		N, R, perDomain*N/1e6, float64(st.DbSizeInUse)/float64(domains)*N/1e6, served*N/1e6, byWatch*N/1e6)
	if n := cacheErrs.Load(); n > 0 {
		t.Logf("%d cache errors reported", n)
	}
	t.Logf("TestScale took %v", time.Since(start).Round(time.Second))
}

// rss returns the resident set of process pid, from /proc.
func rss(pid int) string {
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return "RSS unknown"
	}
	for _, line := range strings.Split(string(data), "\n") {
		if v, ok := strings.CutPrefix(line, "VmRSS:"); ok {
			return "RSS " + strings.TrimSpace(v)
		}
	}
	return "RSS unknown"
}

// pemBlocks returns the types of the PEM blocks in data, in order.
func pemBlocks(data []byte) []string {
	var types []string
	for {
		i := bytes.Index(data, []byte("-----BEGIN "))
		if i < 0 {
			return types
		}
		data = data[i+len("-----BEGIN "):]
		j := bytes.Index(data, []byte("-----"))
		if j < 0 {
			return types
		}
		types = append(types, string(data[:j]))
		data = data[j:]
	}
}
