package certmgrtest

import (
	"context"
	"fmt"
	"slices"
	"sync"

	"golang.org/x/crypto/acme/autocert"
)

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
