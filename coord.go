package certmgr

import (
	"context"

	"golang.org/x/crypto/acme/autocert"
)

// Coordinator is what replicas that share one store need to act as one
// server: a lock per domain that a lost replica gives up by itself, and
// records that are read with their revision and written only if nobody
// wrote them meanwhile and, when fenced, only while the writer still
// holds its lock.
//
// An autocert.Cache that implements Coordinator, or wraps one that does
// and has a method Unwrap() autocert.Cache that returns it, keeps certificates, challenge tokens, the account
// key and certmgr's failure records in that one store.
//
// The methods use only the standard library's types, so that a backend
// module implements it without importing certmgr, and certmgrtest can
// check any implementation against the same conformance suite.
type Coordinator interface {
	// Lock blocks until this process holds the lock name, or ctx ends.
	// The lock lasts until unlock is called or the store loses this
	// process (it crashed, was cut off, or paused for longer than its
	// lease): then lost is closed, at the latest when another process
	// can take the lock. unlock releases the lock, closes lost, and may
	// be called more than once.
	Lock(ctx context.Context, name string) (lost <-chan struct{}, unlock func(), err error)

	// GetRevision returns key's value and revision. A missing key is
	// autocert.ErrCacheMiss with revision 0.
	GetRevision(ctx context.Context, key string) (value []byte, rev int64, err error)

	// PutIf writes value under key if key's revision is still rev (0: the
	// key is absent) and, if fence is not empty, only while this process
	// holds the lock named fence. It returns the new revision and true,
	// or false with no error when a condition failed; err reports the
	// store's failure, after which the write may or may not have landed.
	PutIf(ctx context.Context, key string, value []byte, rev int64, fence string) (newRev int64, ok bool, err error)

	// Watch calls f for every value written under a key that starts with
	// prefix, in the order written, until ctx ends; a deleted key is
	// reported with a nil value. It returns once it watches. Calls of f
	// are not concurrent; f must not block for long.
	Watch(ctx context.Context, prefix string, f func(key string, value []byte)) error
}

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
