package certmgr

import (
	"context"
	"crypto/ecdsa"
	"crypto/tls"
	"errors"
	"fmt"
	"net/netip"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/miekg/dns"

	"github.com/certmgr/certmgr/internal/dnstest"
	"github.com/certmgr/certmgr/internal/pebbletest"
)

// dnsConfig is a Config whose pre-check expects the loopback addresses and
// asks the harness's DNS server.
func dnsConfig(e *pebbletest.Env, cfg Config) Config {
	cfg.DNS.KnownIPs = []netip.Addr{netip.MustParseAddr("127.0.0.1"), netip.MustParseAddr("::1")}
	cfg.DNS.Resolvers = []string{e.DNS.Addr()}
	cfg.DNS.Timeout = 500 * time.Millisecond
	return cfg
}

// Acceptance 1 (DNS): a foreign A record stops the attempt before any
// order; once DNS points at the cluster, the recheck lets Provision through.
func TestProvisionWaitsForDNS(t *testing.T) {
	const name = "migrating.test"
	e := startDNSEnv(t, pebbletest.Options{}, Config{DNSRecheck: Backoff{Steps: []time.Duration{200 * time.Millisecond}, Jitter: -1}}, name)
	e.DNS.SetA(name, "127.0.0.2")
	e.ServeTLS(t, e.m.TLSConfig(), nil)
	err := e.m.Provision(context.Background(), name)
	if !errors.Is(err, ErrDNSNotReady) || !strings.Contains(err.Error(), "127.0.0.2") {
		t.Fatalf("Provision = %v, want ErrDNSNotReady naming 127.0.0.2", err)
	}
	if n := e.Proxy.Requests(pebbletest.ClassNewOrder); n != 0 {
		t.Errorf("%d orders before DNS was ready", n)
	}
	if st := e.m.Status(name); st.State != StateWaitingDNS || st.NextAttempt.IsZero() || !errors.Is(st.LastError, ErrDNSNotReady) {
		t.Errorf("Status = %+v, want waiting-dns with a recheck time", st)
	}
	if !strings.Contains(e.logs.String(), "DNS not ready") {
		t.Error("not logged")
	}
	e.DNS.SetA(name, "127.0.0.1")
	waitFor(t, 10*time.Second, "Provision after the recheck", func() bool {
		err := e.m.Provision(context.Background(), name)
		if err != nil && !errors.Is(err, ErrDNSNotReady) {
			t.Fatalf("Provision = %v", err)
		}
		return err == nil
	})
	if c := e.Proxy.Counts(name); c.Orders != 1 {
		t.Errorf("proxy counted %+v, want 1 order", c)
	}
	if st := e.m.Status(name); st.State != StateValid {
		t.Errorf("Status = %+v, want valid", st)
	}
}

