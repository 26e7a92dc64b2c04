package certmgr

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"sync"
	"time"

	"golang.org/x/crypto/acme/autocert"
)

// certCache is the autocert.Cache that every autocert.Manager of a
// certmgr.Manager writes through. It wraps the user's Cache (a memory map
// when there is none) and:
//   - tells the Manager of every certificate written, so that a renewal
//     done on autocert's own timers is served from the next handshake on;
//   - keeps the certificates and state whose write failed, serves them to
//     readers, and writes them again later, so that nothing obtained is lost;
//   - admits every write of the Manager to the Cache, its Coordinator's
//     included, until Close seals it (see write and seal).
type certCache struct {
	inner autocert.Cache
	coord Coordinator   // inner, if it is one: certificates are written through it
	mgr   cacheOwner    // the Manager told of writes and failures
	kick  chan struct{} // wakes the retry loop; buffered, 1

	pendingMu sync.Mutex
	pending   map[string][]byte // writes that failed, by key

	writersMu sync.Mutex
	writers   map[string]*keyWriter // keys being written; see lockKey

	// sealMu guards sealed and every Add to writing, so that seal waits
	// for each write admitted before it and none is admitted after it.
	sealMu  sync.Mutex
	sealed  bool           // no write reaches the Cache any more
	writing sync.WaitGroup // the writes in flight
}

// errCacheClosed refuses a write to the Cache after Close sealed it.
var errCacheClosed = fmt.Errorf("%w: no write to the Cache after Close", errClosed)

// write runs f, one write to the inner Cache or to its Coordinator, unless
// the cache is sealed: it then returns errCacheClosed without running f.
// It is called with the key's lock held, if any (see lockKey), so that a
// write that waits for its key is refused once sealed, not waited for.
func (c *certCache) write(f func() error) error {
	c.sealMu.Lock()
	if c.sealed {
		c.sealMu.Unlock()
		return errCacheClosed
	}
	c.writing.Add(1)
	c.sealMu.Unlock()
	defer c.writing.Done()
	return f()
}

// seal refuses every write from now on, and waits for those in flight:
// once it returns, nothing reaches the Cache through c.
func (c *certCache) seal() {
	c.sealMu.Lock()
	c.sealed = true
	c.sealMu.Unlock()
	c.writing.Wait()
}

// cacheOwner is what the Cache wrapper tells and asks the Manager;
// *Manager implements it.
type cacheOwner interface {
	// certStored is called after a certificate key was written, at
	// revision rev of a Coordinator's store (0: none), or kept for a
	// retry of its write (rev 0) (handshake.go).
	certStored(key string, data []byte, rev int64)
	// cacheFailed reports a failure of op on key (certmgr.go).
	cacheFailed(op, key string, err error)
	// mayWriteToken reports whether domain's TLS-ALPN-01 certificate
	// ("<domain>+token") may be written or deleted now. Replicas share
	// that one key: only the holder of the domain's lock writes it, so
	// that one that lost its lock neither overwrites nor deletes (in
	// autocert's clean-up) the new holder's (cluster.go).
	mayWriteToken(domain string) bool
	// tokenWritten is called after domain's TLS-ALPN-01 certificate was
	// written, with its value (cluster.go).
	tokenWritten(domain string, data []byte)
}

// keyWriter serialises the writes of one key.
type keyWriter struct {
	mu    sync.Mutex // held across one write of the key to the inner Cache
	users int        // guarded by certCache.writersMu
}

// lockKey serialises the writes of key to the inner Cache, so that of two
// writes of a key (a Put and the retry of an older one that failed) the
// one that lands last is the one that began last. It returns the unlock
// function. The lock is held across the inner Cache's call; nothing else
// is taken under it but pendingMu.
func (c *certCache) lockKey(key string) (unlock func()) {
	c.writersMu.Lock()
	w := c.writers[key]
	if w == nil {
		w = &keyWriter{}
		c.writers[key] = w
	}
	w.users++
	c.writersMu.Unlock()
	w.mu.Lock()
	return func() {
		w.mu.Unlock()
		c.writersMu.Lock()
		if w.users--; w.users == 0 {
			delete(c.writers, key)
		}
		c.writersMu.Unlock()
	}
}

func newCertCache(inner autocert.Cache, mgr cacheOwner) *certCache {
	if inner == nil {
		inner = &memCache{m: make(map[string][]byte)}
	}
	coord := coordinatorOf(inner) // through a wrapper's Unwrap, as the Manager's
	return &certCache{inner: inner, coord: coord, mgr: mgr, kick: make(chan struct{}, 1), pending: make(map[string][]byte), writers: make(map[string]*keyWriter)}
}

