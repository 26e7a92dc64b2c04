// Package etcdcache keeps certmgr's certificates, challenge tokens,
// account key and failure records in etcd, and coordinates the replicas
// that share them: a Cache is an autocert.Cache and implements
// certmgr.Coordinator, so that replicas behind one name act as one
// server.
//
// It is a module of its own, so that users of certmgr who do not use
// etcd do not depend on it.
//
// # Keys
//
// Under Options.Prefix (P, "/certmgr/" by default) a Cache uses two
// ranges of keys, and needs read and write permission on P only:
//
//   - P+"cache/"+key holds the value of key, for autocert.Cache's Get,
//     Put and Delete and for Coordinator's GetRevision, PutIf, DeleteIf
//     and Watch alike. A key's revision is its etcd ModRevision.
//   - P+"locks/"+name+"/"+lease is a replica's entry for the lock name:
//     the layout of concurrency.Mutex (and etcdctl lock), attached to the
//     replica's lease, so that the lock is held by the oldest entry and
//     ends with the lease. A waiter watches the entry before its own from
//     etcd's current revision, which etcd reports at once, and then reads
//     it again (concurrency.Mutex watches from the revision it read,
//     which etcd serves only at its next resynchronisation, up to 100 ms
//     later).
//
// # Fences
//
// The fence that Lock returns names the hold by its entry's key and
// create revision, as key+"@"+revision: the next hold of the same name
// has another create revision, if not another lease. A fenced PutIf or
// DeleteIf checks, in the same etcd transaction as the write, that the
// entry with that key still has that create revision, as
// concurrency.Mutex.IsOwner does; and, before it asks etcd, that the
// hold has not ended in this Cache (by unlock, loss or Close). A fence
// is valid only in the Cache whose Lock returned it.
//
// # Leases
//
// A Cache holds one lease (a concurrency.Session) for all its locks,
// made at the first Lock and kept alive by the client. When the lease
// is lost, every lock it held is lost: the lost channels that Lock
// returned are closed, either when the client reports the lease gone or
// when no keep-alive has been acknowledged for LeaseTTL less a tenth, so
// before the server can give the lock to another replica (the client
// alone may report a loss only twice the TTL after it, when the server
// is unreachable). The Cache then gives the lease up and the next Lock
// grants a new one: after an outage of the store, the same Cache resumes
// without a restart.
//
// That deadline is on this process's clock, and the best it can know:
// etcd gives the lock to another replica if the lease is revoked (say
// with etcdctl lease revoke) or this process is paused past the deadline
// before it closes lost. Fenced writes are safe either way.
//
// Goroutines of one process that share a Cache share its lease; a Cache
// therefore lets one Lock of a name at a time proceed to etcd, and a
// second Lock of the same name waits for the first's unlock, as one on
// another replica does. unlock ends the hold in the Cache at once and
// deletes its entry in etcd in the background; the next Lock of the name
// in this process waits for that delete.
package etcdcache

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.etcd.io/etcd/client/v3/concurrency"
	"golang.org/x/crypto/acme/autocert"
)

// Options configures a Cache. The zero value is usable.
type Options struct {
	// Prefix is the prefix of every key the Cache uses, as it is, so it
	// usually ends with a slash. If empty, "/certmgr/".
	Prefix string

	// LeaseTTL is how long a dead replica's locks outlive it: how long
	// after a replica last reached etcd another may take its locks. It
	// is rounded up to whole seconds, as etcd counts; etcd may raise a
	// very short one (to 2 s with its default timing). If zero, 15 s.
	LeaseTTL time.Duration
}

// Cache is an autocert.Cache in etcd that also implements
// certmgr.Coordinator. Its methods may be called concurrently.
type Cache struct {
	client *clientv3.Client
	prefix string // Options.Prefix or its default
	ttl    int64  // the lease's TTL asked for, in seconds

	ctx    context.Context    // ends at Close; parent of the sessions' contexts
	cancel context.CancelFunc // ends ctx

	wg sync.WaitGroup // session monitors, unlocks and watches; Close waits

	// sessionSem is held while a session is made, so that one is made at
	// a time; a channel so that waiting for it can end with a context.
	sessionSem chan struct{}

	mu     sync.Mutex       // guards the fields below, and the sessions' ended and holds and the holds' released
	closed bool             // Close was called
	sess   *session         // the current session, or nil
	names  map[string]*slot // the lock names this process holds or is trying to get
	holds  map[string]*hold // the current holds, by fence
	// stale are leases given up whose revoke failed: they are revoked
	// when the next is granted, and at Close.
	stale []clientv3.LeaseID
}

