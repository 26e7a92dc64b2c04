package etcdcache

import (
	"bytes"
	"context"
	"crypto/tls"
	"encoding/base64"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"net"
	"net/http"
	"net/url"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.etcd.io/etcd/server/v3/embed"
	"go.uber.org/zap"
	"golang.org/x/crypto/acme/autocert"

	"github.com/certmgr/certmgr"
	"github.com/certmgr/certmgr/certmgrtest"
	"github.com/certmgr/certmgr/etcdcache/internal/etcdtest"
	"github.com/certmgr/certmgr/internal/leakcheck"
)

var (
	campaignRun  = flag.Bool("campaign", false, "run TestFaultCampaign: 20 s of faults, about 35 s in all")
	campaignLong = flag.Duration("campaign.long", 0, "TestFaultCampaign: inject faults for this long (e.g. 30m) instead of the short run's 20 s")
	campaignSeed = flag.Uint64("campaign.seed", 0, "TestFaultCampaign: the seed of the fault schedule and workload; 0 picks one from the clock")
)

// The campaign's settings.
const (
	campaignShort     = 20 * time.Second // faults of the short run
	campaignTimeout   = time.Second      // the replicas' HandshakeTimeout
	campaignMargin    = 2 * time.Second  // beyond HandshakeTimeout, for a loaded machine under -race
	campaignConverge  = 30 * time.Second // from the end of the faults to every good name served everywhere
	campaignSettle    = 10 * time.Second // from convergence to no lock entry and no token in etcd
	campaignPrefix    = "/campaign/"
	campaignSuffix    = ".campaign.test"
	campaignAuthzMax  = 4 // failed authorizations per name in any rolling hour (the default AuthzBudget)
	campaignMaxNames  = 120
	campaignArrival   = 3 * time.Second // a new name arrives this often while faults run
	campaignFirstGood = 4               // good names known from the start
	campaignFirstBad  = 2               // failing names known from the start
)

