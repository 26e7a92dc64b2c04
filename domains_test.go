package certmgr

import (
	"crypto/tls"
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/certmgr/certmgr/internal/testsupport"
)

// TestStaleFailuresMakeRoom: names whose failures are over make room for
// new ones; names still backing off do not.
func TestStaleFailuresMakeRoom(t *testing.T) {
	clock := newFakeClock()
	m := newPureManager(t, clock, func(c *Config) { c.MaxDomains = 3 })
	for i := range 3 {
		d, err := m.domainFor(fmt.Sprintf("junk%d.test", i))
		if err != nil {
			t.Fatal(err)
		}
		a := startAttempt(m, d, PathHandshake)
		m.observed(d.name, observation{order: true})
		m.finish(d, a, nil, errors.New("invalid authorization"))
	}
	if _, err := m.domainFor("legit.test"); err == nil {
		t.Fatal("a new name displaced a domain that backs off")
	}
	clock.Advance(2 * time.Hour) // backoffs and the spent authorizations are over
	if _, err := m.domainFor("legit.test"); err != nil {
		t.Fatalf("stale failures kept the table full: %v", err)
	}
	if n := len(m.Domains()); n != 3 {
		t.Errorf("%d domains, want 3", n)
	}
}

// TestIdleDomains: what keeps a domain from being dropped to make room.
func TestIdleDomains(t *testing.T) {
	clock := newFakeClock()
	m := newPureManager(t, clock, nil)
	now := clock.Now()
	for _, tt := range []struct {
		name string
		d    domain
		idle bool
	}{
		{"nothing", domain{}, true},
		{"expired certificate", domain{notAfter: now}, true},
		{"failures over", domain{fail: failureRecord{Failures: 3, NextAttempt: now}}, true},
		{"attempt", domain{attempt: &attempt{}}, false},
		{"valid certificate", domain{notAfter: now.Add(time.Minute)}, false},
		{"autocert.Manager", domain{am: m.base}, false},
		{"backoff", domain{fail: failureRecord{Failures: 1, NextAttempt: now.Add(time.Minute)}}, false},
		{"Retry-After", domain{fail: failureRecord{Failures: 1, NextAttempt: now.Add(time.Minute), RetryAfter: now.Add(time.Minute)}}, false},
		{"spent authorizations", domain{fail: failureRecord{Spends: []spend{{At: now.Add(-59 * time.Minute), Authz: 1}}}}, false},
		{"DNS recheck", domain{dnsErr: ErrDNSNotReady, dnsNext: now.Add(time.Second)}, false},
		{"Cache wait", domain{localNext: now.Add(time.Second)}, false},
	} {
		d := tt.d
		m.stateMu.Lock()
		idle := m.idleLocked(&d, now)
		m.stateMu.Unlock()
		if idle != tt.idle {
			t.Errorf("%s: idle = %v, want %v", tt.name, idle, tt.idle)
		}
	}
}

// TestEvictedDomainTakesItsCertificates: a domain dropped to make room
// (its certificates expired) is served nothing any more; its
// certificates are not kept.
func TestEvictedDomainTakesItsCertificates(t *testing.T) {
	clock := newFakeClock()
	m := newPureManager(t, clock, func(c *Config) { c.MaxDomains = 1 })
	now := clock.Now()
	old := selfSigned(t, "old.test", ecKey(t), "test", now.Add(-time.Hour), now.Add(time.Hour))
	if _, err := m.domainFor("old.test"); err != nil {
		t.Fatal(err)
	}
	m.serve(certKey{domain: "old.test"}, old)
	if _, err := m.domainFor("new.test"); err == nil {
		t.Fatal("a new name displaced a domain with a valid certificate")
	}
	clock.Advance(2 * time.Hour)
	if _, err := m.domainFor("new.test"); err != nil {
		t.Fatal(err)
	}
	m.servedMu.RLock()
	n := len(m.served)
	m.servedMu.RUnlock()
	if n != 0 || m.Status("old.test").State != StateNone {
		t.Errorf("%d certificates served, Status %+v after the eviction; want none", n, m.Status("old.test"))
	}
}

