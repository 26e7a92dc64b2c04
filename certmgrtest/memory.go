package certmgrtest

import (
	"cmp"
	"context"
	"fmt"
	"slices"
	"strings"
	"sync"

	"golang.org/x/crypto/acme/autocert"
)

// MemoryStore is a store in memory that stands for the shared store of a
// cluster (etcd, say) in tests of code that coordinates replicas: each
// handle that Open returns is a replica with a lease of its own, and
// implements Coordinator and autocert.Cache on the store's one set of
// keys. It needs no goroutine except one per running Watch.
//
// Revisions are those of the whole store, as etcd's: every write and
// every delete of an existing key takes the next one. Values are copied
// in and out. A lease ends only by MemoryReplica.Lose or Disconnect, at
// once: the store has no clock. The store keeps every write, for Watch
// to replay from any revision, until Compact.
//
// The zero value is not usable; use NewMemoryStore.
type MemoryStore struct {
	mu        sync.Mutex // guards the fields below and those of the replicas' locks
	rev       int64      // the store's revision: that of its latest write
	entries   map[string]memoryEntry
	history   []memoryEvent // the writes after revision compacted, in order
	compacted int64
	locks     map[string]*memoryLock // by name; only while held or waited for
	holds     map[string]*memoryHold // the current holds, by fence
	fences    uint64                 // holds so far, to number their fences
	watches   map[*memoryWatch]bool
}

// memoryEntry is a key's value and the revision that wrote it.
type memoryEntry struct {
	value []byte
	rev   int64
}

// memoryLock is a lock name's holder and its waiters, first come first.
type memoryLock struct {
	holder  *memoryHold
	waiters []*memoryWaiter
}

// memoryHold is a Lock that got the lock.
type memoryHold struct {
	r     *MemoryReplica
	name  string
	fence string        // unique to this hold
	lost  chan struct{} // closed when released, by unlock or loss
}

// memoryWaiter is a Lock waiting for the lock. Its ready is closed when
// it holds the lock (hold is set) or must try again (the replica was
// disconnected).
type memoryWaiter struct {
	r     *MemoryReplica
	ready chan struct{}
	hold  *memoryHold
}

// NewMemoryStore returns an empty store.
func NewMemoryStore() *MemoryStore {
	return &MemoryStore{
		rev:     1, // as etcd's: the first write is revision 2
		entries: make(map[string]memoryEntry),
		locks:   make(map[string]*memoryLock),
		holds:   make(map[string]*memoryHold),
		watches: make(map[*memoryWatch]bool),
	}
}

// Compact drops the store's history of writes, as etcd's compaction
// does: a Watch from an earlier revision then reports the current value
// of each key written since, and not the deletes.
func (s *MemoryStore) Compact() {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.history = nil
	s.compacted = s.rev
}

// holdLocked makes r the holder of the lock name, with a new fence.
func (s *MemoryStore) holdLocked(r *MemoryReplica, name string) *memoryHold {
	s.fences++
	h := &memoryHold{r: r, name: name, fence: fmt.Sprintf("memory-%d/%s", s.fences, name), lost: make(chan struct{})}
	s.locks[name].holder = h
	s.holds[h.fence] = h
	return h
}

// Open returns a new replica's handle on the store, with a lease of its
// own.
func (s *MemoryStore) Open() *MemoryReplica {
	return &MemoryReplica{s: s}
}

// MemoryReplica is one replica's handle on a MemoryStore. Its methods
// may be called concurrently.
type MemoryReplica struct {
	s *MemoryStore
	// cut is not nil while the replica is disconnected, and is closed by
	// Reconnect. Guarded by s.mu.
	cut chan struct{}
}

var (
	_ Coordinator    = (*MemoryReplica)(nil)
	_ autocert.Cache = (*MemoryReplica)(nil)
)

// Lose ends the replica's lease as if it had crashed or been cut off for
// longer than its lease: every lock it holds is released at once, without
// an unlock, and that Lock's lost is closed. The replica goes on with a
// new lease: its calls keep working.
func (r *MemoryReplica) Lose() {
	r.s.mu.Lock()
	defer r.s.mu.Unlock()
	r.loseLocked()
}

// Disconnect cuts the replica off from the store until Reconnect: it
// loses its lease as by Lose, and its calls wait for Reconnect or their
// ctx's end, as those of an etcd client do; its watches report nothing
// meanwhile, and then what was written meanwhile.
func (r *MemoryReplica) Disconnect() {
	r.s.mu.Lock()
	defer r.s.mu.Unlock()
	if r.cut == nil {
		r.cut = make(chan struct{})
	}
	r.loseLocked()
	for _, l := range r.s.locks {
		l.waiters = slices.DeleteFunc(l.waiters, func(w *memoryWaiter) bool {
			if w.r == r {
				close(w.ready) // without a hold: try again
				return true
			}
			return false
		})
	}
}