// TestFaultCampaign is issue 17's fault campaign: three etcd members and
// three replicas in this process, a test CA, handshakes over names that
// validate, names that never do and names that keep arriving (every 3 s,
// and one with each fault, its first handshake sent, to the replica the
// fault hits if any, just before the fault starts), and a seeded random
// schedule of faults, one at a time: the etcd leader moved,
// a member stopped and started again on its data, a replica cut off from
// etcd (and taken out of the validation balancer, as a health check
// would) and healed, a replica closed and opened again, a compaction, the
// CA answering 503 or slow. It checks throughout and at the end:
//
//   - every handshake is answered, within HandshakeTimeout plus a margin;
//   - no replica sends a request for a name's order after another replica
//     created a newer order for that name (the orders of one name never
//     interleave at the CA); authorization deactivations that autocert
//     sends detached after a failed attempt are counted apart and logged;
//   - orders per name that validates stay within 1 plus the faults
//     injected while it waited for a certificate: each fault can end at
//     most the one attempt of the name then in flight;
//   - failed authorizations per name stay within 4 (the campaign is
//     shorter than an hour, so this is the rolling-hour budget);
//   - once the faults end, within 30 s, every replica serves every name
//     that validates a CA-issued certificate, the same serial on all;
//   - then, within 10 s, no lock entry and no challenge token is left in
//     etcd;
//   - once every replica is closed, none of their goroutines is left.
//
// A token left behind is a known library defect (see the Errorf that
// names it): a holder that answered the challenge and then lost its hold
// (as one cut off from etcd past its lease does) cannot delete its
// token, and the next holder's order reuses the now valid authorization,
// so no replica writes or deletes that token again. It shows in some
// short runs and in every 5-minute run so far.
//
// go test -race -run TestFaultCampaign ./etcdcache/ -campaign runs it for
// 20 s of faults (about 35 s in all); -campaign.long 30m -timeout 45m for longer;
// -campaign.seed N replays a seed: the same schedule of faults and names,
// though not the same timing. The seed and the schedule are logged at the
// end (go test -v shows them on success too).
func TestFaultCampaign(t *testing.T) {
	if !*campaignRun && *campaignLong == 0 && *campaignSeed == 0 {
		// Not in the README's test command: it takes a minute alone, on
		// a machine it keeps busy. CI runs it after that command.
		t.Skip("runs with -campaign, -campaign.long or -campaign.seed")
	}
	seed := *campaignSeed
	if seed == 0 {
		seed = uint64(time.Now().UnixNano())
	}
	faultsFor := campaignShort
	if *campaignLong > 0 {
		faultsFor = *campaignLong
	}
	rng := rand.New(rand.NewPCG(seed, seed^0x9e3779b97f4a7c15))
	schedule := newSchedule(rng, faultsFor)
	t.Logf("seed %d (replay with -campaign.seed %d); %d faults over %v", seed, seed, len(schedule), faultsFor)
	leakcheck.Label(testLabel, t.Name()) // the goroutines it starts are its own: see goroutinesOf
	before := len(clusterGoroutines(t))
	c := startCampaign(t)
	t.Cleanup(func() {
		t.Logf("seed %d: schedule (offsets from the start of the faults):", seed)
		for _, f := range schedule {
			t.Logf("  %v", f)
		}
		t.Logf("seed %d: %s", seed, c.summary())
		if t.Failed() {
			t.Logf("FAILED with seed %d: replay with go test -race -run TestFaultCampaign ./etcdcache/ -campaign.seed %d", seed, seed)
		}
	})

	// The workload: new names keep arriving; handshakes keep going.
	for range campaignFirstGood {
		c.addName(true)
	}
	for range campaignFirstBad {
		c.addName(false)
	}
	workCtx, stopWork := context.WithCancel(t.Context())
	var work sync.WaitGroup
	for w := range 3 {
		wr := rand.New(rand.NewPCG(seed+uint64(w)+1, 7))
		work.Go(func() { c.shake(workCtx, wr) })
	}
	work.Go(func() {
		ar := rand.New(rand.NewPCG(seed, 11))
		tk := time.NewTicker(campaignArrival)
		defer tk.Stop()
		for {
			select {
			case <-workCtx.Done():
				return
			case <-tk.C:
				if c.nameCount() < campaignMaxNames {
					c.addName(ar.IntN(3) != 0) // two good for one failing
				}
			}
		}
	})

	// The faults, one after the other.
	faultsStart := time.Now()
	c.spy.mu.Lock()
	c.spy.t0 = faultsStart
	c.spy.mu.Unlock()
	for i := range schedule {
		f := &schedule[i]
		if d := time.Until(faultsStart.Add(f.At)); d > 0 {
			time.Sleep(d)
		}
		// A name arrives with the fault: its first order is in flight,
		// on the replica the fault hits if any, when the fault starts.
		name := c.addName(f.Good)
		f.name = name
		c.mu.Lock()
		c.cameWith[name] = f
		c.mu.Unlock()
		work.Go(func() { c.shakeOnce(c.replicas[f.Via], name) })
		time.Sleep(f.Lead)
		f.started = time.Since(faultsStart)
		c.noteFault()
		c.apply(t, f)
		c.faultOver()
	}
	if d := time.Until(faultsStart.Add(faultsFor)); d > 0 {
		time.Sleep(d)
	}
	stopWork()
	work.Wait()
	faultsEnd := time.Now()
	c.healAll(t)

	// Convergence: every good name, every replica, one serial.
	good := c.goodNames()
	pending := slices.Clone(good)
	var lastSerials map[string][]string
	for deadline := faultsEnd.Add(campaignConverge); len(pending) > 0; {
		lastSerials = map[string][]string{}
		var still []string
		for _, n := range pending {
			s := c.serials(n)
			if s[0] == "" || s[0] != s[1] || s[1] != s[2] {
				still = append(still, n)
				lastSerials[n] = s
			}
		}
		pending = still
		if len(pending) == 0 {
			break
		}
		if time.Now().After(deadline) {
			for _, n := range pending {
				what := "not served one CA-issued certificate by every replica"
				if s := lastSerials[n]; !slices.Contains(s, "") {
					// Seen after the replica ordering the name was cut
					// off past its lease, two orders and two certificates
					// at the CA: likely it got its certificate but could
					// not store it, and goes on serving it, not the one
					// the next holder stored.
					what = "served different CA-issued certificates by the replicas (library defect)"
				}
				t.Errorf("%s: %s %v after the faults ended (serials %q; %s)",
					n, what, campaignConverge, lastSerials[n], c.statuses(n))
			}
			break
		}
		time.Sleep(200 * time.Millisecond)
	}
	converged := time.Since(faultsEnd)
	c.logf("converged %v after the faults ended (%d good names)", converged.Round(time.Millisecond), len(good))

	// At rest: no lock entry and no token left.
	var left []string
	for deadline := time.Now().Add(campaignSettle); ; time.Sleep(100 * time.Millisecond) {
		left = c.leftovers(t)
		if len(left) == 0 || time.Now().After(deadline) {
			break
		}
	}
	if len(left) > 0 {
		t.Errorf("%d keys left in etcd %v after convergence: %q", len(left), campaignSettle, left)
		for _, k := range left {
			name := strings.TrimSuffix(strings.TrimPrefix(k, campaignPrefix+"cache/"), "+token")
			if strings.HasPrefix(k, campaignPrefix+"locks/") {
				name, _, _ = strings.Cut(strings.TrimPrefix(k, campaignPrefix+"locks/"), "/")
			}
			c.mu.Lock()
			f := c.cameWith[name]
			c.mu.Unlock()
			how := "before the faults or between them"
			if f != nil {
				how = "with fault " + f.String()
			}
			t.Logf("%s: %s arrived %s; %s", k, name, how, c.statuses(name))
			if n := c.ca.Proxy.Counts(name); strings.HasSuffix(k, "+token") && n.Orders > n.Authzs {
				t.Errorf("%s: library defect: a token left for good: a holder answered the challenge, "+
					"lost its hold before it deleted the token, and the next order reused the valid "+
					"authorization (%d orders, %d authorizations), so no holder wrote or deleted the token again", name, n.Orders, n.Authzs)
			}
		}
	}

	// The invariants counted throughout.
	c.check(t)

	// Goroutines: none of the replicas' is left once they are closed.
	for _, r := range c.replicas {
		r.gate.Lock()
		r.stop()
		r.gate.Unlock()
	}
	c.closeClients()
	waitGoroutinesGone(t, before, func() []string { return clusterGoroutines(t) })
}

