package certmgrtest

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/crypto/acme/autocert"
)

// Coordinator is certmgr.Coordinator, declared here with the same methods
// so that this package need not import certmgr: any type that implements
// one implements the other. See certmgr.Coordinator for the contract that
// CoordinatorConformance checks.
type Coordinator interface {
	// Lock blocks until this process holds the lock name, or ctx ends.
	// The lock lasts until unlock is called or the store loses this
	// process: then lost is closed, at the latest when another process
	// can take the lock. unlock releases the lock, closes lost, and may
	// be called more than once.
	Lock(ctx context.Context, name string) (lost <-chan struct{}, unlock func(), err error)

	// GetRevision returns key's value and revision. A missing key is
	// autocert.ErrCacheMiss with revision 0.
	GetRevision(ctx context.Context, key string) (value []byte, rev int64, err error)

	// PutIf writes value under key if key's revision is still rev (0: the
	// key is absent) and, if fence is not empty, only while this process
	// holds the lock named fence. It returns the new revision and true,
	// or false with no error when a condition failed.
	PutIf(ctx context.Context, key string, value []byte, rev int64, fence string) (newRev int64, ok bool, err error)

	// Watch calls f for every value written under a key that starts with
	// prefix, in the order written, until ctx ends; a deleted key is
	// reported with a nil value. It returns once it watches.
	Watch(ctx context.Context, prefix string, f func(key string, value []byte)) error
}

// Bounds of CoordinatorConformance.
const (
	// conformanceTakeover is how long after lose another replica must
	// hold the lock that the lost one held.
	conformanceTakeover = 30 * time.Second
	// conformanceWait bounds every other wait for a condition: a Lock
	// that should succeed, a watch event, a goroutine's end.
	conformanceWait = 10 * time.Second
	// conformanceRefused is the timeout of a Lock that must fail because
	// another holder has the lock.
	conformanceRefused = 300 * time.Millisecond
)

// CoordinatorConformance checks that the replicas that open returns
// coordinate through one store as certmgr.Coordinator says. It fails tb
// at the first violation, with tb.Fatal from the goroutine that called
// it, and logs what it measured when tb has a method Logf (as
// testing.TB has).
//
// Every call of open returns a new replica's handle on one shared store,
// with its own lease (an etcd session, for example): the handles stand
// for different processes. The caller releases them, for example in
// tb's cleanup; the suite unlocks every lock it took. lose simulates the
// loss of the replica c that open returned: a crash or a partition, in
// which its lease ends without an unlock. After lose, c's methods may
// fail, but c's Lock's lost channels must close, and another replica
// must get c's locks within 30 seconds (backends under test should use
// short leases, about 2 seconds, to keep the suite fast). The suite calls
// open four times and lose once.
//
// The checks, on keys and lock names that start with a random prefix, so
// that the suite may run again on the same store:
//   - GetRevision of a missing key: autocert.ErrCacheMiss and revision 0.
//   - PutIf creates a key only at revision 0, updates it only at its
//     current revision, and otherwise reports false with no error; the
//     revision it returns is the one GetRevision returns and the one the
//     next PutIf must give.
//   - No lost update: 2 replicas × 10 goroutines increment a counter
//     5 times each by GetRevision and PutIf, retrying on false; the
//     counter ends at 100 and the 100 successful PutIfs returned 100
//     different revisions.
//   - Lock excludes: a Lock of a held name, on another replica or on the
//     same one, waits, and with a short ctx fails with ctx's error; the
//     lock outlives the ctx of the Lock that took it; unlock closes lost
//     at once, may be called again, and lets a waiter in; a waiter that
//     gave up leaves nothing behind that blocks the next Lock; 2 replicas
//     × 4 goroutines taking one lock 3 times each are never inside
//     together.
//   - Fencing: PutIf with fence succeeds while this replica holds the
//     lock fence, and reports false on another replica, after unlock,
//     for a lock never taken, and after lose.
//   - Loss: after lose, lost is closed by the time another replica gets
//     the lock, which happens within 30 s; the new holder's fenced PutIf
//     succeeds.
//   - Watch reports the writes of another replica under its prefix, in
//     order and nothing else (not writes outside the prefix, not locks);
//     if the replicas also implement autocert.Cache, its Put and Delete
//     are seen by Watch (a delete as a nil value) and by GetRevision, and
//     PutIf's values by Get; after Watch's ctx ends, f is not called for
//     later writes.
func CoordinatorConformance(tb TB, open func() Coordinator, lose func(Coordinator)) {
	tb.Helper()
	s := &conformance{tb: tb, base: fmt.Sprintf("certmgrtest-%016x/", rand.Uint64())}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	a, b := open(), open()
	s.missing(ctx, a)
	s.revisions(ctx, a, b)
	s.noLostUpdate(ctx, a, b)
	s.lockExcludes(ctx, a, b)
	s.lockConcurrent(ctx, a, b)
	s.fencing(ctx, a, b)
	s.watch(ctx, a, b)
	s.loss(ctx, open(), open(), lose)
}

