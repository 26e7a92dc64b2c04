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
// CoordinatorConformance checks; in short:
type Coordinator interface {
	// Lock blocks until this process holds the lock name, or ctx ends. A
	// second Lock of the name in the same process waits for the first's
	// unlock. fence is a token of this hold alone; lost is closed when
	// the hold ends, by unlock or when this process counts its lease as
	// lost, within the lease's TTL of the last renewal it saw; unlock
	// returns at once, and may be called more than once.
	Lock(ctx context.Context, name string) (fence string, lost <-chan struct{}, unlock func(), err error)

	// GetRevision returns key's value and revision. A missing key is
	// autocert.ErrCacheMiss with revision 0.
	GetRevision(ctx context.Context, key string) (value []byte, rev int64, err error)

	// PutIf writes value under key if key's revision is still rev (0: the
	// key is absent) and, if fence is not empty, only while the hold that
	// fence names is current. It returns the new revision and true, or
	// false with no error when a condition failed.
	PutIf(ctx context.Context, key string, value []byte, rev int64, fence string) (newRev int64, ok bool, err error)

	// DeleteIf deletes key if its revision is still rev, which must be
	// greater than 0 (a missing key is never deleted), and, with fence,
	// only while fence's hold is current. It reports whether it deleted
	// key.
	DeleteIf(ctx context.Context, key string, rev int64, fence string) (ok bool, err error)

	// Watch calls f for every write (delete: a nil value) of a key that
	// starts with prefix with a revision greater than fromRev (0: the
	// current one), in order, with the write's revision, until ctx ends.
	// If those writes can no longer be replayed, it reports the current
	// value and revision of every key under prefix written after
	// fromRev instead. It returns once it watches.
	Watch(ctx context.Context, prefix string, fromRev int64, f func(key string, value []byte, rev int64)) error
}