// fault is one entry of the schedule.
type fault struct {
	At     time.Duration // offset from the start of the faults
	Kind   string
	Target int           // a member or replica index, or a request class
	Dur    time.Duration // how long it lasts, where that applies
	Times  int           // CA faults: how many requests it applies to
	Good   bool          // whether the name that arrives with it validates
	Via    int           // the replica that name's first handshake goes to
	Lead   time.Duration // how long before the fault that handshake starts

	started time.Duration
	name    string // the name that arrived with it
}

func (f fault) String() string {
	s := fmt.Sprintf("%8v %-8s", f.At.Round(time.Millisecond), f.Kind)
	switch f.Kind {
	case "leader":
		s += " to another member"
	case "member":
		s += fmt.Sprintf(" m%d down %v", f.Target, f.Dur.Round(time.Millisecond))
	case "cut":
		s += fmt.Sprintf(" r%d cut %v", f.Target, f.Dur.Round(time.Millisecond))
	case "restart":
		s += fmt.Sprintf(" r%d down %v", f.Target, f.Dur.Round(time.Millisecond))
	case "ca503":
		s += fmt.Sprintf(" %v x%d", certmgrtest.Class(f.Target), f.Times)
	case "caslow":
		s += fmt.Sprintf(" %v delayed %v for %v", certmgrtest.Class(f.Target), f.Dur.Round(time.Millisecond), 3*f.Dur.Round(time.Millisecond))
	}
	s += fmt.Sprintf(" [a %s name via r%d %v before]", map[bool]string{true: "good", false: "failing"}[f.Good], f.Via, f.Lead.Round(time.Millisecond))
	if f.started != 0 {
		s += fmt.Sprintf(" (started at %v, with %s)", f.started.Round(time.Millisecond), f.name)
	}
	return s
}

var faultKinds = []string{"leader", "member", "cut", "restart", "compact", "ca503", "caslow"}

var caClasses = []certmgrtest.Class{certmgrtest.ClassNewOrder, certmgrtest.ClassFinalize, certmgrtest.ClassAuthz,
	certmgrtest.ClassChallenge, certmgrtest.ClassOrder}

// newSchedule draws faults for d, one after the other with gaps.
func newSchedule(rng *rand.Rand, d time.Duration) []fault {
	var out []fault
	at := time.Duration(500+rng.IntN(1000)) * time.Millisecond
	for at < d {
		f := fault{At: at, Kind: faultKinds[rng.IntN(len(faultKinds))], Good: rng.IntN(4) != 0,
			Via: rng.IntN(3), Lead: time.Duration(rng.IntN(600)) * time.Millisecond}
		busy := f.Lead
		switch f.Kind {
		case "leader":
			f.Target = rng.IntN(2) // which of the two others
		case "member":
			f.Target = rng.IntN(3)
			f.Dur = time.Duration(300+rng.IntN(2700)) * time.Millisecond
			busy += f.Dur + time.Second // its restart
		case "cut":
			f.Target = f.Via
			f.Dur = time.Duration(300+rng.IntN(4200)) * time.Millisecond // across the 2 s lease, or not
			busy += f.Dur
		case "restart":
			f.Target = f.Via
			f.Dur = time.Duration(rng.IntN(1000)) * time.Millisecond
			busy += f.Dur + time.Second
		case "ca503":
			f.Target = int(caClasses[rng.IntN(len(caClasses))])
			f.Times = 1 + rng.IntN(3)
		case "caslow":
			f.Target = int(caClasses[rng.IntN(len(caClasses))])
			f.Dur = time.Duration(200+rng.IntN(1300)) * time.Millisecond
			busy += 3 * f.Dur
		}
		out = append(out, f)
		at += busy + time.Duration(300+rng.IntN(1500))*time.Millisecond
	}
	return out
}

// campaign is the cluster under test.
type campaign struct {
	t         *testing.T
	members   []*member
	admin     []*clientv3.Client // one per member, reaching that member alone
	all       *clientv3.Client   // reaching every member
	ca        *certmgrtest.Server
	tlsLB     *certmgrtest.Balancer
	replicas  []*campReplica
	spy       *acmeSpy
	closeOnce sync.Once

	mu          sync.Mutex // guards the fields below
	names       []string
	good        map[string]bool
	arrived     map[string]int    // faults over before the name arrived (see faultOver)
	cameWith    map[string]*fault // the fault a name arrived with
	faults      int               // faults started so far
	over        int               // faults whose injection ended (faultOver)
	handshakes  int
	fallbacks   int
	slowest     time.Duration
	hsErrors    []string
	journal     []string // fault log, for the summary
	extraChecks []string
}

