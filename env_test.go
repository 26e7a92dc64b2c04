package certmgr

// The shared test environment of the end-to-end tests, and the helpers
// every test file uses: the fake clock, the test logger, waiting on a
// condition, the goroutine leak check, a Cache that fails on demand and
// self-signed certificates.

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"math/big"
	"net/http"
	"net/netip"
	"os"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/crypto/acme/autocert"

	"github.com/certmgr/certmgr/certmgrtest"
	"github.com/certmgr/certmgr/internal/leakcheck"
	"github.com/certmgr/certmgr/internal/testsupport"
)

// envOptions configure an env. The zero value is usable.
type envOptions struct {
	pebble   certmgrtest.Options
	names    []string                        // allowed by the default HostPolicy, and pointed at 127.0.0.1
	dnsCheck bool                            // the Managers run the DNS pre-check against the harness's DNS (see dnsConfig)
	cache    func(dir string) autocert.Cache // the Managers' Cache, made in a temporary directory; if nil, a DirCache
	ownTLS   bool                            // the test serves TLSListener itself, or not at all
	config   func(*Config)                   // applied to every Config the env makes, before the caller's changes
	hsBound  time.Duration                   // if not zero, every handshake must end within it
	clock    bool                            // the Managers run on e.clock, a fake clock set to the time the env starts
}

// env is one end-to-end test's world: a certmgrtest.Server (Pebble behind
// the fault-injecting proxy, and its DNS), a Cache that outlives the Managers, and the Managers the
// test starts one after the other, all served on one TLS listener (the
// current one, the last started, answers). When the test ends the Managers
// are closed, no name may have failed more authorizations than the budget
// of 4 an hour, no goroutine of certmgr, autocert or acme may be left, and
// on failure the Managers' log is printed.
type env struct {
	*certmgrtest.Server
	opts    envOptions
	cache   autocert.Cache
	names   []string
	logs    *testsupport.Buffer
	clock   *testsupport.Clock      // the Managers' clock with envOptions.clock; else nil
	cur     atomic.Pointer[Manager] // the Manager TLSListener serves
	started []*Manager              // every Manager started, in order
	slowest atomic.Int64            // the slowest handshake, in nanoseconds
	kept    *x509.Certificate       // the fault matrix's kept.test, once provisioned
}

// envBudget is the failed-authorization budget per hour every env checks.
const envBudget = 4

// newEnv starts an env.
func newEnv(t *testing.T, o envOptions) *env {
	t.Helper()
	checkLeaks(t)
	e := &env{Server: certmgrtest.Start(t, o.pebble), opts: o, names: o.names, logs: &testsupport.Buffer{}}
	for _, n := range o.names {
		e.DNS.SetA(n, "127.0.0.1")
	}
	if o.cache != nil {
		e.cache = o.cache(t.TempDir())
	} else {
		e.cache = autocert.DirCache(t.TempDir())
	}
	if o.clock {
		e.clock = testsupport.NewClock(time.Now())
	}
	if !o.ownTLS {
		e.serveTLS(t, &tls.Config{GetConfigForClient: func(*tls.ClientHelloInfo) (*tls.Config, error) {
			m := e.cur.Load()
			if m == nil {
				return nil, errors.New("env: no Manager started")
			}
			return m.TLSConfig(), nil
		}})
	}
	t.Cleanup(func() {
		// Runs once every Manager is closed, before Pebble stops.
		e.checkBudget(t)
		if s := e.slowest.Load(); s > 0 {
			t.Logf("slowest handshake: %v", time.Duration(s).Round(time.Millisecond))
		}
		if t.Failed() {
			t.Logf("certmgr log:\n%s", e.logs)
		}
	})
	return e
}

// config returns the env's usual Config: its Cache, a fresh client of
// Pebble, a HostPolicy allowing its names, its log and, if on, the DNS
// pre-check and fake clock; then envOptions.config and mod, if not nil,
// change it.
func (e *env) config(mod func(*Config)) Config {
	cfg := Config{
		Autocert: &autocert.Manager{
			Cache:      e.cache,
			Client:     e.NewClient(),
			HostPolicy: autocert.HostWhitelist(e.names...),
		},
		Logger: newTestLogger(e.logs),
	}
	if e.clock != nil {
		cfg.hooks.now = e.clock.Now
	}
	if e.opts.dnsCheck {
		cfg = dnsConfig(e.Server, cfg)
	}
	for _, f := range []func(*Config){e.opts.config, mod} {
		if f != nil {
			f(&cfg)
		}
	}
	return cfg
}

