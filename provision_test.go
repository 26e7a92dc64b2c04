package certmgr

import (
	"context"
	"crypto/ecdsa"
	"crypto/tls"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/miekg/dns"

	"github.com/certmgr/certmgr/certmgrtest"
)

// TestRetryClearsBackoffOnly: the operator's Retry clears the schedule's
// wait, the DNS recheck and the wait for the Cache, and drops autocert's
// failed state, but keeps the CA's Retry-After and the budget; Retry on an
// unknown or invalid name does nothing.
func TestRetryClearsBackoffOnly(t *testing.T) {
	clock := newFakeClock()
	var events []Event
	m := newPureManager(t, clock, func(c *Config) { c.OnEvent = func(e Event) { events = append(events, e) } })
	now := clock.Now()
	d, err := m.domainFor("a.test")
	if err != nil {
		t.Fatal(err)
	}
	m.stateMu.Lock()
	d.fail.fail(now, "refused", 1, 4, m.cfg.Backoff, time.Time{}, 0)
	d.dnsErr, d.dnsNext, d.localNext = ErrDNSNotReady, now.Add(time.Minute), now.Add(time.Minute)
	d.am, d.loadedAt = m.base, [2]time.Time{now, now}
	m.stateMu.Unlock()
	m.Retry("A.test.")
	m.stateMu.Lock()
	if !d.fail.NextAttempt.Equal(now) || !d.dnsNext.IsZero() || !d.localNext.IsZero() || d.am != nil || (d.loadedAt != [2]time.Time{}) || d.fail.Failures != 1 {
		t.Errorf("after Retry: %+v", d)
	}
	d.fail.fail(now, "rate limited", 1, 4, m.cfg.Backoff, now.Add(time.Hour), 0)
	m.stateMu.Unlock()
	m.Retry("a.test")
	if st := m.Status("a.test"); !st.NextAttempt.Equal(now.Add(time.Hour)) {
		t.Errorf("after Retry in the CA's Retry-After: NextAttempt %v, want it kept", st.NextAttempt)
	}
	if len(events) != 2 || events[0].Kind != EventRetry || events[0].Domain != "a.test" || !events[0].NextAttempt.IsZero() ||
		!events[1].NextAttempt.Equal(now.Add(time.Hour)) {
		t.Errorf("events %+v, want two Retry events, the second with the CA's next attempt", events)
	}
	m.Retry("unknown.test")
	m.Retry("not a name")
	if len(events) != 2 || len(m.Domains()) != 1 {
		t.Errorf("Retry of unknown names: %d events, %d domains", len(events), len(m.Domains()))
	}
}

// TestProvisionRefusesInvalidNames: Provision normalises its name and
// refuses one that no certificate can carry.
func TestProvisionRefusesInvalidNames(t *testing.T) {
	m := newPureManager(t, newFakeClock(), nil)
	for _, name := range []string{"", "localhost", "1.2.3.4", "a..test"} {
		if err := m.Provision(context.Background(), name); err == nil || !strings.HasPrefix(err.Error(), "certmgr: ") {
			t.Errorf("Provision(%q) = %v, want an error", name, err)
		}
	}
	if n := len(m.Domains()); n != 0 {
		t.Errorf("%d domains", n)
	}
}

// TestProvisionServesModernClients: the certificate Provision obtains is
// the ECDSA one a TLS 1.3 client, and a TLS 1.2 client offering ECDSA, are
// served.
func TestProvisionServesModernClients(t *testing.T) {
	t.Parallel()
	const name = "modern.test"
	e := newEnv(t, envOptions{cache: memoryCache, names: []string{name}, dnsCheck: true})
	m := e.start(t, nil)
	e.DNS.SetA(name, "127.0.0.1")
	if err := m.Provision(context.Background(), name); err != nil {
		t.Fatal(err)
	}
	for _, conf := range []*tls.Config{
		{MinVersion: tls.VersionTLS13},
		{MaxVersion: tls.VersionTLS12, CipherSuites: []uint16{tls.TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256, tls.TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256}},
	} {
		leaf := e.handshake(t, name, conf)
		if _, ok := leaf.PublicKey.(*ecdsa.PublicKey); !ok {
			t.Errorf("leaf key is %T, want ECDSA", leaf.PublicKey)
		}
	}
	if n := e.Proxy.Counts(name).Orders; n != 1 {
		t.Errorf("%d orders, want 1", n)
	}
}

