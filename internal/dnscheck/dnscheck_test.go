package dnscheck

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"sync"
	"testing"
	"time"

	"github.com/miekg/dns"

	"github.com/certmgr/certmgr/certmgrtest"
	"github.com/certmgr/certmgr/internal/testsupport"
)

func testConfig(resolvers ...string) Config {
	return Config{
		KnownIPs:  []netip.Addr{netip.MustParseAddr("127.0.0.1"), netip.MustParseAddr("::1")},
		Resolvers: resolvers,
	}
}

// check is certmgr.CheckDNS for a normalised domain.
func check(ctx context.Context, domain string, cfg Config) error {
	c, err := New(cfg, Options{Now: time.Now})
	if err != nil {
		return err
	}
	return c.Check(ctx, domain)
}

// TestCheckDNS: what Check finds ready or not, and why, against a DNS
// server on loopback: addresses, CNAME chains, resolver failures, server
// fallback, truncation and CAA.
func TestCheckDNS(t *testing.T) {
	s := certmgrtest.StartDNS(t)
	addr := s.Addr()

	// A second server, silent for every name used, and a dead address.
	silent := certmgrtest.StartDNS(t)
	pc, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	dead := pc.LocalAddr().String()
	pc.Close()

	s.SetA("a.test", "127.0.0.1")
	s.SetA("foreign.test", "127.0.0.2")
	s.SetA("foreign6.test", "127.0.0.1")
	s.SetAAAA("foreign6.test", "2001:db8::1")
	s.SetA("both.test", "127.0.0.1")
	s.SetAAAA("both.test", "::1")
	s.SetCNAME("www.a.test", "both.test")
	s.SetCNAME("loop1.test", "loop2.test")
	s.SetCNAME("loop2.test", "loop1.test")
	for i := range 11 {
		s.SetCNAME(fmt.Sprintf("c%d.test", i), fmt.Sprintf("c%d.test", i+1))
	}
	s.SetA("c11.test", "127.0.0.1")
	s.SetCNAME("dangling.test", "elsewhere.test")
	s.SetRcode("servfail.test", dns.RcodeServerFailure)
	s.SetCAA("noaddr.test", certmgrtest.CAA{Tag: "issue", Value: "pebble.test"})
	s.SetA("silent.test", "127.0.0.1")
	s.SetSilent("silent.test", true)
	s.SetA("tc.test", "127.0.0.1")
	s.SetTruncate("tc.test", true)
	for _, name := range []string{"caa.test", "sub.parent.test", "nobody.test", "critical.test", "wild.test"} {
		s.SetA(name, "127.0.0.1")
	}
	s.SetCAA("caa.test", certmgrtest.CAA{Tag: "issue", Value: "ca.example.net"})
	s.SetCAA("parent.test", certmgrtest.CAA{Tag: "issue", Value: " Pebble.Test ; account=1"}, certmgrtest.CAA{Tag: "iodef", Value: "mailto:x@parent.test"})
	s.SetCAA("nobody.test", certmgrtest.CAA{Tag: "issue", Value: ";"})
	s.SetCAA("critical.test", certmgrtest.CAA{Tag: "issue", Value: "pebble.test"}, certmgrtest.CAA{Flag: 128, Tag: "tbs", Value: "x"})
	s.SetCAA("wild.test", certmgrtest.CAA{Tag: "issuewild", Value: "ca.example.net"})
	silent.SetSilent("fallback.test", true)
	s.SetA("fallback.test", "127.0.0.1")

	caa := testConfig(addr)
	caa.CAAIdentities = []string{"pebble.test"}
	fallback := testConfig(silent.Addr(), dead, addr)
	fallback.Timeout = 500 * time.Millisecond // the silent server costs one; the answering one has time under load
	short := testConfig(addr)
	short.Timeout = 100 * time.Millisecond

	tests := []struct {
		domain string
		cfg    Config
		want   string // the error's reason, or "" for nil
	}{
		{"a.test", testConfig(addr), ""},
		{"foreign.test", testConfig(addr), "A 127.0.0.2 is not a known IP (known: 127.0.0.1, ::1)"},
		{"foreign6.test", testConfig(addr), "AAAA 2001:db8::1 is not a known IP (known: 127.0.0.1, ::1)"},
		{"both.test", testConfig(addr), ""},
		{"www.a.test", testConfig(addr), ""},
		{"loop1.test", testConfig(addr), "A lookup: CNAME loop at loop1.test"},
		{"c3.test", testConfig(addr), ""},
		{"c0.test", testConfig(addr), "A lookup: CNAME chain longer than 8"},
		{"dangling.test", testConfig(addr), "A lookup of elsewhere.test: NXDOMAIN from " + addr},
		{"missing.test", testConfig(addr), "A lookup: NXDOMAIN from " + addr},
		{"servfail.test", testConfig(addr), "A lookup: SERVFAIL from " + addr},
		{"noaddr.test", testConfig(addr), "no A or AAAA record"},
		{"silent.test", short, "A lookup: query to " + addr + " timed out"},
		{"tc.test", testConfig(addr), ""},
		{"fallback.test", fallback, ""},
		{"a.test", caa, ""},
		{"caa.test", caa, `CAA at caa.test does not authorise any of [pebble.test] (found issue "ca.example.net")`},
		{"sub.parent.test", caa, ""},
		{"nobody.test", caa, `CAA at nobody.test does not authorise any of [pebble.test] (found issue ";")`},
		{"critical.test", caa, `CAA at critical.test has a critical record with unknown tag "tbs"`},
		{"wild.test", caa, ""},
	}
	for _, tt := range tests {
		start := time.Now()
		err := check(t.Context(), tt.domain, tt.cfg)
		if tt.want == "" {
			if err != nil {
				t.Errorf("Check(%q) = %v, want nil", tt.domain, err)
			}
			continue
		}
		want := "certmgr: DNS not ready: " + tt.domain + ": " + tt.want
		if err == nil || err.Error() != want || !errors.Is(err, ErrNotReady) {
			t.Errorf("Check(%q) = %v,\nwant %s", tt.domain, err, want)
		}
		if d := time.Since(start); d > 1500*time.Millisecond { // under the default timeout
			t.Errorf("Check(%q) took %v", tt.domain, d)
		}
	}
	if n := s.Queries("tc.test", dns.TypeA); n != 2 {
		t.Errorf("tc.test: %d A queries, want 2 (UDP, then TCP)", n)
	}
	if n := silent.Queries("fallback.test", dns.TypeA); n != 1 {
		t.Errorf("fallback.test: silent server got %d A queries, want 1", n)
	}
}

