package certmgr

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net/netip"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/crypto/acme/autocert"

	"github.com/certmgr/certmgr/internal/pebbletest"
)

// eventLog collects OnEvent's events.
type eventLog struct {
	mu     sync.Mutex
	events []Event
}

func (l *eventLog) add(e Event) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.events = append(l.events, e)
}

func (l *eventLog) kinds() []EventKind {
	l.mu.Lock()
	defer l.mu.Unlock()
	var ks []EventKind
	for _, e := range l.events {
		ks = append(ks, e.Kind)
	}
	return ks
}

func (l *eventLog) count(k EventKind) int {
	n := 0
	for _, got := range l.kinds() {
		if got == k {
			n++
		}
	}
	return n
}

func (l *eventLog) last(k EventKind) Event {
	l.mu.Lock()
	defer l.mu.Unlock()
	for i := len(l.events) - 1; i >= 0; i-- {
		if l.events[i].Kind == k {
			return l.events[i]
		}
	}
	return Event{}
}

// logLines returns the log's lines that mention domain.
func logLines(logs *syncBuffer, domain string) []string {
	var out []string
	for _, l := range strings.Split(logs.String(), "\n") {
		if strings.Contains(l, "domain="+domain) {
			out = append(out, l)
		}
	}
	return out
}

// Acceptance 1 and 2 (operability): the log and OnEvent tell a full
// story, one line per event: DNS not ready, DNS ready, a failed attempt
// (with the CA's detail verbatim), backing off, a flood of handshakes in
// backoff (next to silent), the operator's Retry, the certificate
// obtained, renewed by autocert's timer, and loaded from the cache after a
// restart.
func TestEventStory(t *testing.T) {
	const name = "story.test"
	dir := t.TempDir()
	var events eventLog
	checkLeaks(t)
	env := pebbletest.Start(t, pebbletest.Options{CertValidity: 30 * time.Second})
	logs := &syncBuffer{}
	cfg := Config{
		Autocert: &autocert.Manager{Cache: autocert.DirCache(dir), Client: env.NewClient(),
			HostPolicy: autocert.HostWhitelist(name), RenewBefore: 28 * time.Second},
		Logger:     newTestLogger(logs),
		OnEvent:    events.add,
		DNS:        DNSCheck{KnownIPs: []netip.Addr{netip.MustParseAddr("127.0.0.1"), netip.MustParseAddr("127.0.0.3")}, Resolvers: []string{env.DNS.Addr()}},
		DNSRecheck: Backoff{Steps: []time.Duration{50 * time.Millisecond}, Jitter: -1},
	}
	m, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	env.ServeTLS(t, m.TLSConfig(), nil)
	defer func() {
		if t.Failed() || testing.Verbose() {
			t.Logf("log:\n%s", logs)
		}
	}()
	hs := func() {
		t.Helper()
		if _, err := (&testEnv{Env: env}).handshake(t, name, insecure); err != nil {
			t.Fatal(err)
		}
	}

	// DNS points elsewhere: no attempt.
	env.DNS.SetA(name, "127.0.0.2")
	hs()
	// DNS now right for the pre-check, but nothing answers the VA there.
	env.DNS.SetA(name, "127.0.0.3")
	waitFor(t, 5*time.Second, "the DNS recheck and the failed attempt", func() bool {
		hs()
		return events.count(EventFailed) == 1
	})
	// A flood in backoff.
	before := len(logLines(logs, name))
	for range 1000 {
		if _, err := m.GetCertificate(helloFor(name)); err != nil {
			t.Fatal(err)
		}
	}
	if n := len(logLines(logs, name)) - before; n > 10 {
		t.Errorf("1000 handshakes in backoff logged %d lines", n)
	}
	ordersBefore := env.Proxy.Counts(name).Orders
	// The operator fixes DNS and retries.
	env.DNS.SetA(name, "127.0.0.1")
	m.Retry(name)
	hs()
	waitFor(t, 5*time.Second, "the certificate", func() bool { return m.Status(name).State == StateValid })
	if n := env.Proxy.Counts(name).Orders - ordersBefore; n != 1 {
		t.Errorf("Retry then a handshake made %d orders, want 1", n)
	}
	// autocert's timer renews the 30 s certificate within seconds.
	waitFor(t, 10*time.Second, "the renewal", func() bool { return events.count(EventRenewed) == 1 })
	// RenewBefore exceeds the new certificate's life too: autocert asks
	// again at once, and certmgr refuses rather than loop.
	waitFor(t, 10*time.Second, "the next renewal to be refused", func() bool { return m.refusedOrders.Load() >= 1 })
	m.Close()
	// A restart loads the certificate from the cache at first use.
	m2, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer m2.Close()
	if c, err := m2.GetCertificate(helloFor(name)); err != nil || IsFallback(c) {
		t.Fatalf("after restart: %v, %v", c, err)
	}
	m2.Close()

	// Each event exactly once (the fallback is sampled: once per state).
	want := []EventKind{EventDNSNotReady, EventDNSReady, EventFailed, EventBackoff, EventRetry, EventObtained, EventRenewed, EventLoaded}
	for _, k := range want {
		if n := events.count(k); n != 1 {
			t.Errorf("%v: %d events, want 1", k, n)
		}
	}
	if n := events.count(EventFallback); n < 1 || n > 3 {
		t.Errorf("%d fallback events, want 1 to 3", n)
	}
	var seq []EventKind
	for _, k := range events.kinds() {
		if k != EventFallback {
			seq = append(seq, k)
		}
	}
	if fmt.Sprint(seq) != fmt.Sprint(want) {
		t.Errorf("events in order:\n%v\nwant\n%v", seq, want)
	}
	// The log has the same sequence, in order, with the attributes.
	var logged []string
	for _, l := range logLines(logs, name) {
		msg := l[strings.Index(l, "msg=")+4:]
		msg = strings.Trim(msg[:strings.Index(msg, " domain=")], `"`)
		if msg != EventFallback.String() {
			logged = append(logged, msg)
		}
	}
	if fmt.Sprint(logged) != fmt.Sprint(seq) {
		t.Errorf("log messages in order:\n%v\nwant\n%v", logged, seq)
	}
	failed := events.last(EventFailed)
	var ae *AttemptError
	if !errors.As(failed.Err, &ae) || !strings.HasPrefix(ae.Detail, "Failed to connect to 127.0.0.3:") || failed.Path != PathHandshake {
		t.Errorf("failed event %+v, want the CA's detail verbatim", failed)
	}
	wantAttrs := map[EventKind][]string{
		EventDNSNotReady: {"level=INFO", "next_attempt=", `error="certmgr: DNS not ready: story.test: A 127.0.0.2 is not a known IP`},
		EventFailed:      {"level=WARN", "path=handshake", "challenge=tls-alpn-01", "attempt=1", "duration=", "Failed to connect to 127.0.0.3:"},
		EventBackoff:     {"level=INFO", "next_attempt="},
		EventRetry:       {"level=INFO"},
		EventObtained:    {"level=INFO", "path=handshake", "challenge=tls-alpn-01", "attempt=2", "not_after=", "duration="},
		EventRenewed:     {"level=INFO", "path=renewal", "not_after="},
		EventLoaded:      {"level=DEBUG", "not_after="},
		EventFallback:    {"level=DEBUG"},
	}
	for k, attrs := range wantAttrs {
		line := ""
		for _, l := range logLines(logs, name) {
			if strings.Contains(l, `msg="`+k.String()+`"`) {
				line = l
			}
		}
		for _, a := range attrs {
			if !strings.Contains(line, a) {
				t.Errorf("%v line %q lacks %q", k, line, a)
			}
		}
	}
	if s := fmt.Sprint(events.last(EventObtained)); !strings.Contains(s, name) {
		t.Errorf("fmt.Sprint(event) = %q, want the domain", s)
	}
}

