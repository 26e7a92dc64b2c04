package etcdcache

import (
	"context"
	"strings"
	"sync/atomic"
	"testing"

	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/certmgr/certmgr/etcdcache/internal/etcdtest"
)

// faultKV fails the next deletes of lock entries made through it, as
// etcd does during a leader election ("leader changed").
type faultKV struct {
	clientv3.KV
	failDeletes atomic.Int64 // how many of the next deletes of lock entries fail
	failed      atomic.Int64 // how many did
}

func (k *faultKV) Delete(ctx context.Context, key string, opts ...clientv3.OpOption) (*clientv3.DeleteResponse, error) {
	if strings.Contains(key, "/locks/") && k.failDeletes.Add(-1) >= 0 {
		k.failed.Add(1)
		return nil, rpctypes.ErrLeaderChanged
	}
	return k.KV.Delete(ctx, key, opts...)
}

// newFaultyCache returns a Cache on etcd at endpoint whose client fails
// deletes of lock entries on demand.
func newFaultyCache(t *testing.T, endpoint, prefix string) (*Cache, *faultKV) {
	cli := clientOf(t, endpoint)
	kv := &faultKV{KV: cli.KV}
	cli.KV = kv
	return newCache(t, cli, prefix), kv
}

// TestFailedEntryDeleteWedgesNoOne: when the delete of a lock entry at
// unlock fails, the entry does not stay for as long as the lease lives:
// another replica gets the lock.
func TestFailedEntryDeleteWedgesNoOne(t *testing.T) {
	t.Parallel()
	ctx := testContext(t)
	srv := etcdtest.Start(t)
	a, kv := newFaultyCache(t, srv.Endpoint(), "/wedge/")
	b := newCache(t, clientOf(t, srv.Endpoint()), "/wedge/")
	_, _, unlock, err := a.Lock(ctx, "n")
	if err != nil {
		t.Fatal(err)
	}
	kv.failDeletes.Store(2)
	unlock()
	// a's lease lives on, kept alive: only the entry's delete can free
	// the lock within 3 TTLs.
	bctx, cancel := context.WithTimeout(ctx, 3*testTTL)
	defer cancel()
	_, _, unlockB, err := b.Lock(bctx, "n")
	if err != nil {
		t.Fatalf("the other replica's Lock after a failed delete of the entry: %v", err)
	}
	unlockB()
	if n := kv.failed.Load(); n != 2 {
		t.Errorf("%d deletes failed, want the 2 injected", n)
	}
}

// TestRelockAfterFailedEntryDeleteGetsANewFence: the next hold of a name
// by the same process, after the delete of its entry failed, gets a fence
// of its own, never the earlier hold's.
func TestRelockAfterFailedEntryDeleteGetsANewFence(t *testing.T) {
	t.Parallel()
	ctx := testContext(t)
	srv := etcdtest.Start(t)
	c, kv := newFaultyCache(t, srv.Endpoint(), "/refence/")
	first, _, unlock, err := c.Lock(ctx, "n")
	if err != nil {
		t.Fatal(err)
	}
	kv.failDeletes.Store(1)
	unlock()
	second, _, unlock, err := c.Lock(ctx, "n")
	if err != nil {
		t.Fatal(err)
	}
	defer unlock()
	if second == first {
		t.Errorf("the hold after a failed delete has the earlier hold's fence %q", first)
	}
	if n := kv.failed.Load(); n != 1 {
		t.Errorf("%d deletes failed, want the 1 injected", n)
	}
	// The earlier hold's fence writes nothing.
	if _, ok, err := c.PutIf(ctx, "k", []byte("v"), 0, first); err != nil || ok {
		t.Errorf("PutIf with the earlier hold's fence = %v, %v; want refused", ok, err)
	}
}
