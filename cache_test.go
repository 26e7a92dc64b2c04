package certmgr

import (
	"bytes"
	"context"
	"crypto"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/crypto/acme/autocert"

	"github.com/certmgr/certmgr/internal/testsupport"
)

// newTestCertCache returns a certCache over a faultCache over memory, and
// what it reported, one report a line.
func newTestCertCache() (*certCache, *faultCache, *testsupport.Buffer) {
	fc := &faultCache{inner: &memCache{m: make(map[string][]byte)}}
	reports := &testsupport.Buffer{}
	c := newCertCache(fc, &reportingOwner{w: reports})
	return c, fc, reports
}

// TestCertCacheKeepsFailedWrites: a certificate, the state or the account
// key whose write fails is kept, served to readers and written again by
// flush; a newer write replaces it; other keys are not kept.
func TestCertCacheKeepsFailedWrites(t *testing.T) {
	ctx := context.Background()
	c, fc, reports := newTestCertCache()
	fc.failPut.Store(true)
	for _, key := range []string{"a.test", stateKey, accountKeyName, "a.test+token"} {
		if err := c.Put(ctx, key, []byte("v1 "+key)); !errors.Is(err, errInjectedCache) {
			t.Errorf("Put(%s) = %v, want the Cache's error", key, err)
		}
	}
	if got := reports.String(); got != "put a.test\nput a.test error\nput certmgr+state error\nput acme_account+key error\nput a.test+token error\n" {
		t.Errorf("reported %s", got)
	}
	for _, key := range []string{"a.test", stateKey, accountKeyName} {
		if data, err := c.Get(ctx, key); err != nil || string(data) != "v1 "+key {
			t.Errorf("Get(%s) = %q, %v; want the kept write", key, data, err)
		}
	}
	if _, err := c.Get(ctx, "a.test+token"); !errors.Is(err, autocert.ErrCacheMiss) {
		t.Errorf("Get(a.test+token) = %v, want a miss: a token is not kept", err)
	}
	c.Put(ctx, stateKey, []byte("v2"))
	if n := c.flush(ctx); n != 3 {
		t.Errorf("flush with the Cache failing left %d, want 3", n)
	}
	fc.failPut.Store(false)
	if n := c.flush(ctx); n != 0 {
		t.Errorf("flush left %d, want 0", n)
	}
	if data, _ := fc.inner.Get(ctx, stateKey); string(data) != "v2" {
		t.Errorf("the Cache holds %q, want the newest write", data)
	}
	if err := c.Delete(ctx, "a.test"); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Get(ctx, "a.test"); !errors.Is(err, autocert.ErrCacheMiss) {
		t.Errorf("Get after Delete = %v, want a miss", err)
	}
}

// TestCertCacheRetryLoop: the retry loop writes a kept entry once the
// Cache works again, and stops with its context.
func TestCertCacheRetryLoop(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	c, fc, _ := newTestCertCache()
	done := make(chan struct{})
	go func() { c.retryLoop(ctx, time.Millisecond); close(done) }()
	fc.failPut.Store(true)
	c.Put(ctx, "a.test", []byte("cert"))
	waitFor(t, 5*time.Second, "the write to be retried", func() bool { return fc.putErrs.Load() >= 3 })
	fc.failPut.Store(false)
	waitFor(t, 5*time.Second, "the write", func() bool {
		data, err := fc.inner.Get(ctx, "a.test")
		return err == nil && string(data) == "cert"
	})
	cancel()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		t.Fatal("the retry loop did not stop with its context")
	}
}

// TestCertCacheCorruptCertificateIsAMiss: a certificate entry that cannot
// be decoded is a miss to autocert (which then orders anew), reported all
// the same; a failed read is a *cacheError.
func TestCertCacheCorruptCertificateIsAMiss(t *testing.T) {
	ctx := context.Background()
	c, fc, reports := newTestCertCache()
	fc.inner.Put(ctx, "a.test", []byte("garbage"))
	fc.inner.Put(ctx, "a.test+token", []byte("garbage")) // not a certificate key: as it is
	if _, err := c.Get(ctx, "a.test"); err != autocert.ErrCacheMiss {
		t.Errorf("Get(corrupt) = %v, want autocert.ErrCacheMiss itself", err)
	}
	if data, err := c.Get(ctx, "a.test+token"); err != nil || string(data) != "garbage" {
		t.Errorf("Get(a.test+token) = %q, %v", data, err)
	}
	fc.failGet.Store(true)
	_, err := c.Get(ctx, "b.test")
	var ce *cacheError
	if !errors.As(err, &ce) || !errors.Is(err, errInjectedCache) || !strings.HasPrefix(err.Error(), `certmgr: cache get "b.test": `) {
		t.Errorf("Get with the Cache failing = %v, want a *cacheError", err)
	}
	if got := reports.String(); got != "get a.test error\nget b.test error\n" {
		t.Errorf("reported %s", got)
	}
}

