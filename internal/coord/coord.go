// Package coord declares the interface that certmgr.Coordinator and
// certmgrtest.Coordinator both name: certmgrtest cannot import certmgr,
// whose tests import certmgrtest, so the one declaration lives here, in
// a package that imports only the standard library.
package coord

import "context"

// Coordinator is a store that replicas share to act as one server. The
// documentation of certmgr.Coordinator says what it is for and how its
// revisions count; the contract of each method is below.
type Coordinator interface {
	// Lock blocks until this process holds the lock name, or ctx ends
	// (and then returns ctx's error); the lock outlives ctx. Waiters in
	// this process and in others are alike: a second Lock of a name in
	// the same process waits for the first's unlock, so a holder that
	// locks its name again waits for itself until ctx ends.
	//
	// fence is a token of this hold alone, never empty: the next hold of
	// the same name, even by the same process, gets another. PutIf and
	// DeleteIf given fence land only while this hold is current: before
	// lost is closed, and while the store still counts it the lock's
	// holder, which the store checks in the write itself.
	//
	// lost is closed when the hold ends: at unlock, or once this process
	// counts its lease as lost. It does so within the lease's TTL of the
	// last renewal it saw acknowledged, by a deadline on its own clock:
	// that is the best a client can know, and not a guarantee. Another
	// process may take the lock before lost is closed, if the lease was
	// revoked in the store (by an operator, say), or if this process was
	// paused (a long GC, a frozen VM) past that deadline. lost tells a
	// holder when to stop; every write that must not race another
	// holder's must be fenced.
	//
	// unlock ends the hold and closes lost at once: a fenced write that
	// starts after it returns fails. It returns without waiting for the
	// store: the lock's entry may stay there briefly, so another process
	// may get the lock a moment later (never earlier). unlock may be
	// called more than once, and after lost is closed.
	Lock(ctx context.Context, name string) (fence string, lost <-chan struct{}, unlock func(), err error)

	// GetRevision returns key's value and revision. A missing key is
	// autocert.ErrCacheMiss with revision 0.
	GetRevision(ctx context.Context, key string) (value []byte, rev int64, err error)

	// PutIf writes value under key if key's revision is still rev (0: the
	// key is absent) and, if fence is not empty, only while the hold of a
	// lock that fence names is current (see Lock). fence must be one that
	// this Coordinator's Lock returned; any other makes the write fail.
	// PutIf returns the write's revision and true, or false with no
	// error when a condition failed; err reports the store's failure,
	// after which the write may or may not have landed.
	PutIf(ctx context.Context, key string, value []byte, rev int64, fence string) (newRev int64, ok bool, err error)

	// DeleteIf deletes key if its revision is still rev, which must then
	// be greater than 0, and, with fence, only while fence's hold is
	// current, as PutIf. It returns true if it deleted key, or false
	// with no error when a condition failed: in particular, a missing
	// key is never deleted, whatever rev. err reports the store's
	// failure, after which the delete may or may not have landed.
	DeleteIf(ctx context.Context, key string, rev int64, fence string) (ok bool, err error)

	// Watch calls f for every write and delete of a key that starts with
	// prefix whose revision is greater than fromRev, in the order of
	// their revisions, until ctx ends: with the key's value and the
	// write's revision, and for a delete a nil value and the delete's
	// revision. fromRev 0 is the store's current revision: then Watch
	// reports the writes that follow its call. A caller that read a key
	// with GetRevision and watches from that revision thus misses no
	// later write.
	//
	// When the writes after fromRev can no longer be replayed (the store
	// compacted its history), Watch reports instead the current value of
	// every key under prefix written after fromRev, with its revision,
	// oldest first, and goes on from there: a key deleted in that gap is
	// then not reported. This may also happen when Watch resumes after
	// it lost the store for a while, if the store compacted meanwhile.
	//
	// Watch returns once it watches, or an error if it cannot. Calls of
	// f are not concurrent; f must not block for long. fromRev must not
	// be negative.
	Watch(ctx context.Context, prefix string, fromRev int64, f func(key string, value []byte, rev int64)) error
}
