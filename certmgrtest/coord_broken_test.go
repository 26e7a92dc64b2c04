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

// shared lets goroutines of one replica share a lock it holds, as
// goroutines sharing an etcd session would without care.
type shared struct {
	*MemoryReplica
	mu   *sync.Mutex // guards held
	held map[string]<-chan struct{}
}

func (r *shared) Lock(ctx context.Context, name string) (<-chan struct{}, func(), error) {
	r.mu.Lock()
	lost, ok := r.held[name]
	r.mu.Unlock()
	if ok {
		return lost, func() {}, nil
	}
	lost, unlock, err := r.MemoryReplica.Lock(ctx, name)
	if err != nil {
		return nil, nil, err
	}
	r.mu.Lock()
	r.held[name] = lost
	r.mu.Unlock()
	return lost, func() {
		r.mu.Lock()
		delete(r.held, name)
		r.mu.Unlock()
		unlock()
	}, nil
}

// neverLost returns a lost channel that is never closed.
type neverLost struct{ *MemoryReplica }

func (r neverLost) Lock(ctx context.Context, name string) (<-chan struct{}, func(), error) {
	_, unlock, err := r.MemoryReplica.Lock(ctx, name)
	return make(chan struct{}), unlock, err
}

// endless watches beyond its ctx.
type endless struct{ *MemoryReplica }

func (r endless) Watch(ctx context.Context, prefix string, f func(string, []byte)) error {
	return r.MemoryReplica.Watch(context.WithoutCancel(ctx), prefix, f)
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
		{"unfenced", func(r *MemoryReplica) Coordinator { return unfenced{r} }, "PutIf"},
		{"lastWins", func(r *MemoryReplica) Coordinator { return lastWins{r} }, "PutIf"},
		{"shared", func(r *MemoryReplica) Coordinator {
			return &shared{r, new(sync.Mutex), make(map[string]<-chan struct{})}
		}, "on the same replica succeeded"},
		{"neverLost", func(r *MemoryReplica) Coordinator { return neverLost{r} }, "did not close lost"},
		{"endless", func(r *MemoryReplica) Coordinator { return endless{r} }, "after its ctx ended"},
	} {
		t.Run(tc.name, func(t *testing.T) {
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
		})
	}
}