// member is one etcd member in this process.
type member struct {
	cfg *embed.Config
	id  uint64
	mu  sync.Mutex
	e   *embed.Etcd
}

func (m *member) start() error {
	e, err := embed.StartEtcd(m.cfg)
	if err != nil {
		return err
	}
	select {
	case <-e.Server.ReadyNotify():
	case <-time.After(30 * time.Second):
		e.Close()
		return errors.New("etcd member not ready within 30 s")
	}
	m.mu.Lock()
	m.e = e
	m.id = uint64(e.Server.MemberID())
	m.mu.Unlock()
	return nil
}

func (m *member) stop() {
	m.mu.Lock()
	e := m.e
	m.e = nil
	m.mu.Unlock()
	if e != nil {
		e.Close()
	}
}

func (m *member) running() bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.e != nil
}

// campReplica is one server: a client of every member through a proxy of
// its own per member (cut together to partition it), a Cache, a Manager
// and a TLS listener that outlives them.
type campReplica struct {
	c     *campaign
	idx   int
	links []*proxy
	tlsL  net.Listener
	srv   *http.Server

	gate  sync.RWMutex // the test's handshakes hold it for reading; stop and open for writing
	gen   int
	mu    sync.Mutex // guards m, for the TLS server
	m     *certmgr.Manager
	cache *Cache
	cli   *clientv3.Client
}

func startCampaign(t *testing.T) *campaign {
	t.Helper()
	c := &campaign{t: t, good: map[string]bool{}, arrived: map[string]int{}, cameWith: map[string]*fault{}}
	// Three members, started together: each waits for a quorum.
	var initial []string
	for i := range 3 {
		cfg := embed.NewConfig()
		cfg.Name = fmt.Sprintf("m%d", i)
		cfg.Dir = t.TempDir()
		cfg.ZapLoggerBuilder = embed.NewZapLoggerBuilder(zap.NewNop())
		cfg.UnsafeNoFsync = true
		cu, pu := etcdtest.FreeURL(t), etcdtest.FreeURL(t)
		cfg.ListenClientUrls, cfg.AdvertiseClientUrls = []url.URL{cu}, []url.URL{cu}
		cfg.ListenPeerUrls, cfg.AdvertisePeerUrls = []url.URL{pu}, []url.URL{pu}
		cfg.InitialClusterToken = "campaign"
		initial = append(initial, cfg.Name+"="+pu.String())
		c.members = append(c.members, &member{cfg: cfg})
	}
	errs := make([]error, 3)
	var wg sync.WaitGroup
	for i, m := range c.members {
		m.cfg.InitialCluster = strings.Join(initial, ",")
		wg.Go(func() { errs[i] = m.start() })
	}
	wg.Wait()
	t.Cleanup(func() {
		var wg sync.WaitGroup
		for _, m := range c.members {
			wg.Go(m.stop)
		}
		wg.Wait()
	})
	if err := errors.Join(errs...); err != nil {
		t.Fatal(err)
	}
	var eps []string
	t.Cleanup(c.closeClients)
	for _, m := range c.members {
		ep := m.cfg.AdvertiseClientUrls[0].String()
		eps = append(eps, ep)
		cli, err := clientv3.New(clientv3.Config{Endpoints: []string{ep}, DialTimeout: 5 * time.Second, Logger: zap.NewNop()})
		if err != nil {
			t.Fatal(err)
		}
		c.admin = append(c.admin, cli)
	}
	var err error
	c.all, err = clientv3.New(clientv3.Config{Endpoints: eps, DialTimeout: 5 * time.Second, Logger: zap.NewNop()})
	if err != nil {
		t.Fatal(err)
	}

	c.ca = certmgrtest.Start(t, certmgrtest.Options{})
	c.spy = &acmeSpy{urls: map[string][]string{}, owner: map[string]string{}, authzOf: map[string]map[string]bool{}}
	var tlsAddrs []string
	for i := range 3 {
		r := &campReplica{c: c, idx: i}
		for _, m := range c.members {
			r.links = append(r.links, startProxy(t, m.cfg.AdvertiseClientUrls[0].Host))
		}
		if r.tlsL, err = net.Listen("tcp", "127.0.0.1:0"); err != nil {
			t.Fatal(err)
		}
		r.srv = &http.Server{
			TLSConfig: &tls.Config{GetConfigForClient: func(*tls.ClientHelloInfo) (*tls.Config, error) {
				// Not under gate, which the test's own handshake
				// holds for reading while a stop may wait to write.
				r.mu.Lock()
				m := r.m
				r.mu.Unlock()
				if m == nil {
					return nil, errors.New("the replica is down")
				}
				return m.TLSConfig(), nil
			}},
			Handler:  http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) { io.WriteString(w, "ok\n") }),
			ErrorLog: discardLog,
		}
		go r.srv.ServeTLS(r.tlsL, "", "")
		tlsAddrs = append(tlsAddrs, r.tlsL.Addr().String())
		c.replicas = append(c.replicas, r)
		r.gate.Lock()
		r.open(t)
		r.gate.Unlock()
	}
	c.tlsLB = certmgrtest.NewBalancer(c.ca.TLSListener, tlsAddrs...)
	t.Cleanup(func() {
		for _, r := range c.replicas {
			r.gate.Lock()
			r.stop()
			r.gate.Unlock()
			r.srv.Close()
		}
		c.tlsLB.Close()
	})
	return c
}

