package certmgrtest

import (
	"context"
	"errors"
	"sync"
	"sync/atomic"
	"time"
)

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
