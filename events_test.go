package certmgr

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/certmgr/certmgr/certmgrtest"
	"github.com/certmgr/certmgr/internal/testsupport"
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
func logLines(logs *testsupport.Buffer, domain string) []string {
	var out []string
	for _, l := range strings.Split(logs.String(), "\n") {
		if strings.Contains(l, "domain="+domain) {
			out = append(out, l)
		}
	}
	return out
}

// TestEventKinds: each kind's message, and the level it is logged at.
func TestEventKinds(t *testing.T) {
	for _, tt := range []struct {
		kind  EventKind
		msg   string
		level slog.Level
	}{
		{EventObtained, "certificate obtained", slog.LevelInfo},
		{EventRenewed, "certificate renewed", slog.LevelInfo},
		{EventLoaded, "certificate loaded from cache", slog.LevelDebug},
		{EventFailed, "certificate attempt failed", slog.LevelWarn},
		{EventBackoff, "backing off", slog.LevelInfo},
		{EventRateLimited, "rate limited by CA", slog.LevelWarn},
		{EventDNSNotReady, "DNS not ready", slog.LevelInfo},
		{EventDNSReady, "DNS ready", slog.LevelInfo},
		{EventFallback, "fallback certificate served", slog.LevelDebug},
		{EventCacheError, "cache error", slog.LevelError},
		{EventRetry, "retry requested", slog.LevelInfo},
		{EventTableFull, "domain table full", slog.LevelWarn},
		{EventOrderBudget, "order budget spent", slog.LevelWarn},
		{EventKind(0), "EventKind(0)", slog.LevelInfo},
		{EventKind(99), "EventKind(99)", slog.LevelInfo},
	} {
		if got := tt.kind.String(); got != tt.msg {
			t.Errorf("%d.String() = %q, want %q", int(tt.kind), got, tt.msg)
		}
		if got := tt.kind.level(); got != tt.level {
			t.Errorf("%v: level %v, want %v", tt.kind, got, tt.level)
		}
	}
}

// TestEventString: an event is one line, its message then its set fields.
func TestEventString(t *testing.T) {
	at := time.Date(2026, 1, 17, 0, 27, 45, 0, time.UTC)
	for _, tt := range []struct {
		e    Event
		want string
	}{
		{Event{Kind: EventRetry, Time: at, Domain: "a.test"}, "retry requested domain=a.test"},
		{Event{Kind: EventObtained, Time: at, Domain: "a.test", Path: PathHandshake, Challenge: "tls-alpn-01", Attempt: 2,
			Duration: 1500 * time.Millisecond, NotAfter: at},
			"certificate obtained domain=a.test path=handshake challenge=tls-alpn-01 attempt=2 duration=1.5s not_after=2026-01-17 00:27:45 +0000 UTC"},
		{Event{Kind: EventBackoff, Domain: "a.test", Path: PathRenewal, NextAttempt: at, Err: errors.New("refused")},
			"backing off domain=a.test path=renewal next_attempt=2026-01-17 00:27:45 +0000 UTC error=refused"},
	} {
		if got := tt.e.String(); got != tt.want {
			t.Errorf("String() =\n%s\nwant\n%s", got, tt.want)
		}
	}
}

// TestEmitLogsAndCalls: emit logs each event, at its level with its
// fields, and hands it to OnEvent, in order.
func TestEmitLogsAndCalls(t *testing.T) {
	logs := &testsupport.Buffer{}
	var got []EventKind
	m := newPureManager(t, newFakeClock(), func(c *Config) {
		c.Logger = newTestLogger(logs)
		c.OnEvent = func(e Event) { got = append(got, e.Kind) }
	})
	m.emit(Event{Kind: EventFailed, Domain: "a.test", Err: errors.New("refused")}, Event{Kind: EventFallback, Domain: "a.test"})
	if fmt.Sprint(got) != fmt.Sprint([]EventKind{EventFailed, EventFallback}) {
		t.Errorf("OnEvent saw %v", got)
	}
	lines := logLines(logs, "a.test")
	if len(lines) != 2 || !strings.Contains(lines[0], `level=WARN msg="certificate attempt failed" domain=a.test error=refused`) ||
		!strings.Contains(lines[1], `level=DEBUG msg="fallback certificate served" domain=a.test`) {
		t.Errorf("logged:\n%s", strings.Join(lines, "\n"))
	}
}

