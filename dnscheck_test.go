package certmgr

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/miekg/dns"

	"github.com/certmgr/certmgr/certmgrtest"
)

func testDNSCheck(resolvers ...string) DNSCheck {
	return DNSCheck{
		KnownIPs:  []netip.Addr{netip.MustParseAddr("127.0.0.1"), netip.MustParseAddr("::1")},
		Resolvers: resolvers,
	}
}

// TestCheckDNS: CheckDNS normalises the domain, passes each field of
// DNSCheck on to the check, which internal/dnscheck tests, and its errors
// for domains that are not ready are ErrDNSNotReady.
func TestCheckDNS(t *testing.T) {
	t.Parallel()
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
	s.SetA("silent.test", "127.0.0.1")
	s.SetSilent("silent.test", true)
	s.SetA("caa.test", "127.0.0.1")
	s.SetCAA("caa.test", certmgrtest.CAA{Tag: "issue", Value: "ca.example.net"})
	silent.SetSilent("fallback.test", true)
	s.SetA("fallback.test", "127.0.0.1")

	caa := testDNSCheck(addr)
	caa.CAAIdentities = []string{"pebble.test"}
	fallback := testDNSCheck(silent.Addr(), dead, addr)
	fallback.Timeout = 500 * time.Millisecond // the silent server costs one; the answering one has time under load
	short := testDNSCheck(addr)
	short.Timeout = 100 * time.Millisecond

	tests := []struct {
		domain string
		opts   DNSCheck
		want   string // the error's reason, or "" for nil
	}{
		{"a.test", testDNSCheck(addr), ""},
		{"A.Test.", testDNSCheck(addr), ""},
		{"Foreign.Test.", testDNSCheck(addr), "A 127.0.0.2 is not a known IP (known: 127.0.0.1, ::1)"},
		{"silent.test", short, "A lookup: query to " + addr + " timed out"},
		{"fallback.test", fallback, ""},
		{"a.test", caa, ""},
		{"caa.test", caa, `CAA at caa.test does not authorise any of [pebble.test] (found issue "ca.example.net")`},
	}
	for _, tt := range tests {
		start := time.Now()
		err := CheckDNS(t.Context(), tt.domain, tt.opts)
		if tt.want == "" {
			if err != nil {
				t.Errorf("CheckDNS(%q) = %v, want nil", tt.domain, err)
			}
			continue
		}
		domain := strings.ToLower(strings.TrimSuffix(tt.domain, "."))
		want := "certmgr: DNS not ready: " + domain + ": " + tt.want
		if err == nil || err.Error() != want || !errors.Is(err, ErrDNSNotReady) {
			t.Errorf("CheckDNS(%q) = %v,\nwant %s", tt.domain, err, want)
		}
		if d := time.Since(start); d > 1500*time.Millisecond { // under the default timeout
			t.Errorf("CheckDNS(%q) took %v", tt.domain, d)
		}
	}
	if n := silent.Queries("fallback.test", dns.TypeA); n != 1 {
		t.Errorf("fallback.test: silent server got %d A queries, want 1", n)
	}
}

// TestCheckDNSInvalid: invalid names and options, and a done context, are
// errors other than ErrDNSNotReady.
func TestCheckDNSInvalid(t *testing.T) {
	s := certmgrtest.StartDNS(t)
	s.SetA("a.test", "127.0.0.1")
	ctx, cancel := context.WithCancel(t.Context())
	cancel()
	tests := []struct {
		ctx    context.Context
		domain string
		opts   DNSCheck
		want   string
	}{
		{t.Context(), "", testDNSCheck(s.Addr()), "certmgr: missing server name"},
		{t.Context(), "a..test", testDNSCheck(s.Addr()), `certmgr: server name "a..test" has an empty label`},
		{t.Context(), "127.0.0.1", testDNSCheck(s.Addr()), `certmgr: server name "127.0.0.1" is an IP address`},
		{t.Context(), "-a.test", testDNSCheck(s.Addr()), `certmgr: server name "-a.test" contains an invalid character`},
		{t.Context(), strings.Repeat("a", 64) + ".test", testDNSCheck(s.Addr()), `certmgr: server name "` + strings.Repeat("a", 64) + `.test" has a label over 63 bytes`},
		{t.Context(), "a.test", DNSCheck{Resolvers: []string{s.Addr()}}, "certmgr: DNSCheck.KnownIPs is empty"},
		{t.Context(), "a.test", DNSCheck{KnownIPs: []netip.Addr{netip.MustParseAddr("127.0.0.1")}, Resolvers: []string{"no-port"}}, `certmgr: resolver "no-port" is not host:port: address no-port: missing port in address`},
		{ctx, "a.test", testDNSCheck(s.Addr()), "certmgr: DNS check of a.test: context canceled"},
	}
	for _, tt := range tests {
		err := CheckDNS(tt.ctx, tt.domain, tt.opts)
		if err == nil || err.Error() != tt.want || errors.Is(err, ErrDNSNotReady) {
			t.Errorf("CheckDNS(%q) = %v, want %s", tt.domain, err, tt.want)
		}
	}
}