// closeClients closes the test's own etcd clients, once.
func (c *campaign) closeClients() {
	c.closeOnce.Do(func() {
		for _, cli := range c.admin {
			cli.Close()
		}
		if c.all != nil {
			c.all.Close()
		}
	})
}

// open starts r's client, Cache and Manager; r.gate is held.
func (r *campReplica) open(t *testing.T) {
	var eps []string
	for _, l := range r.links {
		eps = append(eps, "http://"+l.addr())
	}
	cli, err := clientv3.New(clientv3.Config{Endpoints: eps, DialTimeout: 5 * time.Second, Logger: zap.NewNop()})
	if err != nil {
		t.Fatal(err)
	}
	cache, err := New(cli, Options{Prefix: campaignPrefix, LeaseTTL: testTTL})
	if err != nil {
		cli.Close()
		t.Fatal(err)
	}
	r.gen++
	who := fmt.Sprintf("r%d#%d", r.idx, r.gen)
	client := r.c.ca.NewClient()
	hc := *client.HTTPClient
	base := hc.Transport
	if base == nil {
		base = http.DefaultTransport
	}
	hc.Transport = &spyTransport{spy: r.c.spy, who: who, base: base}
	client.HTTPClient = &hc
	m, err := certmgr.New(certmgr.Config{
		Autocert: &autocert.Manager{Cache: cache, Client: client, Prompt: autocert.AcceptTOS,
			HostPolicy: func(_ context.Context, host string) error {
				if strings.HasSuffix(host, campaignSuffix) {
					return nil
				}
				return errors.New("not a campaign name")
			}},
		Logger:           slog.New(slog.DiscardHandler),
		HandshakeTimeout: campaignTimeout,
		// Short, so that a name a fault failed is retried within the
		// convergence bound; the authorization budget still holds.
		Backoff:     certmgr.Backoff{Steps: []time.Duration{time.Second, 2 * time.Second, 4 * time.Second}},
		OrderBudget: 1 << 20, // the campaign's failing names would spend the default
		OnEvent: func(e certmgr.Event) {
			if e.Kind == certmgr.EventFallback {
				r.c.mu.Lock()
				r.c.fallbacks++
				r.c.mu.Unlock()
			}
		},
	})
	if err != nil {
		cache.Close()
		cli.Close()
		t.Fatal(err)
	}
	r.mu.Lock()
	r.m = m
	r.mu.Unlock()
	r.cache, r.cli = cache, cli
}

// stop closes r's Manager, Cache and client; r.gate is held.
func (r *campReplica) stop() {
	if r.m == nil {
		return
	}
	r.mu.Lock()
	m := r.m
	r.m = nil
	r.mu.Unlock()
	m.Close()
	r.cache.Close()
	r.cli.Close()
	r.cache, r.cli = nil, nil
}

func (r *campReplica) setCut(cut bool) {
	for _, l := range r.links {
		if cut {
			l.cut()
		} else {
			l.heal()
		}
	}
}

// handshake completes a TLS handshake with r for name, verifying the
// chain if verify; it reports false if r is down.
func (r *campReplica) handshake(ctx context.Context, name string, verify bool) (tls.ConnectionState, bool, error) {
	r.gate.RLock()
	defer r.gate.RUnlock()
	if r.m == nil {
		return tls.ConnectionState{}, false, nil
	}
	cfg := &tls.Config{ServerName: name, RootCAs: r.c.ca.Roots, InsecureSkipVerify: !verify}
	d := tls.Dialer{Config: cfg}
	conn, err := d.DialContext(ctx, "tcp", r.tlsL.Addr().String())
	if err != nil {
		return tls.ConnectionState{}, true, err
	}
	defer conn.Close()
	return conn.(*tls.Conn).ConnectionState(), true, nil
}

func (c *campaign) logf(format string, args ...any) {
	c.mu.Lock()
	c.journal = append(c.journal, fmt.Sprintf(format, args...))
	c.mu.Unlock()
}

// since returns the offset of at from the start of the faults.
func (c *campaign) since(at time.Time) time.Duration {
	c.spy.mu.Lock()
	t0 := c.spy.t0
	c.spy.mu.Unlock()
	return at.Sub(t0).Round(time.Millisecond)
}

func (c *campaign) noteFault() {
	c.mu.Lock()
	c.faults++
	c.mu.Unlock()
}