// TestDNSInvalid: an invalid Config, and a done context, are errors other
// than ErrNotReady.
func TestDNSInvalid(t *testing.T) {
	s := certmgrtest.StartDNS(t)
	s.SetA("a.test", "127.0.0.1")
	ctx, cancel := context.WithCancel(t.Context())
	cancel()
	tests := []struct {
		ctx  context.Context
		cfg  Config
		want string
	}{
		{t.Context(), Config{Resolvers: []string{s.Addr()}}, "certmgr: DNSCheck.KnownIPs is empty"},
		{t.Context(), Config{KnownIPs: []netip.Addr{netip.MustParseAddr("127.0.0.1")}, Resolvers: []string{"no-port"}}, `certmgr: resolver "no-port" is not host:port: address no-port: missing port in address`},
		{t.Context(), Config{KnownIPs: []netip.Addr{{}}, Resolvers: []string{s.Addr()}}, "certmgr: DNSCheck.KnownIPs holds an invalid address"},
		{ctx, testConfig(s.Addr()), "certmgr: DNS check of a.test: context canceled"},
	}
	for _, tt := range tests {
		err := check(tt.ctx, "a.test", tt.cfg)
		if err == nil || err.Error() != tt.want || errors.Is(err, ErrNotReady) {
			t.Errorf("Check with %+v = %v, want %s", tt.cfg, err, tt.want)
		}
	}
}