// TestPreCheckWaitsForDNS: a foreign A record stops the attempt before any
// order; once DNS points at the cluster, the recheck lets Provision through.
func TestPreCheckWaitsForDNS(t *testing.T) {
	t.Parallel()
	const name = "migrating.test"
	e := newEnv(t, envOptions{cache: memoryCache, names: []string{name}, dnsCheck: true})
	m := e.start(t, func(c *Config) { c.DNSRecheck = Backoff{Steps: []time.Duration{200 * time.Millisecond}, Jitter: -1} })
	e.DNS.SetA(name, "127.0.0.2")
	err := m.Provision(context.Background(), name)
	if !errors.Is(err, ErrDNSNotReady) || !strings.Contains(err.Error(), "127.0.0.2") {
		t.Fatalf("Provision = %v, want ErrDNSNotReady naming 127.0.0.2", err)
	}
	if n := e.Proxy.Requests(certmgrtest.ClassNewOrder); n != 0 {
		t.Errorf("%d orders before DNS was ready", n)
	}
	if st := m.Status(name); st.State != StateWaitingDNS || st.NextAttempt.IsZero() || !errors.Is(st.LastError, ErrDNSNotReady) {
		t.Errorf("Status = %+v, want waiting-dns with a recheck time", st)
	}
	if !strings.Contains(e.logs.String(), "DNS not ready") {
		t.Error("not logged")
	}
	e.DNS.SetA(name, "127.0.0.1")
	waitFor(t, 10*time.Second, "Provision after the recheck", func() bool {
		err := m.Provision(context.Background(), name)
		if err != nil && !errors.Is(err, ErrDNSNotReady) {
			t.Fatalf("Provision = %v", err)
		}
		return err == nil
	})
	if c := e.Proxy.Counts(name); c.Orders != 1 {
		t.Errorf("proxy counted %+v, want 1 order", c)
	}
	if st := m.Status(name); st.State != StateValid {
		t.Errorf("Status = %+v, want valid", st)
	}
}

// TestPreCheckRecords: AAAA records count too, and CAA must authorise the
// CA; Domains then lists each name with its state.
func TestPreCheckRecords(t *testing.T) {
	t.Parallel()
	e := newEnv(t, envOptions{cache: memoryCache, names: []string{"stale-aaaa.test", "good-aaaa.test", "caa-other.test", "www.caa-parent.test"},
		dnsCheck: true, pebble: certmgrtest.Options{IPv6: true}})
	m := e.start(t, func(c *Config) { c.DNS.CAAIdentities = []string{"pebble.test"} })
	e.DNS.SetA("stale-aaaa.test", "127.0.0.1")
	e.DNS.SetAAAA("stale-aaaa.test", "2001:db8::1")
	e.DNS.SetA("good-aaaa.test", "127.0.0.1")
	e.DNS.SetAAAA("good-aaaa.test", "::1")
	e.DNS.SetA("caa-other.test", "127.0.0.1")
	e.DNS.SetCAA("caa-other.test", certmgrtest.CAA{Tag: "issue", Value: "ca.example.net"})
	e.DNS.SetA("www.caa-parent.test", "127.0.0.1")
	e.DNS.SetCAA("caa-parent.test", certmgrtest.CAA{Tag: "issue", Value: "pebble.test"})

	for _, tt := range []struct {
		name, want string // want: "" to pass, else what the error names
	}{
		{"stale-aaaa.test", "2001:db8::1"},
		{"good-aaaa.test", ""},
		{"caa-other.test", "ca.example.net"},
		{"www.caa-parent.test", ""},
	} {
		err := m.Provision(context.Background(), tt.name)
		switch {
		case tt.want == "" && err != nil:
			t.Errorf("Provision(%s) = %v, want success", tt.name, err)
		case tt.want != "" && (!errors.Is(err, ErrDNSNotReady) || !strings.Contains(err.Error(), tt.want)):
			t.Errorf("Provision(%s) = %v, want ErrDNSNotReady naming %s", tt.name, err, tt.want)
		}
		wantOrders := 0
		if tt.want == "" {
			wantOrders = 1
		}
		if n := e.Proxy.Counts(tt.name).Orders; n != wantOrders {
			t.Errorf("%s: %d orders, want %d", tt.name, n, wantOrders)
		}
	}
	var got []string
	for _, s := range m.Domains() {
		got = append(got, s.Domain+"="+s.State.String())
	}
	if want := "[caa-other.test=waiting-dns good-aaaa.test=valid stale-aaaa.test=waiting-dns www.caa-parent.test=valid]"; fmt.Sprint(got) != want {
		t.Errorf("Domains() = %v, want %s", got, want)
	}
}