// faultOver counts a fault whose injection ended (a member or replica
// back, a cut healed, the CA's delay removed). A name that arrives while
// a fault is on counts it among those that may cost it an order.
func (c *campaign) faultOver() {
	c.mu.Lock()
	c.over++
	c.mu.Unlock()
}

// addName adds a new name that validates, if good, or never does.
func (c *campaign) addName(good bool) string {
	c.mu.Lock()
	defer c.mu.Unlock()
	n := len(c.names)
	var name string
	if good {
		name = fmt.Sprintf("g%d%s", n, campaignSuffix)
		c.ca.DNS.SetA(name, "127.0.0.1")
	} else {
		name = fmt.Sprintf("f%d%s", n, campaignSuffix)
		c.ca.DNS.SetA(name, "127.0.0.3") // nothing listens there
	}
	c.names = append(c.names, name)
	c.good[name] = good
	c.arrived[name] = c.over
	return name
}

func (c *campaign) nameCount() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return len(c.names)
}

func (c *campaign) goodNames() []string {
	c.mu.Lock()
	defer c.mu.Unlock()
	var out []string
	for _, n := range c.names {
		if c.good[n] {
			out = append(out, n)
		}
	}
	return out
}

// shake makes handshakes with random replicas for random names until
// ctx ends; each must be answered within the handshake timeout plus the
// margin.
func (c *campaign) shake(ctx context.Context, rng *rand.Rand) {
	for ctx.Err() == nil {
		c.mu.Lock()
		name := c.names[rng.IntN(len(c.names))]
		c.mu.Unlock()
		c.shakeOnce(c.replicas[rng.IntN(len(c.replicas))], name)
		select {
		case <-ctx.Done():
		case <-time.After(time.Duration(10+rng.IntN(60)) * time.Millisecond):
		}
	}
}

