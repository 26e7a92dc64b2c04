package certmgrtest

import (
	"context"
	"fmt"
	"runtime"
	"strings"
	"sync"
	"testing"
)

// The broken Coordinators below are MemoryReplicas with one fault each,
// which CoordinatorConformance must find.

// unfenced ignores PutIf's fence.
type unfenced struct{ *MemoryReplica }

func (r unfenced) PutIf(ctx context.Context, key string, value []byte, rev int64, fence string) (int64, bool, error) {
	return r.MemoryReplica.PutIf(ctx, key, value, rev, "")
}

// lastWins writes whatever the revision.
type lastWins struct{ *MemoryReplica }

func (r lastWins) PutIf(ctx context.Context, key string, value []byte, rev int64, fence string) (int64, bool, error) {
	_, cur, _ := r.MemoryReplica.GetRevision(ctx, key)
	return r.MemoryReplica.PutIf(ctx, key, value, cur, fence)
}

// unfencedDelete ignores DeleteIf's fence.
type unfencedDelete struct{ *MemoryReplica }

func (r unfencedDelete) DeleteIf(ctx context.Context, key string, rev int64, fence string) (bool, error) {
	return r.MemoryReplica.DeleteIf(ctx, key, rev, "")
}

// blindDelete deletes whatever the revision.
type blindDelete struct{ *MemoryReplica }

func (r blindDelete) DeleteIf(ctx context.Context, key string, rev int64, fence string) (bool, error) {
	_, cur, _ := r.MemoryReplica.GetRevision(ctx, key)
	return r.MemoryReplica.DeleteIf(ctx, key, cur, fence)
}

// deleteMissing reports that it deleted a missing key at revision 0.
type deleteMissing struct{ *MemoryReplica }

func (r deleteMissing) DeleteIf(ctx context.Context, key string, rev int64, fence string) (bool, error) {
	if _, cur, _ := r.MemoryReplica.GetRevision(ctx, key); cur == 0 && rev == 0 {
		return true, nil
	}
	return r.MemoryReplica.DeleteIf(ctx, key, rev, fence)
}

// shared lets goroutines of one replica share a lock it holds, as
// goroutines sharing an etcd session would without care.
type shared struct {
	*MemoryReplica
	mu   *sync.Mutex // guards held
	held map[string]sharedHold
}

type sharedHold struct {
	fence string
	lost  <-chan struct{}
}

func (r *shared) Lock(ctx context.Context, name string) (string, <-chan struct{}, func(), error) {
	r.mu.Lock()
	h, ok := r.held[name]
	r.mu.Unlock()
	if ok {
		return h.fence, h.lost, func() {}, nil
	}
	fence, lost, unlock, err := r.MemoryReplica.Lock(ctx, name)
	if err != nil {
		return "", nil, nil, err
	}
	r.mu.Lock()
	r.held[name] = sharedHold{fence, lost}
	r.mu.Unlock()
	return fence, lost, func() {
		r.mu.Lock()
		delete(r.held, name)
		r.mu.Unlock()
		unlock()
	}, nil
}

// neverLost returns a lost channel that is never closed.
type neverLost struct{ *MemoryReplica }

func (r neverLost) Lock(ctx context.Context, name string) (string, <-chan struct{}, func(), error) {
	fence, _, unlock, err := r.MemoryReplica.Lock(ctx, name)
	return fence, make(chan struct{}), unlock, err
}

// refenced hands out fences of its own, which it maps to the
// MemoryReplica's through valid.
type refenced struct {
	*MemoryReplica
	mu      *sync.Mutex // guards fences, current and the holds' unlocked
	fences  map[string]*refencedHold
	current map[string]string // lock name → the MemoryReplica's fence of its latest hold
	// fence returns the fence of a hold of the lock name, whose fence in
	// the MemoryReplica is inner.
	fence func(name, inner string) string
	// valid tells whether h's fence still writes, with the MemoryReplica's
	// fence of the latest hold of its name.
	valid func(h *refencedHold) bool
}

type refencedHold struct {
	name     string
	unlocked bool
}

func newRefenced(r *MemoryReplica, fence func(name, inner string) string, valid func(*refencedHold) bool) *refenced {
	return &refenced{MemoryReplica: r, mu: new(sync.Mutex), fences: make(map[string]*refencedHold),
		current: make(map[string]string), fence: fence, valid: valid}
}