// start makes a Manager of e.config(mod), closed when t ends, and makes it
// the one TLSListener serves.
func (e *env) start(t *testing.T, mod func(*Config)) *Manager {
	t.Helper()
	m, err := New(e.config(mod))
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	t.Cleanup(func() { m.Close() })
	e.cur.Store(m)
	e.started = append(e.started, m)
	return m
}

// memoryCache, as envOptions.cache, gives each Manager a Cache of its
// own in memory (what certmgr does for an autocert.Manager without one);
// e.cache is then nil.
func memoryCache(string) autocert.Cache { return nil }

// dnsConfig is cfg with the pre-check on: it expects the loopback
// addresses and asks the harness's DNS server.
func dnsConfig(pe *certmgrtest.Server, cfg Config) Config {
	cfg.DNS.KnownIPs = []netip.Addr{netip.MustParseAddr("127.0.0.1"), netip.MustParseAddr("::1")}
	cfg.DNS.Resolvers = []string{pe.DNS.Addr()}
	cfg.DNS.Timeout = 500 * time.Millisecond
	return cfg
}

// serveTLS serves cfg on TLSListener until the env stops.
func (e *env) serveTLS(t *testing.T, cfg *tls.Config) {
	t.Helper()
	if err := e.ServeTLS(cfg, nil); err != nil {
		t.Fatal(err)
	}
}

// servePlain serves h on HTTPListener until the env stops.
func (e *env) servePlain(t *testing.T, h http.Handler) {
	t.Helper()
	if err := e.ServePlain(h); err != nil {
		t.Fatal(err)
	}
}