// TestEventStory: the log and OnEvent tell a full story, one line per
// event: DNS not ready, DNS ready, a failed attempt (with the CA's detail
// verbatim), backing off, a flood of handshakes in backoff (next to
// silent), the operator's Retry, the certificate obtained, renewed by
// autocert's timer, and loaded from the cache after a restart.
func TestEventStory(t *testing.T) {
	t.Parallel()
	const name = "story.test"
	var events eventLog
	e := newEnv(t, envOptions{names: []string{name}, pebble: certmgrtest.Options{CertValidity: 30 * time.Second}})
	logs := e.logs
	config := func(c *Config) {
		c.Autocert.RenewBefore = 28 * time.Second
		c.OnEvent = events.add
		c.DNS = DNSCheck{KnownIPs: []netip.Addr{netip.MustParseAddr("127.0.0.1"), netip.MustParseAddr("127.0.0.3")}, Resolvers: []string{e.DNS.Addr()}}
		c.DNSRecheck = Backoff{Steps: []time.Duration{50 * time.Millisecond}, Jitter: -1}
	}
	m := e.start(t, config)
	defer func() {
		if testing.Verbose() && !t.Failed() {
			t.Logf("log:\n%s", logs)
		}
	}()
	hs := func() {
		t.Helper()
		e.handshake(t, name, insecure)
	}

	// DNS points elsewhere: no attempt.
	e.DNS.SetA(name, "127.0.0.2")
	hs()
	// DNS now right for the pre-check, but nothing answers the VA there.
	e.DNS.SetA(name, "127.0.0.3")
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
	ordersBefore := e.Proxy.Counts(name).Orders
	// The operator fixes DNS and retries.
	e.DNS.SetA(name, "127.0.0.1")
	m.Retry(name)
	hs()
	waitFor(t, 5*time.Second, "the certificate", func() bool { return m.Status(name).State == StateValid })
	if n := e.Proxy.Counts(name).Orders - ordersBefore; n != 1 {
		t.Errorf("Retry then a handshake made %d orders, want 1", n)
	}
	// autocert's timer renews the 30 s certificate within seconds.
	waitFor(t, 10*time.Second, "the renewal", func() bool { return events.count(EventRenewed) == 1 })
	// RenewBefore exceeds the new certificate's life too: autocert asks
	// again at once, and certmgr refuses rather than loop.
	waitFor(t, 10*time.Second, "the next renewal to be refused", func() bool { return m.refusedOrders.Load() >= 1 })
	m.Close()
	// A restart loads the certificate from the cache at first use.
	m2 := e.start(t, config)
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
		if k != EventFallback && k != EventRenewalScheduled && k != EventRenewalSuggested { // the CA's renewal information: see ari_test.go
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
		if msg != EventFallback.String() && msg != EventRenewalScheduled.String() && msg != EventRenewalSuggested.String() {
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

// TestOnEventMayReenter: OnEvent may call the Manager back, even from a
// cache error reported while the failure cache is being written.
func TestOnEventMayReenter(t *testing.T) {
	const name = "reenter.test"
	var (
		mp     atomic.Pointer[Manager]
		called atomic.Bool
	)
	e := newEnv(t, envOptions{names: []string{name}, cache: newFaultCache})
	m := e.start(t, func(c *Config) {
		c.OnEvent = func(ev Event) {
			if ev.Kind == EventCacheError && called.CompareAndSwap(false, true) {
				if mm := mp.Load(); mm != nil {
					mm.Retry(name)
					mm.Domains()
				}
			}
		}
	})
	mp.Store(m)
	e.DNS.SetA(name, "127.0.0.3") // the attempt fails: its record is written
	e.cache.(*faultCache).failPut.Store(true)
	done := make(chan error, 1)
	go func() { done <- m.Provision(context.Background(), name) }()
	select {
	case err := <-done:
		if err == nil {
			t.Fatal("Provision succeeded; validation should fail")
		}
	case <-time.After(20 * time.Second):
		t.Fatal("Provision did not return: OnEvent deadlocked")
	}
	if !called.Load() {
		t.Fatal("OnEvent saw no cache error; the test did not test anything")
	}
}