func (r *refenced) Lock(ctx context.Context, name string) (string, <-chan struct{}, func(), error) {
	inner, lost, unlock, err := r.MemoryReplica.Lock(ctx, name)
	if err != nil {
		return "", nil, nil, err
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	fence := r.fence(name, inner)
	h := &refencedHold{name: name}
	r.fences[fence] = h
	r.current[name] = inner
	return fence, lost, func() {
		r.mu.Lock()
		h.unlocked = true
		r.mu.Unlock()
		unlock()
	}, nil
}

// inner returns the MemoryReplica's fence that fence stands for.
func (r *refenced) inner(fence string) string {
	if fence == "" {
		return ""
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	h := r.fences[fence]
	if h == nil || !r.valid(h) {
		return "invalid"
	}
	return r.current[h.name]
}

func (r *refenced) PutIf(ctx context.Context, key string, value []byte, rev int64, fence string) (int64, bool, error) {
	return r.MemoryReplica.PutIf(ctx, key, value, rev, r.inner(fence))
}

func (r *refenced) DeleteIf(ctx context.Context, key string, rev int64, fence string) (bool, error) {
	return r.MemoryReplica.DeleteIf(ctx, key, rev, r.inner(fence))
}

// nameFenced fences by the lock's name, as the first Coordinator did:
// any fence of a name writes while the replica holds that name, so a
// stale fence writes once the replica locks the name again.
func nameFenced(r *MemoryReplica) Coordinator {
	return newRefenced(r,
		func(name, inner string) string { return name + "#" + inner },
		func(*refencedHold) bool { return true })
}

// nameIsFence returns the lock's name as its fence.
func nameIsFence(r *MemoryReplica) Coordinator {
	return newRefenced(r,
		func(name, _ string) string { return name },
		func(*refencedHold) bool { return true })
}

// unlockOnly ends a fence at its unlock, but not at the loss of its
// lease: after a loss, it fences by the lock's name.
func unlockOnly(r *MemoryReplica) Coordinator {
	return newRefenced(r,
		func(_, inner string) string { return "hold/" + inner },
		func(h *refencedHold) bool { return !h.unlocked })
}

// endless watches beyond its ctx.
type endless struct{ *MemoryReplica }

func (r endless) Watch(ctx context.Context, prefix string, fromRev int64, f func(string, []byte, int64)) error {
	return r.MemoryReplica.Watch(context.WithoutCancel(ctx), prefix, fromRev, f)
}

// fromNow watches from the current revision, whatever fromRev.
type fromNow struct{ *MemoryReplica }

func (r fromNow) Watch(ctx context.Context, prefix string, fromRev int64, f func(string, []byte, int64)) error {
	return r.MemoryReplica.Watch(ctx, prefix, 0, f)
}

// fromIncluded also reports the write at fromRev.
type fromIncluded struct{ *MemoryReplica }

func (r fromIncluded) Watch(ctx context.Context, prefix string, fromRev int64, f func(string, []byte, int64)) error {
	if fromRev > 0 {
		fromRev--
	}
	return r.MemoryReplica.Watch(ctx, prefix, fromRev, f)
}

// noRevision reports every write with revision 0.
type noRevision struct{ *MemoryReplica }

func (r noRevision) Watch(ctx context.Context, prefix string, fromRev int64, f func(string, []byte, int64)) error {
	return r.MemoryReplica.Watch(ctx, prefix, fromRev, func(key string, value []byte, _ int64) { f(key, value, 0) })
}

// failTB is a TB whose Fatal ends the goroutine, as testing.TB's does,
// and records the message.
type failTB struct {
	msg      string
	cleanups []func()
}

func (*failTB) Helper()              {}
func (tb *failTB) Cleanup(f func())  { tb.cleanups = append(tb.cleanups, f) }
func (tb *failTB) Fatal(args ...any) { tb.msg = fmt.Sprint(args...); runtime.Goexit() }

func TestConformanceFindsFaults(t *testing.T) {
	for _, tc := range []struct {
		name string
		wrap func(*MemoryReplica) Coordinator
		want string
	}{
		{"unfenced", func(r *MemoryReplica) Coordinator { return unfenced{r} }, "fencing: a fence never returned: PutIf"},
		{"lastWins", func(r *MemoryReplica) Coordinator { return lastWins{r} }, "PutIf's revisions: PutIf"},
		{"unfencedDelete", func(r *MemoryReplica) Coordinator { return unfencedDelete{r} }, "fencing: another replica's fence: DeleteIf"},
		{"blindDelete", func(r *MemoryReplica) Coordinator { return blindDelete{r} }, "DeleteIf: DeleteIf"},
		{"deleteMissing", func(r *MemoryReplica) Coordinator { return deleteMissing{r} }, "DeleteIf: DeleteIf"},
		{"shared", func(r *MemoryReplica) Coordinator {
			return &shared{r, new(sync.Mutex), make(map[string]sharedHold)}
		}, "on the same replica succeeded"},
		{"neverLost", func(r *MemoryReplica) Coordinator { return neverLost{r} }, "did not close lost"},
		{"nameFenced", nameFenced, "a stale fence after the same replica locked the name again: PutIf"},
		{"nameIsFence", nameIsFence, "that of an earlier hold"},
		{"unlockOnly", unlockOnly, "a stale fence after the lost replica locked the name again: PutIf"},
		{"endless", func(r *MemoryReplica) Coordinator { return endless{r} }, "after its ctx ended"},
		{"fromNow", func(r *MemoryReplica) Coordinator { return fromNow{r} }, "Watch from a revision: Watch("},
		{"fromIncluded", func(r *MemoryReplica) Coordinator { return fromIncluded{r} }, "Watch from a revision: Watch("},
		{"noRevision", func(r *MemoryReplica) Coordinator { return noRevision{r} }, "revisions that do not grow"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			s := NewMemoryStore()
			replicas := make(map[Coordinator]*MemoryReplica)
			var tb failTB
			done := make(chan struct{})
			go func() {
				defer close(done)
				open := func() Coordinator {
					r := s.Open()
					c := tc.wrap(r)
					replicas[c] = r
					return c
				}
				CoordinatorConformance(&tb, open, func(c Coordinator) { replicas[c].Lose() })
			}()
			<-done
			for _, f := range tb.cleanups {
				f()
			}
			if !strings.Contains(tb.msg, tc.want) {
				t.Fatalf("the suite reported %q, want a failure about %q", tb.msg, tc.want)
			}
			t.Logf("%s", tb.msg)
		})
	}
}
