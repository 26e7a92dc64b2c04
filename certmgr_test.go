package certmgr

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"math/rand/v2"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"runtime"
	"strings"
	"sync/atomic"
	"testing"

	"golang.org/x/crypto/acme"

	"golang.org/x/crypto/acme/autocert"
)

// TestNewRefusesInvalidConfig: New refuses a Config it cannot run, with an
// error that says what is wrong.
func TestNewRefusesInvalidConfig(t *testing.T) {
	loopback := []netip.Addr{netip.MustParseAddr("127.0.0.1")}
	for _, tt := range []struct {
		name string
		cfg  Config
		want string // in the error
	}{
		{"nil Autocert", Config{}, "Autocert"},
		{"negative HandshakeTimeout", Config{Autocert: &autocert.Manager{}, HandshakeTimeout: -1}, "negative"},
		{"negative AuthzBudget", Config{Autocert: &autocert.Manager{}, AuthzBudget: -1}, "negative"},
		{"negative MaxDomains", Config{Autocert: &autocert.Manager{}, MaxDomains: -1}, "negative"},
		{"negative MaxFallbacks", Config{Autocert: &autocert.Manager{}, MaxFallbacks: -1}, "negative"},
		{"AuthzBudget below one attempt's cost", Config{Autocert: &autocert.Manager{}, AuthzBudget: 1}, "AuthzBudget"},
		{"resolver without a port", Config{Autocert: &autocert.Manager{}, DNS: DNSCheck{KnownIPs: loopback, Resolvers: []string{"no-port"}}}, `resolver "no-port"`},
		{"invalid known IP", Config{Autocert: &autocert.Manager{}, DNS: DNSCheck{KnownIPs: []netip.Addr{{}}, Resolvers: []string{"127.0.0.1:53"}}}, "invalid address"},
		{"resolvers without known IPs", Config{Autocert: &autocert.Manager{}, DNS: DNSCheck{Resolvers: []string{"127.0.0.1:53"}}}, "KnownIPs"},
		{"CAA identities without known IPs", Config{Autocert: &autocert.Manager{}, DNS: DNSCheck{CAAIdentities: []string{"letsencrypt.org"}}}, "KnownIPs"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			m, err := New(tt.cfg)
			if err == nil {
				m.Close()
				t.Fatalf("New accepted %+v", tt.cfg)
			}
			if !strings.HasPrefix(err.Error(), "certmgr: ") || !strings.Contains(err.Error(), tt.want) {
				t.Errorf("New = %v, want a certmgr error naming %q", err, tt.want)
			}
		})
	}
}

// TestNewAppliesDefaults: every zero field of Config gets its documented
// default.
func TestNewAppliesDefaults(t *testing.T) {
	m := newPureManager(t, newFakeClock(), nil)
	if m.timeout != DefaultHandshakeTimeout || m.cfg.AuthzBudget != 4 || m.cfg.MaxDomains != 10000 || m.cfg.MaxFallbacks != 1024 {
		t.Errorf("timeout %v, AuthzBudget %d, MaxDomains %d, MaxFallbacks %d; want 10s, 4, 10000, 1024",
			m.timeout, m.cfg.AuthzBudget, m.cfg.MaxDomains, m.cfg.MaxFallbacks)
	}
	if fmt.Sprint(m.cfg.Backoff) != fmt.Sprint(defaultBackoff) || fmt.Sprint(m.cfg.DNSRecheck) != fmt.Sprint(defaultDNSRecheck) {
		t.Errorf("Backoff %v, DNSRecheck %v; want the defaults", m.cfg.Backoff, m.cfg.DNSRecheck)
	}
	if m.client.DirectoryURL != autocert.DefaultACMEDirectory || m.client.UserAgent != "certmgr" || m.client.RetryBackoff == nil {
		t.Errorf("client %+v, want Let's Encrypt's directory, UserAgent certmgr and a RetryBackoff", m.client)
	}
	if m.dns != nil {
		t.Error("a DNS pre-check without KnownIPs")
	}
	if m.cost() != 1 {
		t.Errorf("an attempt costs %d authorizations before HTTPHandler, want 1", m.cost())
	}
}