// TestDNSNotReadyError: the text of a not-ready error, which wraps
// ErrNotReady.
func TestDNSNotReadyError(t *testing.T) {
	e := &notReadyError{domain: "a.test", reason: "no A or AAAA record"}
	if !errors.Is(e, ErrNotReady) || e.Error() != "certmgr: DNS not ready: a.test: no A or AAAA record" {
		t.Errorf("notReadyError %q: not ErrNotReady", e)
	}
}

// TestDNSCache: floods of checks cost one query per name and type per
// cache interval, on the checker's clock; failures are cached too.
func TestDNSCache(t *testing.T) {
	s := certmgrtest.StartDNS(t)
	s.SetA("a.test", "127.0.0.1")
	s.SetRcode("servfail.test", dns.RcodeServerFailure)
	clock := testsupport.NewClock(time.Unix(1e9, 0))
	cfg := testConfig(s.Addr())
	cfg.CAAIdentities = []string{"pebble.test"}
	c, err := New(cfg, Options{MaxCache: time.Minute, Now: clock.Now})
	if err != nil {
		t.Fatal(err)
	}

	flood := func(domain string, wantNil bool) {
		t.Helper()
		var wg sync.WaitGroup
		errs := make([]error, 1000)
		for i := range errs {
			wg.Go(func() { errs[i] = c.Check(t.Context(), domain) })
		}
		wg.Wait()
		for _, err := range errs {
			if (err == nil) != wantNil {
				t.Fatalf("Check(%q) = %v", domain, err)
			}
		}
	}
	queries := func(want int) {
		t.Helper()
		for _, name := range []string{"a.test", "servfail.test"} {
			for _, qtype := range []uint16{dns.TypeA, dns.TypeAAAA} {
				if n := s.Queries(name, qtype); n != want {
					t.Errorf("%s %s: %d queries, want %d", name, dns.TypeToString[qtype], n, want)
				}
			}
		}
		if n := s.Queries("a.test", dns.TypeCAA); n != want {
			t.Errorf("a.test CAA: %d queries, want %d", n, want)
		}
	}

	flood("a.test", true)
	flood("servfail.test", false)
	queries(1)
	clock.Advance(59 * time.Second)
	flood("a.test", true)
	flood("servfail.test", false)
	queries(1)
	clock.Advance(time.Second)
	flood("a.test", true)
	flood("servfail.test", false)
	queries(2)
}

// TestDNSCacheBound: a full cache drops its expired entries or, with
// none, its oldest.
func TestDNSCacheBound(t *testing.T) {
	clock := testsupport.NewClock(time.Unix(1e9, 0))
	c, err := New(testConfig("127.0.0.1:1"), Options{MaxCache: time.Minute, Now: clock.Now})
	if err != nil {
		t.Fatal(err)
	}
	key := func(i int) cacheKey { return cacheKey{fmt.Sprintf("n%d.test.", i), dns.TypeA} }
	for i := range maxCacheEntries {
		ttl := time.Hour // capped to a minute
		if i < 8 {
			ttl = 10 * time.Second
		}
		c.store(key(i), &cacheEntry{ans: &answer{ttl: ttl}})
		clock.Advance(time.Millisecond)
	}
	// Full, nothing expired: the oldest entry goes.
	c.store(key(-1), &cacheEntry{ans: &answer{ttl: -1}})
	if len(c.cache) != maxCacheEntries || c.cached(key(0)) != nil || c.cached(key(1)) == nil {
		t.Fatalf("after overflow: %d entries, oldest kept: %v", len(c.cache), c.cached(key(0)) != nil)
	}
	// Full, entries 1 to 7 expired: they all go, and no other.
	clock.Advance(10 * time.Second)
	c.store(key(-2), &cacheEntry{err: errors.New("x")})
	if n := len(c.cache); n != maxCacheEntries-6 || c.cached(key(8)) == nil {
		t.Fatalf("after expiry: %d entries, want %d", n, maxCacheEntries-6)
	}
}