// conformance is one run of CoordinatorConformance.
type conformance struct {
	tb   TB
	base string // prefix of every key and lock name of this run
}

func (s *conformance) fatalf(format string, args ...any) {
	s.tb.Helper()
	s.tb.Fatal("certmgrtest: Coordinator conformance: " + fmt.Sprintf(format, args...))
}

func (s *conformance) logf(format string, args ...any) {
	s.tb.Helper()
	if l, ok := s.tb.(interface{ Logf(string, ...any) }); ok {
		l.Logf("certmgrtest: Coordinator conformance: "+format, args...)
	}
}

// waitFor polls cond until it holds, failing after d.
func (s *conformance) waitFor(d time.Duration, what string, cond func() bool) {
	s.tb.Helper()
	deadline := time.Now().Add(d)
	for pause := time.Millisecond; !cond(); pause = min(2*pause, 50*time.Millisecond) {
		if time.Now().After(deadline) {
			s.fatalf("%s: not within %v", what, d)
		}
		time.Sleep(pause)
	}
}

func isClosed(ch <-chan struct{}) bool {
	select {
	case <-ch:
		return true
	default:
		return false
	}
}

func (s *conformance) get(ctx context.Context, c Coordinator, key string) ([]byte, int64) {
	s.tb.Helper()
	v, rev, err := c.GetRevision(ctx, key)
	if err != nil {
		s.fatalf("GetRevision(%q): %v", key, err)
	}
	if rev <= 0 {
		s.fatalf("GetRevision(%q) = revision %d, want > 0", key, rev)
	}
	return v, rev
}

// putIf calls PutIf and fails unless ok is wantOK and there is no error.
func (s *conformance) putIf(ctx context.Context, c Coordinator, key, value string, rev int64, fence string, wantOK bool) int64 {
	s.tb.Helper()
	newRev, ok, err := c.PutIf(ctx, key, []byte(value), rev, fence)
	if err != nil {
		s.fatalf("PutIf(%q, %q, rev %d, fence %q): %v", key, value, rev, fence, err)
	}
	if ok != wantOK {
		s.fatalf("PutIf(%q, %q, rev %d, fence %q) = %v, want %v", key, value, rev, fence, ok, wantOK)
	}
	if ok && newRev <= 0 {
		s.fatalf("PutIf(%q, %q, rev %d, fence %q) = revision %d, want > 0", key, value, rev, fence, newRev)
	}
	return newRev
}

func (s *conformance) wantValue(ctx context.Context, c Coordinator, key, value string, rev int64) {
	s.tb.Helper()
	v, r := s.get(ctx, c, key)
	if string(v) != value || r != rev {
		s.fatalf("GetRevision(%q) = %q, rev %d; want %q, rev %d", key, v, r, value, rev)
	}
}

func (s *conformance) lock(ctx context.Context, c Coordinator, name string) (<-chan struct{}, func()) {
	s.tb.Helper()
	ctx, cancel := context.WithTimeout(ctx, conformanceWait)
	defer cancel()
	lost, unlock, err := c.Lock(ctx, name)
	if err != nil {
		s.fatalf("Lock(%q): %v", name, err)
	}
	if lost == nil || unlock == nil {
		s.fatalf("Lock(%q) returned a nil lost channel or unlock function", name)
	}
	s.tb.Cleanup(unlock)
	if isClosed(lost) {
		s.fatalf("Lock(%q): lost is closed at once", name)
	}
	return lost, unlock
}

