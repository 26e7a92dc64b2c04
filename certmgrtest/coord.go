package certmgrtest

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"slices"
	"strconv"
	"sync"
	"time"

	"golang.org/x/crypto/acme/autocert"

	"github.com/certmgr/certmgr/internal/coord"
)

// Coordinator is certmgr.Coordinator, the same type: a lock per domain
// that a lost replica gives up by itself, and records that are read with
// their revision and written or deleted only if nobody wrote them
// meanwhile and, when fenced, only while the writer's hold of its lock is
// still current. Both name the one declaration in internal/coord, so that
// this package need not import certmgr. The documentation of
// certmgr.Coordinator sums up the contract that CoordinatorConformance
// checks; that of each method, on the declaration, gives it in full:
//
//	go doc github.com/certmgr/certmgr/internal/coord.Coordinator
type Coordinator = coord.Coordinator

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