// Get implements autocert.Cache. An error other than a miss is a
// *cacheError. A certificate entry that cannot be decoded is reported
// and answered as a miss: autocert would otherwise fail on it for good,
// where a miss makes it order a new certificate.
func (c *certCache) Get(ctx context.Context, key string) ([]byte, error) {
	data, err := c.get(ctx, key)
	c.report("get", key, err)
	if ce := (*cacheError)(nil); errors.As(err, &ce) && ce.miss {
		return nil, autocert.ErrCacheMiss // autocert compares with ==
	}
	return data, err
}

// report hands a failure of op on key to the Manager. A miss is no failure.
func (c *certCache) report(op, key string, err error) {
	var ce *cacheError
	switch {
	case err == nil || errors.Is(err, autocert.ErrCacheMiss) && !errors.As(err, &ce):
	case errors.Is(err, errCacheClosed): // refused after Close: no news
	case errors.As(err, &ce):
		c.mgr.cacheFailed(op, key, ce.err)
	default:
		c.mgr.cacheFailed(op, key, err)
	}
}

// get is Get without reporting, for callers that hold a lock: they
// report once they released it.
func (c *certCache) get(ctx context.Context, key string) ([]byte, error) {
	c.pendingMu.Lock()
	data, ok := c.pending[key]
	c.pendingMu.Unlock()
	if ok {
		return data, nil
	}
	data, err := c.inner.Get(ctx, key)
	switch {
	case errors.Is(err, autocert.ErrCacheMiss):
		return nil, err
	case err != nil:
		return nil, &cacheError{op: "get", key: key, err: err}
	case isCertKey(key):
		if _, err := decodeCert(data); err != nil {
			// A miss to autocert, reported all the same.
			return nil, &cacheError{op: "get", key: key, err: err, miss: true}
		}
	}
	return data, nil
}

// cacheError is a Cache failure: the Cache, not the CA, failed.
type cacheError struct {
	op, key string
	err     error
	miss    bool // the entry is corrupt: to autocert, a miss
}

func (e *cacheError) Error() string {
	return "certmgr: cache " + e.op + " " + strconv.Quote(e.key) + ": " + e.err.Error()
}

// Unwrap returns the Cache's error, or autocert.ErrCacheMiss for a
// corrupt entry.
func (e *cacheError) Unwrap() error {
	if e.miss {
		return autocert.ErrCacheMiss
	}
	return e.err
}

// Put implements autocert.Cache. A certificate or state write that fails
// is kept and retried; the error is still returned. After Close, a write
// is refused with errCacheClosed, or dropped (nil) if it is a challenge
// token's, whose outcome autocert ignores.
func (c *certCache) Put(ctx context.Context, key string, data []byte) error {
	if !c.tokenWritable(key) {
		return nil // autocert ignores the outcome of a token write
	}
	err := c.put(ctx, key, data)
	if errors.Is(err, errCacheClosed) && isTokenKey(key) {
		return nil
	}
	if domain, ok := strings.CutSuffix(key, "+token"); ok && err == nil {
		c.mgr.tokenWritten(domain, data)
	}
	c.report("put", key, err)
	return err
}

// put is Put without reporting. A write refused after Close is neither
// kept nor told to the Manager.
func (c *certCache) put(ctx context.Context, key string, data []byte) error {
	unlock := c.lockKey(key)
	var rev int64
	err := c.write(func() (err error) {
		rev, err = c.putInner(ctx, key, data)
		return err
	})
	if errors.Is(err, errCacheClosed) {
		unlock()
		return err
	}
	keep := isCertKey(key) || key == stateKey || key == accountKeyName
	c.pendingMu.Lock()
	if err != nil && keep {
		c.pending[key] = data
	} else {
		delete(c.pending, key)
	}
	c.pendingMu.Unlock()
	unlock()
	if err != nil && keep {
		select {
		case c.kick <- struct{}{}:
		default:
		}
	}
	if isCertKey(key) {
		c.mgr.certStored(key, data, rev)
	}
	return err
}

// putTries bounds the compare-and-swap writes of one certificate key.
const putTries = 8