// refused checks that Lock(name) on c fails with ctx's error while
// another holds name.
func (s *conformance) refused(ctx context.Context, c Coordinator, name, who string) {
	s.tb.Helper()
	ctx, cancel := context.WithTimeout(ctx, conformanceRefused)
	defer cancel()
	_, unlock, err := c.Lock(ctx, name)
	if err == nil {
		unlock()
		s.fatalf("Lock(%q) on %s succeeded while another holds it", name, who)
	}
	if !errors.Is(err, context.DeadlineExceeded) {
		s.fatalf("Lock(%q) on %s, with a ctx that ends: %v, want an error that is context.DeadlineExceeded", name, who, err)
	}
}

func (s *conformance) missing(ctx context.Context, a Coordinator) {
	s.tb.Helper()
	key := s.base + "missing"
	v, rev, err := a.GetRevision(ctx, key)
	if !errors.Is(err, autocert.ErrCacheMiss) || rev != 0 || v != nil {
		s.fatalf("GetRevision of a missing key = %q, %d, %v; want nil, 0, autocert.ErrCacheMiss", v, rev, err)
	}
}

func (s *conformance) revisions(ctx context.Context, a, b Coordinator) {
	s.tb.Helper()
	key := s.base + "putif"
	s.putIf(ctx, a, key, "v0", 1, "", false) // absent, rev not 0
	if _, _, err := a.GetRevision(ctx, key); !errors.Is(err, autocert.ErrCacheMiss) {
		s.fatalf("after a failed PutIf, GetRevision = %v, want autocert.ErrCacheMiss", err)
	}
	r1 := s.putIf(ctx, a, key, "v1", 0, "", true)
	s.wantValue(ctx, a, key, "v1", r1)
	s.wantValue(ctx, b, key, "v1", r1)
	s.putIf(ctx, b, key, "x", 0, "", false) // exists
	s.putIf(ctx, b, key, "x", r1+1000, "", false)
	r2 := s.putIf(ctx, b, key, "v2", r1, "", true)
	if r2 == r1 {
		s.fatalf("an update returned the revision it replaced, %d", r1)
	}
	s.putIf(ctx, a, key, "x", r1, "", false) // stale
	s.wantValue(ctx, a, key, "v2", r2)
	r3 := s.putIf(ctx, a, key, "v3", r2, "", true)
	s.wantValue(ctx, b, key, "v3", r3)
}

func (s *conformance) noLostUpdate(ctx context.Context, a, b Coordinator) {
	s.tb.Helper()
	const goroutines, increments = 10, 5
	key := s.base + "counter"
	var (
		wg       sync.WaitGroup
		errMu    sync.Mutex // guards firstErr and revs
		firstErr error
		revs     []int64
	)
	fail := func(err error) {
		errMu.Lock()
		defer errMu.Unlock()
		if firstErr == nil {
			firstErr = err
		}
	}
	deadline := time.Now().Add(conformanceTakeover)
	increment := func(c Coordinator) error {
		for time.Now().Before(deadline) {
			v, rev, err := c.GetRevision(ctx, key)
			n := 0
			switch {
			case errors.Is(err, autocert.ErrCacheMiss):
				if rev != 0 {
					return fmt.Errorf("GetRevision of a missing key: revision %d", rev)
				}
			case err != nil:
				return fmt.Errorf("GetRevision: %v", err)
			default:
				if n, err = strconv.Atoi(string(v)); err != nil {
					return fmt.Errorf("GetRevision: value %q: %v", v, err)
				}
			}
			newRev, ok, err := c.PutIf(ctx, key, []byte(strconv.Itoa(n+1)), rev, "")
			if err != nil {
				return fmt.Errorf("PutIf: %v", err)
			}
			if ok {
				errMu.Lock()
				revs = append(revs, newRev)
				errMu.Unlock()
				return nil
			}
		}
		return fmt.Errorf("no increment within %v", conformanceTakeover)
	}
	for _, c := range []Coordinator{a, b} {
		for range goroutines {
			wg.Go(func() {
				for range increments {
					if err := increment(c); err != nil {
						fail(err)
						return
					}
				}
			})
		}
	}
	wg.Wait()
	if firstErr != nil {
		s.fatalf("concurrent increments: %v", firstErr)
	}
	want := 2 * goroutines * increments
	v, _ := s.get(ctx, a, key)
	if string(v) != strconv.Itoa(want) {
		s.fatalf("after %d concurrent increments by GetRevision and PutIf the counter is %q: lost updates", want, v)
	}
	slices.Sort(revs)
	if len(slices.Compact(revs)) != want {
		s.fatalf("%d successful PutIfs returned only %d different revisions", want, len(revs))
	}
}

