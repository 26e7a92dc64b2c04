package etcdcache

import (
	"context"
	"fmt"
	"sort"
	"strings"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
)

// watchOpenTimeout bounds Watch's read of etcd's current revision: a
// client built with no DialTimeout would wait for etcd otherwise, for as
// long as it is unreachable.
const watchOpenTimeout = 5 * time.Second

// Watch implements certmgr.Coordinator with an etcd watch of the keys
// under prefix, from the revision after fromRev, or with fromRev 0 after
// the revision current when it is called (which it then asks etcd for,
// and fails if etcd does not answer within 5 seconds). Revisions are
// etcd's: a write's ModRevision, and a delete's revision.
// It runs until ctx ends, the Cache is closed or the client is, in one
// goroutine per call.
//
// When its etcd watch fails (a lost leader, an error), Watch watches
// again from the revision after the last it reported, so nothing is
// skipped. If etcd compacted that revision (or fromRev) meanwhile, Watch
// reports the current value of each key written since, with its
// ModRevision (a delete meanwhile is then not reported), and goes on
// from there.
func (c *Cache) Watch(ctx context.Context, prefix string, fromRev int64, f func(key string, value []byte, rev int64)) error {
	if fromRev < 0 {
		return fmt.Errorf("etcdcache: watch %q from revision %d", prefix, fromRev)
	}
	if fromRev == 0 {
		// Any read gives the current revision.
		gctx, cancel := context.WithTimeout(ctx, watchOpenTimeout)
		resp, err := c.client.Get(gctx, c.key(prefix), clientv3.WithCountOnly())
		cancel()
		if err != nil {
			return fmt.Errorf("etcdcache: watch %q: %w", prefix, err)
		}
		fromRev = resp.Header.Revision
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if !c.goLocked(func() { c.watch(ctx, prefix, fromRev+1, f) }) {
		return errClosed
	}
	return nil
}

// watch runs Watch's etcd watches from revision next on.
func (c *Cache) watch(ctx context.Context, prefix string, next int64, f func(key string, value []byte, rev int64)) {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	defer context.AfterFunc(c.ctx, cancel)()
	defer context.AfterFunc(c.client.Ctx(), cancel)()
	ctx = clientv3.WithRequireLeader(ctx)
	full := c.key(prefix)
	report := func(kv []byte, value []byte, rev int64) bool {
		if ctx.Err() != nil {
			return false
		}
		f(strings.TrimPrefix(string(kv), c.prefix+"cache/"), value, rev)
		return true
	}
	pause := 50 * time.Millisecond
	for ctx.Err() == nil {
		wctx, wcancel := context.WithCancel(ctx) // frees this etcd watch
		wch := c.client.Watch(wctx, full, clientv3.WithPrefix(), clientv3.WithRev(next))
		for wresp := range wch {
			if wresp.CompactRevision != 0 {
				n, ok := c.resync(ctx, full, next, report)
				if !ok {
					break
				}
				next = n
				break // and watch from next
			}
			if wresp.Err() != nil {
				break
			}
			pause = 50 * time.Millisecond
			for _, ev := range wresp.Events {
				value := nonNil(ev.Kv.Value)
				if ev.Type == clientv3.EventTypeDelete {
					value = nil
				}
				if !report(ev.Kv.Key, value, ev.Kv.ModRevision) {
					wcancel()
					return
				}
				next = ev.Kv.ModRevision + 1
			}
		}
		wcancel()
		select {
		case <-ctx.Done():
			return
		case <-time.After(pause):
		}
		pause = min(2*pause, 2*time.Second)
	}
}

// resync reports the current value of every key under full written at
// revision next or later, oldest first, and returns the revision to
// watch from.
func (c *Cache) resync(ctx context.Context, full string, next int64, report func(key, value []byte, rev int64) bool) (int64, bool) {
	resp, err := c.client.Get(ctx, full, clientv3.WithPrefix(), clientv3.WithMinModRev(next))
	if err != nil {
		return next, false
	}
	kvs := resp.Kvs
	sort.SliceStable(kvs, func(i, j int) bool { return kvs[i].ModRevision < kvs[j].ModRevision })
	for _, kv := range kvs {
		if !report(kv.Key, nonNil(kv.Value), kv.ModRevision) {
			return next, false
		}
	}
	return resp.Header.Revision + 1, true
}
