package certmgr

// Tests of what a closed Manager writes: nothing, once Close returned,
// whatever autocert's detached goroutines and timers still do.

import (
	"context"
	"errors"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/crypto/acme/autocert"

	"github.com/certmgr/certmgr/certmgrtest"
	"github.com/certmgr/certmgr/internal/testsupport"
)

// writeLog is an autocert.Cache that records every write (Put or Delete)
// that ends after the test marked its Manager closed (closed).
type writeLog struct {
	autocert.Cache
	closed atomic.Bool // set by the test once Close returned

	mu   sync.Mutex
	late []string // writes that ended after closed was set
}

func (c *writeLog) Put(ctx context.Context, key string, data []byte) error {
	err := c.Cache.Put(ctx, key, data)
	c.note("put " + key)
	return err
}

func (c *writeLog) Delete(ctx context.Context, key string) error {
	err := c.Cache.Delete(ctx, key)
	c.note("delete " + key)
	return err
}

func (c *writeLog) note(write string) {
	if c.closed.Load() {
		c.mu.Lock()
		c.late = append(c.late, write)
		c.mu.Unlock()
	}
}

// lateWrites returns the writes that ended after closed was set.
func (c *writeLog) lateWrites() []string {
	c.mu.Lock()
	defer c.mu.Unlock()
	return append([]string(nil), c.late...)
}

// newWriteLogEnv returns an env for name whose Cache is a DirCache
// behind a writeLog, and that writeLog.
func newWriteLogEnv(t *testing.T, name string) (*env, *writeLog) {
	t.Helper()
	wl := &writeLog{}
	e := newEnv(t, envOptions{names: []string{name}, cache: func(dir string) autocert.Cache {
		wl.Cache = autocert.DirCache(dir)
		return wl
	}})
	return e, wl
}

// queuedOnKey reports whether a write of key waits for its key's lock in
// m's Cache wrapper while the test holds it.
func queuedOnKey(m *Manager, key string) bool {
	m.cache.writersMu.Lock()
	defer m.cache.writersMu.Unlock()
	w := m.cache.writers[key]
	return w != nil && w.users >= 2
}

// TestNoStateWriteAfterClose: autocert's detached withdrawal of an
// order's authorizations reads an authorization after the attempt's
// finalization was held, and its answer settles the order's reservation,
// a state write. That write is held (on its key's lock) until Close
// returned: then it must not reach the Cache, where a restarted process
// may have written its own state meanwhile.
func TestNoStateWriteAfterClose(t *testing.T) {
	t.Parallel()
	const name = "closestate.test"
	e, wl := newWriteLogEnv(t, name)
	m := e.start(t, nil)
	if err := m.Provision(context.Background(), name); err != nil {
		t.Fatal(err)
	}
	waitDetached(t) // the first attempt's clean-up ends before the Close

	// An RSA certificate: the order reuses the valid authorization, so it
	// is ready at once and only autocert's detached read of it settles
	// its reservation. Its new-order request is held until the state's key
	// is held (the reservation is written before the order goes out), and
	// its finalization until the Close.
	e.Proxy.AddRule(certmgrtest.Rule{Class: certmgrtest.ClassNewOrder, Identifier: name, Hold: true, Times: 1})
	e.Proxy.AddRule(certmgrtest.Rule{Class: certmgrtest.ClassFinalize, Identifier: name, Hold: true})
	orders := e.Proxy.Requests(certmgrtest.ClassNewOrder)
	got := make(chan error, 1)
	go func() {
		_, err := m.GetCertificate(syntheticHello(certKey{domain: name, rsa: true}))
		got <- err
	}()
	waitFor(t, 15*time.Second, "the RSA order to be held", func() bool {
		return e.Proxy.Requests(certmgrtest.ClassNewOrder) > orders
	})
	unlock := m.cache.lockKey(stateKey)
	locked := true
	defer func() {
		if locked {
			unlock()
		}
	}()
	e.Proxy.Release()
	waitFor(t, 15*time.Second, "the settled reservation's state write to wait for its key", func() bool {
		return queuedOnKey(m, stateKey)
	})

	closeWithin(t, m, 10*time.Second)
	wl.closed.Store(true)
	locked = false
	unlock()
	waitDetached(t) // the held write went on, or was refused
	if err := <-got; err != nil {
		t.Errorf("GetCertificate = %v, want the fallback", err)
	}
	if late := wl.lateWrites(); len(late) > 0 {
		t.Errorf("writes to the Cache after Close returned: %s", strings.Join(late, ", "))
	}
}

// TestNoTokenDeleteAfterClose: an attempt's challenge acceptance is held
// when Close cuts it; autocert then deletes the challenge's token in a
// goroutine of its own, held (on the token's key lock) until Close
// returned: the delete must not reach the Cache.
func TestNoTokenDeleteAfterClose(t *testing.T) {
	t.Parallel()
	const name = "closetoken.test"
	e, wl := newWriteLogEnv(t, name)
	m := e.start(t, nil)
	e.Proxy.AddRule(certmgrtest.Rule{Class: certmgrtest.ClassChallenge, Identifier: name, Hold: true})
	done := make(chan error, 1)
	go func() { done <- m.Provision(context.Background(), name) }()
	waitFor(t, 15*time.Second, "the challenge's acceptance to be held", func() bool {
		return e.Proxy.Requests(certmgrtest.ClassChallenge) > 0
	})
	token := name + "+token"
	if _, err := wl.Get(context.Background(), token); err != nil {
		t.Fatalf("the token is not in the Cache: %v", err)
	}
	unlock := m.cache.lockKey(token)
	locked := true
	defer func() {
		if locked {
			unlock()
		}
	}()

	closeWithin(t, m, 10*time.Second)
	wl.closed.Store(true)
	if err := <-done; err == nil {
		t.Error("Provision succeeded, want Close's error")
	}
	waitFor(t, 10*time.Second, "autocert's delete of the token to wait for its key", func() bool {
		return queuedOnKey(m, token)
	})
	locked = false
	unlock()
	waitDetached(t)
	if late := wl.lateWrites(); len(late) > 0 {
		t.Errorf("writes to the Cache after Close returned: %s", strings.Join(late, ", "))
	}
}