func (s *conformance) lockExcludes(ctx context.Context, a, b Coordinator) {
	s.tb.Helper()
	name := s.base + "lock"

	// The lock outlives the ctx of the Lock that took it.
	lctx, lcancel := context.WithCancel(ctx)
	lostA, unlockA := s.lock(lctx, a, name)
	lcancel()
	s.refused(ctx, b, name, "another replica")
	s.refused(ctx, a, name, "the same replica")
	if isClosed(lostA) {
		s.fatalf("lost is closed while the lock is held")
	}

	// A waiter on b gets in after the unlock.
	type result struct {
		lost   <-chan struct{}
		unlock func()
		err    error
	}
	got := make(chan result, 1)
	wctx, wcancel := context.WithTimeout(ctx, conformanceWait)
	defer wcancel()
	go func() {
		lost, unlock, err := b.Lock(wctx, name)
		got <- result{lost, unlock, err}
	}()
	select {
	case r := <-got:
		if r.err == nil {
			r.unlock()
		}
		s.fatalf("Lock(%q) on another replica returned while the lock is held (err %v)", name, r.err)
	default:
	}
	unlockA()
	if !isClosed(lostA) {
		s.fatalf("unlock did not close lost")
	}
	unlockA() // again: no effect
	var r result
	select {
	case r = <-got:
	case <-time.After(conformanceWait):
		s.fatalf("a waiting Lock(%q) did not get the lock within %v of its unlock", name, conformanceWait)
	}
	if r.err != nil {
		s.fatalf("a waiting Lock(%q): %v", name, r.err)
	}
	s.tb.Cleanup(r.unlock)
	if isClosed(r.lost) {
		s.fatalf("lost is closed at once")
	}

	// A waiter that gave up leaves nothing that blocks the next Lock:
	// b holds, a gives up, b unlocks, b (then a) must get it.
	s.refused(ctx, a, name, "another replica")
	r.unlock()
	if !isClosed(r.lost) {
		s.fatalf("unlock did not close lost")
	}
	_, unlock := s.lock(ctx, b, name)
	unlock()
	_, unlock = s.lock(ctx, a, name)
	unlock()
}

func (s *conformance) lockConcurrent(ctx context.Context, a, b Coordinator) {
	s.tb.Helper()
	const goroutines, rounds = 4, 3
	name := s.base + "mutex"
	var (
		inside, most atomic.Int32
		wg           sync.WaitGroup
		errMu        sync.Mutex // guards firstErr
		firstErr     error
	)
	for _, c := range []Coordinator{a, b} {
		for range goroutines {
			wg.Go(func() {
				for range rounds {
					lctx, cancel := context.WithTimeout(ctx, conformanceTakeover)
					lost, unlock, err := c.Lock(lctx, name)
					cancel()
					if err != nil {
						errMu.Lock()
						firstErr = firstOf(firstErr, err)
						errMu.Unlock()
						return
					}
					n := inside.Add(1)
					for m := most.Load(); n > m && !most.CompareAndSwap(m, n); m = most.Load() {
					}
					// Give another holder time to come in: a store
					// round trip.
					c.GetRevision(ctx, s.base+"missing")
					if isClosed(lost) {
						errMu.Lock()
						firstErr = firstOf(firstErr, errors.New("lost closed while held"))
						errMu.Unlock()
					}
					inside.Add(-1)
					unlock()
				}
			})
		}
	}
	wg.Wait()
	if firstErr != nil {
		s.fatalf("concurrent Locks of %q: %v", name, firstErr)
	}
	if m := most.Load(); m != 1 {
		s.fatalf("concurrent Locks of %q: %d holders at once", name, m)
	}
}