// helloFor is a modern client's hello for name.
func helloFor(name string) *tls.ClientHelloInfo {
	return &tls.ClientHelloInfo{ServerName: name, SupportedVersions: []uint16{tls.VersionTLS13}}
}

// Acceptance 3 (operability): Retry during the CA's Retry-After changes
// nothing.
func TestRetryKeepsRetryAfter(t *testing.T) {
	const name = "retry-after.test"
	e := startEnv(t, pebbletest.Options{}, Config{}, name)
	e.Proxy.AddRule(pebbletest.Rule{Class: pebbletest.ClassNewOrder, Identifier: name, Status: 429, RetryAfter: "3600"})
	e.ServeTLS(t, e.m.TLSConfig(), nil)
	if err := e.m.Provision(context.Background(), name); err == nil {
		t.Fatal("Provision succeeded through a 429")
	}
	e.m.Retry(name)
	if err := e.m.Provision(context.Background(), name); !errors.Is(err, ErrBackoff) {
		t.Errorf("Provision after Retry = %v, want ErrBackoff (the CA's Retry-After)", err)
	}
	c, err := e.m.GetCertificate(helloFor(name))
	if err != nil || !IsFallback(c) {
		t.Errorf("handshake after Retry: %v, %v; want the fallback", c, err)
	}
	if n := e.Proxy.Requests(pebbletest.ClassNewOrder); n != 1 {
		t.Errorf("%d new-order requests, want 1", n)
	}
	if st := e.m.Status(name); time.Until(st.NextAttempt) < 3590*time.Second {
		t.Errorf("Status after Retry = %+v, want NextAttempt an hour ahead", st)
	}
}

// TestDomainsSorted: Domains lists every known domain, sorted, and never a
// refused one.
func TestDomainsSorted(t *testing.T) {
	e := startEnv(t, pebbletest.Options{}, Config{}, "b.test", "a.test", "c.test")
	e.ServeTLS(t, e.m.TLSConfig(), nil)
	for _, n := range []string{"c.test", "a.test", "b.test"} {
		if err := e.m.Provision(context.Background(), n); err != nil {
			t.Fatal(err)
		}
	}
	e.m.GetCertificate(helloFor("refused.test"))
	var got []string
	for _, s := range e.m.Domains() {
		got = append(got, s.Domain+"="+s.State.String())
	}
	if want := "[a.test=valid b.test=valid c.test=valid]"; fmt.Sprint(got) != want {
		t.Errorf("Domains() = %v, want %s", got, want)
	}
}