// shakeOnce makes one handshake with r for name, unless r is down, and
// records how it went.
func (c *campaign) shakeOnce(r *campReplica, name string) {
	hctx, cancel := context.WithTimeout(context.Background(), campaignTimeout+campaignMargin+5*time.Second)
	begin := time.Now()
	_, up, err := r.handshake(hctx, name, false)
	took := time.Since(begin)
	cancel()
	if !up {
		return
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	c.handshakes++
	c.slowest = max(c.slowest, took)
	if err != nil {
		c.hsErrors = append(c.hsErrors, fmt.Sprintf("started at %v: r%d %s: %v after %v", c.since(begin), r.idx, name, err, took))
	} else if took > campaignTimeout+campaignMargin {
		c.hsErrors = append(c.hsErrors, fmt.Sprintf("started at %v: r%d %s: answered after %v", c.since(begin), r.idx, name, took))
	}
}

// apply injects f and, for faults that last, ends it.
func (c *campaign) apply(t *testing.T, f *fault) {
	ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
	defer cancel()
	switch f.Kind {
	case "leader":
		lead, err := c.leader(ctx)
		if err != nil {
			c.logf("%v: no leader: %v", f, err)
			return
		}
		to := (lead + 1 + f.Target) % 3
		if !c.members[to].running() {
			to = 3 - lead - to
		}
		if _, err := c.admin[lead].MoveLeader(ctx, c.members[to].id); err != nil {
			c.logf("%v: MoveLeader m%d->m%d: %v", f, lead, to, err)
		} else {
			c.logf("%v: leader m%d -> m%d", f, lead, to)
		}
	case "member":
		m := c.members[f.Target]
		m.stop()
		time.Sleep(f.Dur)
		if err := m.start(); err != nil {
			t.Fatalf("%v: restarting the member: %v", f, err)
		}
	case "cut":
		r := c.replicas[f.Target]
		c.tlsLB.SetDown(f.Target, true)
		r.setCut(true)
		time.Sleep(f.Dur)
		r.setCut(false)
		c.tlsLB.SetDown(f.Target, false)
	case "restart":
		r := c.replicas[f.Target]
		c.tlsLB.SetDown(f.Target, true)
		r.gate.Lock()
		r.stop()
		r.gate.Unlock()
		time.Sleep(f.Dur)
		r.gate.Lock()
		r.open(t)
		r.gate.Unlock()
		c.tlsLB.SetDown(f.Target, false)
	case "compact":
		resp, err := c.all.Get(ctx, campaignPrefix+"probe")
		if err == nil {
			_, err = c.all.Compact(ctx, resp.Header.Revision)
		}
		if err != nil {
			c.logf("%v: %v", f, err)
		} else {
			c.logf("%v: to revision %d", f, resp.Header.Revision)
		}
	case "ca503":
		c.ca.Proxy.AddRule(certmgrtest.Rule{Class: certmgrtest.Class(f.Target), Status: http.StatusServiceUnavailable, Times: f.Times})
	case "caslow":
		remove := c.ca.Proxy.AddRule(certmgrtest.Rule{Class: certmgrtest.Class(f.Target), Delay: f.Dur})
		time.Sleep(3 * f.Dur)
		remove()
	}
}

// leader returns the index of the current leader.
func (c *campaign) leader(ctx context.Context) (int, error) {
	for i, m := range c.members {
		if !m.running() {
			continue
		}
		st, err := c.admin[i].Status(ctx, m.cfg.AdvertiseClientUrls[0].String())
		if err != nil {
			continue
		}
		for j, o := range c.members {
			if o.id == st.Leader {
				return j, nil
			}
		}
	}
	return 0, errors.New("no member knows a leader")
}

// healAll ends every fault left and waits for every replica to reach etcd.
func (c *campaign) healAll(t *testing.T) {
	t.Helper()
	for _, m := range c.members {
		if !m.running() {
			if err := m.start(); err != nil {
				t.Fatal(err)
			}
		}
	}
	for i, r := range c.replicas {
		r.setCut(false)
		c.tlsLB.SetDown(i, false)
	}
	for _, r := range c.replicas {
		waitFor(t, 30*time.Second, fmt.Sprintf("replica %d to reach etcd", r.idx), func() bool {
			ctx, cancel := context.WithTimeout(t.Context(), time.Second)
			defer cancel()
			r.gate.RLock()
			defer r.gate.RUnlock()
			_, err := r.cli.Get(ctx, campaignPrefix+"probe")
			return err == nil
		})
	}
}

// serials returns the serial each replica serves for name with a chain
// to the CA, or "".
func (c *campaign) serials(name string) []string {
	out := make([]string, len(c.replicas))
	for i, r := range c.replicas {
		ctx, cancel := context.WithTimeout(c.t.Context(), 5*time.Second)
		cs, _, err := r.handshake(ctx, name, true)
		cancel()
		if err == nil && len(cs.PeerCertificates) > 0 {
			out[i] = cs.PeerCertificates[0].SerialNumber.String()
		}
	}
	return out
}

func (c *campaign) statuses(name string) string {
	var parts []string
	for _, r := range c.replicas {
		r.gate.RLock()
		if r.m != nil {
			s := r.m.Status(name)
			next := "now"
			if !s.NextAttempt.IsZero() {
				next = "in " + time.Until(s.NextAttempt).Round(time.Millisecond).String()
			}
			parts = append(parts, fmt.Sprintf("r%d: state %v failures %d next attempt %s err %v", r.idx, s.State, s.Failures,
				next, s.LastError))
		}
		r.gate.RUnlock()
	}
	return strings.Join(parts, "; ") + fmt.Sprintf("; CA: %+v", c.ca.Proxy.Counts(name))
}

// leftovers returns the lock entries and tokens in etcd.
func (c *campaign) leftovers(t *testing.T) []string {
	ctx, cancel := context.WithTimeout(t.Context(), 5*time.Second)
	defer cancel()
	resp, err := c.all.Get(ctx, campaignPrefix, clientv3.WithPrefix(), clientv3.WithKeysOnly())
	if err != nil {
		return []string{"(etcd: " + err.Error() + ")"}
	}
	var out []string
	for _, kv := range resp.Kvs {
		k := string(kv.Key)
		if strings.HasPrefix(k, campaignPrefix+"locks/") || strings.HasSuffix(k, "+token") {
			out = append(out, k)
		}
	}
	return out
}

// check reports the invariants counted throughout the campaign.
func (c *campaign) check(t *testing.T) {
	c.mu.Lock()
	defer c.mu.Unlock()
	for _, e := range c.hsErrors {
		t.Errorf("handshake not answered within %v: %s", campaignTimeout+campaignMargin, e)
	}
	c.spy.mu.Lock()
	for _, v := range c.spy.violations {
		t.Errorf("orders interleaved at the CA: %s", v)
	}
	c.spy.mu.Unlock()
	for _, n := range c.names {
		counts := c.ca.Proxy.Counts(n)
		if counts.FailedAuthzs > campaignAuthzMax {
			t.Errorf("%s: %d failed authorizations within the campaign (under an hour), want at most %d", n, counts.FailedAuthzs, campaignAuthzMax)
		}
		if c.good[n] {
			if bound := 1 + c.faults - c.arrived[n]; counts.Orders > bound {
				t.Errorf("%s: %d orders, want at most %d (1 + the faults on when it arrived or since)", n, counts.Orders, bound)
			}
		}
	}
}

func (c *campaign) summary() string {
	c.mu.Lock()
	defer c.mu.Unlock()
	total := c.ca.Proxy.Total()
	var good, bad int
	var goodOrders, badOrders, maxGood, maxFailed int
	for _, n := range c.names {
		cn := c.ca.Proxy.Counts(n)
		maxFailed = max(maxFailed, cn.FailedAuthzs)
		if c.good[n] {
			good++
			goodOrders += cn.Orders
			maxGood = max(maxGood, cn.Orders)
		} else {
			bad++
			badOrders += cn.Orders
		}
	}
	c.spy.mu.Lock()
	deact := c.spy.lateAuthz
	c.spy.mu.Unlock()
	s := fmt.Sprintf("%d faults; %d names (%d good: %d orders, at most %d for one; %d failing: %d orders); "+
		"most failed authorizations for one name %d; CA totals %+v; %d handshakes (%d fallback events), slowest %v; "+
		"%d handshake errors; %d late authorization requests of autocert's detached clean-up",
		c.faults, len(c.names), good, goodOrders, maxGood, bad, badOrders, maxFailed, total,
		c.handshakes, c.fallbacks, c.slowest.Round(time.Millisecond), len(c.hsErrors), deact)
	for _, j := range c.journal {
		s += "\n  " + j
	}
	return s
}

// acmeSpy watches every replica's ACME requests, and maps the URLs the CA
// answers with to the names they concern, to tell whose order a request
// is for.
type acmeSpy struct {
	mu         sync.Mutex
	urls       map[string][]string        // URL path -> names
	owner      map[string]string          // name -> the replica whose order the CA created last
	authzOf    map[string]map[string]bool // authorization path -> the replicas whose orders listed it
	violations []string
	lateAuthz  int       // requests of autocert's detached clean-up after another replica's new order
	t0         time.Time // the start of the faults
}

// since returns the time since the start of the faults; sp.mu is held.
func (sp *acmeSpy) since() time.Duration {
	if sp.t0.IsZero() {
		return 0
	}
	return time.Since(sp.t0).Round(time.Millisecond)
}

type spyTransport struct {
	spy  *acmeSpy
	who  string
	base http.RoundTripper
}

func (s *spyTransport) RoundTrip(req *http.Request) (*http.Response, error) {
	if req.Method != http.MethodPost || req.Body == nil {
		return s.base.RoundTrip(req)
	}
	body, err := io.ReadAll(req.Body)
	req.Body.Close()
	if err != nil {
		return nil, err
	}
	req.Body = io.NopCloser(bytes.NewReader(body))
	payload := jwsPayloadOf(body)
	sp := s.spy
	newOrder := strings.HasSuffix(req.URL.Path, "/order-plz")
	var names []string
	if newOrder {
		var o struct {
			Identifiers []struct{ Value string } `json:"identifiers"`
		}
		json.Unmarshal(payload, &o)
		for _, id := range o.Identifiers {
			names = append(names, strings.ToLower(id.Value))
		}
	} else {
		sp.mu.Lock()
		names = sp.urls[req.URL.Path]
		for _, n := range names {
			o := sp.owner[n]
			if o == "" || o == s.who {
				continue
			}
			at := sp.since()
			switch {
			case !strings.Contains(req.URL.Path, "/authZ/"):
				sp.violations = append(sp.violations, fmt.Sprintf("at %v %s: %s sent %s after %s's new order",
					at, n, s.who, req.URL.Path, o))
			case bytes.Contains(payload, []byte("deactivated")) && sp.authzOf[req.URL.Path][o]:
				sp.violations = append(sp.violations, fmt.Sprintf("at %v %s: %s deactivated %s, an authorization of %s's newer order",
					at, n, s.who, req.URL.Path, o))
			default:
				// autocert's detached clean-up of an attempt that
				// ended (deactivatePendingAuthz): it fetches the
				// authorization, and deactivates it if pending.
				sp.lateAuthz++
			}
		}
		sp.mu.Unlock()
	}
	resp, err := s.base.RoundTrip(req)
	if err != nil || len(names) == 0 {
		return resp, err
	}
	rb, err := io.ReadAll(resp.Body)
	resp.Body.Close()
	resp.Body = io.NopCloser(bytes.NewReader(rb))
	if err != nil {
		return resp, nil
	}
	var doc struct {
		Authorizations []string `json:"authorizations"`
		Finalize       string   `json:"finalize"`
		Certificate    string   `json:"certificate"`
		Challenges     []struct {
			URL string `json:"url"`
		} `json:"challenges"`
	}
	json.Unmarshal(rb, &doc)
	links := append(slices.Clone(doc.Authorizations), doc.Finalize, doc.Certificate, resp.Header.Get("Location"))
	for _, ch := range doc.Challenges {
		links = append(links, ch.URL)
	}
	sp.mu.Lock()
	defer sp.mu.Unlock()
	if newOrder && resp.StatusCode == http.StatusCreated {
		for _, n := range names {
			sp.owner[n] = s.who
		}
		for _, z := range doc.Authorizations {
			if u, err := url.Parse(z); err == nil {
				if sp.authzOf[u.Path] == nil {
					sp.authzOf[u.Path] = map[string]bool{}
				}
				sp.authzOf[u.Path][s.who] = true
			}
		}
	}
	for _, l := range links {
		if u, err := url.Parse(l); err == nil && l != "" {
			sp.urls[u.Path] = names
		}
	}
	return resp, nil
}

// jwsPayloadOf returns the decoded payload of a flattened JWS.
func jwsPayloadOf(body []byte) []byte {
	var jws struct {
		Payload string `json:"payload"`
	}
	if json.Unmarshal(body, &jws) != nil {
		return nil
	}
	p, _ := base64.RawURLEncoding.DecodeString(jws.Payload)
	return p
}