// swapKey returns data, a cached certificate, with key in place of its own.
func swapKey(t *testing.T, data []byte, key crypto.Signer) []byte {
	t.Helper()
	_, chain := pem.Decode(data)
	der, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	return append(pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der}), chain...)
}

// TestNewerWriteWinsOverRetry: the retry of a failed write does not land
// over a newer write of the same key.
func TestNewerWriteWinsOverRetry(t *testing.T) {
	inner := &scriptedCache{m: map[string][]byte{}, failNext: true, writing: make(chan []byte, 4), release: make(chan struct{})}
	c := newCertCache(inner, &reportingOwner{w: io.Discard})
	v1, v2 := []byte("old"), []byte("new")
	if err := c.Put(context.Background(), "a.test", v1); err == nil {
		t.Fatal("the first write should fail")
	}
	inner.blockNext.Store(true)
	flushed := make(chan struct{})
	go func() { c.flush(context.Background()); close(flushed) }()
	if got := <-inner.writing; !bytes.Equal(got, v1) {
		t.Fatalf("flush wrote %q, want the kept %q", got, v1)
	}
	put := make(chan error, 1)
	go func() { put <- c.Put(context.Background(), "a.test", v2) }()
	// The newer write either reaches the store now (the defect) or queues
	// behind the retry in progress, on its key's lock: wait for one.
	queued := func() bool {
		c.writersMu.Lock()
		defer c.writersMu.Unlock()
		return c.writers["a.test"] != nil && c.writers["a.test"].users == 2
	}
	waitFor(t, 10*time.Second, "the newer write to reach the store or queue", func() bool {
		return len(inner.writing) > 0 || queued()
	})
	close(inner.release)
	<-flushed
	if err := <-put; err != nil {
		t.Fatal(err)
	}
	if got, _ := inner.Get(context.Background(), "a.test"); !bytes.Equal(got, v2) {
		t.Errorf("the store holds %q, want the newest write %q", got, v2)
	}
}

// scriptedCache fails its first Put if failNext, and blocks the next Put
// after blockNext is set until release is closed; each Put's data is sent
// on writing.
type scriptedCache struct {
	mu        sync.Mutex
	m         map[string][]byte
	failNext  bool
	blockNext atomic.Bool
	writing   chan []byte
	release   chan struct{}
}

func (c *scriptedCache) Get(_ context.Context, key string) ([]byte, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if v, ok := c.m[key]; ok {
		return v, nil
	}
	return nil, autocert.ErrCacheMiss
}

func (c *scriptedCache) Put(_ context.Context, key string, data []byte) error {
	c.mu.Lock()
	fail := c.failNext
	c.failNext = false
	c.mu.Unlock()
	if fail {
		return errors.New("store unavailable")
	}
	if c.blockNext.CompareAndSwap(true, false) {
		c.writing <- data
		<-c.release
	} else {
		c.writing <- data
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	c.m[key] = data
	return nil
}

func (c *scriptedCache) Delete(_ context.Context, key string) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	delete(c.m, key)
	return nil
}

// reportingOwner is a cacheOwner that writes what it is told to w, one
// report a line, and lets every token be written.
type reportingOwner struct{ w io.Writer }

func (o *reportingOwner) tokenWritten(string, []byte) {}

func (o *reportingOwner) certStored(key string, _ []byte, _ int64) { fmt.Fprintf(o.w, "put %s\n", key) }

func (o *reportingOwner) cacheFailed(op, key string, _ error) {
	fmt.Fprintf(o.w, "%s %s error\n", op, key)
}

func (o *reportingOwner) mayWriteToken(string) bool { return true }