// TestSweepDropsExpiredCertificates: a certificate served without a
// domain (the store's watch serves every replica every certificate)
// leaves the served table at the sweep after it expired; a valid one
// stays.
func TestSweepDropsExpiredCertificates(t *testing.T) {
	clock := newFakeClock()
	m := newPureManager(t, clock, nil)
	now := clock.Now()
	short := selfSigned(t, "short.test", ecKey(t), "test", now.Add(-time.Hour), now.Add(time.Hour))
	long := selfSigned(t, "long.test", ecKey(t), "test", now.Add(-time.Hour), now.Add(90*24*time.Hour))
	m.serveAt(certKey{domain: "short.test"}, short, 7) // as the watch serves it
	m.serveAt(certKey{domain: "long.test"}, long, 8)
	served := func() (n, revs int) {
		m.servedMu.RLock()
		defer m.servedMu.RUnlock()
		return len(m.served), len(m.servedRev)
	}
	m.sweepRecords()
	if n, revs := served(); n != 2 || revs != 2 {
		t.Fatalf("%d certificates (%d revisions) served after a sweep before any expired, want 2", n, revs)
	}
	clock.Advance(2 * time.Hour)
	m.sweepRecords()
	if n, revs := served(); n != 1 || revs != 1 || m.servedCert(certKey{domain: "long.test"}) != long {
		t.Errorf("%d certificates (%d revisions) served after the sweep, want only the valid one", n, revs)
	}
}

// TestGateSaysWhy: checkAttemptLocked lets an attempt start, or says what it
// waits for: the schedule, the budget, the Cache or DNS.
func TestGateSaysWhy(t *testing.T) {
	clock := newFakeClock()
	m := newPureManager(t, clock, nil)
	now := clock.Now()
	errDNS := fmt.Errorf("%w: a.test: no A or AAAA record", ErrDNSNotReady)
	spends := func(n int) []spend {
		s := make([]spend, n)
		for i := range s {
			s[i] = spend{At: now.Add(-time.Duration(n-i) * time.Minute), Authz: 1}
		}
		return s
	}
	for _, tt := range []struct {
		name string
		d    domain
		want string // in the error; "" for none
		is   error
	}{
		{"free", domain{}, "", nil},
		{"due", domain{fail: failureRecord{Failures: 1, NextAttempt: now}}, "", nil},
		{"backoff", domain{fail: failureRecord{Failures: 2, LastError: "refused", NextAttempt: now.Add(time.Minute)}},
			"next attempt at 2026-01-01T00:01:00Z after 2 failure(s): refused", ErrBackoff},
		{"budget", domain{fail: failureRecord{Spends: spends(4)}}, "budget spent until 2026-01-01T00:58:00Z", ErrBackoff}, // the first of 4 spends, 4 min ago, and budgetWindow
		{"budget left", domain{fail: failureRecord{Spends: spends(3)}}, "", nil},
		{"cache", domain{localNext: now.Add(time.Second)}, "the cache could not be read", ErrBackoff},
		{"dns", domain{dnsErr: errDNS, dnsNext: now.Add(time.Second)}, errDNS.Error(), ErrDNSNotReady},
		{"dns recheck due", domain{dnsErr: errDNS, dnsNext: now}, "", nil},
	} {
		d := tt.d
		d.name = "a.test"
		m.stateMu.Lock()
		err := m.checkAttemptLocked(&d)
		m.stateMu.Unlock()
		switch {
		case tt.want == "" && err != nil:
			t.Errorf("%s: gate = %v, want nil", tt.name, err)
		case tt.want != "" && (!errors.Is(err, tt.is) || !strings.Contains(fmt.Sprint(err), tt.want)):
			t.Errorf("%s: gate = %v, want %v naming %q", tt.name, err, tt.is, tt.want)
		}
	}
}