// session is a lease of this Cache and the locks held under it.
type session struct {
	s      *concurrency.Session
	ctx    context.Context // ends when the session does: by loss, give-up or Close
	cancel context.CancelFunc
	ttl    time.Duration // as granted
	ended  bool
	holds  map[*hold]bool
}

// slot is this process's claim on a lock name: from the Lock that is
// trying to get it, through the lock's hold, until the lock's entry in
// etcd is deleted (or its lease lost). Another Lock of the name in this
// process waits for free to be closed.
type slot struct {
	name  string
	free  chan struct{}
	freed bool // free is closed
}

// hold is a lock that this process holds.
type hold struct {
	slot      *slot
	sess      *session
	key       string        // the lock's entry in etcd
	createRev int64         // the entry's create revision: the hold's in etcd while it is held
	fence     string        // key and createRev
	lost      chan struct{} // closed when released
	released  bool          // by unlock, loss or Close
}

// owner is true in etcd while h is the hold of its lock.
func (h *hold) owner() clientv3.Cmp {
	return clientv3.Compare(clientv3.CreateRevision(h.key), "=", h.createRev)
}

var errClosed = errors.New("etcdcache: Cache closed")

// New returns a Cache that keeps its data in etcd through client, under
// opts.Prefix. It does not contact etcd: the lease is granted at the
// first Lock. The caller keeps ownership of client, and closes it after
// Cache.Close.
func New(client *clientv3.Client, opts Options) (*Cache, error) {
	if client == nil {
		return nil, errors.New("etcdcache: nil client")
	}
	if opts.LeaseTTL < 0 {
		return nil, fmt.Errorf("etcdcache: negative LeaseTTL %v", opts.LeaseTTL)
	}
	if opts.Prefix == "" {
		opts.Prefix = "/certmgr/"
	}
	if opts.LeaseTTL == 0 {
		opts.LeaseTTL = 15 * time.Second
	}
	ctx, cancel := context.WithCancel(context.Background())
	return &Cache{
		client:     client,
		prefix:     opts.Prefix,
		ttl:        int64((opts.LeaseTTL + time.Second - 1) / time.Second),
		ctx:        ctx,
		cancel:     cancel,
		sessionSem: make(chan struct{}, 1),
		names:      make(map[string]*slot),
		holds:      make(map[string]*hold),
	}, nil
}

// closeTimeout bounds how long Close waits for etcd to revoke its
// leases.
const closeTimeout = 5 * time.Second

// Close releases the Cache's locks, closing their lost channels, and
// revokes its lease, waiting at most 5 seconds for etcd (the lease
// expires by itself otherwise, and Close reports the error). It ends the
// Cache's watches and waits for their calls of f to return, so f must
// not call Close. Lock and Watch fail after Close; the other methods keep
// working as long as the client does. Close may be called more than
// once.
//
// A Lock that was waiting for an unreachable etcd when its ctx ended may
// keep a goroutine until etcd answers or the client is closed.
func (c *Cache) Close() error {
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		return nil
	}
	c.closed = true
	s := c.sess
	c.sess = nil
	if s != nil {
		c.endLocked(s)
	}
	for _, sl := range c.names {
		c.freeLocked(sl) // Locks waiting in this process see closed
	}
	stale := c.stale
	c.stale = nil
	c.mu.Unlock()

	ctx, cancel := context.WithTimeout(context.Background(), closeTimeout)
	defer cancel()
	var err error
	if s != nil {
		s.cancel() // no more keep-alives
		_, rerr := c.client.Revoke(ctx, s.s.Lease())
		if rerr != nil && !errors.Is(rerr, rpctypes.ErrLeaseNotFound) { // revoked, or expired, already
			err = fmt.Errorf("etcdcache: revoke lease: %w", rerr)
		}
	}
	c.revoke(ctx, stale)
	c.cancel()
	c.wg.Wait()
	return err
}