// TestPreCheckHandshakeFlood: 1,000 handshakes for a name whose DNS is
// wrong make no order, all get the fallback promptly, and cost at most 2
// queries per record type.
func TestPreCheckHandshakeFlood(t *testing.T) {
	t.Parallel()
	const name = "wrong.test"
	e := newEnv(t, envOptions{cache: memoryCache, names: []string{name}, dnsCheck: true})
	e.start(t, func(c *Config) { c.DNS.CAAIdentities = []string{"pebble.test"} })
	e.DNS.SetA(name, "127.0.0.2")
	var (
		wg      sync.WaitGroup
		mu      sync.Mutex
		slowest time.Duration
		bad     []error
	)
	sem := make(chan struct{}, 32)
	for range 1000 {
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer func() { <-sem; wg.Done() }()
			start := time.Now()
			leaf, err := e.dial(t, name, insecure)
			mu.Lock()
			defer mu.Unlock()
			slowest = max(slowest, time.Since(start))
			if err == nil && !isFallbackLeaf(leaf) {
				err = fmt.Errorf("got %v", leaf.Subject)
			}
			if err != nil {
				bad = append(bad, err)
			}
		}()
	}
	wg.Wait()
	if len(bad) > 0 {
		t.Fatalf("%d handshakes without the fallback, first: %v", len(bad), bad[0])
	}
	if n := e.Proxy.Requests(certmgrtest.ClassNewOrder); n != 0 {
		t.Errorf("%d orders", n)
	}
	for _, q := range []uint16{dns.TypeA, dns.TypeAAAA, dns.TypeCAA} {
		if n := e.DNS.Queries(name, q); n > 2 {
			t.Errorf("%d %s queries, want at most 2", n, dns.TypeToString[q])
		}
	}
	if slowest > 2*time.Second {
		t.Errorf("slowest handshake took %v", slowest)
	}
	t.Logf("slowest of 1000 handshakes: %v; queries A=%d AAAA=%d", slowest, e.DNS.Queries(name, dns.TypeA), e.DNS.Queries(name, dns.TypeAAAA))
}

// TestPreCheckResolverFailures: resolver failures are "not ready" too.
func TestPreCheckResolverFailures(t *testing.T) {
	t.Parallel()
	names := []string{"nx.test", "servfail.test", "noaddr.test", "silent.test"}
	e := newEnv(t, envOptions{cache: memoryCache, names: names, dnsCheck: true})
	m := e.start(t, nil)
	e.DNS.SetRcode("nx.test", dns.RcodeNameError)
	e.DNS.SetRcode("servfail.test", dns.RcodeServerFailure)
	e.DNS.SetA("noaddr.test")                                                        // no A record ...
	e.DNS.SetCAA("noaddr.test", certmgrtest.CAA{Tag: "issue", Value: "pebble.test"}) // exists, no A/AAAA
	e.DNS.SetA("silent.test", "127.0.0.1")
	e.DNS.SetSilent("silent.test", true)
	for _, name := range names {
		start := time.Now()
		err := m.Provision(context.Background(), name)
		if !errors.Is(err, ErrDNSNotReady) {
			t.Errorf("Provision(%s) = %v, want ErrDNSNotReady", name, err)
		}
		if took := time.Since(start); took > 20*time.Second {
			t.Errorf("Provision(%s) took %v", name, took)
		}
		leaf, err := e.dial(t, name, insecure)
		if err != nil || !isFallbackLeaf(leaf) {
			t.Errorf("handshake(%s): %v, %v; want the fallback", name, leaf, err)
		}
		if st := m.Status(name); st.State != StateWaitingDNS {
			t.Errorf("Status(%s) = %+v, want waiting-dns", name, st)
		}
		if !strings.Contains(e.logs.String(), "domain="+name) {
			t.Errorf("%s: not logged", name)
		}
	}
	if n := e.Proxy.Requests(certmgrtest.ClassNewOrder); n != 0 {
		t.Errorf("%d orders", n)
	}
}
