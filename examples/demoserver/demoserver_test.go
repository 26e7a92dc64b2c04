package demoserver

import (
	"bytes"
	"context"
	"errors"
	"flag"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"

	"golang.org/x/crypto/acme/autocert"

	"github.com/certmgr/certmgr/internal/testsupport"
)

// TestUsage checks that wrong command lines are refused before anything
// starts.
func TestUsage(t *testing.T) {
	dir := t.TempDir()
	for _, args := range [][]string{
		{"unexpected"},
		{"-pebble", "-cache-dir", dir},
		{"-pebble", "-production"},
		{"-pebble", "-https-addr", ":8443"},
		{"-pebble", "-known-ip", "not-an-ip"},
		{"-cache-dir", dir},
		{"-domain", "example.com"},
		{"-domain", "example.com", "-cache-dir", dir, "-production", "-directory", "https://ca.example/dir"},
		{"-domain", "example.com", "-cache-dir", dir, "-pebble-root-out", dir + "/root.pem"},
		{"-no-such-flag"},
	} {
		var stderr bytes.Buffer
		if code := Run(context.Background(), args, io.Discard, &stderr, Hooks{}); code != 2 {
			t.Errorf("server %q: exit status %d, want 2\n%s", args, code, stderr.String())
		}
	}
	var stderr bytes.Buffer
	if code := Run(context.Background(), []string{"-help"}, io.Discard, &stderr, Hooks{}); code != 0 {
		t.Errorf("server -help: exit status %d, want 0", code)
	}
	if !strings.Contains(stderr.String(), "-cache-dir") {
		t.Errorf("server -help does not list -cache-dir:\n%s", stderr.String())
	}
}

// testHooks returns Hooks that add the flag -store, refuse it with
// -cache-dir, and supply cache when it is given.
func testHooks(cache autocert.Cache, closeCache func() error) Hooks {
	return Hooks{
		Flags: func(fs *flag.FlagSet) { fs.Bool("store", false, "use the test's Cache") },
		Check: func(given func(string) bool) (bool, error) {
			if given("store") && given("cache-dir") {
				return false, errors.New("-store and -cache-dir do not go together")
			}
			return given("store"), nil
		},
		Cache: func() (autocert.Cache, func() error, error) { return cache, closeCache, nil },
	}
}

// TestHooksUsage checks how the hooks' flags and checks join the
// command's own.
func TestHooksUsage(t *testing.T) {
	dir := t.TempDir()
	h := testHooks(autocert.DirCache(dir), nil)

	var stderr bytes.Buffer
	code := Run(context.Background(), []string{"-domain", "example.com", "-cache-dir", dir, "-store"}, io.Discard, &stderr, h)
	if code != 2 || stderr.String() != "server: -store and -cache-dir do not go together\n" {
		t.Errorf("Check's error: exit status %d, stderr %q; want 2 and the error after \"server: \"", code, stderr.String())
	}

	// A Cache of the hooks' stands for -cache-dir.
	for _, args := range [][]string{
		{"-domain", "example.com", "-store"},
		{"-pebble", "-store"},
	} {
		var o options
		stderr.Reset()
		if ok, _ := o.parse(args, &stderr, &h); !ok || !o.ownCache {
			t.Errorf("server %q: ok %v, ownCache %v, want both true\n%s", args, ok, o.ownCache, stderr.String())
		}
	}
	var o options
	if ok, _ := o.parse([]string{"-domain", "example.com", "-cache-dir", dir}, &stderr, &h); !ok || o.ownCache {
		t.Errorf("-cache-dir without -store: ok %v, ownCache %v, want true, false", ok, o.ownCache)
	}

	stderr.Reset()
	if code := Run(context.Background(), []string{"-help"}, io.Discard, &stderr, h); code != 0 || !strings.Contains(stderr.String(), "-store") {
		t.Errorf("server -help with the hooks: exit status %d, want 0 and -store listed:\n%s", code, stderr.String())
	}
}

// recordingCache wraps an autocert.Cache, and records the keys put and
// any use after close.
type recordingCache struct {
	autocert.Cache
	mu        sync.Mutex
	put       map[string]bool
	closes    int
	afterUses []string
}

func (c *recordingCache) use(op, key string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closes > 0 {
		c.afterUses = append(c.afterUses, op+" "+key)
	}
	if op == "put" {
		c.put[key] = true
	}
}

func (c *recordingCache) Get(ctx context.Context, key string) ([]byte, error) {
	c.use("get", key)
	return c.Cache.Get(ctx, key)
}

func (c *recordingCache) Put(ctx context.Context, key string, data []byte) error {
	c.use("put", key)
	return c.Cache.Put(ctx, key, data)
}

func (c *recordingCache) Delete(ctx context.Context, key string) error {
	c.use("delete", key)
	return c.Cache.Delete(ctx, key)
}

func (c *recordingCache) close() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.closes++
	return nil
}

// TestHooksCache runs the server against the embedded CA with a Cache
// that the hooks supply: the certificates land in it, and it is closed
// once, after the Manager is done with it.
func TestHooksCache(t *testing.T) {
	cache := &recordingCache{Cache: autocert.DirCache(t.TempDir()), put: make(map[string]bool)}
	srv := testsupport.StartServer(t, "Run", func(ctx context.Context, stdout, stderr io.Writer) int {
		return Run(ctx, []string{"-pebble", "-store"}, stdout, stderr, testHooks(cache, cache.close))
	})

	// The status line comes once every domain is provisioned.
	testsupport.WaitLines(t, srv.Lines, "status: ")
	cache.mu.Lock()
	for _, d := range testsupport.PebbleDomains {
		if !cache.put[d] {
			t.Errorf("no certificate of %s put in the hooks' Cache (keys put: %v)", d, cache.put)
		}
	}
	if cache.closes != 0 {
		t.Errorf("the Cache was closed %d times while the server runs", cache.closes)
	}
	cache.mu.Unlock()

	srv.Stop(t, shutdownTimeout)
	cache.mu.Lock()
	defer cache.mu.Unlock()
	if cache.closes != 1 {
		t.Errorf("the Cache was closed %d times, want 1", cache.closes)
	}
	if len(cache.afterUses) > 0 {
		t.Errorf("the Cache was used after its close: %v", cache.afterUses)
	}
}

// TestStatusLoopbackOnly: without -status-public, the status page answers
// loopback clients only.
func TestStatusLoopbackOnly(t *testing.T) {
	h := loopbackOnly(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) { io.WriteString(w, "status") }))
	for addr, want := range map[string]int{"127.0.0.1:5000": 200, "[::1]:5000": 200, "198.51.100.7:5000": 404, "[2001:db8::1]:443": 404} {
		r := httptest.NewRequest("GET", "/certmgr/status", nil)
		r.RemoteAddr = addr
		w := httptest.NewRecorder()
		h.ServeHTTP(w, r)
		if w.Code != want {
			t.Errorf("from %s: %d, want %d", addr, w.Code, want)
		}
	}
}