// Reconnect ends a Disconnect.
func (r *MemoryReplica) Reconnect() {
	r.s.mu.Lock()
	defer r.s.mu.Unlock()
	if r.cut != nil {
		close(r.cut)
		r.cut = nil
	}
}

func (r *MemoryReplica) loseLocked() {
	for name, l := range r.s.locks {
		if l.holder != nil && l.holder.r == r {
			r.s.releaseLocked(name, l.holder)
		}
	}
}

// reach waits until the replica is connected, or ctx ends.
func (r *MemoryReplica) reach(ctx context.Context) error {
	for {
		r.s.mu.Lock()
		cut := r.cut
		r.s.mu.Unlock()
		if cut == nil {
			return ctx.Err()
		}
		select {
		case <-cut:
		case <-ctx.Done():
			return fmt.Errorf("certmgrtest: store unreachable: %w", ctx.Err())
		}
	}
}

// releaseLocked ends h's hold of the lock name, closes its lost, and
// passes the lock to the first waiter.
func (s *MemoryStore) releaseLocked(name string, h *memoryHold) {
	l := s.locks[name]
	if l == nil || l.holder != h {
		return
	}
	close(h.lost)
	l.holder = nil
	delete(s.holds, h.fence)
	if len(l.waiters) == 0 {
		delete(s.locks, name)
		return
	}
	w := l.waiters[0]
	l.waiters = l.waiters[1:]
	w.hold = s.holdLocked(w.r, name)
	close(w.ready)
}

// Lock implements Coordinator: waiters get the lock in the order they
// asked for it. A fence names the lock and counts the holds of the
// store.
func (r *MemoryReplica) Lock(ctx context.Context, name string) (fence string, lost <-chan struct{}, unlock func(), err error) {
	s := r.s
	for {
		if err := r.reach(ctx); err != nil {
			return "", nil, nil, err
		}
		s.mu.Lock()
		if r.cut != nil { // disconnected meanwhile
			s.mu.Unlock()
			continue
		}
		l := s.locks[name]
		if l == nil {
			l = &memoryLock{}
			s.locks[name] = l
		}
		var h *memoryHold
		if l.holder == nil {
			h = s.holdLocked(r, name)
			s.mu.Unlock()
		} else {
			w := &memoryWaiter{r: r, ready: make(chan struct{})}
			l.waiters = append(l.waiters, w)
			s.mu.Unlock()
			select {
			case <-w.ready:
			case <-ctx.Done():
				s.mu.Lock()
				select {
				case <-w.ready: // got it (or a retry) meanwhile: give it back
					if w.hold != nil {
						s.releaseLocked(name, w.hold)
					}
				default:
					l.waiters = slices.DeleteFunc(l.waiters, func(x *memoryWaiter) bool { return x == w })
				}
				s.mu.Unlock()
				return "", nil, nil, ctx.Err()
			}
			if w.hold == nil {
				continue
			}
			h = w.hold
		}
		unlock = func() {
			s.mu.Lock()
			defer s.mu.Unlock()
			s.releaseLocked(name, h)
		}
		return h.fence, h.lost, unlock, nil
	}
}

// fencedLocked reports whether fence is empty or names a current hold of
// r.
func (r *MemoryReplica) fencedLocked(fence string) bool {
	if fence == "" {
		return true
	}
	h := r.s.holds[fence]
	return h != nil && h.r == r
}

// GetRevision implements Coordinator.
func (r *MemoryReplica) GetRevision(ctx context.Context, key string) (value []byte, rev int64, err error) {
	if err := r.reach(ctx); err != nil {
		return nil, 0, err
	}
	r.s.mu.Lock()
	defer r.s.mu.Unlock()
	e, ok := r.s.entries[key]
	if !ok {
		return nil, 0, autocert.ErrCacheMiss
	}
	return slices.Clone(e.value), e.rev, nil
}

// PutIf implements Coordinator.
func (r *MemoryReplica) PutIf(ctx context.Context, key string, value []byte, rev int64, fence string) (newRev int64, ok bool, err error) {
	if err := r.reach(ctx); err != nil {
		return 0, false, err
	}
	r.s.mu.Lock()
	defer r.s.mu.Unlock()
	if r.s.entries[key].rev != rev || !r.fencedLocked(fence) {
		return 0, false, nil
	}
	if value == nil {
		value = []byte{}
	}
	return r.s.putLocked(key, value), true, nil
}