// TestWaitsAreCappedFromNow: a record from a far future (or a clock that
// went back) waits at most the schedules' longest from now, and the cap
// is written, so that it does not move with the clock.
func TestWaitsAreCappedFromNow(t *testing.T) {
	clock := newFakeClock()
	m := newPureManager(t, clock, func(c *Config) {
		c.Backoff = Backoff{Steps: []time.Duration{time.Minute, 10 * time.Minute}, Jitter: -1}
		c.DNSRecheck = Backoff{Steps: []time.Duration{time.Minute}, Jitter: -1}
	})
	now := clock.Now()
	far := now.Add(1000 * time.Hour)
	d := &domain{name: "a.test", fail: failureRecord{Failures: 1, NextAttempt: far, RetryAfter: far}, dnsErr: ErrDNSNotReady, dnsNext: far, localNext: far}
	m.stateMu.Lock()
	m.capWaitsLocked(d, now)
	m.stateMu.Unlock()
	if !d.fail.NextAttempt.Equal(now.Add(maxRetryAfter)) || !d.fail.RetryAfter.Equal(now.Add(maxRetryAfter)) ||
		!d.dnsNext.Equal(now.Add(time.Minute)) || !d.localNext.Equal(now.Add(30*time.Second)) {
		t.Errorf("capped to next %v, retry-after %v, dns %v, cache %v", d.fail.NextAttempt, d.fail.RetryAfter, d.dnsNext, d.localNext)
	}
	d.fail.RetryAfter = time.Time{}
	d.fail.NextAttempt = far
	clock.Advance(-24 * time.Hour) // the clock goes back: the cap holds from the new now
	m.stateMu.Lock()
	m.capWaitsLocked(d, clock.Now())
	m.stateMu.Unlock()
	if want := clock.Now().Add(10 * time.Minute); !d.fail.NextAttempt.Equal(want) {
		t.Errorf("NextAttempt %v, want %v", d.fail.NextAttempt, want)
	}
}

// TestAutocertPerDomain: each domain gets an autocert.Manager of its own,
// with the user's settings, writing through certmgr's cache; names with
// none are answered by the base one.
func TestAutocertPerDomain(t *testing.T) {
	m := newPureManager(t, newFakeClock(), func(c *Config) {
		c.Autocert.Email = "ops@example.com"
		c.Autocert.RenewBefore = 48 * time.Hour
	})
	d, err := m.domainFor("a.test")
	if err != nil {
		t.Fatal(err)
	}
	if m.challengeAutocert("a.test") != m.base {
		t.Error("a domain without an autocert.Manager is not answered by the base one")
	}
	am, err := m.domainAutocert(t.Context(), d)
	if err != nil {
		t.Fatal(err)
	}
	if again, _ := m.domainAutocert(t.Context(), d); again != am || m.challengeAutocert("a.test") != am || am == m.base {
		t.Error("the domain's autocert.Manager is not its own, or not kept")
	}
	if am.Cache != m.cache || am.Email != "ops@example.com" || am.RenewBefore != 48*time.Hour || am.Client.Key == nil ||
		am.Client.DirectoryURL != m.client.DirectoryURL || am.Client.UserAgent != "certmgr" {
		t.Errorf("autocert.Manager %+v, client %+v: not the user's settings through certmgr's cache", am, am.Client)
	}
}

// TestLoadingDomainIsNotEvicted: a domain whose first Cache read is
// running is not dropped to make room.
func TestLoadingDomainIsNotEvicted(t *testing.T) {
	m := newPureManager(t, nil, func(c *Config) { c.MaxDomains = 1 })
	d, err := m.domainFor("loading.test")
	if err != nil {
		t.Fatal(err)
	}
	m.stateMu.Lock()
	d.loading++ // its first Cache read is running
	m.stateMu.Unlock()
	if _, err := m.domainFor("other.test"); err == nil {
		t.Error("a domain whose Cache read is running was dropped to make room")
	}
	m.stateMu.Lock()
	d.loading--
	m.stateMu.Unlock()
	if _, err := m.domainFor("other.test"); err != nil {
		t.Errorf("once loaded and idle, the domain makes room: %v", err)
	}
}