// firstOf returns the first non-nil of its arguments.
func firstOf(err1, err2 error) error {
	if err1 != nil {
		return err1
	}
	return err2
}

func (s *conformance) fencing(ctx context.Context, a, b Coordinator) {
	s.tb.Helper()
	name := s.base + "fence"
	key := s.base + "fenced"
	s.putIf(ctx, a, key, "x", 0, s.base+"never-locked", false)
	_, unlock := s.lock(ctx, a, name)
	r1 := s.putIf(ctx, a, key, "v1", 0, name, true)
	s.putIf(ctx, b, key, "x", r1, name, false) // b does not hold it
	r2 := s.putIf(ctx, a, key, "v2", r1, name, true)
	unlock()
	s.putIf(ctx, a, key, "x", r2, name, false) // after unlock
	s.wantValue(ctx, b, key, "v2", r2)
	r3 := s.putIf(ctx, a, key, "v3", r2, "", true) // only the fence failed
	_, unlock = s.lock(ctx, b, name)
	s.putIf(ctx, b, key, "v4", r3, name, true)
	unlock()
}

// event is a call of Watch's f.
type event struct {
	key   string
	value string
	isNil bool
}

func (e event) String() string {
	if e.isNil {
		return e.key + "=<nil>"
	}
	return fmt.Sprintf("%s=%q", e.key, e.value)
}

// watcher records the calls of a Watch's f.
type watcher struct {
	mu     sync.Mutex // guards events, active
	events []event
	active int // calls of f running; more than 1 is a violation
	concur bool
}

func (w *watcher) f(key string, value []byte) {
	w.mu.Lock()
	w.active++
	if w.active > 1 {
		w.concur = true
	}
	w.events = append(w.events, event{key, string(value), value == nil})
	w.active--
	w.mu.Unlock()
}

func (w *watcher) snapshot() ([]event, bool) {
	w.mu.Lock()
	defer w.mu.Unlock()
	return slices.Clone(w.events), w.concur
}

// until waits for an event of key and returns all events so far.
func (s *conformance) until(w *watcher, key string) []event {
	s.tb.Helper()
	var evs []event
	s.waitFor(conformanceWait, "Watch reporting "+key, func() bool {
		evs, _ = w.snapshot()
		return slices.ContainsFunc(evs, func(e event) bool { return e.key == key })
	})
	return evs
}

