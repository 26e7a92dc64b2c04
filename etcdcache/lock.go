package etcdcache

import (
	"context"
	"errors"
	"fmt"
	"time"

	"go.etcd.io/etcd/api/v3/mvccpb"
	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.etcd.io/etcd/client/v3/concurrency"
)

// margin is how long before its lease's TTL since the last keep-alive
// acknowledgement a Cache counts the lease as lost: a tenth of the TTL,
// for the time the acknowledgement took to arrive and for clocks that
// run at slightly different rates.
func margin(ttl time.Duration) time.Duration { return ttl / 10 }

// session returns the current session, granting a new lease if there is
// none.
func (c *Cache) session(ctx context.Context) (*session, error) {
	c.mu.Lock()
	s, closed := c.sess, c.closed
	c.mu.Unlock()
	switch {
	case closed:
		return nil, errClosed
	case s != nil:
		return s, nil
	}
	select {
	case c.sessionSem <- struct{}{}:
	case <-ctx.Done():
		return nil, ctx.Err()
	}
	defer func() { <-c.sessionSem }()
	c.mu.Lock()
	s, closed = c.sess, c.closed
	c.mu.Unlock()
	switch {
	case closed:
		return nil, errClosed
	case s != nil:
		return s, nil
	}

	start := time.Now()
	grant, err := c.client.Grant(ctx, c.ttl)
	if err != nil {
		if ctx.Err() != nil {
			return nil, ctx.Err()
		}
		return nil, fmt.Errorf("etcdcache: grant lease: %w", err)
	}
	sctx, cancel := context.WithCancel(c.ctx)
	// Two keep-alive streams of one lease: the session's, and this one,
	// which tells when etcd last acknowledged one.
	acks, err := c.client.KeepAlive(sctx, grant.ID)
	var cs *concurrency.Session
	if err == nil {
		cs, err = concurrency.NewSession(c.client, concurrency.WithTTL(int(grant.TTL)),
			concurrency.WithLease(grant.ID), concurrency.WithContext(sctx))
	}
	if err != nil {
		cancel()
		c.revoke(ctx, []clientv3.LeaseID{grant.ID})
		return nil, fmt.Errorf("etcdcache: keep lease alive: %w", err)
	}
	ttl := time.Duration(grant.TTL) * time.Second
	s = &session{s: cs, ctx: sctx, cancel: cancel, ttl: ttl, holds: make(map[*hold]bool)}
	deadline := start.Add(ttl - margin(ttl))

	c.mu.Lock()
	if !c.goLocked(func() { c.monitor(s, acks, deadline) }) {
		c.mu.Unlock()
		cancel()
		c.revoke(ctx, []clientv3.LeaseID{grant.ID})
		return nil, errClosed
	}
	c.sess = s
	stale := c.stale
	c.stale = nil
	c.mu.Unlock()
	c.revoke(ctx, stale) // etcd answered just now
	return s, nil
}

// monitor ends s when etcd acknowledged no keep-alive for the TTL less
// the margin, when the client reports the lease lost, or at Close.
func (c *Cache) monitor(s *session, acks <-chan *clientv3.LeaseKeepAliveResponse, deadline time.Time) {
	timer := time.NewTimer(time.Until(deadline))
	defer timer.Stop()
loop:
	for {
		select {
		case ack, ok := <-acks:
			if !ok {
				break loop
			}
			ttl := time.Duration(ack.TTL) * time.Second
			timer.Reset(ttl - margin(ttl))
		case <-s.s.Done():
			break loop
		case <-timer.C:
			break loop
		case <-s.ctx.Done():
			break loop
		}
	}
	c.mu.Lock()
	c.giveUpLocked(s) // and stop keeping it alive
	closed := c.closed
	c.mu.Unlock()
	if !closed { // Close revokes it
		// Give the lease up now rather than when it expires, if etcd
		// can be reached.
		ctx, cancel := context.WithTimeout(c.ctx, s.ttl)
		_, err := c.client.Revoke(ctx, s.s.Lease())
		cancel()
		if err != nil && !errors.Is(err, rpctypes.ErrLeaseNotFound) {
			c.mu.Lock()
			c.stale = append(c.stale, s.s.Lease())
			c.mu.Unlock()
		}
	}
}

// giveUpLocked ends s as lost; its monitor then revokes its lease. c.mu
// must be held.
func (c *Cache) giveUpLocked(s *session) {
	if c.sess == s {
		c.sess = nil
	}
	c.endLocked(s)
}

// endLocked marks s ended and releases its locks. c.mu must be held.
func (c *Cache) endLocked(s *session) {
	if s.ended {
		return
	}
	s.ended = true
	for h := range s.holds {
		c.releaseLocked(h)
		c.freeLocked(h.slot) // its entry goes with the lease
	}
	s.cancel()
}

// releaseLocked marks h released and closes its lost; it reports whether
// h was held. c.mu must be held.
func (c *Cache) releaseLocked(h *hold) bool {
	if h.released {
		return false
	}
	h.released = true
	close(h.lost)
	delete(h.sess.holds, h)
	delete(c.holds, h.fence)
	return true
}