// dial connects to TLSListener with SNI name and returns the leaf the
// server sent, verified against Pebble's root unless conf says otherwise
// (insecure). It records the slowest handshake and, with
// envOptions.hsBound, fails t if it took longer. Safe in goroutines.
func (e *env) dial(t testing.TB, name string, conf *tls.Config) (*x509.Certificate, error) {
	t.Helper()
	if conf == nil {
		conf = &tls.Config{}
	}
	conf = conf.Clone()
	conf.ServerName = name
	if conf.RootCAs == nil {
		conf.RootCAs = e.Roots
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	start := time.Now()
	c, err := (&tls.Dialer{Config: conf}).DialContext(ctx, "tcp", e.TLSListener.Addr().String())
	took := time.Since(start)
	if b := e.opts.hsBound; b > 0 && took > b {
		t.Errorf("handshake %s took %v, want at most %v", name, took, b)
	}
	for {
		old := e.slowest.Load()
		if int64(took) <= old || e.slowest.CompareAndSwap(old, int64(took)) {
			break
		}
	}
	if err != nil {
		return nil, err
	}
	defer c.Close()
	return c.(*tls.Conn).ConnectionState().PeerCertificates[0], nil
}

// handshake is dial failing t on error.
func (e *env) handshake(t *testing.T, name string, conf *tls.Config) *x509.Certificate {
	t.Helper()
	leaf, err := e.dial(t, name, conf)
	if err != nil {
		t.Fatalf("handshake %s: %v", name, err)
	}
	return leaf
}

// expectFallback handshakes name and wants the self-signed fallback.
func (e *env) expectFallback(t *testing.T, name string) {
	t.Helper()
	if leaf := e.handshake(t, name, insecure); !isFallbackLeaf(leaf) {
		t.Errorf("handshake %s got %v, want the fallback", name, leaf.Subject)
	}
}

// expectIssued handshakes name and wants a certificate Pebble issued,
// verified against its root.
func (e *env) expectIssued(t *testing.T, name string) *x509.Certificate {
	t.Helper()
	leaf, err := e.dial(t, name, nil)
	if err != nil {
		served := e.handshake(t, name, insecure) // tell what was served instead
		t.Fatalf("handshake %s: %v; served %q, want a certificate issued by Pebble", name, err, served.Subject)
	}
	return leaf
}

// handshakeAny handshakes name accepting whatever is served (a fallback or
// a certificate): for outcomes a test does not pin down.
func (e *env) handshakeAny(t *testing.T, name string) *x509.Certificate {
	t.Helper()
	return e.handshake(t, name, insecure)
}

// checkBudget wants every name's failed authorizations within envBudget.
func (e *env) checkBudget(t *testing.T, extra ...string) {
	t.Helper()
	for _, n := range slices.Concat(e.names, extra) {
		if c := e.Proxy.Counts(n); c.FailedAuthzs > envBudget {
			t.Errorf("%s: %d failed authorizations, budget %d", n, c.FailedAuthzs, envBudget)
		}
	}
}

// insecure accepts any certificate: to see fallbacks.
var insecure = &tls.Config{InsecureSkipVerify: true}

func isFallbackLeaf(leaf *x509.Certificate) bool {
	return strings.Contains(leaf.Subject.String(), "certmgr fallback") && leaf.Issuer.String() == leaf.Subject.String()
}

// helloFor is a modern client's hello for name.
func helloFor(name string) *tls.ClientHelloInfo {
	return &tls.ClientHelloInfo{ServerName: name, SupportedVersions: []uint16{tls.VersionTLS13}}
}

// closeWithin closes m and fails t unless Close returns within d.
func closeWithin(t *testing.T, m *Manager, d time.Duration) {
	t.Helper()
	start := time.Now()
	done := make(chan struct{})
	go func() { m.Close(); close(done) }()
	select {
	case <-done:
		if took := time.Since(start); took > d {
			t.Errorf("Close took %v, want at most %v", took, d)
		}
	case <-time.After(30 * time.Second):
		t.Fatalf("Close did not return in 30 s")
	}
}

// failureOf returns a copy of name's failure record, from inside m.
func failureOf(m *Manager, name string) failureRecord {
	m.stateMu.Lock()
	defer m.stateMu.Unlock()
	if d := m.domains[name]; d != nil {
		f := d.fail
		f.Spends = append([]spend(nil), f.Spends...)
		return f
	}
	return failureRecord{}
}

// waitFailed waits until name's Status shows n failures and returns it.
func waitFailed(t *testing.T, m *Manager, name string, n int) Status {
	t.Helper()
	waitFor(t, 15*time.Second, fmt.Sprintf("%s to fail %d time(s)", name, n), func() bool {
		st := m.Status(name)
		return st.Failures >= n && st.State != StateObtaining
	})
	st := m.Status(name)
	if st.Failures != n {
		t.Errorf("%s: %d failures, want %d", name, st.Failures, n)
	}
	return st
}

// waitOutcome waits until the attempt a handshake or Provision started for
// name has an outcome (valid, backoff or waiting-dns) and returns Status.
func waitOutcome(t *testing.T, m *Manager, name string) Status {
	t.Helper()
	waitFor(t, 15*time.Second, name+"'s attempt to end", func() bool {
		switch m.Status(name).State {
		case StateValid, StateBackoff, StateWaitingDNS:
			return true
		}
		return false
	})
	return m.Status(name)
}

// persisted returns the failure records persisted in cache, as read now.
func persisted(t *testing.T, cache autocert.Cache) map[string]failureRecord {
	t.Helper()
	return persistedAt(t, cache, time.Now())
}

// persistedAt returns the failure records persisted in cache, as read at
// now.
func persistedAt(t *testing.T, cache autocert.Cache, now time.Time) map[string]failureRecord {
	t.Helper()
	data, err := cache.Get(context.Background(), stateKey)
	if errors.Is(err, autocert.ErrCacheMiss) {
		return nil
	}
	if err != nil {
		t.Fatalf("reading the persisted state: %v", err)
	}
	recs, bad, err := decodeState(data, now)
	if err != nil || len(bad) > 0 {
		t.Fatalf("persisted state unreadable: %v %v", err, bad)
	}
	return recs
}

// intermediates returns the chain of c past its leaf.
func intermediates(c *tls.Certificate) *x509.CertPool {
	p := x509.NewCertPool()
	for _, der := range c.Certificate[1:] {
		if ic, err := x509.ParseCertificate(der); err == nil {
			p.AddCert(ic)
		}
	}
	return p
}

// newPureManager returns a Manager with no CA, DNS or disk behind it: a
// memory Cache, the clock's time (the real time if clock is nil), no
// jitter and a discarded log. mod, if not nil, changes its Config first.
// It is closed when t ends.
func newPureManager(t *testing.T, clock *testsupport.Clock, mod func(*Config)) *Manager {
	t.Helper()
	cfg := Config{
		Autocert: &autocert.Manager{},
		Logger:   slog.New(slog.NewTextHandler(io.Discard, nil)),
		hooks:    testHooks{rand: func() float64 { return 0 }},
	}
	if clock != nil {
		cfg.hooks.now = clock.Now
	}
	if mod != nil {
		mod(&cfg)
	}
	m, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { m.Close() })
	return m
}