// TestCloseIsIdempotentAndRefusesAttempts: Close returns nil every time,
// and no attempt starts after it.
func TestCloseIsIdempotentAndRefusesAttempts(t *testing.T) {
	checkLeaks(t)
	m := newPureManager(t, newFakeClock(), nil)
	for range 2 {
		if err := m.Close(); err != nil {
			t.Errorf("Close = %v", err)
		}
	}
	if err := m.Provision(context.Background(), "a.test"); !errors.Is(err, errClosed) {
		t.Errorf("Provision after Close = %v, want errClosed", err)
	}
	if st := m.Status("a.test"); st.State != StateNone || st.Failures != 0 {
		t.Errorf("Status after a refused attempt = %+v, want none", st)
	}
}

// TestCacheErrorsAreEventsUntilClose: a Cache failure is an event naming
// the domain of a certificate key; after Close, autocert's timers' Cache
// errors are not news.
func TestCacheErrorsAreEventsUntilClose(t *testing.T) {
	var events []Event
	m := newPureManager(t, newFakeClock(), func(c *Config) { c.OnEvent = func(e Event) { events = append(events, e) } })
	m.cacheFailed("put", "a.test+rsa", errInjectedCache)
	m.cacheFailed("get", stateKey, errInjectedCache)
	m.Close()
	m.cacheFailed("put", "b.test", errInjectedCache)
	if len(events) != 2 {
		t.Fatalf("%d events, want 2: %v", len(events), events)
	}
	if e := events[0]; e.Kind != EventCacheError || e.Domain != "a.test" || !errors.Is(e.Err, errInjectedCache) ||
		e.Err.Error() != `certmgr: cache put "a.test+rsa": `+errInjectedCache.Error() {
		t.Errorf("first event %+v (%v)", e, e.Err)
	}
	if e := events[1]; e.Domain != "" || !strings.Contains(e.Err.Error(), stateKey) {
		t.Errorf("state key event %+v, want no domain", e)
	}
}

// TestGetCertificateNormalisesServerName: every spelling of a name gets
// the one certificate of its normalised form, from one order.
func TestGetCertificateNormalisesServerName(t *testing.T) {
	e := newEnv(t, envOptions{cache: memoryCache, names: []string{"example.com"}})
	m := e.start(t, nil)
	leaf := e.handshake(t, "example.com", nil)
	for _, sni := range []string{"Example.COM.", "EXAMPLE.com", "example.com."} {
		c, err := m.GetCertificate(helloFor(sni))
		if err != nil {
			t.Fatalf("GetCertificate(%q): %v", sni, err)
		}
		if !c.Leaf.Equal(leaf) {
			t.Errorf("GetCertificate(%q) returned another certificate", sni)
		}
	}
	if got := e.Proxy.Counts("example.com").Orders; got != 1 {
		t.Errorf("%d orders, want 1", got)
	}
	if _, err := m.GetCertificate(helloFor("other.com")); !errors.Is(err, ErrHostNotAllowed) {
		t.Errorf("refused name: err = %v, want ErrHostNotAllowed", err)
	}
}

// TestGetCertificateRefusedNamesLeaveNothing: names the HostPolicy refuses
// leave no domain, no fallback and no goroutine.
func TestGetCertificateRefusedNamesLeaveNothing(t *testing.T) {
	checkLeaks(t)
	m := newPureManager(t, newFakeClock(), func(c *Config) {
		c.Autocert.HostPolicy = autocert.HostWhitelist("only.test")
	})
	before := runtime.NumGoroutine()
	for i := 0; i < 10000; i++ {
		name := fmt.Sprintf("r%d-%x.test", i, rand.Uint64())
		if _, err := m.GetCertificate(&tls.ClientHelloInfo{ServerName: name}); !errors.Is(err, ErrHostNotAllowed) {
			t.Fatalf("GetCertificate(%s) = %v, want ErrHostNotAllowed", name, err)
		}
	}
	if n := len(m.Domains()); n != 0 {
		t.Errorf("%d domains kept", n)
	}
	if n := m.fallbacks.len(); n != 0 {
		t.Errorf("%d fallbacks kept", n)
	}
	if after := runtime.NumGoroutine(); after > before {
		t.Errorf("goroutines: %d before, %d after", before, after)
	}
}