// DeleteIf implements Coordinator.
func (r *MemoryReplica) DeleteIf(ctx context.Context, key string, rev int64, fence string) (ok bool, err error) {
	if err := r.reach(ctx); err != nil {
		return false, err
	}
	r.s.mu.Lock()
	defer r.s.mu.Unlock()
	e, exists := r.s.entries[key]
	if !exists || e.rev != rev || !r.fencedLocked(fence) {
		return false, nil
	}
	r.s.putLocked(key, nil)
	return true, nil
}

// putLocked writes key, or deletes it if value is nil, and reports the
// write to the watches.
func (s *MemoryStore) putLocked(key string, value []byte) int64 {
	s.rev++
	if value == nil {
		delete(s.entries, key)
	} else {
		value = slices.Clone(value)
		if value == nil {
			value = []byte{}
		}
		s.entries[key] = memoryEntry{value, s.rev}
	}
	e := memoryEvent{key, value, s.rev}
	s.history = append(s.history, e)
	for w := range s.watches {
		if strings.HasPrefix(key, w.prefix) {
			w.queue = append(w.queue, e)
			w.signal()
		}
	}
	return s.rev
}

// Get implements autocert.Cache.
func (r *MemoryReplica) Get(ctx context.Context, key string) ([]byte, error) {
	v, _, err := r.GetRevision(ctx, key)
	return v, err
}

// Put implements autocert.Cache: it writes whatever the key's revision.
func (r *MemoryReplica) Put(ctx context.Context, key string, data []byte) error {
	if err := r.reach(ctx); err != nil {
		return err
	}
	if data == nil {
		data = []byte{}
	}
	r.s.mu.Lock()
	defer r.s.mu.Unlock()
	r.s.putLocked(key, data)
	return nil
}

// Delete implements autocert.Cache. Deleting a missing key changes
// nothing and reports nothing to watches.
func (r *MemoryReplica) Delete(ctx context.Context, key string) error {
	if err := r.reach(ctx); err != nil {
		return err
	}
	r.s.mu.Lock()
	defer r.s.mu.Unlock()
	if _, ok := r.s.entries[key]; ok {
		r.s.putLocked(key, nil)
	}
	return nil
}

// memoryWatch is a running Watch.
type memoryWatch struct {
	prefix string
	wake   chan struct{} // has an element when queue may have grown
	queue  []memoryEvent // guarded by the store's mu
}

func (w *memoryWatch) signal() {
	select {
	case w.wake <- struct{}{}:
	default:
	}
}

// memoryEvent is a write, or with a nil value a delete, and its
// revision.
type memoryEvent struct {
	key   string
	value []byte
	rev   int64
}

// Watch implements Coordinator, with one goroutine per call that ends
// when ctx ends. After Compact, a Watch from an earlier revision reports
// the current value of each key written since.
func (r *MemoryReplica) Watch(ctx context.Context, prefix string, fromRev int64, f func(key string, value []byte, rev int64)) error {
	if fromRev < 0 {
		return fmt.Errorf("certmgrtest: Watch from revision %d", fromRev)
	}
	if err := r.reach(ctx); err != nil {
		return err
	}
	w := &memoryWatch{prefix: prefix, wake: make(chan struct{}, 1)}
	s := r.s
	s.mu.Lock()
	if fromRev == 0 {
		fromRev = s.rev
	}
	if fromRev < s.compacted {
		for key, e := range s.entries {
			if e.rev > fromRev && strings.HasPrefix(key, prefix) {
				w.queue = append(w.queue, memoryEvent{key, e.value, e.rev})
			}
		}
		slices.SortFunc(w.queue, func(a, b memoryEvent) int { return cmp.Compare(a.rev, b.rev) })
	} else {
		i, _ := slices.BinarySearchFunc(s.history, fromRev+1, func(e memoryEvent, rev int64) int { return cmp.Compare(e.rev, rev) })
		for _, e := range s.history[i:] {
			if strings.HasPrefix(e.key, prefix) {
				w.queue = append(w.queue, e)
			}
		}
	}
	if len(w.queue) > 0 {
		w.signal()
	}
	s.watches[w] = true
	s.mu.Unlock()
	go func() {
		defer func() {
			s.mu.Lock()
			delete(s.watches, w)
			s.mu.Unlock()
		}()
		for {
			select {
			case <-w.wake:
			case <-ctx.Done():
				return
			}
			s.mu.Lock()
			q := w.queue
			w.queue = nil
			s.mu.Unlock()
			for _, e := range q {
				if r.reach(ctx) != nil {
					return
				}
				f(e.key, slices.Clone(e.value), e.rev)
			}
		}
	}()
	return nil
}