// Bounds of CoordinatorConformance.
const (
	// conformanceTakeover is how long after lose another replica must
	// hold the lock that the lost one held, and how long after that the
	// lost one must take it again.
	conformanceTakeover = 30 * time.Second
	// conformanceWait bounds every other wait for a condition: a Lock
	// that should succeed, a watch event, a goroutine's end, a call to a
	// replica that was lost.
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
// loss of the replica c that open returned: a partition (or a pause)
// that outlasts its lease, which ends without an unlock. After lose, c's
// methods may fail, but c's Lock's lost channels must close, and another
// replica must get c's locks, within 30 seconds (backends under test
// should use short leases, about 2 seconds, to keep the suite fast).
// Then c must work again, as a replica does once its partition heals,
// and get its lock again within 30 seconds. The suite calls open four
// times and lose once.
//
// The checks, on keys and lock names that start with a random prefix, so
// that the suite may run again on the same store:
//   - GetRevision of a missing key: autocert.ErrCacheMiss and revision 0.
//   - PutIf creates a key only at revision 0, updates it only at its
//     current revision, and otherwise reports false with no error; the
//     revision it returns is the one GetRevision returns and the one the
//     next PutIf must give, and greater than the one before.
//   - DeleteIf deletes a key only at its current revision, never a
//     missing key (at revision 0 or any other), and otherwise reports
//     false with no error; the key is then missing, and PutIf at
//     revision 0 creates it again.
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
//     together. Every hold's fence is non-empty, and differs from that
//     of every other hold in the run.
//   - Fencing: PutIf and DeleteIf with a fence succeed while its hold is
//     current, and report false on another replica, after unlock, for a
//     fence never returned, and with the fence of an earlier hold after
//     the same replica locked the same name again.
//   - Loss: after lose, lost is closed by the time another replica gets
//     the lock, which happens within 30 s, and the lost hold's fence
//     does not write; the new holder's fenced PutIf succeeds; once the
//     lost replica holds the name again, the lost hold's fence still
//     does not write and the new one's does.
//   - Watch from revision 0 reports the writes of another replica under
//     its prefix made after its call, in order, each with its revision
//     (that PutIf returned), and nothing else (not earlier writes, not
//     writes outside the prefix, not failed writes, not locks); a
//     DeleteIf is reported as a nil value. If the replicas also
//     implement autocert.Cache, its Put and Delete are seen by Watch and
//     by GetRevision, and PutIf's values by Get. Watch from a revision
//     that GetRevision returned reports exactly the writes after it, and
//     then the writes after its call. After Watch's ctx ends, f is not
//     called for later writes.
func CoordinatorConformance(tb TB, open func() Coordinator, lose func(Coordinator)) {
	tb.Helper()
	s := &conformance{
		tb:     tb,
		base:   fmt.Sprintf("certmgrtest-%016x/", rand.Uint64()),
		fences: make(map[string]string),
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	a, b := open(), open()
	s.missing(ctx, a)
	s.revisions(ctx, a, b)
	s.deletes(ctx, a, b)
	s.noLostUpdate(ctx, a, b)
	s.lockExcludes(ctx, a, b)
	s.lockConcurrent(ctx, a, b)
	s.fencing(ctx, a, b)
	s.watch(ctx, a, b)
	s.watchFrom(ctx, a, b)
	s.loss(ctx, open(), open(), lose)
}

// conformance is one run of CoordinatorConformance.
type conformance struct {
	tb   TB
	base string // prefix of every key and lock name of this run
	step string // what is being checked, for failures

	mu     sync.Mutex        // guards fences
	fences map[string]string // every fence Lock returned, to its lock's name
}

func (s *conformance) fatalf(format string, args ...any) {
	s.tb.Helper()
	s.tb.Fatal("certmgrtest: Coordinator conformance: " + s.step + ": " + fmt.Sprintf(format, args...))
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

// newFence records the fence of a hold of the lock name, and reports an
// error if it is empty or that of another hold.
func (s *conformance) newFence(fence, name string) error {
	if fence == "" {
		return fmt.Errorf("Lock(%q) returned an empty fence", name)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if prev, ok := s.fences[fence]; ok {
		return fmt.Errorf("Lock(%q) returned fence %q, that of an earlier hold (of %q)", name, fence, prev)
	}
	s.fences[fence] = name
	return nil
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

// deleteIf calls DeleteIf and fails unless ok is wantOK and there is no
// error.
func (s *conformance) deleteIf(ctx context.Context, c Coordinator, key string, rev int64, fence string, wantOK bool) {
	s.tb.Helper()
	ok, err := c.DeleteIf(ctx, key, rev, fence)
	if err != nil {
		s.fatalf("DeleteIf(%q, rev %d, fence %q): %v", key, rev, fence, err)
	}
	if ok != wantOK {
		s.fatalf("DeleteIf(%q, rev %d, fence %q) = %v, want %v", key, rev, fence, ok, wantOK)
	}
}

func (s *conformance) wantValue(ctx context.Context, c Coordinator, key, value string, rev int64) {
	s.tb.Helper()
	v, r := s.get(ctx, c, key)
	if string(v) != value || r != rev {
		s.fatalf("GetRevision(%q) = %q, rev %d; want %q, rev %d", key, v, r, value, rev)
	}
}

func (s *conformance) wantMissing(ctx context.Context, c Coordinator, key string) {
	s.tb.Helper()
	v, rev, err := c.GetRevision(ctx, key)
	if !errors.Is(err, autocert.ErrCacheMiss) || rev != 0 || v != nil {
		s.fatalf("GetRevision(%q) = %q, %d, %v; want nil, 0, autocert.ErrCacheMiss", key, v, rev, err)
	}
}

// lock takes the lock name on c within conformanceWait.
func (s *conformance) lock(ctx context.Context, c Coordinator, name string) (string, <-chan struct{}, func()) {
	s.tb.Helper()
	return s.lockWithin(ctx, c, name, conformanceWait)
}

func (s *conformance) lockWithin(ctx context.Context, c Coordinator, name string, d time.Duration) (string, <-chan struct{}, func()) {
	s.tb.Helper()
	ctx, cancel := context.WithTimeout(ctx, d)
	defer cancel()
	fence, lost, unlock, err := c.Lock(ctx, name)
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
	if err := s.newFence(fence, name); err != nil {
		s.fatalf("%v", err)
	}
	return fence, lost, unlock
}

// refused checks that Lock(name) on c fails with ctx's error while
// another holds name.
func (s *conformance) refused(ctx context.Context, c Coordinator, name, who string) {
	s.tb.Helper()
	ctx, cancel := context.WithTimeout(ctx, conformanceRefused)
	defer cancel()
	_, _, unlock, err := c.Lock(ctx, name)
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
	s.step = "missing key"
	s.wantMissing(ctx, a, s.base+"missing")
}

func (s *conformance) revisions(ctx context.Context, a, b Coordinator) {
	s.tb.Helper()
	s.step = "PutIf's revisions"
	key := s.base + "putif"
	s.putIf(ctx, a, key, "v0", 1, "", false) // absent, rev not 0
	s.wantMissing(ctx, a, key)
	r1 := s.putIf(ctx, a, key, "v1", 0, "", true)
	s.wantValue(ctx, a, key, "v1", r1)
	s.wantValue(ctx, b, key, "v1", r1)
	s.putIf(ctx, b, key, "x", 0, "", false) // exists
	s.putIf(ctx, b, key, "x", r1+1000, "", false)
	r2 := s.putIf(ctx, b, key, "v2", r1, "", true)
	if r2 <= r1 {
		s.fatalf("an update returned revision %d, not greater than the one it replaced, %d", r2, r1)
	}
	s.putIf(ctx, a, key, "x", r1, "", false) // stale
	s.wantValue(ctx, a, key, "v2", r2)
	r3 := s.putIf(ctx, a, key, "v3", r2, "", true)
	s.wantValue(ctx, b, key, "v3", r3)
}

func (s *conformance) deletes(ctx context.Context, a, b Coordinator) {
	s.tb.Helper()
	s.step = "DeleteIf"
	key := s.base + "deleteif"
	s.deleteIf(ctx, a, key, 0, "", false) // missing
	s.deleteIf(ctx, a, key, 1, "", false)
	r1 := s.putIf(ctx, a, key, "v1", 0, "", true)
	s.deleteIf(ctx, b, key, 0, "", false) // exists
	s.deleteIf(ctx, b, key, r1+1000, "", false)
	r2 := s.putIf(ctx, b, key, "v2", r1, "", true)
	s.deleteIf(ctx, a, key, r1, "", false) // stale
	s.wantValue(ctx, a, key, "v2", r2)
	s.deleteIf(ctx, a, key, r2, "", true)
	s.wantMissing(ctx, b, key)
	s.deleteIf(ctx, b, key, r2, "", false) // deleted already
	s.deleteIf(ctx, b, key, 0, "", false)
	s.putIf(ctx, b, key, "x", r2, "", false)
	r3 := s.putIf(ctx, b, key, "v3", 0, "", true) // a deleted key is absent
	if r3 <= r2 {
		s.fatalf("PutIf after a DeleteIf returned revision %d, not greater than %d", r3, r2)
	}
	s.wantValue(ctx, a, key, "v3", r3)
}

func (s *conformance) noLostUpdate(ctx context.Context, a, b Coordinator) {
	s.tb.Helper()
	s.step = "no lost update"
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
	s.step = "Lock excludes"
	name := s.base + "lock"

	// The lock outlives the ctx of the Lock that took it.
	lctx, lcancel := context.WithCancel(ctx)
	_, lostA, unlockA := s.lock(lctx, a, name)
	lcancel()
	s.refused(ctx, b, name, "another replica")
	s.refused(ctx, a, name, "the same replica")
	if isClosed(lostA) {
		s.fatalf("lost is closed while the lock is held")
	}

	// A waiter on b gets in after the unlock.
	type result struct {
		fence  string
		lost   <-chan struct{}
		unlock func()
		err    error
	}
	got := make(chan result, 1)
	wctx, wcancel := context.WithTimeout(ctx, conformanceWait)
	defer wcancel()
	go func() {
		fence, lost, unlock, err := b.Lock(wctx, name)
		got <- result{fence, lost, unlock, err}
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
	if err := s.newFence(r.fence, name); err != nil {
		s.fatalf("%v", err)
	}

	// A waiter that gave up leaves nothing that blocks the next Lock:
	// b holds, a gives up, b unlocks, b (then a) must get it.
	s.refused(ctx, a, name, "another replica")
	r.unlock()
	if !isClosed(r.lost) {
		s.fatalf("unlock did not close lost")
	}
	_, _, unlock := s.lock(ctx, b, name)
	unlock()
	_, _, unlock = s.lock(ctx, a, name)
	unlock()
}

func (s *conformance) lockConcurrent(ctx context.Context, a, b Coordinator) {
	s.tb.Helper()
	s.step = "concurrent Locks"
	const goroutines, rounds = 4, 3
	name := s.base + "mutex"
	var (
		inside, most atomic.Int32
		wg           sync.WaitGroup
		errMu        sync.Mutex // guards firstErr
		firstErr     error
	)
	fail := func(err error) {
		errMu.Lock()
		firstErr = firstOf(firstErr, err)
		errMu.Unlock()
	}
	for _, c := range []Coordinator{a, b} {
		for range goroutines {
			wg.Go(func() {
				for range rounds {
					lctx, cancel := context.WithTimeout(ctx, conformanceTakeover)
					fence, lost, unlock, err := c.Lock(lctx, name)
					cancel()
					if err != nil {
						fail(err)
						return
					}
					n := inside.Add(1)
					for m := most.Load(); n > m && !most.CompareAndSwap(m, n); m = most.Load() {
					}
					if err := s.newFence(fence, name); err != nil {
						fail(err)
					}
					// Give another holder time to come in: a store
					// round trip.
					c.GetRevision(ctx, s.base+"missing")
					if isClosed(lost) {
						fail(errors.New("lost closed while held"))
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
	s.step = "fencing: a fence never returned"
	s.putIf(ctx, a, key, "x", 0, s.base+"never-locked", false)
	s.step = "fencing: the holder's fence"
	fence1, _, unlock := s.lock(ctx, a, name)
	r1 := s.putIf(ctx, a, key, "v1", 0, fence1, true)
	s.step = "fencing: another replica's fence"
	s.putIf(ctx, b, key, "x", r1, fence1, false)
	s.deleteIf(ctx, b, key, r1, fence1, false)
	s.step = "fencing: the holder's fence"
	r2 := s.putIf(ctx, a, key, "v2", r1, fence1, true)
	unlock()
	s.step = "fencing: a fence after its unlock"
	s.putIf(ctx, a, key, "x", r2, fence1, false)
	s.deleteIf(ctx, a, key, r2, fence1, false)
	s.wantValue(ctx, b, key, "v2", r2)

	// The same replica holds the name again: the fence of its earlier
	// hold is stale.
	fence2, _, unlock := s.lock(ctx, a, name)
	s.step = "fencing: a stale fence after the same replica locked the name again"
	s.putIf(ctx, a, key, "x", r2, fence1, false)
	s.deleteIf(ctx, a, key, r2, fence1, false)
	s.step = "fencing: the holder's fence"
	r3 := s.putIf(ctx, a, key, "v3", r2, fence2, true)
	unlock()
	s.step = "fencing: a fence after its unlock"
	s.putIf(ctx, a, key, "x", r3, fence2, false)
	s.step = "fencing: an unfenced write"
	r4 := s.putIf(ctx, a, key, "v4", r3, "", true)
	s.step = "fencing: another replica's hold"
	fence3, _, unlock := s.lock(ctx, b, name)
	s.putIf(ctx, b, key, "x", r4, fence2, false) // the earlier holder's
	r5 := s.putIf(ctx, b, key, "v5", r4, fence3, true)
	s.deleteIf(ctx, b, key, r4, fence3, false) // stale revision
	s.deleteIf(ctx, b, key, r5, fence3, true)
	unlock()
	s.wantMissing(ctx, a, key)
}

// event is a call of Watch's f. A want event of revision 0 matches any
// revision.
type event struct {
	key   string
	value string
	isNil bool
	rev   int64
}

func (e event) String() string {
	if e.isNil {
		return fmt.Sprintf("%s=<nil>@%d", e.key, e.rev)
	}
	return fmt.Sprintf("%s=%q@%d", e.key, e.value, e.rev)
}

// watcher records the calls of a Watch's f.
type watcher struct {
	mu     sync.Mutex // guards events, active
	events []event
	active int // calls of f running; more than 1 is a violation
	concur bool
}

func (w *watcher) f(key string, value []byte, rev int64) {
	w.mu.Lock()
	w.active++
	if w.active > 1 {
		w.concur = true
	}
	w.events = append(w.events, event{key, string(value), value == nil, rev})
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

// wantEvents checks what a Watch reported: the events of want, with
// their revisions unless 0, and increasing revisions; and that f was not
// called concurrently.
func (s *conformance) wantEvents(w *watcher, what string, got, want []event) {
	s.tb.Helper()
	for i, e := range got {
		if e.rev <= 0 || i > 0 && e.rev <= got[i-1].rev {
			s.fatalf("%s reported revisions that do not grow from 1:\n\t%v", what, got)
		}
	}
	match := len(got) == len(want)
	for i := 0; match && i < len(got); i++ {
		g, w := got[i], want[i]
		match = g.key == w.key && g.value == w.value && g.isNil == w.isNil && (w.rev == 0 || g.rev == w.rev)
	}
	if !match {
		s.fatalf("%s reported\n\t%v\nwant\n\t%v", what, got, want)
	}
	if _, concur := w.snapshot(); concur {
		s.fatalf("%s called f concurrently", what)
	}
}

func (s *conformance) watch(ctx context.Context, a, b Coordinator) {
	s.tb.Helper()
	s.step = "Watch"
	prefix := s.base + "w/"
	s.putIf(ctx, b, prefix+"before", "0", 0, "", true) // before Watch: not reported
	wctx, wcancel := context.WithCancel(ctx)
	defer wcancel()
	var w watcher
	if err := a.Watch(wctx, prefix, 0, w.f); err != nil {
		s.fatalf("Watch(%q): %v", prefix, err)
	}
	k1, k2, end := prefix+"1", prefix+"2", prefix+"end"
	var want []event
	r1 := s.putIf(ctx, b, k1, "a", 0, "", true)
	want = append(want, event{k1, "a", false, r1})
	s.putIf(ctx, b, s.base+"outside", "o", 0, "", true)
	s.putIf(ctx, b, prefix[:len(prefix)-1], "o", 0, "", true) // the prefix without its slash
	r := s.putIf(ctx, b, k1, "b", r1, "", true)
	want = append(want, event{k1, "b", false, r})
	r2 := s.putIf(ctx, b, k2, "c", 0, "", true)
	want = append(want, event{k2, "c", false, r2})
	s.putIf(ctx, b, k1, "x", r1, "", false) // not written: not reported
	s.deleteIf(ctx, b, k2, r1, "", false)   // not deleted: not reported
	_, _, unlock := s.lock(ctx, b, prefix+"lock")
	unlock()
	s.deleteIf(ctx, b, k2, r2, "", true)
	want = append(want, event{k2, "", true, 0})

	cb, bIsCache := b.(autocert.Cache)
	ca, aIsCache := a.(autocert.Cache)
	if aIsCache && bIsCache {
		k3 := prefix + "3"
		if err := cb.Put(ctx, k3, []byte("d")); err != nil {
			s.fatalf("Cache.Put(%q): %v", k3, err)
		}
		v, rev := s.get(ctx, a, k3)
		if string(v) != "d" {
			s.fatalf("GetRevision(%q) after Cache.Put = %q, want %q", k3, v, "d")
		}
		want = append(want, event{k3, "d", false, rev})
		if err := cb.Delete(ctx, k1); err != nil {
			s.fatalf("Cache.Delete(%q): %v", k1, err)
		}
		want = append(want, event{k1, "", true, 0})
		if err := cb.Delete(ctx, prefix+"never-written"); err != nil {
			s.fatalf("Cache.Delete of a missing key: %v", err)
		}
		rev = s.putIf(ctx, a, k3, "d2", rev, "", true)
		want = append(want, event{k3, "d2", false, rev})
		if v, err := ca.Get(ctx, k3); err != nil || string(v) != "d2" {
			s.fatalf("Cache.Get(%q) after PutIf = %q, %v; want %q", k3, v, err, "d2")
		}
		s.wantMissing(ctx, a, k1)
		rev = s.putIf(ctx, a, k1, "again", 0, "", true) // a deleted key is absent
		want = append(want, event{k1, "again", false, rev})
		s.wantValue(ctx, b, k1, "again", rev)
	} else {
		s.logf("the Coordinator is not an autocert.Cache: Put and Delete not checked")
	}
	r = s.putIf(ctx, b, end, "e", 0, "", true)
	want = append(want, event{end, "e", false, r})
	s.wantEvents(&w, fmt.Sprintf("Watch(%q, 0)", prefix), s.until(&w, end), want)

	// After the ctx ends, f is not called again. A second watch tells
	// when the store has reported a later write.
	wcancel()
	var w2 watcher
	w2ctx, w2cancel := context.WithCancel(ctx)
	defer w2cancel()
	if err := a.Watch(w2ctx, prefix, 0, w2.f); err != nil {
		s.fatalf("Watch(%q): %v", prefix, err)
	}
	after := prefix + "after"
	s.putIf(ctx, b, after, "z", 0, "", true)
	s.until(&w2, after)
	if evs, _ := w.snapshot(); len(evs) != len(want) {
		s.fatalf("Watch called f after its ctx ended: %v", evs[len(want):])
	}
}

// watchFrom checks a Watch from the revision that GetRevision returned.
func (s *conformance) watchFrom(ctx context.Context, a, b Coordinator) {
	s.tb.Helper()
	s.step = "Watch from a revision"
	prefix := s.base + "from/"
	k1, k2, later := prefix+"1", prefix+"2", prefix+"later"
	s.putIf(ctx, b, k2, "old", 0, "", true)
	r := s.putIf(ctx, b, k1, "1", 0, "", true)
	_, from := s.get(ctx, a, k1)
	if from != r {
		s.fatalf("GetRevision(%q) = revision %d, want %d", k1, from, r)
	}
	var want []event
	r = s.putIf(ctx, b, k1, "2", from, "", true)
	want = append(want, event{k1, "2", false, r})
	s.putIf(ctx, b, s.base+"from-outside", "o", 0, "", true)
	r3 := s.putIf(ctx, b, prefix+"3", "3", 0, "", true)
	want = append(want, event{prefix + "3", "3", false, r3})
	s.deleteIf(ctx, b, k1, r, "", true)
	want = append(want, event{k1, "", true, 0})

	wctx, wcancel := context.WithCancel(ctx)
	defer wcancel()
	var w watcher
	if err := a.Watch(wctx, prefix, from, w.f); err != nil {
		s.fatalf("Watch(%q, %d): %v", prefix, from, err)
	}
	r = s.putIf(ctx, b, later, "4", 0, "", true)
	want = append(want, event{later, "4", false, r})
	s.wantEvents(&w, fmt.Sprintf("Watch(%q, %d) after GetRevision", prefix, from), s.until(&w, later), want)
}

func (s *conformance) loss(ctx context.Context, c, d Coordinator, lose func(Coordinator)) {
	s.tb.Helper()
	s.step = "loss"
	name := s.base + "loss"
	key := s.base + "loss-record"
	fence, lost, _ := s.lock(ctx, c, name)
	rev := s.putIf(ctx, c, key, "c", 0, fence, true)
	s.refused(ctx, d, name, "another replica")

	type result struct {
		fence      string
		lostClosed bool
		unlock     func()
		err        error
	}
	got := make(chan result, 1)
	lctx, lcancel := context.WithTimeout(ctx, conformanceTakeover)
	defer lcancel()
	go func() {
		fence, _, unlock, err := d.Lock(lctx, name)
		got <- result{fence, isClosed(lost), unlock, err}
	}()
	start := time.Now()
	lose(c)
	s.waitFor(conformanceTakeover, "lost closed after lose", func() bool { return isClosed(lost) })
	s.logf("lost closed %v after lose", time.Since(start).Round(time.Millisecond))
	// c may not reach the store: its calls may fail, or time out.
	cctx, ccancel := context.WithTimeout(ctx, conformanceWait)
	defer ccancel()
	s.step = "loss: the lost hold's fence"
	if _, ok, _ := c.PutIf(cctx, key, []byte("x"), rev, fence); ok {
		s.fatalf("a fenced PutIf succeeded after lose")
	}
	if ok, _ := c.DeleteIf(cctx, key, rev, fence); ok {
		s.fatalf("a fenced DeleteIf succeeded after lose")
	}
	s.step = "loss: takeover"
	r := <-got
	if r.err != nil {
		s.fatalf("Lock(%q) after the holder was lost: %v", name, r.err)
	}
	s.tb.Cleanup(r.unlock)
	s.logf("another replica got the lock %v after lose", time.Since(start).Round(time.Millisecond))
	if !r.lostClosed {
		s.fatalf("another replica got the lock before the lost replica's lost was closed")
	}
	if err := s.newFence(r.fence, name); err != nil {
		s.fatalf("%v", err)
	}
	s.wantValue(ctx, d, key, "c", rev)
	rev = s.putIf(ctx, d, key, "d", rev, r.fence, true)
	r.unlock()

	// The lost replica comes back and holds the name again: its lost
	// hold's fence must not write, as it would if fences named locks.
	s.step = "loss: the lost replica locks again"
	start = time.Now()
	fence2, _, unlock := s.lockWithin(ctx, c, name, conformanceTakeover)
	s.logf("the lost replica got the lock again %v after the takeover", time.Since(start).Round(time.Millisecond))
	s.step = "loss: a stale fence after the lost replica locked the name again"
	s.putIf(ctx, c, key, "x", rev, fence, false)
	s.deleteIf(ctx, c, key, rev, fence, false)
	s.step = "loss: the lost replica's new fence"
	s.putIf(ctx, c, key, "c2", rev, fence2, true)
	unlock()
}