// TestProvisionCancelled: Provision honours its context; the attempt it
// started goes on and its outcome is recorded.
func TestProvisionCancelled(t *testing.T) {
	t.Parallel()
	const name = "cancel.test"
	e := newEnv(t, envOptions{cache: memoryCache, names: []string{name}, dnsCheck: true})
	m := e.start(t, nil)
	e.DNS.SetA(name, "127.0.0.1")
	e.Proxy.AddRule(certmgrtest.Rule{Class: certmgrtest.ClassNewOrder, Identifier: name, Hold: true})
	ctx, cancel := context.WithCancel(context.Background())
	errc := make(chan error, 1)
	go func() { errc <- m.Provision(ctx, name) }()
	// Cancel while Provision waits for the attempt, whose order is held.
	waitFor(t, 10*time.Second, "the held order", func() bool { return e.Proxy.Requests(certmgrtest.ClassNewOrder) == 1 })
	cancelled := time.Now()
	cancel()
	select {
	case err := <-errc:
		if took := time.Since(cancelled); !errors.Is(err, context.Canceled) || took > 50*time.Millisecond {
			t.Errorf("Provision = %v, %v after the cancel; want context.Canceled within 50 ms", err, took)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Provision did not return after its context ended")
	}
	if st := m.Status(name); st.State != StateObtaining {
		t.Fatalf("Status = %+v, want the attempt still in flight", st)
	}
	e.Proxy.Release()
	waitFor(t, 10*time.Second, "the late outcome", func() bool { return m.Status(name).State == StateValid })
	if n := e.Proxy.Counts(name).Orders; n != 1 {
		t.Errorf("%d orders, want 1", n)
	}
}

// TestProvisionHostNotAllowed: a refused name is refused before anything
// else: no domain, no DNS query.
func TestProvisionHostNotAllowed(t *testing.T) {
	e := newEnv(t, envOptions{cache: memoryCache, names: []string{"allowed.test"}, dnsCheck: true})
	m := e.start(t, nil)
	err := m.Provision(context.Background(), "refused.test")
	if !errors.Is(err, ErrHostNotAllowed) {
		t.Fatalf("Provision = %v, want ErrHostNotAllowed", err)
	}
	if n := len(m.Domains()); n != 0 {
		t.Errorf("%d domains kept", n)
	}
	if n := e.DNS.Queries("refused.test", dns.TypeA); n != 0 {
		t.Errorf("%d DNS queries for a refused name", n)
	}
}

// TestProvisionAfterRSAAttempt: Provision that joins an attempt for the
// RSA certificate still ends with the ECDSA one.
func TestProvisionAfterRSAAttempt(t *testing.T) {
	t.Parallel()
	const name = "both.test"
	e := newEnv(t, envOptions{cache: memoryCache, names: []string{name}})
	m := e.start(t, func(c *Config) { c.HandshakeTimeout = 100 * time.Millisecond })
	e.Proxy.AddRule(certmgrtest.Rule{Class: certmgrtest.ClassNewOrder, Identifier: name, Hold: true, Times: 1})
	// An RSA-only client starts the RSA attempt (and cannot take the
	// ECDSA fallback it gets meanwhile).
	rsaHello := &tls.ClientHelloInfo{ServerName: name, CipherSuites: rsaOnly.CipherSuites,
		SignatureSchemes: []tls.SignatureScheme{tls.PKCS1WithSHA256}}
	if c, err := m.GetCertificate(rsaHello); err != nil || !IsFallback(c) {
		t.Fatalf("GetCertificate(RSA hello) = %v, %v; want the fallback while the order is held", c, err)
	}
	waitFor(t, 5*time.Second, "the held RSA order", func() bool { return e.Proxy.Requests(certmgrtest.ClassNewOrder) == 1 })
	done := make(chan error, 1)
	go func() { done <- m.Provision(context.Background(), name) }()
	e.Proxy.Release()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	c := m.servedCert(certKey{domain: name})
	if c == nil {
		t.Fatal("no ECDSA certificate after Provision")
	}
	if _, ok := c.Leaf.PublicKey.(*ecdsa.PublicKey); !ok {
		t.Errorf("Provision's certificate has a %T key", c.Leaf.PublicKey)
	}
}

// TestRetryKeepsRetryAfter: Retry during the CA's Retry-After changes
// nothing.
func TestRetryKeepsRetryAfter(t *testing.T) {
	const name = "retry-after.test"
	e := newEnv(t, envOptions{cache: memoryCache, names: []string{name}})
	m := e.start(t, nil)
	e.Proxy.AddRule(certmgrtest.Rule{Class: certmgrtest.ClassNewOrder, Identifier: name, Status: 429, RetryAfter: "3600"})
	if err := m.Provision(context.Background(), name); err == nil {
		t.Fatal("Provision succeeded through a 429")
	}
	m.Retry(name)
	if err := m.Provision(context.Background(), name); !errors.Is(err, ErrBackoff) {
		t.Errorf("Provision after Retry = %v, want ErrBackoff (the CA's Retry-After)", err)
	}
	c, err := m.GetCertificate(helloFor(name))
	if err != nil || !IsFallback(c) {
		t.Errorf("handshake after Retry: %v, %v; want the fallback", c, err)
	}
	if n := e.Proxy.Requests(certmgrtest.ClassNewOrder); n != 1 {
		t.Errorf("%d new-order requests, want 1", n)
	}
	if st := m.Status(name); time.Until(st.NextAttempt) < 3590*time.Second {
		t.Errorf("Status after Retry = %+v, want NextAttempt an hour ahead", st)
	}
}