func (s *conformance) watch(ctx context.Context, a, b Coordinator) {
	s.tb.Helper()
	prefix := s.base + "w/"
	wctx, wcancel := context.WithCancel(ctx)
	defer wcancel()
	var w watcher
	if err := a.Watch(wctx, prefix, w.f); err != nil {
		s.fatalf("Watch(%q): %v", prefix, err)
	}
	k1, k2, end := prefix+"1", prefix+"2", prefix+"end"
	r1 := s.putIf(ctx, b, k1, "a", 0, "", true)
	s.putIf(ctx, b, s.base+"outside", "o", 0, "", true)
	s.putIf(ctx, b, prefix[:len(prefix)-1], "o", 0, "", true) // the prefix without its slash
	s.putIf(ctx, b, k1, "b", r1, "", true)
	s.putIf(ctx, b, k2, "c", 0, "", true)
	s.putIf(ctx, b, k1, "x", r1, "", false) // not written: not reported
	_, unlock := s.lock(ctx, b, prefix+"lock")
	unlock()
	want := []event{{k1, "a", false}, {k1, "b", false}, {k2, "c", false}, {end, "e", false}}

	cb, bIsCache := b.(autocert.Cache)
	ca, aIsCache := a.(autocert.Cache)
	if aIsCache && bIsCache {
		k3 := prefix + "3"
		if err := cb.Put(ctx, k3, []byte("d")); err != nil {
			s.fatalf("Cache.Put(%q): %v", k3, err)
		}
		if err := cb.Delete(ctx, k1); err != nil {
			s.fatalf("Cache.Delete(%q): %v", k1, err)
		}
		if err := cb.Delete(ctx, prefix+"never-written"); err != nil {
			s.fatalf("Cache.Delete of a missing key: %v", err)
		}
		want = slices.Insert(want, 3, event{k3, "d", false}, event{k1, "", true})
		v, rev := s.get(ctx, a, k3)
		if string(v) != "d" {
			s.fatalf("GetRevision(%q) after Cache.Put = %q, want %q", k3, v, "d")
		}
		s.putIf(ctx, a, k3, "d2", rev, "", true)
		want = slices.Insert(want, 5, event{k3, "d2", false})
		if v, err := ca.Get(ctx, k3); err != nil || string(v) != "d2" {
			s.fatalf("Cache.Get(%q) after PutIf = %q, %v; want %q", k3, v, err, "d2")
		}
		if _, rev, err := a.GetRevision(ctx, k1); !errors.Is(err, autocert.ErrCacheMiss) || rev != 0 {
			s.fatalf("GetRevision(%q) after Cache.Delete = rev %d, %v; want 0, autocert.ErrCacheMiss", k1, rev, err)
		}
		r := s.putIf(ctx, a, k1, "again", 0, "", true) // a deleted key is absent
		want = slices.Insert(want, 6, event{k1, "again", false})
		s.wantValue(ctx, b, k1, "again", r)
	} else {
		s.logf("the Coordinator is not an autocert.Cache: Put and Delete not checked")
	}
	s.putIf(ctx, b, end, "e", 0, "", true)
	evs := s.until(&w, end)
	if !slices.Equal(evs, want) {
		s.fatalf("Watch(%q) reported\n\t%v\nwant\n\t%v", prefix, evs, want)
	}
	if _, concur := w.snapshot(); concur {
		s.fatalf("Watch called f concurrently")
	}

	// After the ctx ends, f is not called again. A second watch tells
	// when the store has reported a later write.
	wcancel()
	var w2 watcher
	w2ctx, w2cancel := context.WithCancel(ctx)
	defer w2cancel()
	if err := a.Watch(w2ctx, prefix, w2.f); err != nil {
		s.fatalf("Watch(%q): %v", prefix, err)
	}
	after := prefix + "after"
	s.putIf(ctx, b, after, "z", 0, "", true)
	s.until(&w2, after)
	if evs, _ := w.snapshot(); len(evs) != len(want) {
		s.fatalf("Watch called f after its ctx ended: %v", evs[len(want):])
	}
}

func (s *conformance) loss(ctx context.Context, c, d Coordinator, lose func(Coordinator)) {
	s.tb.Helper()
	name := s.base + "loss"
	key := s.base + "loss-record"
	lost, _ := s.lock(ctx, c, name)
	rev := s.putIf(ctx, c, key, "c", 0, name, true)
	s.refused(ctx, d, name, "another replica")

	type result struct {
		lostClosed bool
		unlock     func()
		err        error
	}
	got := make(chan result, 1)
	lctx, lcancel := context.WithTimeout(ctx, conformanceTakeover)
	defer lcancel()
	go func() {
		_, unlock, err := d.Lock(lctx, name)
		got <- result{isClosed(lost), unlock, err}
	}()
	start := time.Now()
	lose(c)
	s.waitFor(conformanceTakeover, "lost closed after lose", func() bool { return isClosed(lost) })
	s.logf("lost closed %v after lose", time.Since(start).Round(time.Millisecond))
	if _, ok, _ := c.PutIf(ctx, key, []byte("x"), rev, name); ok {
		s.fatalf("a fenced PutIf succeeded after lose")
	}
	r := <-got
	if r.err != nil {
		s.fatalf("Lock(%q) after the holder was lost: %v", name, r.err)
	}
	s.tb.Cleanup(r.unlock)
	s.logf("another replica got the lock %v after lose", time.Since(start).Round(time.Millisecond))
	if !r.lostClosed {
		s.fatalf("another replica got the lock before the lost replica's lost was closed")
	}
	s.wantValue(ctx, d, key, "c", rev)
	s.putIf(ctx, d, key, "d", rev, name, true)
	r.unlock()
}