// TestCertCacheSealWaitsForWritesInFlight: seal, the end of Close, waits
// for a write that is in the Cache already, and refuses every later one:
// a Put with an error wrapping errClosed, neither kept nor told to the
// Manager, a token's Put and a Delete with no error.
func TestCertCacheSealWaitsForWritesInFlight(t *testing.T) {
	inner := &scriptedCache{m: map[string][]byte{}, writing: make(chan []byte, 4), release: make(chan struct{})}
	reports := &testsupport.Buffer{}
	c := newCertCache(inner, &reportingOwner{w: reports})
	ctx := context.Background()
	if err := c.Put(ctx, "a.test+token", []byte("token")); err != nil {
		t.Fatal(err)
	}
	<-inner.writing
	inner.blockNext.Store(true)
	put := make(chan error, 1)
	go func() { put <- c.Put(ctx, stateKey, []byte("before")) }()
	<-inner.writing // in the Cache, until release
	sealed := make(chan struct{})
	go func() { c.seal(); close(sealed) }()
	waitFor(t, 10*time.Second, "seal to begin", func() bool {
		c.sealMu.Lock()
		defer c.sealMu.Unlock()
		return c.sealed
	})
	select {
	case <-sealed:
		t.Fatal("seal returned while a write was in the Cache")
	default:
	}
	close(inner.release)
	<-sealed
	if err := <-put; err != nil {
		t.Fatalf("the write in flight: %v", err)
	}

	for _, key := range []string{"a.test", stateKey, accountKeyName} {
		if err := c.Put(ctx, key, []byte("after")); !errors.Is(err, errClosed) {
			t.Errorf("Put(%s) after seal = %v, want an error wrapping errClosed", key, err)
		}
	}
	for _, key := range []string{"a.test+token", "tok+http-01"} {
		if err := c.Put(ctx, key, []byte("after")); err != nil {
			t.Errorf("Put(%s) after seal = %v, want it dropped", key, err)
		}
	}
	if err := c.Delete(ctx, "a.test+token"); err != nil {
		t.Errorf("Delete after seal = %v, want it dropped", err)
	}
	if n := len(inner.writing); n > 0 {
		t.Errorf("%d Put(s) reached the Cache after seal", n)
	}
	if got, _ := inner.Get(ctx, stateKey); string(got) != "before" {
		t.Errorf("the Cache holds state %q, want the write before seal", got)
	}
	if got, _ := inner.Get(ctx, "a.test+token"); string(got) != "token" {
		t.Errorf("the Cache holds token %q, want it undeleted", got)
	}
	if _, err := c.Get(ctx, "a.test"); !errors.Is(err, autocert.ErrCacheMiss) {
		t.Errorf("Get(a.test) = %v, want a miss: a refused write is not kept", err)
	}
	if r := reports.String(); r != "" {
		t.Errorf("reported %q, want nothing", r)
	}
}

// TestNoRecordWriteAfterClose: with a Coordinator, a closed Manager
// updates no failure record in the store and writes no account key.
func TestNoRecordWriteAfterClose(t *testing.T) {
	t.Parallel()
	const name = "record.test"
	replica := certmgrtest.NewMemoryStore().Open()
	m := newPureManager(t, nil, func(c *Config) { c.Autocert.Cache = replica })
	fail := func(r *failureRecord) error { r.Failures++; r.NextAttempt = time.Now().Add(time.Hour); return nil }
	ctx := context.Background()
	if err := m.updateRecord(ctx, name, "", nil, nil, fail); err != nil {
		t.Fatal(err)
	}
	_, rev, err := replica.GetRevision(ctx, recordPrefix+name)
	if err != nil {
		t.Fatal(err)
	}
	m.Close()
	if err := m.updateRecord(ctx, name, "", nil, nil, fail); !errors.Is(err, errClosed) {
		t.Errorf("updateRecord after Close = %v, want an error wrapping errClosed", err)
	}
	m.storeRecord(name, "", nil, nil, func(r *failureRecord) { r.Failures++ })
	if _, err := m.storeAccountKey(ctx, []byte("key")); !errors.Is(err, errClosed) {
		t.Errorf("storeAccountKey after Close = %v, want an error wrapping errClosed", err)
	}
	if _, now, err := replica.GetRevision(ctx, recordPrefix+name); err != nil || now != rev {
		t.Errorf("the record's revision is %d (%v), want %d: written after Close", now, err, rev)
	}
	if _, err := replica.Get(ctx, accountKeyName); !errors.Is(err, autocert.ErrCacheMiss) {
		t.Errorf("the account key: %v, want none written after Close", err)
	}
}
