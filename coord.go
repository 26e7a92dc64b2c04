package certmgr

import (
	"golang.org/x/crypto/acme/autocert"

	"github.com/certmgr/certmgr/internal/coord"
)

// Coordinator is what replicas that share one store need to act as one
// server: a lock per domain that a lost replica gives up by itself, and
// records that are read with their revision and written or deleted only
// if nobody wrote them meanwhile and, when fenced, only while the
// writer's hold of its lock is still current.
//
// An autocert.Cache that implements Coordinator, or wraps one that does
// and has a method Unwrap() autocert.Cache that returns it, keeps
// certificates, challenge tokens, the account key and certmgr's failure
// records in that one store.
//
// Revisions are those of the whole store, as etcd's: every write and
// every delete takes a revision greater than all before it (writes that
// the store makes in one transaction, if any, share one), so that the
// revisions of one key, and those that Watch reports, only grow. The
// first write's revision is greater than 1, as etcd's is: Watch from
// revision 1 reports every key there is.
//
// Its methods, in short:
//
//   - Lock(ctx, name) (fence, lost, unlock, err) blocks until this process
//     holds the lock name, or ctx ends; a second Lock of the name in the
//     same process waits for the first's unlock. fence is a token of this
//     hold alone; lost is closed when the hold ends, by unlock or when
//     this process counts its lease as lost, within the lease's TTL of
//     the last renewal it saw; unlock returns at once, and may be called
//     more than once.
//   - GetRevision(ctx, key) (value, rev, err) returns key's value and
//     revision. A missing key is autocert.ErrCacheMiss with revision 0.
//   - PutIf(ctx, key, value, rev, fence) (newRev, ok, err) writes value
//     under key if key's revision is still rev (0: the key is absent)
//     and, if fence is not empty, only while the hold that fence names is
//     current. It returns the new revision and true, or false with no
//     error when a condition failed.
//   - DeleteIf(ctx, key, rev, fence) (ok, err) deletes key if its
//     revision is still rev, which must be greater than 0 (a missing key
//     is never deleted), and, with fence, only while fence's hold is
//     current. It reports whether it deleted key.
//   - Watch(ctx, prefix, fromRev, f) error calls f for every write
//     (delete: a nil value) of a key that starts with prefix with a
//     revision greater than fromRev (0: the current one), in order, with
//     the write's revision, until ctx ends. If those writes can no longer
//     be replayed, it reports the current value and revision of every key
//     under prefix written after fromRev instead. It returns once it
//     watches. New waits for it at most a second; while it fails, or
//     has not returned, it is tried again in the background.
//
// Each method's documentation, on the one declaration of the interface,
// [coord.Coordinator], gives its contract in full; an implementation
// must keep all of it. Read it with
//
//	go doc github.com/certmgr/certmgr/internal/coord.Coordinator
//
// The methods use only the standard library's types, so that a backend
// module implements it without importing certmgr, and certmgrtest can
// check any implementation against the same conformance suite.
// certmgrtest.Coordinator is the same type.
type Coordinator = coord.Coordinator

// coordinatorOf returns the Coordinator that cache implements, or that a
// wrapper of it passes through: a Cache that wraps another may implement
// Unwrap() autocert.Cache, and coordinatorOf follows it. It returns nil
// when there is none: each process then decides alone.
func coordinatorOf(cache autocert.Cache) Coordinator {
	for range 16 { // a chain of wrappers, not a cycle
		if c, ok := cache.(Coordinator); ok {
			return c
		}
		w, ok := cache.(interface{ Unwrap() autocert.Cache })
		if !ok {
			return nil
		}
		cache = w.Unwrap()
	}
	return nil
}
