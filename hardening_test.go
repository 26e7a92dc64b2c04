package certmgr

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"net/url"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/crypto/acme"
	"golang.org/x/crypto/acme/autocert"

	"github.com/certmgr/certmgr/internal/dnstest"
	"github.com/certmgr/certmgr/internal/pebbletest"
)

// quietManager returns a Manager on cache (memory if nil) with clock's
// time, closed when t ends.
func quietManager(t *testing.T, cache autocert.Cache, clock *fakeClock, mod func(*Config)) *Manager {
	t.Helper()
	cfg := Config{Autocert: &autocert.Manager{Cache: cache}, Logger: slog.New(slog.NewTextHandler(io.Discard, nil))}
	if clock != nil {
		cfg.hooks.now = clock.now
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

func TestOrderOfUnknownOrRetiredManagerIsRefused(t *testing.T) {
	m := quietManager(t, nil, nil, nil)
	req := httptest.NewRequest(http.MethodPost, "https://ca.test/new-order", nil)
	if _, err := m.admitOrder(req, "gone.test"); err == nil {
		t.Error("an order for a domain certmgr does not track was admitted")
	}
	d, err := m.domainFor("kept.test")
	if err != nil {
		t.Fatal(err)
	}
	current, retired := &autocert.Manager{}, &autocert.Manager{}
	m.stateMu.Lock()
	d.am = current
	m.stateMu.Unlock()
	fromRetired := req.WithContext(context.WithValue(req.Context(), senderKey{}, retired))
	if _, err := m.admitOrder(fromRetired, "kept.test"); err == nil || !strings.Contains(err.Error(), "retired") {
		t.Errorf("an order from a retired autocert.Manager: %v, want refused", err)
	}
	if n := m.refusedOrders.Load(); n != 2 {
		t.Errorf("%d orders refused, want 2", n)
	}
}

func TestLoadingDomainIsNotEvicted(t *testing.T) {
	m := quietManager(t, nil, nil, func(c *Config) { c.MaxDomains = 1 })
	d, err := m.domainFor("loading.test")
	if err != nil {
		t.Fatal(err)
	}
	m.stateMu.Lock()
	d.loading++ // its first Cache read is running
	m.stateMu.Unlock()
	if _, err := m.domainFor("other.test"); err == nil {
		t.Error("a domain whose Cache read is running was dropped to make room")
	}
	m.stateMu.Lock()
	d.loading--
	m.stateMu.Unlock()
	if _, err := m.domainFor("other.test"); err != nil {
		t.Errorf("once loaded and idle, the domain makes room: %v", err)
	}
}

// TestGracefulRestartsSpendAtMostTheBudget: six graceful restarts in a
// row, each right after the CA failed a validation (Close cuts the
// client's poll of the authorization), give the CA at most 4 failed
// validations: what an attempt may have spent is stored before its
// order goes out.
func TestGracefulRestartsSpendAtMostTheBudget(t *testing.T) {
	const name = "restart.test"
	f := newFaultEnv(t, nil, false, name)
	f.DNS.SetA(name, "127.0.0.3") // nothing listens there: validation fails
	refused := 0
	for round := range 6 {
		m := f.start(t, f.config(func(c *Config) {
			c.Backoff = Backoff{Steps: []time.Duration{time.Millisecond}, Jitter: -1} // only the budget binds
		}))
		pass := f.Proxy.AddRule(pebbletest.Rule{Class: pebbletest.ClassAuthz, Identifier: name, Times: 1})
		hold := f.Proxy.AddRule(pebbletest.Rule{Class: pebbletest.ClassAuthz, Identifier: name, Hold: true})
		authz := f.Proxy.Requests(pebbletest.ClassAuthz)
		done := make(chan error, 1)
		go func() { done <- m.Provision(context.Background(), name) }()
		var err error
		waitFor(t, 10*time.Second, "the poll after the failed validation, or a refusal", func() bool {
			select {
			case err = <-done:
				return true
			default:
				return f.Proxy.Requests(pebbletest.ClassAuthz) >= authz+2
			}
		})
		if err != nil {
			if !errors.Is(err, ErrBackoff) {
				t.Fatalf("round %d: Provision = %v, want ErrBackoff or an attempt cut by Close", round, err)
			}
			refused++
		}
		closeWithin(t, m, time.Second)
		pass()
		hold()
		waitDetached(t)
	}
	c := f.Proxy.Counts(name)
	if c.ChallengeResponses > 4 {
		t.Errorf("%d validations failed at the CA over 6 restarts, want at most 4", c.ChallengeResponses)
	}
	if c.ChallengeResponses == 0 || refused == 0 {
		t.Errorf("%d validations, %d refusals: the scenario did not run", c.ChallengeResponses, refused)
	}
	if rec := persisted(t, f.cache)[name]; rec.spentSince(time.Now().Add(-budgetWindow), time.Now()) < c.ChallengeResponses {
		t.Errorf("persisted %+v, want the %d failed validations counted", rec, c.ChallengeResponses)
	}
}

// TestUnreadableStateLosesNothing: while the persisted records cannot be
// read, no order is made and nothing is written over them; once they can,
// they bind. A record whose HostPolicy check errors is kept as it is.
func TestUnreadableStateLosesNothing(t *testing.T) {
	const (
		limited = "limited.test"
		other   = "other.test"
	)
	f := newFaultEnv(t, nil, false, limited, other)
	now := time.Now()
	want := failureRecord{Failures: 1, LastError: "rate limited", LastFailure: now.Add(-time.Minute),
		NextAttempt: now.Add(72 * time.Hour), RetryAfter: now.Add(72 * time.Hour),
		Spends: []spend{{At: now.Add(-10 * time.Minute), Authz: 2}}}
	data, err := encodeState(map[string]failureRecord{limited: want})
	if err != nil {
		t.Fatal(err)
	}
	if err := f.cache.Put(context.Background(), stateKey, data); err != nil {
		t.Fatal(err)
	}
	var failing atomic.Bool // reads of the records fail
	failing.Store(true)
	fc := &blockingCache{Cache: f.cache, block: func(key string) error {
		if key == stateKey && failing.Load() {
			return errors.New("store unavailable")
		}
		return nil
	}}
	m := f.start(t, f.config(func(c *Config) {
		c.Autocert.Cache = fc
		c.hooks.cacheRetry = time.Hour // read again only when Retry asks
	}))
	if err := m.Provision(context.Background(), other); !errors.Is(err, ErrBackoff) {
		t.Errorf("Provision with the records unread = %v, want ErrBackoff", err)
	}
	if n := f.Proxy.Counts(other).Orders; n != 0 {
		t.Errorf("%d orders while the records were unread", n)
	}
	if rec := persisted(t, f.cache)[limited]; !rec.RetryAfter.Equal(want.RetryAfter) {
		t.Fatalf("the unread record was overwritten: %+v", rec)
	}

	failing.Store(false)
	m.Retry(other) // reads them again
	if st := m.Status(limited); st.Failures != 1 || !st.NextAttempt.Equal(want.RetryAfter) {
		t.Errorf("Status once read = %+v, want the persisted failure until %v", st, want.RetryAfter)
	}
	if err := m.Provision(context.Background(), limited); !errors.Is(err, ErrBackoff) {
		t.Errorf("Provision of the rate-limited domain = %v, want ErrBackoff", err)
	}
	if err := m.Provision(context.Background(), other); err != nil {
		t.Fatalf("Provision once the records are read: %v", err)
	}
	if rec := persisted(t, f.cache)[limited]; !rec.RetryAfter.Equal(want.RetryAfter) {
		t.Errorf("after a save, the record is %+v", rec)
	}
	closeWithin(t, m, time.Second)

	// A HostPolicy that errors on the name when New runs: its record stays.
	const third = "third.test"
	f.DNS.SetA(third, "127.0.0.1")
	m2 := f.start(t, f.config(func(c *Config) {
		c.Autocert.HostPolicy = func(_ context.Context, host string) error {
			if host == third || host == keptName {
				return nil
			}
			return errors.New("policy backend unavailable")
		}
	}))
	if err := m2.Provision(context.Background(), third); err != nil {
		t.Fatalf("Provision %s: %v", third, err)
	}
	if rec := persisted(t, f.cache)[limited]; !rec.RetryAfter.Equal(want.RetryAfter) {
		t.Errorf("with its HostPolicy check failing, the record became %+v", rec)
	}
}

// TestWaitsBoundedFromNow: no persisted record, however far in the future
// its times, and no Retry-After met while the clock ran ahead, holds a
// domain longer than maxRetryAfter from now; Retry cannot lift the CA's
// (bounded) Retry-After.
func TestWaitsBoundedFromNow(t *testing.T) {
	clock := newFakeClock()
	far := time.Date(9999, 12, 31, 0, 0, 0, 0, time.UTC)
	data := []byte(`{"version":1,"domains":{"far.test":{"failures":3,"last_failure":"9999-12-31T00:00:00Z",` +
		`"next_attempt":"9999-12-31T00:00:00Z","retry_after":"9999-12-31T00:00:00Z",` +
		`"spends":[{"at":"9999-12-31T00:00:00Z","authz":1000000000},{"at":"2025-01-01T00:00:00Z","authz":-5}]}}}`)
	cache := &memCache{m: map[string][]byte{stateKey: data}}
	m := quietManager(t, cache, clock, nil)
	limit := clock.now().Add(maxRetryAfter)
	if st := m.Status("far.test"); st.NextAttempt.After(limit) || st.NextAttempt.IsZero() {
		t.Errorf("Status.NextAttempt = %v, want within %v and set", st.NextAttempt, limit)
	}
	m.Retry("far.test")
	if st := m.Status("far.test"); st.NextAttempt.After(limit) {
		t.Errorf("after Retry, NextAttempt = %v, want within %v", st.NextAttempt, limit)
	}
	clock.advance(maxRetryAfter + budgetWindow + time.Second)
	d, _ := m.domainFor("far.test")
	m.stateMu.Lock()
	gate := m.gateLocked(d)
	m.stateMu.Unlock()
	if gate != nil {
		t.Errorf("after 8 days and the budget window: %v", gate)
	}

	// A 429 met while the clock ran a year ahead.
	ahead := clock.now().Add(365 * 24 * time.Hour)
	var rec failureRecord
	rec.fail(ahead, "rate limited", 1, 4, defaultBackoff, ahead.Add(maxRetryAfter), 0)
	d2, _ := m.domainFor("ahead.test")
	m.stateMu.Lock()
	d2.fail = rec
	m.stateMu.Unlock()
	if st := m.Status("ahead.test"); st.NextAttempt.After(clock.now().Add(maxRetryAfter)) {
		t.Errorf("with the clock back, NextAttempt = %v, want within 8 days of %v", st.NextAttempt, clock.now())
	}
	_ = far
}

// TestRenewalCutAtTransportEnds: a renewal whose request gets no answer
// (the CA holds it past the request timeout) ends at once, failed and
// logged, instead of holding the domain until autocert's next order.
func TestRenewalCutAtTransportEnds(t *testing.T) {
	const name = "renew.test"
	dir := t.TempDir()
	e := startEnv(t, pebbletest.Options{CertValidity: time.Minute},
		Config{Autocert: &autocert.Manager{Cache: autocert.DirCache(dir)}}, name)
	current := e.serveCurrent(t)
	if err := e.m.Provision(context.Background(), name); err != nil {
		t.Fatal(err)
	}
	e.m.Close()
	// From now on the CA takes every finalization and never answers.
	e.Proxy.AddRule(pebbletest.Rule{Class: pebbletest.ClassFinalize, Identifier: name, Hold: true})

	// Restarted with renewal due at once (RenewBefore covers the life).
	events := &eventLog{}
	m, err := New(Config{
		Autocert: &autocert.Manager{Cache: autocert.DirCache(dir), Client: e.NewClient(),
			HostPolicy: autocert.HostWhitelist(name), RenewBefore: time.Hour},
		Logger:  newTestLogger(e.logs),
		OnEvent: events.add,
		hooks:   testHooks{requestTimeout: 500 * time.Millisecond},
	})
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	current.Store(m)
	if _, err := e.handshake(t, name, nil); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 20*time.Second, "the renewal's failure", func() bool { return events.count(EventFailed) > 0 })
	if ev := events.last(EventFailed); ev.Path != PathRenewal {
		t.Errorf("failure event %+v, want the renewal's", ev)
	}
	if st := m.Status(name); st.State != StateValid || st.Failures != 1 {
		t.Errorf("Status = %+v, want valid with the renewal's failure", st)
	}
	m.stateMu.Lock()
	inFlight := m.domains[name].attempt
	m.stateMu.Unlock()
	if inFlight != nil {
		t.Errorf("the renewal is still in flight after its failure")
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

// TestRemoteNamesMakeNoCacheErrors: names and token paths a remote client
// chooses are checked before any Cache call, and what the Cache cannot
// store is reported at most once a minute.
func TestRemoteNamesMakeNoCacheErrors(t *testing.T) {
	var cacheErrors atomic.Int64
	m := quietManager(t, autocert.DirCache(t.TempDir()), nil, func(c *Config) {
		c.OnEvent = func(e Event) {
			if e.Kind == EventCacheError {
				cacheErrors.Add(1)
			}
		}
	})
	label := strings.Repeat("a", 63)
	for i := range 20 {
		// 253 bytes in labels of at most 63: a valid name whose "+token"
		// key is too long for a file name.
		name := strings.Join([]string{label, label, label, fmt.Sprintf("%02d", i) + strings.Repeat("c", 59)}, ".")
		hello := &tls.ClientHelloInfo{ServerName: name, SupportedProtos: []string{acme.ALPNProto}}
		if _, err := m.GetCertificate(hello); err == nil {
			t.Fatal("a validation hello with no token got a certificate")
		}
		long := &tls.ClientHelloInfo{ServerName: strings.Repeat("b", 70) + ".test", SupportedProtos: []string{acme.ALPNProto}}
		if _, err := m.GetCertificate(long); err == nil {
			t.Fatal("a validation hello for a label of 70 bytes got a certificate")
		}
	}
	h := m.HTTPHandler(nil)
	for range 20 {
		r := httptest.NewRequest(http.MethodGet, "http://a.test/.well-known/acme-challenge/"+strings.Repeat("x", 250), nil)
		w := httptest.NewRecorder()
		h.ServeHTTP(w, r)
		if w.Code != http.StatusNotFound {
			t.Errorf("a token path of 250 bytes: %d, want 404", w.Code)
		}
	}
	if n := cacheErrors.Load(); n > 1 {
		t.Errorf("%d cache-error events from remote clients' names, want at most 1 a minute", n)
	}
}

// TestHTTPHandlerWhileATokenReadFails: HTTPHandler holds no lock of
// certmgr's while it takes autocert's: autocert reads a token from the
// Cache under its own lock, the read fails, and OnEvent calls Status.
func TestHTTPHandlerWhileATokenReadFails(t *testing.T) {
	const name = "lock.test"
	entered, release := make(chan struct{}), make(chan struct{})
	var once sync.Once
	cache := &blockingCache{Cache: &memCache{m: map[string][]byte{}}, block: func(key string) error {
		if !strings.HasSuffix(key, "+http-01") {
			return nil
		}
		once.Do(func() { close(entered) })
		<-release
		return errors.New("store unavailable")
	}}
	var m *Manager
	m = quietManager(t, cache, nil, func(c *Config) {
		c.OnEvent = func(e Event) { m.Status(name) }
	})
	d, err := m.domainFor(name)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := m.autocertFor(context.Background(), d); err != nil {
		t.Fatal(err)
	}
	h := m.HTTPHandler(nil)
	served := make(chan struct{})
	go func() {
		defer close(served)
		r := httptest.NewRequest(http.MethodGet, "http://"+name+"/.well-known/acme-challenge/"+strings.Repeat("t", 43), nil)
		h.ServeHTTP(httptest.NewRecorder(), r)
	}()
	<-entered // autocert holds its lock, reading the Cache
	again := make(chan struct{})
	go func() {
		defer close(again)
		m.HTTPHandler(nil)
	}()
	// Give HTTPHandler the chance to take stateMu and block on autocert's
	// lock, the order that deadlocked: wait until stateMu is held, or
	// HTTPHandler returned, or a second passed.
	waitForCond(time.Second, func() bool {
		select {
		case <-again:
			return true
		default:
		}
		if m.stateMu.TryLock() {
			m.stateMu.Unlock()
			return false
		}
		return true
	})
	close(release)
	for _, c := range []chan struct{}{served, again} {
		select {
		case <-c:
		case <-time.After(10 * time.Second):
			t.Fatal("deadlock: HTTPHandler and a failing token read wait for each other")
		}
	}
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

// TestNewerWriteWinsOverRetry: the retry of a failed write does not land
// over a newer write of the same key.
func TestNewerWriteWinsOverRetry(t *testing.T) {
	inner := &scriptedCache{m: map[string][]byte{}, failNext: true, writing: make(chan []byte, 4), release: make(chan struct{})}
	c := newCertCache(inner)
	c.onPut = func(string, []byte) {}
	c.onError = func(string, string, error) {}
	v1, v2 := []byte("old"), []byte("new")
	if err := c.Put(context.Background(), "a.test", v1); err == nil {
		t.Fatal("the first write should fail")
	}
	inner.blockNext.Store(true)
	flushed := make(chan struct{})
	go func() { c.flush(context.Background()); close(flushed) }()
	if got := <-inner.writing; !bytes.Equal(got, v1) {
		t.Fatalf("flush wrote %q, want the kept %q", got, v1)
	}
	put := make(chan error, 1)
	go func() { put <- c.Put(context.Background(), "a.test", v2) }()
	// The newer write may reach the store now (a defect) or wait for the
	// retry in progress: wait a while for the former.
	select {
	case <-inner.writing:
	case <-time.After(500 * time.Millisecond):
	}
	close(inner.release)
	<-flushed
	if err := <-put; err != nil {
		t.Fatal(err)
	}
	if got, _ := inner.Get(context.Background(), "a.test"); !bytes.Equal(got, v2) {
		t.Errorf("the store holds %q, want the newest write %q", got, v2)
	}
}

// scriptedCache fails its first Put if failNext, and blocks the next Put
// after blockNext is set until release is closed; each Put's data is sent
// on writing.
type scriptedCache struct {
	mu        sync.Mutex
	m         map[string][]byte
	failNext  bool
	blockNext atomic.Bool
	writing   chan []byte
	release   chan struct{}
}

func (c *scriptedCache) Get(_ context.Context, key string) ([]byte, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if v, ok := c.m[key]; ok {
		return v, nil
	}
	return nil, autocert.ErrCacheMiss
}

func (c *scriptedCache) Put(_ context.Context, key string, data []byte) error {
	c.mu.Lock()
	fail := c.failNext
	c.failNext = false
	c.mu.Unlock()
	if fail {
		return errors.New("store unavailable")
	}
	if c.blockNext.CompareAndSwap(true, false) {
		c.writing <- data
		<-c.release
	} else {
		c.writing <- data
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	c.m[key] = data
	return nil
}

func (c *scriptedCache) Delete(_ context.Context, key string) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	delete(c.m, key)
	return nil
}

// TestOldAccountKeyNameIsTheAccount: autocert's former name of the account
// key holds the account key, not a certificate.
func TestOldAccountKeyNameIsTheAccount(t *testing.T) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	der, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	cache := &memCache{m: map[string][]byte{oldAccountKeyName: pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: der})}}
	m := quietManager(t, cache, nil, nil)
	got, err := m.accountKey(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if !key.Public().(*ecdsa.PublicKey).Equal(got.Public()) {
		t.Error("a new account key was made; the one under autocert's former name was not used")
	}
}

// TestFullDomainTableIsReported: a new name refused because every tracked
// domain is busy is logged and counted in an event, at most once a minute.
func TestFullDomainTableIsReported(t *testing.T) {
	clock := newFakeClock()
	logs := &syncBuffer{}
	events := &eventLog{}
	m := quietManager(t, nil, clock, func(c *Config) {
		c.MaxDomains = 1
		c.OnEvent = events.add
		c.Logger = newTestLogger(logs)
	})
	d, err := m.domainFor("busy.test")
	if err != nil {
		t.Fatal(err)
	}
	m.stateMu.Lock()
	d.fail.NextAttempt = clock.now().Add(time.Hour) // backing off: kept
	m.stateMu.Unlock()
	for range 10 {
		c, err := m.GetCertificate(&tls.ClientHelloInfo{ServerName: "new.test"})
		if err != nil || !IsFallback(c) {
			t.Fatalf("GetCertificate = %v, %v; want the fallback", c, err)
		}
	}
	if n := events.count(EventTableFull); n != 1 {
		t.Errorf("%d table-full events for 10 refusals in a minute, want 1", n)
	}
	if !strings.Contains(logs.String(), "level=WARN msg=\"domain table full\"") {
		t.Errorf("no warning logged:\n%s", logs)
	}
	clock.advance(time.Minute)
	m.GetCertificate(&tls.ClientHelloInfo{ServerName: "new.test"})
	if n := events.count(EventTableFull); n != 2 {
		t.Errorf("%d table-full events after a minute more, want 2", n)
	}
}

// TestOrderBudgetBinds: the account makes at most OrderBudget orders in 3
// hours; the next is refused with ErrBackoff and a warning.
func TestOrderBudgetBinds(t *testing.T) {
	names := []string{"o1.test", "o2.test", "o3.test"}
	f := newFaultEnv(t, nil, false, names...)
	events := &eventLog{}
	m := f.start(t, f.config(func(c *Config) {
		c.OrderBudget = 3 // kept.test's and two more
		c.OnEvent = events.add
	}))
	f.provisionKept(t, m)
	for _, n := range names[:2] {
		if err := m.Provision(context.Background(), n); err != nil {
			t.Fatalf("Provision %s: %v", n, err)
		}
	}
	err := m.Provision(context.Background(), names[2])
	if !errors.Is(err, ErrBackoff) || !strings.Contains(err.Error(), "OrderBudget") {
		t.Errorf("Provision beyond the budget = %v, want ErrBackoff naming OrderBudget", err)
	}
	if n := f.Proxy.Counts(names[2]).Orders; n != 0 {
		t.Errorf("%d orders beyond the budget", n)
	}
	if n := events.count(EventOrderBudget); n != 1 {
		t.Errorf("%d order-budget events, want 1", n)
	}
	if st := m.Status(names[2]); st.Failures != 0 {
		t.Errorf("a local refusal counted as the domain's failure: %+v", st)
	}
}

// TestCAAParametersChecked: an issue record's accounturi and
// validationmethods (RFC 8657) must allow this client, as far as it knows
// its account and methods.
func TestCAAParametersChecked(t *testing.T) {
	s := startDNS(t)
	s.SetA("a.test", "127.0.0.1")
	const account = "https://ca.test/acct/1"
	tests := []struct {
		value   string
		account string // the client's, "" while unknown
		ready   bool
	}{
		{"ca.test", account, true},
		{"ca.test; validationmethods=tls-alpn-01", account, true},
		{"ca.test; validationmethods=http-01,tls-alpn-01", account, true},
		{"ca.test; validationmethods=http-01", account, false},
		{"ca.test; validationmethods=dns-01", "", false},
		{"ca.test; accounturi=" + account, account, true},
		{"ca.test; accounturi=https://ca.test/acct/2", account, false},
		{"ca.test; accounturi=https://ca.test/acct/2", "", true},
		{"ca.test; accounturi=" + account + "; validationmethods=http-01", account, false},
		{"other.ca; accounturi=" + account, account, false},
	}
	for _, tt := range tests {
		s.SetCAA("a.test", dnstest.CAA{Tag: "issue", Value: tt.value})
		c := newDNSChecker(DNSCheck{KnownIPs: []netip.Addr{netip.MustParseAddr("127.0.0.1")},
			Resolvers: []string{s.Addr()}, CAAIdentities: []string{"ca.test"}}, 0, time.Now)
		c.methods = func() []string { return []string{"tls-alpn-01"} }
		c.account = func() string { return tt.account }
		err := c.check(context.Background(), "a.test")
		if ready := err == nil; ready != tt.ready {
			t.Errorf("CAA %q with account %q: %v, want ready %v", tt.value, tt.account, err, tt.ready)
		}
	}
}

// TestAccountURIFromCA: the account's URI is what the CA answered to the
// new-account request.
func TestAccountURIFromCA(t *testing.T) {
	const name = "acct.test"
	e := startEnv(t, pebbletest.Options{}, Config{}, name)
	e.ServeTLS(t, e.m.TLSConfig(), nil)
	if err := e.m.Provision(context.Background(), name); err != nil {
		t.Fatal(err)
	}
	uri := e.m.accountURI()
	dir, _ := url.Parse(e.DirectoryURL)
	if u, err := url.Parse(uri); err != nil || u.Host != dir.Host || !strings.HasPrefix(u.Path, "/my-account/") {
		t.Errorf("account URI %q, want the CA's account URL (Pebble: /my-account/ID)", uri)
	}
}