// TestWaitsBoundedFromNow: no persisted record, however far in the future
// its times, and no Retry-After met while the clock ran ahead, holds a
// domain longer than maxRetryAfter from now; Retry cannot lift the CA's
// (bounded) Retry-After.
func TestWaitsBoundedFromNow(t *testing.T) {
	clock := newFakeClock()
	data := []byte(`{"version":1,"domains":{"far.test":{"failures":3,"last_failure":"9999-12-31T00:00:00Z",` +
		`"next_attempt":"9999-12-31T00:00:00Z","retry_after":"9999-12-31T00:00:00Z",` +
		`"spends":[{"at":"9999-12-31T00:00:00Z","authz":1000000000},{"at":"2025-01-01T00:00:00Z","authz":-5}]}}}`)
	cache := &memCache{m: map[string][]byte{stateKey: data}}
	m := newPureManager(t, clock, func(c *Config) { c.Autocert.Cache = cache })
	limit := clock.Now().Add(maxRetryAfter)
	if st := m.Status("far.test"); st.NextAttempt.After(limit) || st.NextAttempt.IsZero() {
		t.Errorf("Status.NextAttempt = %v, want within %v and set", st.NextAttempt, limit)
	}
	m.Retry("far.test")
	if st := m.Status("far.test"); st.NextAttempt.After(limit) {
		t.Errorf("after Retry, NextAttempt = %v, want within %v", st.NextAttempt, limit)
	}
	clock.Advance(maxRetryAfter + budgetWindow + time.Second)
	d, _ := m.domainFor("far.test")
	m.stateMu.Lock()
	gate := m.checkAttemptLocked(d)
	m.stateMu.Unlock()
	if gate != nil {
		t.Errorf("after 8 days and the budget window: %v", gate)
	}

	// A 429 met while the clock ran a year ahead.
	ahead := clock.Now().Add(365 * 24 * time.Hour)
	var rec failureRecord
	rec.fail(ahead, "rate limited", 1, 4, defaultBackoff, ahead.Add(maxRetryAfter), 0)
	d2, _ := m.domainFor("ahead.test")
	m.stateMu.Lock()
	d2.fail = rec
	m.stateMu.Unlock()
	if st := m.Status("ahead.test"); st.NextAttempt.After(clock.Now().Add(maxRetryAfter)) {
		t.Errorf("with the clock back, NextAttempt = %v, want within 8 days of %v", st.NextAttempt, clock.Now())
	}
}

// TestFullDomainTableIsReported: a new name refused because every tracked
// domain is busy is logged and counted in an event, at most once a minute.
func TestFullDomainTableIsReported(t *testing.T) {
	clock := newFakeClock()
	logs := &testsupport.Buffer{}
	events := &eventLog{}
	m := newPureManager(t, clock, func(c *Config) {
		c.MaxDomains = 1
		c.OnEvent = events.add
		c.Logger = newTestLogger(logs)
	})
	d, err := m.domainFor("busy.test")
	if err != nil {
		t.Fatal(err)
	}
	m.stateMu.Lock()
	d.fail.NextAttempt = clock.Now().Add(time.Hour) // backing off: kept
	m.stateMu.Unlock()
	for range 10 {
		c, err := m.GetCertificate(&tls.ClientHelloInfo{ServerName: "new.test"})
		if err != nil || !IsFallback(c) {
			t.Fatalf("GetCertificate = %v, %v; want the fallback", c, err)
		}
	}
	if n := events.count(EventTableFull); n != 1 {
		t.Errorf("%d table-full events for 10 refusals in a minute, want 1", n)
	}
	if !strings.Contains(logs.String(), "level=WARN msg=\"domain table full\"") {
		t.Errorf("no warning logged:\n%s", logs)
	}
	clock.Advance(time.Minute)
	m.GetCertificate(&tls.ClientHelloInfo{ServerName: "new.test"})
	if n := events.count(EventTableFull); n != 2 {
		t.Errorf("%d table-full events after a minute more, want 2", n)
	}
}