// TestDNSForget: Forget drops the cached answers of a name and of the
// names it climbs to for CAA, and no other, so that the next Check asks
// again.
func TestDNSForget(t *testing.T) {
	s := certmgrtest.StartDNS(t)
	s.SetA("a.test", "127.0.0.1")
	s.SetA("b.test", "127.0.0.1")
	cfg := testConfig(s.Addr())
	cfg.CAAIdentities = []string{"pebble.test"}
	c, err := New(cfg, Options{MaxCache: time.Minute, Now: time.Now})
	if err != nil {
		t.Fatal(err)
	}
	for range 2 {
		for _, name := range []string{"a.test", "b.test"} {
			if err := c.Check(t.Context(), name); err != nil {
				t.Fatalf("Check(%s) = %v", name, err)
			}
		}
	}
	c.Forget("A.Test")
	for _, name := range []string{"a.test", "b.test"} {
		if err := c.Check(t.Context(), name); err != nil {
			t.Fatalf("Check(%s) = %v", name, err)
		}
	}
	for _, tt := range []struct {
		name  string
		qtype uint16
		want  int
	}{
		{"a.test", dns.TypeA, 2},
		{"a.test", dns.TypeCAA, 2},
		{"test", dns.TypeCAA, 2},
		{"b.test", dns.TypeA, 1},
		{"b.test", dns.TypeCAA, 1},
	} {
		if n := s.Queries(tt.name, tt.qtype); n != tt.want {
			t.Errorf("%s %s: %d queries, want %d", tt.name, dns.TypeToString[tt.qtype], n, tt.want)
		}
	}
}

// TestCAAParametersChecked: an issue record's accounturi and
// validationmethods (RFC 8657) must allow this client, as far as it knows
// its account and methods.
func TestCAAParametersChecked(t *testing.T) {
	s := certmgrtest.StartDNS(t)
	s.SetA("a.test", "127.0.0.1")
	const account = "https://ca.test/acct/1"
	tests := []struct {
		value   string
		account string // the client's, "" while unknown
		ready   bool
	}{
		{"ca.test", account, true},
		{"ca.test; validationmethods=tls-alpn-01", account, true},
		{"ca.test; validationmethods=http-01,tls-alpn-01", account, true},
		{"ca.test; validationmethods=http-01", account, false},
		{"ca.test; validationmethods=dns-01", "", false},
		{"ca.test; accounturi=" + account, account, true},
		{"ca.test; accounturi=https://ca.test/acct/2", account, false},
		{"ca.test; accounturi=https://ca.test/acct/2", "", true},
		{"ca.test; accounturi=" + account + "; validationmethods=http-01", account, false},
		{"other.ca; accounturi=" + account, account, false},
	}
	for _, tt := range tests {
		s.SetCAA("a.test", certmgrtest.CAA{Tag: "issue", Value: tt.value})
		c, err := New(Config{KnownIPs: []netip.Addr{netip.MustParseAddr("127.0.0.1")},
			Resolvers: []string{s.Addr()}, CAAIdentities: []string{"ca.test"}}, Options{
			Now:     time.Now,
			Methods: func() []string { return []string{"tls-alpn-01"} },
			Account: func() string { return tt.account },
		})
		if err != nil {
			t.Fatal(err)
		}
		err = c.Check(context.Background(), "a.test")
		if ready := err == nil; ready != tt.ready {
			t.Errorf("CAA %q with account %q: %v, want ready %v", tt.value, tt.account, err, tt.ready)
		}
	}
}
