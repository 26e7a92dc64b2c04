package certmgr

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"net/url"
	"strings"
	"sync"
	"testing"

	"golang.org/x/crypto/acme"
)

// TestAccountKeyMadeOnceAndKept: without a key of the user's, the first
// call makes one and writes it where autocert keeps it; concurrent and
// later calls share it, and a Manager restarted on the Cache reads it.
func TestAccountKeyMadeOnceAndKept(t *testing.T) {
	cache := &memCache{m: make(map[string][]byte)}
	m := newPureManager(t, newFakeClock(), func(c *Config) { c.Autocert.Cache = cache })
	var (
		wg   sync.WaitGroup
		keys [8]crypto.Signer
	)
	for i := range keys {
		wg.Go(func() {
			k, err := m.accountKey(context.Background())
			if err != nil {
				t.Error(err)
			}
			keys[i] = k
		})
	}
	wg.Wait()
	for _, k := range keys {
		// A call that comes once the first read ended reads the key again.
		if k == nil || !k.Public().(*ecdsa.PublicKey).Equal(keys[0].Public()) {
			t.Fatal("concurrent calls got different keys")
		}
	}
	data, err := cache.Get(context.Background(), accountKeyName)
	if err != nil {
		t.Fatalf("the key was not written: %v", err)
	}
	if b, _ := pem.Decode(data); b == nil || b.Type != "EC PRIVATE KEY" {
		t.Fatalf("written as %q", data)
	}
	m2 := newPureManager(t, newFakeClock(), func(c *Config) { c.Autocert.Cache = cache })
	k2, err := m2.accountKey(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if !k2.Public().(*ecdsa.PublicKey).Equal(keys[0].Public()) {
		t.Error("a restarted Manager made a new account key")
	}
}

// TestAccountKeyOfTheUser: the user's Client.Key is the account key; the
// Cache is not asked.
func TestAccountKeyOfTheUser(t *testing.T) {
	key := ecKey(t)
	fc := &faultCache{inner: &memCache{m: make(map[string][]byte)}}
	fc.failGet.Store(true)
	m := newPureManager(t, newFakeClock(), func(c *Config) {
		c.Autocert.Cache = fc
		c.Autocert.Client = &acme.Client{Key: key}
	})
	if got, err := m.accountKey(context.Background()); err != nil || got != key {
		t.Errorf("accountKey = %v, %v; want the user's", got, err)
	}
}

// TestAccountKeyUnreadable: an invalid key in the Cache, or a Cache that
// cannot be read, is an error: no new account is made in its place.
func TestAccountKeyUnreadable(t *testing.T) {
	der, err := x509.MarshalPKIXPublicKey(ecKey(t).Public())
	if err != nil {
		t.Fatal(err)
	}
	for name, data := range map[string][]byte{
		"not PEM":    []byte("garbage"),
		"public key": pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: der}),
		"not a key":  pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: []byte("garbage")}),
	} {
		cache := &memCache{m: map[string][]byte{accountKeyName: data}}
		m := newPureManager(t, newFakeClock(), func(c *Config) { c.Autocert.Cache = cache })
		if k, err := m.accountKey(context.Background()); err == nil || !strings.HasPrefix(err.Error(), "certmgr: ") {
			t.Errorf("%s: accountKey = %v, %v; want an error", name, k, err)
		}
		if string(cache.m[accountKeyName]) != string(data) {
			t.Errorf("%s: the key in the Cache was replaced", name)
		}
	}
	fc := &faultCache{inner: &memCache{m: make(map[string][]byte)}}
	fc.failGet.Store(true)
	m := newPureManager(t, newFakeClock(), func(c *Config) { c.Autocert.Cache = fc })
	if _, err := m.accountKey(context.Background()); !errors.Is(err, errInjectedCache) || fc.putErrs.Load() != 0 {
		t.Errorf("accountKey with the Cache unreadable = %v, want its error and no write", err)
	}
}

// TestAccountKeyWriteFailureIsKept: a key whose write fails is used all
// the same and kept by the cache for a later write: the account is not
// lost.
func TestAccountKeyWriteFailureIsKept(t *testing.T) {
	fc := &faultCache{inner: &memCache{m: make(map[string][]byte)}}
	fc.failPut.Store(true)
	m := newPureManager(t, newFakeClock(), func(c *Config) { c.Autocert.Cache = fc })
	key, err := m.accountKey(context.Background())
	if err != nil || key == nil {
		t.Fatalf("accountKey = %v, %v", key, err)
	}
	fc.failPut.Store(false)
	m.cache.flush(context.Background())
	if _, err := fc.inner.Get(context.Background(), accountKeyName); err != nil {
		t.Errorf("the key was not written once the Cache worked: %v", err)
	}
}

// TestOldAccountKeyNameIsTheAccount: autocert's former name of the account
// key holds the account key, not a certificate.
func TestOldAccountKeyNameIsTheAccount(t *testing.T) {
	key := ecKey(t)
	der, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	cache := &memCache{m: map[string][]byte{oldAccountKeyName: pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: der})}}
	m := newPureManager(t, nil, func(c *Config) { c.Autocert.Cache = cache })
	got, err := m.accountKey(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if !key.Public().(*ecdsa.PublicKey).Equal(got.Public()) {
		t.Error("a new account key was made; the one under autocert's former name was not used")
	}
}

// TestAccountURIFromCA: the account's URI is what the CA answered to the
// new-account request.
func TestAccountURIFromCA(t *testing.T) {
	t.Parallel()
	const name = "acct.test"
	e := newEnv(t, envOptions{names: []string{name}, cache: memoryCache})
	m := e.start(t, nil)
	if err := m.Provision(context.Background(), name); err != nil {
		t.Fatal(err)
	}
	uri := m.accountURI()
	dir, _ := url.Parse(e.DirectoryURL)
	if u, err := url.Parse(uri); err != nil || u.Host != dir.Host || !strings.HasPrefix(u.Path, "/my-account/") {
		t.Errorf("account URI %q, want the CA's account URL (Pebble: /my-account/ID)", uri)
	}
}