// freeLocked ends sl's claim on its name. c.mu must be held.
func (c *Cache) freeLocked(sl *slot) {
	if sl.freed {
		return
	}
	sl.freed = true
	close(sl.free)
	if c.names[sl.name] == sl {
		delete(c.names, sl.name)
	}
}

// claim waits until no other Lock of this process claims name, and
// claims it.
func (c *Cache) claim(ctx context.Context, name string) (*slot, error) {
	for {
		c.mu.Lock()
		if c.closed {
			c.mu.Unlock()
			return nil, errClosed
		}
		sl := c.names[name]
		if sl == nil {
			sl = &slot{name: name, free: make(chan struct{})}
			c.names[name] = sl
			c.mu.Unlock()
			return sl, nil
		}
		free := sl.free
		c.mu.Unlock()
		select {
		case <-free:
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
}

// lockResult is the outcome of an attempt to get a lock.
type lockResult struct {
	h   *hold
	err error
}

// Lock implements certmgr.Coordinator: it blocks until this process
// holds the lock name, or ctx ends. Waiters on all replicas get the lock
// in the order they asked etcd for it. The lock ends at unlock, at Close
// or when the Cache's lease is lost, and then lost is closed (see the
// package documentation). The fence names the lock's entry in etcd.
func (c *Cache) Lock(ctx context.Context, name string) (fence string, lost <-chan struct{}, unlock func(), err error) {
	if err := ctx.Err(); err != nil {
		return "", nil, nil, err
	}
	sl, err := c.claim(ctx, name)
	if err != nil {
		return "", nil, nil, err
	}
	// The attempt runs in a goroutine of its own, which may outlive
	// this call: it can wait for etcd after ctx ends, to delete its
	// entry.
	got := make(chan lockResult)
	gaveUp := make(chan struct{})
	go c.acquire(ctx, sl, got, gaveUp)
	select {
	case r := <-got:
		if r.err != nil {
			return "", nil, nil, r.err
		}
		h := r.h
		return h.fence, h.lost, func() { c.unlock(h) }, nil
	case <-ctx.Done():
		close(gaveUp)
		return "", nil, nil, ctx.Err()
	}
}

// acquire gets the lock sl.name in etcd and hands it over on got, or
// releases it if the caller of Lock gave up meanwhile. It frees sl
// unless it hands over a lock.
func (c *Cache) acquire(ctx context.Context, sl *slot, got chan<- lockResult, gaveUp <-chan struct{}) {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	defer context.AfterFunc(c.ctx, cancel)()
	var r lockResult
	for {
		s, err := c.session(ctx)
		if err != nil {
			r.err = err
			break
		}
		h, err := c.lockIn(ctx, s, sl)
		if h != nil {
			select {
			case got <- lockResult{h: h}:
			case <-gaveUp:
				c.unlock(h)
			}
			return
		}
		if ctx.Err() != nil {
			r.err = ctx.Err()
			if c.ctx.Err() != nil {
				r.err = errClosed
			}
			break
		}
		c.mu.Lock()
		if errors.Is(err, concurrency.ErrSessionExpired) {
			c.giveUpLocked(s)
		}
		ended := s.ended
		c.mu.Unlock()
		if !ended {
			r.err = fmt.Errorf("etcdcache: lock %q: %w", sl.name, err)
			break
		}
		// The lease was lost while waiting: try again with a new one.
	}
	c.mu.Lock()
	c.freeLocked(sl)
	c.mu.Unlock()
	select {
	case got <- r:
	case <-gaveUp:
	}
}

// lockIn gets the lock sl.name with the lease of s, and registers it
// unless s ended meanwhile.
func (c *Cache) lockIn(ctx context.Context, s *session, sl *slot) (*hold, error) {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	defer context.AfterFunc(s.ctx, cancel)()
	pfx := c.prefix + "locks/" + sl.name
	key, rev, err := c.enter(ctx, s, pfx)
	if err == nil {
		c.mu.Lock()
		closed := c.closed
		if !s.ended && !closed {
			h := &hold{slot: sl, sess: s, key: key, createRev: rev, lost: make(chan struct{})}
			h.fence = fmt.Sprintf("%s@%d", h.key, h.createRev)
			s.holds[h] = true
			c.holds[h.fence] = h
			c.mu.Unlock()
			return h, nil
		}
		c.mu.Unlock()
		err = concurrency.ErrSessionExpired
		if closed {
			err = errClosed
		}
	}
	// Leave no entry that would block other replicas while this lease
	// lives, also if the Txn that made it failed after it landed.
	c.deleteEntry(s, entryKey(pfx, s))
	return nil, err
}

// deleteEntry deletes s's lock entry key. One failed request must not
// leave it: it would hold every other replica's Lock of the name for as
// long as s's lease lives. So the delete is tried again, with a growing
// pause, until it lands, s ends (its entries go with its lease) or the
// Cache closes (which revokes the lease); if etcd has not taken it within
// the lease's TTL, s is given up, and its monitor revokes the lease.
func (c *Cache) deleteEntry(s *session, key string) {
	pause := entryRetryPause
	for giveUp := time.Now().Add(s.ttl); ; {
		ctx, cancel := context.WithTimeout(s.ctx, s.ttl)
		_, err := c.client.Delete(ctx, key)
		cancel()
		if err == nil || s.ctx.Err() != nil {
			return
		}
		if !time.Now().Before(giveUp) {
			c.mu.Lock()
			c.giveUpLocked(s)
			c.mu.Unlock()
			return
		}
		t := time.NewTimer(pause)
		select {
		case <-s.ctx.Done():
		case <-t.C:
		}
		t.Stop()
		pause = min(2*pause, s.ttl/4)
	}
}

// entryRetryPause is the first pause before a failed delete of a lock
// entry is tried again.
const entryRetryPause = 50 * time.Millisecond

// entryKey is the key of s's entry for the lock whose entries are under
// pfx.
func entryKey(pfx string, s *session) string { return fmt.Sprintf("%s/%x", pfx, s.s.Lease()) }

// enter puts s's entry for the lock whose entries are under pfx, unless
// it is there, and waits until it is the oldest: the lock is then held.
// It returns the entry's key and create revision. The entry is gone
// (concurrency.ErrSessionExpired) if s's lease expired meanwhile.
func (c *Cache) enter(ctx context.Context, s *session, pfx string) (key string, rev int64, err error) {
	key = entryKey(pfx, s)
	oldest := clientv3.OpGet(pfx+"/", clientv3.WithFirstCreate()...)
	// The entry is made, or found, on the session's context, not the
	// caller's: a caller that gives up must not cut the request while it
	// may still land at etcd, after the clean-up's delete, and leave an
	// entry that blocks every replica for as long as the lease lives.
	sctx, cancel := context.WithTimeout(s.ctx, s.ttl)
	defer cancel()
	var resp *clientv3.TxnResponse
	for range 3 {
		resp, err = c.client.Txn(sctx).
			If(clientv3.Compare(clientv3.CreateRevision(key), "=", 0)).
			Then(clientv3.OpPut(key, "", clientv3.WithLease(s.s.Lease())), oldest).
			Commit()
		if err != nil || resp.Succeeded {
			break
		}
		// An entry of s's is there already: one whose delete has not
		// landed yet. It is never taken over, since its fence was an
		// earlier hold's: it is deleted, and a new one made.
		if _, err = c.client.Delete(sctx, key); err != nil {
			break
		}
	}
	switch {
	case err != nil:
		return key, 0, err
	case !resp.Succeeded:
		return key, 0, fmt.Errorf("etcdcache: the lock entry %s is made again at once whenever it is deleted", key)
	}
	rev = resp.Header.Revision
	if first := resp.Responses[1].GetResponseRange().Kvs; len(first) > 0 && first[0].CreateRevision == rev {
		return key, rev, nil // the oldest entry, in the same transaction: held
	}
	for {
		older, err := c.client.Get(ctx, pfx+"/", append(clientv3.WithLastCreate(), clientv3.WithMaxCreateRev(rev-1))...)
		if err != nil {
			return key, rev, err
		}
		if len(older.Kvs) == 0 {
			break
		}
		if err := c.waitDelete(ctx, string(older.Kvs[0].Key), older.Kvs[0].CreateRevision); err != nil {
			return key, rev, err
		}
	}
	own, err := c.client.Get(ctx, key)
	switch {
	case err != nil:
		return key, rev, err
	case len(own.Kvs) == 0 || own.Kvs[0].CreateRevision != rev:
		return key, rev, concurrency.ErrSessionExpired
	}
	return key, rev, nil
}

// waitDelete returns once the entry key created at revision createRev is
// gone, or ctx ends. It watches key from etcd's current revision, which
// etcd reports at once (a watch from an earlier revision is served only
// at its next resynchronisation, up to 100 ms later), and once the watch
// is in place reads key again, for a delete that came before: the key
// may even be there again, another entry of the same lease, newer than
// the waiter's, which must not be waited for.
func (c *Cache) waitDelete(ctx context.Context, key string, createRev int64) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	for wr := range c.client.Watch(ctx, key, clientv3.WithCreatedNotify()) {
		if err := wr.Err(); err != nil {
			return err
		}
		if wr.Created {
			g, err := c.client.Get(ctx, key)
			if err != nil {
				return err
			}
			if len(g.Kvs) == 0 || g.Kvs[0].CreateRevision != createRev {
				return nil
			}
			continue
		}
		for _, ev := range wr.Events {
			if ev.Type == mvccpb.DELETE {
				return nil
			}
		}
	}
	if err := ctx.Err(); err != nil {
		return err
	}
	return errors.New("etcdcache: the watch of a lock entry ended")
}

// unlock releases h and deletes its entry in etcd, in the background;
// another Lock of the same name in this process waits for the delete.
func (c *Cache) unlock(h *hold) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if !c.releaseLocked(h) {
		return
	}
	if !c.goLocked(func() {
		c.deleteEntry(h.sess, h.key)
		c.mu.Lock()
		c.freeLocked(h.slot)
		c.mu.Unlock()
	}) {
		c.freeLocked(h.slot)
	}
}