// TestGetCertificateRefusesInvalidNames: a name no certificate can carry
// is refused before the HostPolicy is asked.
func TestGetCertificateRefusesInvalidNames(t *testing.T) {
	asked := 0
	m := newPureManager(t, newFakeClock(), func(c *Config) {
		c.Autocert.HostPolicy = func(context.Context, string) error { asked++; return nil }
	})
	for _, name := range []string{"", "localhost", "a..test", "127.0.0.1", strings.Repeat("a", 64) + ".test"} {
		if c, err := m.GetCertificate(&tls.ClientHelloInfo{ServerName: name}); err == nil || c != nil {
			t.Errorf("GetCertificate(%q) = %v, %v; want an error", name, c, err)
		}
	}
	if asked != 0 || len(m.Domains()) != 0 {
		t.Errorf("HostPolicy asked %d times, %d domains; want none", asked, len(m.Domains()))
	}
}

// TestHostPolicyErrorWrapsBoth: a refusal wraps ErrHostNotAllowed and the
// policy's own error.
func TestHostPolicyErrorWrapsBoth(t *testing.T) {
	errNotOurs := errors.New("not ours")
	m := newPureManager(t, newFakeClock(), func(c *Config) {
		c.Autocert.HostPolicy = func(context.Context, string) error { return errNotOurs }
	})
	err := m.hostPolicy(context.Background(), "a.test")
	if !errors.Is(err, ErrHostNotAllowed) || !errors.Is(err, errNotOurs) || !strings.Contains(err.Error(), "a.test") {
		t.Errorf("hostPolicy = %v, want both errors and the name", err)
	}
	if err := newPureManager(t, newFakeClock(), nil).hostPolicy(context.Background(), "a.test"); err != nil {
		t.Errorf("no HostPolicy: %v, want every name allowed", err)
	}

}

// TestRemoteNamesMakeNoCacheErrors: names and token paths a remote client
// chooses are checked before any Cache call, and what the Cache cannot
// store is reported at most once a minute.
func TestRemoteNamesMakeNoCacheErrors(t *testing.T) {
	var cacheErrors atomic.Int64
	m := newPureManager(t, nil, func(c *Config) {
		c.Autocert.Cache = autocert.DirCache(t.TempDir())
		c.OnEvent = func(e Event) {
			if e.Kind == EventCacheError {
				cacheErrors.Add(1)
			}
		}
	})
	label := strings.Repeat("a", 63)
	for i := range 20 {
		// 253 bytes in labels of at most 63: a valid name whose "+token"
		// key is too long for a file name.
		name := strings.Join([]string{label, label, label, fmt.Sprintf("%02d", i) + strings.Repeat("c", 59)}, ".")
		hello := &tls.ClientHelloInfo{ServerName: name, SupportedProtos: []string{acme.ALPNProto}}
		if _, err := m.GetCertificate(hello); err == nil {
			t.Fatal("a validation hello with no token got a certificate")
		}
		long := &tls.ClientHelloInfo{ServerName: strings.Repeat("b", 70) + ".test", SupportedProtos: []string{acme.ALPNProto}}
		if _, err := m.GetCertificate(long); err == nil {
			t.Fatal("a validation hello for a label of 70 bytes got a certificate")
		}
	}
	h := m.HTTPHandler(nil)
	for range 20 {
		r := httptest.NewRequest(http.MethodGet, "http://a.test/.well-known/acme-challenge/"+strings.Repeat("x", 250), nil)
		w := httptest.NewRecorder()
		h.ServeHTTP(w, r)
		if w.Code != http.StatusNotFound {
			t.Errorf("a token path of 250 bytes: %d, want 404", w.Code)
		}
	}
	if n := cacheErrors.Load(); n > 1 {
		t.Errorf("%d cache-error events from remote clients' names, want at most 1 a minute", n)
	}
}