// newFakeClock returns a clock at 2026-01-01 00:00 UTC.
func newFakeClock() *testsupport.Clock {
	return testsupport.NewClock(time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC))
}

// newTestLogger logs everything, Debug included, to w.
func newTestLogger(w io.Writer) *slog.Logger {
	return slog.New(slog.NewTextHandler(w, &slog.HandlerOptions{Level: slog.LevelDebug}))
}

// waitFor polls cond until it holds or d passes.
func waitFor(t *testing.T, d time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %v waiting for %s", d, what)
		}
		time.Sleep(5 * time.Millisecond) // polling with a deadline
	}
}

// waitForCond polls cond until it holds or d passes.
func waitForCond(d time.Duration, cond func() bool) bool {
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			return false
		}
		time.Sleep(5 * time.Millisecond) // polling with a deadline
	}
	return true
}

// checkLeaks fails t if, once t's cleanups have run, goroutines of
// certmgr, autocert or acme are still running after a grace period in which
// detached work (autocert deactivating authorizations) ends.
func checkLeaks(t *testing.T) {
	labelTest(t)
	t.Cleanup(func() {
		if left := settle(t, 10*time.Second, nil); len(left) > 0 {
			t.Errorf("%d goroutine(s) left behind:\n%s", len(left), strings.Join(left, "\n\n"))
		}
	})
}

// waitDetached waits for the goroutines autocert detaches after an
// attempt (withdrawing unused authorizations, deleting challenge tokens).
func waitDetached(t *testing.T) {
	t.Helper()
	autocertOnly := func(stack string) bool { return strings.Contains(stack, "acme/autocert.") }
	if left := settle(t, 10*time.Second, autocertOnly); len(left) > 0 {
		t.Fatalf("autocert's detached work did not end:\n%s", strings.Join(left, "\n\n"))
	}
}

// waitNoLeaks waits until no goroutine of certmgr, autocert or acme runs.
func waitNoLeaks(t *testing.T, d time.Duration) {
	t.Helper()
	if left := settle(t, d, nil); len(left) > 0 {
		t.Fatalf("%d goroutine(s) still running %v after Close:\n%s", len(left), d, strings.Join(left, "\n\n"))
	}
}

// TestMain runs the tests, then wants no goroutine of certmgr, autocert or
// acme left at all, labelled or not: a test's own checks see only the
// goroutines it labelled (labelTest).
//
// The tests run 4 at a time unless -test.parallel says otherwise: the
// server-backed ones wait on the CA and on timeouts more than they
// compute.
func TestMain(m *testing.M) {
	flag.Parse()
	set := false
	flag.Visit(func(f *flag.Flag) { set = set || f.Name == "test.parallel" })
	if !set {
		flag.Set("test.parallel", "4")
	}
	code := m.Run()
	deadline := time.Now().Add(10 * time.Second)
	for left := leakedGoroutines(leakcheck.Stacks()[1:]); code == 0 && len(left) > 0; left = leakedGoroutines(leakcheck.Stacks()[1:]) {
		if time.Now().After(deadline) {
			fmt.Fprintf(os.Stderr, "%d goroutine(s) left behind after the tests:\n%s\n", len(left), strings.Join(left, "\n\n"))
			code = 1
		}
		time.Sleep(5 * time.Millisecond) // polling with a deadline
	}
	os.Exit(code)
}

// labelTest labels t's goroutine, so that the goroutines it starts from
// now on (its servers', its Managers' and theirs) are t's (see settle),
// even while other tests run in parallel.
func labelTest(t *testing.T) {
	leakcheck.Label(testLabel, t.Name())
}