// putInner writes key to the inner Cache. A certificate key, if the inner
// Cache is or wraps a Coordinator, is written to the Coordinator (the
// store that its watch reads and its records live in) by compare-and-swap
// on the revision
// just read, whose new revision it returns: replicas serve the
// certificate their store holds last, by revision (see serveAt). It is
// not written over a certificate issued later (one a replica that held
// the lock stored while this one's write waited for a retry, say): that
// write succeeds with revision 0, and the store's is served. It returns 0
// for every other write.
func (c *certCache) putInner(ctx context.Context, key string, data []byte) (int64, error) {
	if c.coord == nil || !isCertKey(key) {
		return 0, c.inner.Put(ctx, key, data)
	}
	pause := putPause
	for range putTries {
		stored, rev, err := c.coord.GetRevision(ctx, key)
		if err == nil || errors.Is(err, autocert.ErrCacheMiss) {
			if issuedLater(stored, data) {
				return 0, nil
			}
			var ok bool
			if rev, ok, err = c.coord.PutIf(ctx, key, data, rev, ""); err == nil && ok {
				return rev, nil
			}
		}
		if err != nil {
			// A store that fails for a moment (etcd electing a leader):
			// tried again at once while the attempt holds its lock, lest
			// another replica find no certificate and order again.
			if pause > putPauseMax || !sleepCtx(ctx, pause) {
				return 0, err
			}
			pause *= 2
		}
	}
	return 0, fmt.Errorf("certmgr: writing %q: it was written again %d times in a row meanwhile", key, putTries)
}

// A certificate's write to a Coordinator that fails is tried again after
// putPause, then twice as long each time, up to putPauseMax: about 1.5 s
// in all, as long as etcd takes to elect a leader.
const (
	putPause    = 100 * time.Millisecond
	putPauseMax = 800 * time.Millisecond
)

// sleepCtx waits for d, and reports whether ctx is still live.
func sleepCtx(ctx context.Context, d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return true
	case <-ctx.Done():
		return false
	}
}

// Delete implements autocert.Cache. After Close, a delete is dropped:
// autocert deletes only challenge tokens, in goroutines of its own that
// ignore the outcome.
func (c *certCache) Delete(ctx context.Context, key string) error {
	if !c.tokenWritable(key) {
		return nil
	}
	unlock := c.lockKey(key)
	defer unlock()
	err := c.write(func() error {
		c.pendingMu.Lock()
		delete(c.pending, key)
		c.pendingMu.Unlock()
		return c.inner.Delete(ctx, key)
	})
	if errors.Is(err, errCacheClosed) {
		return nil
	}
	return err
}

// tokenWritable reports whether key, if it is a domain's TLS-ALPN-01
// certificate, may be written or deleted now (see mayWriteToken).
func (c *certCache) tokenWritable(key string) bool {
	domain, ok := strings.CutSuffix(key, "+token")
	return !ok || c.mgr.mayWriteToken(domain)
}

// issuedLater reports whether the certificate encoded in a was issued
// after the one in b; false if either cannot be decoded.
func issuedLater(a, b []byte) bool {
	ca, err := decodeCert(a)
	if err != nil {
		return false
	}
	cb, err := decodeCert(b)
	return err == nil && ca.Leaf.NotBefore.After(cb.Leaf.NotBefore)
}

// isTokenKey reports whether key is a challenge token's: a TLS-ALPN-01
// certificate ("+token") or an http-01 response ("+http-01").
func isTokenKey(key string) bool {
	return strings.HasSuffix(key, "+token") || strings.HasSuffix(key, "+http-01")
}

// retryLoop writes the kept entries again every interval until they are
// all written or ctx ends.
func (c *certCache) retryLoop(ctx context.Context, interval time.Duration) {
	t := time.NewTimer(interval)
	t.Stop()
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-c.kick:
			t.Reset(interval)
		case <-t.C:
			if c.flush(ctx) > 0 {
				t.Reset(interval)
			}
		}
	}
}

// flush writes the kept entries and returns how many are left. Each is
// written under its key's lock, and only if it is still the newest write
// of its key: a Put that succeeded meanwhile is not overwritten.
func (c *certCache) flush(ctx context.Context) int {
	c.pendingMu.Lock()
	keys := make([]string, 0, len(c.pending))
	for k := range c.pending {
		keys = append(keys, k)
	}
	c.pendingMu.Unlock()
	for _, k := range keys {
		unlock := c.lockKey(k)
		c.pendingMu.Lock()
		v, ok := c.pending[k]
		c.pendingMu.Unlock()
		var err error
		if ok {
			wctx, cancel := context.WithTimeout(ctx, cacheTimeout)
			err = c.write(func() error {
				_, err := c.putInner(wctx, k, v) // the watch serves it (storeChanged)
				return err
			})
			cancel()
			if err == nil {
				c.pendingMu.Lock()
				delete(c.pending, k) // under the key's lock: nothing newer came
				c.pendingMu.Unlock()
			}
		}
		unlock()
		if err != nil && !errors.Is(err, errCacheClosed) {
			c.mgr.cacheFailed("put", k, err)
		}
	}
	c.pendingMu.Lock()
	defer c.pendingMu.Unlock()
	return len(c.pending)
}

// cacheTimeout bounds one Cache call made by certmgr itself.
const cacheTimeout = 10 * time.Second