// Acceptance 2 and 3 (DNS): AAAA records count too, and CAA must authorise
// the CA.
func TestProvisionDNSRecords(t *testing.T) {
	e := startDNSEnv(t, pebbletest.Options{IPv6: true}, Config{DNS: DNSCheck{CAAIdentities: []string{"pebble.test"}}},
		"stale-aaaa.test", "good-aaaa.test", "caa-other.test", "www.caa-parent.test")
	e.ServeTLS(t, e.m.TLSConfig(), nil)
	e.DNS.SetA("stale-aaaa.test", "127.0.0.1")
	e.DNS.SetAAAA("stale-aaaa.test", "2001:db8::1")
	e.DNS.SetA("good-aaaa.test", "127.0.0.1")
	e.DNS.SetAAAA("good-aaaa.test", "::1")
	e.DNS.SetA("caa-other.test", "127.0.0.1")
	e.DNS.SetCAA("caa-other.test", dnstest.CAA{Tag: "issue", Value: "ca.example.net"})
	e.DNS.SetA("www.caa-parent.test", "127.0.0.1")
	e.DNS.SetCAA("caa-parent.test", dnstest.CAA{Tag: "issue", Value: "pebble.test"})

	for _, tt := range []struct {
		name, want string // want: "" to pass, else what the error names
	}{
		{"stale-aaaa.test", "2001:db8::1"},
		{"good-aaaa.test", ""},
		{"caa-other.test", "ca.example.net"},
		{"www.caa-parent.test", ""},
	} {
		err := e.m.Provision(context.Background(), tt.name)
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
}

// Acceptance 4 (DNS): 1,000 handshakes for a name whose DNS is wrong make
// no order, all get the fallback promptly, and cost at most 2 queries per
// record type.
func TestHandshakeFloodWrongDNS(t *testing.T) {
	const name = "wrong.test"
	e := startDNSEnv(t, pebbletest.Options{}, Config{DNS: DNSCheck{CAAIdentities: []string{"pebble.test"}}}, name)
	e.DNS.SetA(name, "127.0.0.2")
	e.ServeTLS(t, e.m.TLSConfig(), nil)
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
			leaf, err := e.handshake(t, name, insecure)
			mu.Lock()
			defer mu.Unlock()
			slowest = max(slowest, time.Since(start))
			if err == nil && !strings.Contains(leaf.Subject.String(), "certmgr fallback") {
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
	if n := e.Proxy.Requests(pebbletest.ClassNewOrder); n != 0 {
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

// Acceptance 5 (DNS): resolver failures are "not ready" too.
func TestProvisionDNSFailures(t *testing.T) {
	names := []string{"nx.test", "servfail.test", "noaddr.test", "silent.test"}
	e := startDNSEnv(t, pebbletest.Options{}, Config{}, names...)
	e.ServeTLS(t, e.m.TLSConfig(), nil)
	e.DNS.SetRcode("nx.test", dns.RcodeNameError)
	e.DNS.SetRcode("servfail.test", dns.RcodeServerFailure)
	e.DNS.SetCAA("noaddr.test", dnstest.CAA{Tag: "issue", Value: "pebble.test"}) // exists, no A/AAAA
	e.DNS.SetA("silent.test", "127.0.0.1")
	e.DNS.SetSilent("silent.test", true)
	for _, name := range names {
		start := time.Now()
		err := e.m.Provision(context.Background(), name)
		if !errors.Is(err, ErrDNSNotReady) {
			t.Errorf("Provision(%s) = %v, want ErrDNSNotReady", name, err)
		}
		if took := time.Since(start); took > 20*time.Second {
			t.Errorf("Provision(%s) took %v", name, took)
		}
		leaf, err := e.handshake(t, name, insecure)
		if err != nil || !strings.Contains(leaf.Subject.String(), "certmgr fallback") {
			t.Errorf("handshake(%s): %v, %v; want the fallback", name, leaf, err)
		}
		if st := e.m.Status(name); st.State != StateWaitingDNS {
			t.Errorf("Status(%s) = %+v, want waiting-dns", name, st)
		}
		if !strings.Contains(e.logs.String(), "domain="+name) {
			t.Errorf("%s: not logged", name)
		}
	}
	if n := e.Proxy.Requests(pebbletest.ClassNewOrder); n != 0 {
		t.Errorf("%d orders", n)
	}
}

// Acceptance 6 (DNS): the certificate Provision obtains is the ECDSA one a
// TLS 1.3 client, and a TLS 1.2 client offering ECDSA, are served.
func TestProvisionServesModernClients(t *testing.T) {
	const name = "modern.test"
	e := startDNSEnv(t, pebbletest.Options{}, Config{}, name)
	e.DNS.SetA(name, "127.0.0.1")
	e.ServeTLS(t, e.m.TLSConfig(), nil)
	if err := e.m.Provision(context.Background(), name); err != nil {
		t.Fatal(err)
	}
	for _, conf := range []*tls.Config{
		{MinVersion: tls.VersionTLS13},
		{MaxVersion: tls.VersionTLS12, CipherSuites: []uint16{tls.TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256, tls.TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256}},
	} {
		leaf, err := e.handshake(t, name, conf)
		if err != nil {
			t.Fatal(err)
		}
		if _, ok := leaf.PublicKey.(*ecdsa.PublicKey); !ok {
			t.Errorf("leaf key is %T, want ECDSA", leaf.PublicKey)
		}
	}
	if n := e.Proxy.Counts(name).Orders; n != 1 {
		t.Errorf("%d orders, want 1", n)
	}
}

// Acceptance 7 (DNS): Provision honours its context; the attempt it
// started goes on and its outcome is recorded.
func TestProvisionCancelled(t *testing.T) {
	const name = "cancel.test"
	e := startDNSEnv(t, pebbletest.Options{}, Config{}, name)
	e.DNS.SetA(name, "127.0.0.1")
	e.ServeTLS(t, e.m.TLSConfig(), nil)
	e.Proxy.AddRule(pebbletest.Rule{Class: pebbletest.ClassNewOrder, Identifier: name, Hold: true})
	ctx, cancel := context.WithCancel(context.Background())
	cancelledAt := make(chan time.Time, 1)
	errc := make(chan error, 1)
	go func() { errc <- e.m.Provision(ctx, name) }()
	time.AfterFunc(100*time.Millisecond, func() { cancelledAt <- time.Now(); cancel() })
	select {
	case err := <-errc:
		cancelled := <-cancelledAt
		if took := time.Since(cancelled); !errors.Is(err, context.Canceled) || took > 50*time.Millisecond {
			t.Errorf("Provision = %v, %v after the cancel; want context.Canceled within 50 ms", err, took)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Provision did not return after its context ended")
	}
	if st := e.m.Status(name); st.State != StateObtaining {
		t.Fatalf("Status = %+v, want the attempt still in flight", st)
	}
	// The order must be held (not on its way) when released.
	waitFor(t, 10*time.Second, "the held order", func() bool { return e.Proxy.Requests(pebbletest.ClassNewOrder) == 1 })
	e.Proxy.Release()
	waitFor(t, 10*time.Second, "the late outcome", func() bool { return e.m.Status(name).State == StateValid })
	if n := e.Proxy.Counts(name).Orders; n != 1 {
		t.Errorf("%d orders, want 1", n)
	}
}

// Acceptance 8 (DNS): a refused name is refused before anything else.
func TestProvisionHostNotAllowed(t *testing.T) {
	e := startDNSEnv(t, pebbletest.Options{}, Config{}, "allowed.test")
	err := e.m.Provision(context.Background(), "refused.test")
	if !errors.Is(err, ErrHostNotAllowed) {
		t.Fatalf("Provision = %v, want ErrHostNotAllowed", err)
	}
	if n := len(e.m.Domains()); n != 0 {
		t.Errorf("%d domains kept", n)
	}
	if n := e.DNS.Queries("refused.test", dns.TypeA); n != 0 {
		t.Errorf("%d DNS queries for a refused name", n)
	}
}