// revoke revokes leases that were given up, for their lock entries to
// go at once; errors do not matter, the leases expire anyway.
func (c *Cache) revoke(ctx context.Context, leases []clientv3.LeaseID) {
	for _, id := range leases {
		c.client.Revoke(ctx, id)
	}
}

// goLocked runs f in a goroutine that Close waits for, unless the Cache
// is closed; c.mu must be held.
func (c *Cache) goLocked(f func()) bool {
	if c.closed {
		return false
	}
	c.wg.Go(f)
	return true
}

// key returns the etcd key of the Cache's key.
func (c *Cache) key(key string) string { return c.prefix + "cache/" + key }

// GetRevision implements certmgr.Coordinator: the revision is key's etcd
// ModRevision.
func (c *Cache) GetRevision(ctx context.Context, key string) (value []byte, rev int64, err error) {
	resp, err := c.client.Get(ctx, c.key(key))
	if err != nil {
		return nil, 0, fmt.Errorf("etcdcache: get %q: %w", key, err)
	}
	if len(resp.Kvs) == 0 {
		return nil, 0, autocert.ErrCacheMiss
	}
	kv := resp.Kvs[0]
	return nonNil(kv.Value), kv.ModRevision, nil
}

func nonNil(b []byte) []byte {
	if b == nil {
		return []byte{}
	}
	return b
}

// conditions returns the comparisons of a write of the etcd key k at
// revision rev, fenced by fence; false if the fence names no current hold
// of this Cache.
func (c *Cache) conditions(k string, rev int64, fence string) ([]clientv3.Cmp, bool) {
	cmps := []clientv3.Cmp{clientv3.Compare(clientv3.ModRevision(k), "=", rev)}
	if fence == "" {
		return cmps, true
	}
	c.mu.Lock()
	h := c.holds[fence]
	c.mu.Unlock()
	if h == nil {
		return nil, false // not held (any more), or not this Cache's
	}
	return append(cmps, h.owner()), true
}

// PutIf implements certmgr.Coordinator, in one etcd transaction that
// compares key's ModRevision with rev and, with a fence, checks that the
// lock's entry that the fence names is still the one Lock created (see
// the package documentation).
func (c *Cache) PutIf(ctx context.Context, key string, value []byte, rev int64, fence string) (newRev int64, ok bool, err error) {
	k := c.key(key)
	cmps, ok := c.conditions(k, rev, fence)
	if !ok {
		return 0, false, nil
	}
	resp, err := c.client.Txn(ctx).If(cmps...).Then(clientv3.OpPut(k, string(value))).Commit()
	if err != nil {
		return 0, false, fmt.Errorf("etcdcache: put %q: %w", key, err)
	}
	if !resp.Succeeded {
		return 0, false, nil
	}
	return resp.Header.Revision, true, nil
}

// DeleteIf implements certmgr.Coordinator, in one etcd transaction with
// the comparisons of PutIf.
func (c *Cache) DeleteIf(ctx context.Context, key string, rev int64, fence string) (ok bool, err error) {
	if rev <= 0 { // a missing key's ModRevision is 0: never deleted
		return false, nil
	}
	k := c.key(key)
	cmps, ok := c.conditions(k, rev, fence)
	if !ok {
		return false, nil
	}
	resp, err := c.client.Txn(ctx).If(cmps...).Then(clientv3.OpDelete(k)).Commit()
	if err != nil {
		return false, fmt.Errorf("etcdcache: delete %q: %w", key, err)
	}
	return resp.Succeeded, nil
}

// Get implements autocert.Cache.
func (c *Cache) Get(ctx context.Context, key string) ([]byte, error) {
	v, _, err := c.GetRevision(ctx, key)
	return v, err
}

// Put implements autocert.Cache: it writes whatever key's revision.
func (c *Cache) Put(ctx context.Context, key string, data []byte) error {
	if _, err := c.client.Put(ctx, c.key(key), string(data)); err != nil {
		return fmt.Errorf("etcdcache: put %q: %w", key, err)
	}
	return nil
}

// Delete implements autocert.Cache.
func (c *Cache) Delete(ctx context.Context, key string) error {
	if _, err := c.client.Delete(ctx, c.key(key)); err != nil {
		return fmt.Errorf("etcdcache: delete %q: %w", key, err)
	}
	return nil
}
