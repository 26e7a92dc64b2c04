package certmgr

import (
	"context"
	"crypto/x509"
	"errors"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/crypto/acme/autocert"
)

// TestHTTPHandlerObtainsOverHTTP01: http-01 through HTTPHandler obtains a
// certificate when no TLS port is reachable.
func TestHTTPHandlerObtainsOverHTTP01(t *testing.T) {
	t.Parallel()
	const name = "http01.test"
	e := newEnv(t, envOptions{cache: memoryCache, names: []string{name}, ownTLS: true})
	m := e.start(t, nil)
	e.servePlain(t, m.HTTPHandler(nil))
	e.TLSListener.Close() // tls-alpn-01 connections are refused

	if err := m.Provision(context.Background(), name); err != nil {
		t.Fatalf("Provision: %v", err)
	}
	cert, err := m.GetCertificate(helloFor(name))
	if err != nil {
		t.Fatal(err)
	}
	if IsFallback(cert) {
		t.Fatal("got the fallback certificate")
	}
	if _, err := cert.Leaf.Verify(x509.VerifyOptions{DNSName: name, Roots: e.Roots, Intermediates: intermediates(cert)}); err != nil {
		t.Errorf("certificate does not verify against Pebble's root: %v", err)
	}
	if c := e.Proxy.Counts(name); c.Orders != 2 || c.FailedAuthzs != 1 {
		t.Errorf("proxy counted %+v, want 2 orders: tls-alpn-01 failed, http-01 passed", c)
	}
}

// TestHTTPHandlerAnswers: without a CA: requests other than challenges go
// to the fallback handler (by default, GET and HEAD are redirected to
// https and other methods refused, as autocert does); a path that is no
// ACME token is not found, before any Cache call; a challenge for a name
// that is no valid name is refused, for a name the HostPolicy refuses
// forbidden, and for an unknown token not found; and HTTPHandler makes
// every attempt risk two authorizations.
func TestHTTPHandlerAnswers(t *testing.T) {
	m := newPureManager(t, newFakeClock(), func(c *Config) { c.Autocert.HostPolicy = autocert.HostWhitelist("a.test") })
	if _, err := m.domainFor("a.test"); err != nil {
		t.Fatal(err)
	}
	h := m.HTTPHandler(nil)
	if m.cost() != 2 {
		t.Errorf("an attempt costs %d authorizations after HTTPHandler, want 2", m.cost())
	}
	const token = "aGVsbG8td29ybGQtdG9rZW4tMDEyMzQ1Njc4OQ" // the form of an ACME token
	custom := m.HTTPHandler(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) { w.WriteHeader(http.StatusTeapot) }))
	for _, tt := range []struct {
		h              http.Handler
		method, target string
		status         int
		want           string // in the Location header, or the body
	}{
		{h, "GET", "http://a.test/page?q=1", http.StatusFound, "https://a.test/page?q=1"},
		{h, "HEAD", "http://a.test:80/", http.StatusFound, "https://a.test:443/"},
		{h, "POST", "http://a.test/form", http.StatusBadRequest, "Use HTTPS"},
		{custom, "GET", "http://a.test/", http.StatusTeapot, ""},
		{h, "GET", "http://a.test/.well-known/acme-challenge/tok", http.StatusNotFound, "not an ACME token"},
		{h, "GET", "http://a.test/.well-known/acme-challenge/" + token + "/..", http.StatusNotFound, "not an ACME token"},
		{h, "GET", "http://a..test/.well-known/acme-challenge/" + token, http.StatusBadRequest, "empty label"},
		{h, "GET", "http://A.TEST:5002/.well-known/acme-challenge/" + token, http.StatusNotFound, ""},
		{h, "GET", "http://b.test/.well-known/acme-challenge/" + token, http.StatusForbidden, ""},
	} {
		w := httptest.NewRecorder()
		tt.h.ServeHTTP(w, httptest.NewRequest(tt.method, tt.target, nil))
		got := w.Header().Get("Location") + w.Body.String()
		if w.Code != tt.status || !strings.Contains(got, tt.want) {
			t.Errorf("%s %s: %d %q, want %d with %q", tt.method, tt.target, w.Code, got, tt.status, tt.want)
		}
	}
}

// TestHTTPHandlerWhileATokenReadFails: HTTPHandler holds no lock of
// certmgr's while it takes autocert's: autocert reads a token from the
// Cache under its own lock, the read fails, and OnEvent calls Status.
func TestHTTPHandlerWhileATokenReadFails(t *testing.T) {
	t.Parallel()
	const name = "lock.test"
	entered, release := make(chan struct{}), make(chan struct{})
	var once sync.Once
	cache := &blockingCache{Cache: &memCache{m: map[string][]byte{}}, block: func(key string) error {
		if !strings.HasSuffix(key, "+http-01") {
			return nil
		}
		once.Do(func() { close(entered) })
		<-release
		return errors.New("store unavailable")
	}}
	var m *Manager
	m = newPureManager(t, nil, func(c *Config) {
		c.Autocert.Cache = cache
		c.OnEvent = func(e Event) { m.Status(name) }
	})
	d, err := m.domainFor(name)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := m.domainAutocert(context.Background(), d); err != nil {
		t.Fatal(err)
	}
	h := m.HTTPHandler(nil)
	served := make(chan struct{})
	go func() {
		defer close(served)
		r := httptest.NewRequest(http.MethodGet, "http://"+name+"/.well-known/acme-challenge/"+strings.Repeat("t", 43), nil)
		h.ServeHTTP(httptest.NewRecorder(), r)
	}()
	<-entered // autocert holds its lock, reading the Cache
	again := make(chan struct{})
	go func() {
		defer close(again)
		m.HTTPHandler(nil)
	}()
	// Give HTTPHandler the chance to take stateMu and block on autocert's
	// lock, the order that deadlocked: wait until stateMu is held, or
	// HTTPHandler returned, or a second passed.
	waitForCond(time.Second, func() bool {
		select {
		case <-again:
			return true
		default:
		}
		if m.stateMu.TryLock() {
			m.stateMu.Unlock()
			return false
		}
		return true
	})
	close(release)
	for _, c := range []chan struct{}{served, again} {
		select {
		case <-c:
		case <-time.After(10 * time.Second):
			t.Fatal("deadlock: HTTPHandler and a failing token read wait for each other")
		}
	}
}