// testLabel is the pprof label that names a goroutine's test.
const testLabel = "certmgr-test"

// settle polls until no goroutine of t's (see labelTest) of certmgr,
// autocert or acme that keep selects (all, if keep is nil) is running,
// or d passes; it returns those still running.
func settle(t *testing.T, d time.Duration, keep func(stack string) bool) []string {
	deadline := time.Now().Add(d)
	for {
		var left []string
		for _, g := range leakedGoroutines(leakcheck.Labelled(testLabel, t.Name())) {
			if keep == nil || keep(g) {
				left = append(left, g)
			}
		}
		if len(left) == 0 || time.Now().After(deadline) {
			return left
		}
		time.Sleep(5 * time.Millisecond) // polling with a deadline
	}
}

// leakedGoroutines returns the stacks of the goroutines of certmgr,
// autocert and acme among stacks, the test harness's and the tests' own
// left out.
func leakedGoroutines(stacks []string) []string {
	var leaked []string
	for _, g := range stacks {
		if strings.Contains(g, "leakedGoroutines") || strings.Contains(g, "pebble/v2") || strings.Contains(g, "certmgr/certmgrtest.") {
			continue
		}
		if strings.Contains(g, "github.com/certmgr/certmgr.") || strings.Contains(g, "acme/autocert.") || strings.Contains(g, "x/crypto/acme.") {
			if !strings.Contains(g, "testing.tRunner") {
				leaked = append(leaked, g)
			}
		}
	}
	return leaked
}

// faultCache wraps a Cache and fails its reads or writes on demand: a
// read-only directory (writes fail) or an unreadable one (reads fail too).
// Tests run as root, so chmod cannot make a directory read-only.
type faultCache struct {
	inner            autocert.Cache
	failGet, failPut atomic.Bool
	getErrs, putErrs atomic.Int64
}

var errInjectedCache = errors.New("certmgr test: injected cache error")

func (c *faultCache) Get(ctx context.Context, key string) ([]byte, error) {
	if c.failGet.Load() {
		c.getErrs.Add(1)
		return nil, fmt.Errorf("read %s: %w", key, errInjectedCache)
	}
	return c.inner.Get(ctx, key)
}

func (c *faultCache) Put(ctx context.Context, key string, data []byte) error {
	if c.failPut.Load() {
		c.putErrs.Add(1)
		return fmt.Errorf("write %s: %w", key, errInjectedCache)
	}
	return c.inner.Put(ctx, key, data)
}

func (c *faultCache) Delete(ctx context.Context, key string) error {
	if c.failPut.Load() {
		return fmt.Errorf("delete %s: %w", key, errInjectedCache)
	}
	return c.inner.Delete(ctx, key)
}

// selfSigned returns a certificate for name signed by key itself, valid
// from notBefore to notAfter, with org as its Organization.
func selfSigned(t testing.TB, name string, key crypto.Signer, org string, notBefore, notAfter time.Time) *tls.Certificate {
	t.Helper()
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(time.Now().UnixNano()),
		Subject:      pkix.Name{CommonName: name, Organization: []string{org}},
		DNSNames:     []string{name},
		NotBefore:    notBefore,
		NotAfter:     notAfter,
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	if err != nil {
		t.Fatal(err)
	}
	leaf, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	return &tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key, Leaf: leaf}
}

// ecKey returns a new P-256 key.
func ecKey(t testing.TB) *ecdsa.PrivateKey {
	t.Helper()
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	return k
}

// pemCert encodes c as autocert stores it: the key, then the chain.
func pemCert(t testing.TB, c *tls.Certificate) []byte {
	t.Helper()
	der, err := x509.MarshalPKCS8PrivateKey(c.PrivateKey)
	if err != nil {
		t.Fatal(err)
	}
	out := pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der})
	for _, b := range c.Certificate {
		out = append(out, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: b})...)
	}
	return out
}

// blockingCache runs block before each Get; an error it returns is the
// Get's.
type blockingCache struct {
	autocert.Cache
	block func(key string) error
}

func (c *blockingCache) Get(ctx context.Context, key string) ([]byte, error) {
	if err := c.block(key); err != nil {
		return nil, err
	}
	return c.Cache.Get(ctx, key)
}
