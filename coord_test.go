package certmgr

import (
	"context"
	"testing"

	"github.com/certmgr/certmgr/certmgrtest"
	"golang.org/x/crypto/acme/autocert"
)

// certmgrtest's in-memory store implements Coordinator, and
// certmgrtest.Coordinator is the same interface: both name internal/coord's.
var (
	_ Coordinator             = (*certmgrtest.MemoryReplica)(nil)
	_ Coordinator             = certmgrtest.Coordinator(nil)
	_ certmgrtest.Coordinator = Coordinator(nil)
)

// coordCache is a memory Cache that is also a Coordinator; its methods
// are never called here.
type coordCache struct{ memCache }

func (*coordCache) Lock(context.Context, string) (string, <-chan struct{}, func(), error) {
	return "", nil, func() {}, nil
}
func (*coordCache) GetRevision(context.Context, string) ([]byte, int64, error) { return nil, 0, nil }
func (*coordCache) PutIf(context.Context, string, []byte, int64, string) (int64, bool, error) {
	return 0, false, nil
}
func (*coordCache) DeleteIf(context.Context, string, int64, string) (bool, error) { return false, nil }
func (*coordCache) Watch(context.Context, string, int64, func(string, []byte, int64)) error {
	return nil
}

// wrapCache wraps a Cache and says so with Unwrap.
type wrapCache struct {
	autocert.Cache
	inner autocert.Cache
}

func (w *wrapCache) Unwrap() autocert.Cache { return w.inner }

// TestCoordinatorOf: the Coordinator of a Cache is the Cache itself, or
// the first one found down its chain of Unwrap; a Cache without one, or a
// chain that loops, has none.
func TestCoordinatorOf(t *testing.T) {
	coord := &coordCache{memCache{m: map[string][]byte{}}}
	plain := &memCache{m: map[string][]byte{}}
	wrapped := &wrapCache{Cache: coord, inner: coord}
	twice := &wrapCache{Cache: wrapped, inner: wrapped}
	loop := &wrapCache{Cache: plain}
	loop.inner = loop
	for _, tt := range []struct {
		name  string
		cache autocert.Cache
		want  Coordinator
	}{
		{"itself", coord, coord},
		{"wrapped", wrapped, coord},
		{"wrapped twice", twice, coord},
		{"none", plain, nil},
		{"nil", nil, nil},
		{"a loop", loop, nil},
	} {
		if got := coordinatorOf(tt.cache); got != tt.want {
			t.Errorf("%s: coordinatorOf = %v, want %v", tt.name, got, tt.want)
		}
	}
}
