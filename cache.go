package certmgr

import (
	"context"
	"crypto"
	"crypto/rsa"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"errors"
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
//     readers, and writes them again later, so that nothing obtained is lost.
type certCache struct {
	inner   autocert.Cache
	onPut   func(key string, data []byte) // after a certificate key is written (or kept)
	onError func(op, key string, err error)
	// mayWriteToken reports whether domain's TLS-ALPN-01 certificate
	// ("<domain>+token") may be written or deleted now; if nil, always.
	// Replicas share that one key: only the holder of the domain's lock
	// writes it, so that one that lost its lock neither overwrites nor
	// deletes (in autocert's clean-up) the new holder's.
	mayWriteToken func(domain string) bool
	kick          chan struct{} // wakes the retry loop; buffered, 1

	pendingMu sync.Mutex
	pending   map[string][]byte // writes that failed, by key

	writersMu sync.Mutex
	writers   map[string]*keyWriter // keys being written; see lockKey
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

func newCertCache(inner autocert.Cache) *certCache {
	if inner == nil {
		inner = &memCache{m: make(map[string][]byte)}
	}
	return &certCache{inner: inner, kick: make(chan struct{}, 1), pending: make(map[string][]byte), writers: make(map[string]*keyWriter)}
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

// report hands a failure of op on key to onError. A miss is no failure.
func (c *certCache) report(op, key string, err error) {
	var ce *cacheError
	switch {
	case err == nil || errors.Is(err, autocert.ErrCacheMiss) && !errors.As(err, &ce):
	case errors.As(err, &ce):
		c.onError(op, key, ce.err)
	default:
		c.onError(op, key, err)
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
// is kept and retried; the error is still returned.
func (c *certCache) Put(ctx context.Context, key string, data []byte) error {
	if !c.tokenWritable(key) {
		return nil // autocert ignores the outcome of a token write
	}
	err := c.put(ctx, key, data)
	c.report("put", key, err)
	return err
}

// put is Put without reporting.
func (c *certCache) put(ctx context.Context, key string, data []byte) error {
	unlock := c.lockKey(key)
	err := c.inner.Put(ctx, key, data)
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
		c.onPut(key, data)
	}
	return err
}

// Delete implements autocert.Cache.
func (c *certCache) Delete(ctx context.Context, key string) error {
	if !c.tokenWritable(key) {
		return nil
	}
	unlock := c.lockKey(key)
	defer unlock()
	c.pendingMu.Lock()
	delete(c.pending, key)
	c.pendingMu.Unlock()
	return c.inner.Delete(ctx, key)
}

// tokenWritable reports whether key, if it is a domain's TLS-ALPN-01
// certificate, may be written or deleted now (see mayWriteToken).
func (c *certCache) tokenWritable(key string) bool {
	domain, ok := strings.CutSuffix(key, "+token")
	return !ok || c.mayWriteToken == nil || c.mayWriteToken(domain)
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
			err = c.inner.Put(wctx, k, v)
			cancel()
			if err == nil {
				c.pendingMu.Lock()
				delete(c.pending, k) // under the key's lock: nothing newer came
				c.pendingMu.Unlock()
			}
		}
		unlock()
		if err != nil {
			c.onError("put", k, err)
		}
	}
	c.pendingMu.Lock()
	defer c.pendingMu.Unlock()
	return len(c.pending)
}

// cacheTimeout bounds one Cache call made by certmgr itself.
const cacheTimeout = 10 * time.Second

// isCertKey reports whether key is one under which autocert stores a
// domain's certificate: "example.com" (ECDSA) or "example.com+rsa".
// Its other keys have other suffixes ("+token", "+http-01",
// "acme_account+key"), or are autocert's former account key name
// ("acme_account.key"), and certmgr's own start with "certmgr+".
func isCertKey(key string) bool {
	if key == oldAccountKeyName {
		return false
	}
	i := strings.IndexByte(key, '+')
	return i < 0 || key[i:] == "+rsa"
}

// certKey names one of a domain's certificates.
type certKey struct {
	domain string
	rsa    bool
}

// cacheKey returns the autocert.Cache key of k.
func (k certKey) cacheKey() string {
	if k.rsa {
		return k.domain + "+rsa"
	}
	return k.domain
}

func certKeyOf(cacheKey string) certKey {
	if d, ok := strings.CutSuffix(cacheKey, "+rsa"); ok {
		return certKey{domain: d, rsa: true}
	}
	return certKey{domain: cacheKey}
}

// parseCert decodes a certificate as autocert stores it and checks that
// it is usable for k at now.
func parseCert(k certKey, data []byte, now time.Time) (*tls.Certificate, error) {
	c, err := decodeCert(data)
	if err != nil {
		return nil, err
	}
	leaf := c.Leaf
	if now.Before(leaf.NotBefore) || !now.Before(leaf.NotAfter) {
		return nil, errors.New("certmgr: cached certificate is not valid now")
	}
	if err := leaf.VerifyHostname(k.domain); err != nil {
		return nil, err
	}
	if _, isRSA := leaf.PublicKey.(*rsa.PublicKey); isRSA != k.rsa {
		return nil, errors.New("certmgr: cached certificate has the wrong key type")
	}
	return c, nil
}

// decodeCert decodes a certificate as autocert stores it: the private key
// then the chain, in PEM. The leaf must match the key.
func decodeCert(data []byte) (*tls.Certificate, error) {
	keyBlock, rest := pem.Decode(data)
	if keyBlock == nil || !strings.Contains(keyBlock.Type, "PRIVATE") {
		return nil, errors.New("certmgr: cached certificate has no private key")
	}
	var chain [][]byte
	for len(rest) > 0 {
		var b *pem.Block
		b, rest = pem.Decode(rest)
		if b == nil {
			break
		}
		chain = append(chain, b.Bytes)
	}
	if len(chain) == 0 || len(strings.TrimSpace(string(rest))) > 0 {
		return nil, errors.New("certmgr: cached certificate is malformed")
	}
	key, err := parsePrivateKey(keyBlock.Bytes)
	if err != nil {
		return nil, err
	}
	leaf, err := x509.ParseCertificate(chain[0])
	if err != nil {
		return nil, err
	}
	if pub, ok := leaf.PublicKey.(interface{ Equal(crypto.PublicKey) bool }); !ok || !pub.Equal(key.Public()) {
		return nil, errors.New("certmgr: cached certificate does not match its key")
	}
	return &tls.Certificate{Certificate: chain, PrivateKey: key, Leaf: leaf}, nil
}

func parsePrivateKey(der []byte) (crypto.Signer, error) {
	if k, err := x509.ParsePKCS1PrivateKey(der); err == nil {
		return k, nil
	}
	if k, err := x509.ParseECPrivateKey(der); err == nil {
		return k, nil
	}
	k, err := x509.ParsePKCS8PrivateKey(der)
	if err != nil {
		return nil, errors.New("certmgr: cannot parse private key")
	}
	s, ok := k.(crypto.Signer)
	if !ok {
		return nil, errors.New("certmgr: private key cannot sign")
	}
	return s, nil
}

// memCache is the Cache of a Manager whose autocert.Manager has none:
// state then lives as long as the process.
type memCache struct {
	mu sync.Mutex
	m  map[string][]byte
}

func (c *memCache) Get(_ context.Context, key string) ([]byte, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if v, ok := c.m[key]; ok {
		return v, nil
	}
	return nil, autocert.ErrCacheMiss
}

func (c *memCache) Put(_ context.Context, key string, data []byte) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.m[key] = data
	return nil
}

func (c *memCache) Delete(_ context.Context, key string) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	delete(c.m, key)
	return nil
}
