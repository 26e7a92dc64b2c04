package certmgr

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"strings"
	"testing"

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
