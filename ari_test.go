package certmgr

import (
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"math/big"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/crypto/acme"
	"golang.org/x/crypto/acme/autocert"

	"github.com/certmgr/certmgr/certmgrtest"
	"github.com/certmgr/certmgr/internal/testsupport"
)

// TestCertIDIsRFC9773s: the example of RFC 9773, section 4.1.
func TestCertIDIsRFC9773s(t *testing.T) {
	leaf := &x509.Certificate{
		AuthorityKeyId: []byte{0x69, 0x88, 0x5B, 0x6B, 0x87, 0x46, 0x40, 0x41, 0xE1, 0xB3,
			0x7B, 0x84, 0x7B, 0xA0, 0xAE, 0x2C, 0xDE, 0x01, 0xC8, 0xD4},
		SerialNumber: big.NewInt(0x87654321),
	}
	if id, ok := certID(leaf); !ok || id != "aYhba4dGQEHhs3uEe6CuLN4ByNQ.AIdlQyE" {
		t.Errorf("certID = %q, %v; want aYhba4dGQEHhs3uEe6CuLN4ByNQ.AIdlQyE", id, ok)
	}
	leaf.SerialNumber = big.NewInt(0x7f)
	if id, _ := certID(leaf); !strings.HasSuffix(id, ".fw") {
		t.Errorf("certID of serial 0x7f = %q, want no sign octet (.fw)", id)
	}
	if _, ok := certID(&x509.Certificate{SerialNumber: big.NewInt(1)}); ok {
		t.Error("a certificate without an authority key identifier has a CertID")
	}
}

// TestPickRenewalIsInTheWindow: a time in the window, at the random
// point given; now once the window ended.
func TestPickRenewalIsInTheWindow(t *testing.T) {
	start := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	end := start.Add(48 * time.Hour)
	for _, tc := range []struct {
		now  time.Time
		r    float64
		want time.Time
	}{
		{start.Add(-time.Hour), 0, start},
		{start.Add(-time.Hour), 0.5, start.Add(24 * time.Hour)},
		{start.Add(time.Hour), 0.25, start.Add(12 * time.Hour)},
		{end, 0.5, end},
		{end.Add(time.Hour), 0.5, end.Add(time.Hour)},
	} {
		if got := pickRenewal(start, end, tc.now, tc.r); !got.Equal(tc.want) {
			t.Errorf("pickRenewal(now %v, r %v) = %v, want %v", tc.now, tc.r, got, tc.want)
		}
	}
}

// TestCheckWindowRefusesNonsense: an empty, inverted, far-future or
// far-past window cannot be used; one already open, or ended a moment
// ago (a revoked certificate's), can.
func TestCheckWindowRefusesNonsense(t *testing.T) {
	nb := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	leaf := &x509.Certificate{NotBefore: nb, NotAfter: nb.Add(90 * 24 * time.Hour)}
	for _, tc := range []struct {
		name       string
		start, end time.Time
		ok         bool
	}{
		{"usual", nb.Add(59 * 24 * time.Hour), nb.Add(61 * 24 * time.Hour), true},
		{"revoked", nb.Add(-time.Hour), nb.Add(-time.Hour + time.Second), true},
		{"empty", time.Time{}, time.Time{}, false},
		{"inverted", nb.Add(61 * 24 * time.Hour), nb.Add(59 * 24 * time.Hour), false},
		{"zero length", nb.Add(time.Hour), nb.Add(time.Hour), false},
		{"far future", nb.Add(91 * 24 * time.Hour), nb.Add(92 * 24 * time.Hour), false},
		{"far past", nb.AddDate(-1, 0, 0), nb.AddDate(-1, 0, 1), false},
	} {
		if err := checkWindow(tc.start, tc.end, leaf); (err == nil) != tc.ok {
			t.Errorf("%s: checkWindow = %v, want ok %v", tc.name, err, tc.ok)
		}
	}
}

// ariEnv is an env whose Managers poll the CA's renewal information every
// 100 ms, and whose events are collected.
func ariEnv(t *testing.T, name string) (*env, *Manager, *eventLog) {
	e := newEnv(t, envOptions{names: []string{name}})
	events := &eventLog{}
	m := e.start(t, func(c *Config) {
		c.hooks.renewalInfoMinPoll, c.hooks.renewalInfoMaxPoll = 100*time.Millisecond, 100*time.Millisecond
		c.OnEvent = events.add
	})
	return e, m, events
}

// polls counts the renewal information requests at the CA.
func polls(e *env) int { return e.Proxy.Requests(certmgrtest.ClassOther) }

// TestOpenRenewalWindowRenewsOnce: a certificate whose renewal window the
// CA opens (through Pebble's hook) is renewed after the next poll, once;
// the new one is served from the next handshake on, and Status.NotAfter
// moves.
func TestOpenRenewalWindowRenewsOnce(t *testing.T) {
	t.Parallel()
	const name = "ari.test"
	e, m, events := ariEnv(t, name)
	leaf := e.expectIssued(t, name)
	waitFor(t, 10*time.Second, "the first renewal schedule", func() bool { return events.count(EventRenewalScheduled) == 1 })
	if st := m.Status(name); st.RenewAt.IsZero() || !st.RenewAt.Before(leaf.NotAfter) {
		t.Errorf("Status.RenewAt = %v, want a time before expiry (%v)", st.RenewAt, leaf.NotAfter)
	}

	m.stateMu.Lock()
	before := m.domains[name].am
	m.stateMu.Unlock()
	// The CA dates certificates to the second: the renewed one's expiry
	// moves once a second has passed.
	waitFor(t, 5*time.Second, "a second after the issuance", func() bool { return time.Now().After(leaf.NotBefore.Add(2 * time.Second)) })
	// A window open since an hour, ending in 30 s: the time picked in it
	// is past (renewal at once) or within 30 s.
	now := time.Now()
	window := fmt.Sprintf(`{"suggestedWindow": {"start": %q, "end": %q}, "explanationURL": "https://ca.test/why"}`,
		now.Add(-time.Hour).Format(time.RFC3339), now.Add(30*time.Second).Format(time.RFC3339))
	if err := e.SetRenewalInfo(t.Context(), leaf, window); err != nil {
		t.Fatal(err)
	}
	set := time.Now()
	waitFor(t, 20*time.Second, "the renewed certificate", func() bool {
		return m.Status(name).NotAfter.After(leaf.NotAfter)
	})
	t.Logf("renewed %v after the window opened", time.Since(set).Round(time.Millisecond))
	if got := e.expectIssued(t, name); got.SerialNumber.Cmp(leaf.SerialNumber) == 0 {
		t.Error("the old certificate is still served")
	}
	m.stateMu.Lock()
	am := m.domains[name].am
	m.stateMu.Unlock()
	if am != before {
		t.Error("the renewal replaced the domain's autocert.Manager, and with it the renewal timer of its other key type")
	}
	if ev := events.last(EventRenewalSuggested); ev.ExplanationURL != "https://ca.test/why" {
		t.Errorf("the suggestion event: %+v, want the CA's explanation URL", ev)
	}
	// Some polls later, still one renewal.
	p := polls(e)
	waitFor(t, 10*time.Second, "more polls", func() bool { return polls(e) >= p+3 })
	if n := e.Proxy.Counts(name).Orders; n != 2 {
		t.Errorf("%d orders, want the first and one renewal", n)
	}
	if n := events.count(EventRenewed); n != 1 {
		t.Errorf("%d renewals, want 1", n)
	}
}

// TestRevokedCertificateIsReplaced: a certificate revoked through the
// ACME revocation endpoint, which the CA's renewal information then
// reports with a window already past, is replaced after the next poll;
// the handshakes meanwhile all get a CA-issued certificate, never the
// fallback.
func TestRevokedCertificateIsReplaced(t *testing.T) {
	t.Parallel()
	const name = "revoked.test"
	e, m, _ := ariEnv(t, name)
	if err := m.Provision(t.Context(), name); err != nil {
		t.Fatal(err)
	}
	cert, err := m.GetCertificate(helloFor(name))
	if err != nil {
		t.Fatal(err)
	}
	var fallbacks, handshakes atomic.Int64
	stop := make(chan struct{})
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			select {
			case <-stop:
				return
			default:
			}
			c, err := m.GetCertificate(helloFor(name))
			handshakes.Add(1)
			if err != nil || IsFallback(c) {
				fallbacks.Add(1)
			}
		}
	}()
	if err := e.Revoke(t.Context(), cert); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 2*time.Minute, "the replacement", func() bool {
		c, err := m.GetCertificate(helloFor(name))
		return err == nil && c.Leaf.SerialNumber.Cmp(cert.Leaf.SerialNumber) != 0
	})
	close(stop)
	<-done
	if n := fallbacks.Load(); n != 0 {
		t.Errorf("%d of %d handshakes got the fallback while the revoked certificate was replaced", n, handshakes.Load())
	}
	if n := e.Proxy.Counts(name).Orders; n != 2 {
		t.Errorf("%d orders, want 2", n)
	}
}

// TestBadRenewalInfoChangesNothing: renewal information that is
// malformed, inverted, far off, or an error answer makes no order and
// one log line, however many polls.
func TestBadRenewalInfoChangesNothing(t *testing.T) {
	t.Parallel()
	now := time.Now()
	window := func(start, end time.Time) string {
		return fmt.Sprintf(`{"suggestedWindow": {"start": %q, "end": %q}}`, start.Format(time.RFC3339), end.Format(time.RFC3339))
	}
	for _, tc := range []struct {
		name   string
		body   string // set through Pebble's hook
		status int    // or answered by the proxy
	}{
		{name: "malformed", body: `{"suggestedWindow": {"start": "soon"`},
		{name: "inverted", body: window(now.Add(time.Hour), now.Add(-time.Hour))},
		{name: "far future", body: window(now.AddDate(2, 0, 0), now.AddDate(2, 0, 1))},
		{name: "far past", body: window(now.AddDate(-2, 0, 0), now.AddDate(-2, 0, 1))},
		{name: "404", status: 404},
		{name: "500", status: 500},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			const name = "bad.test"
			e, m, events := ariEnv(t, name)
			leaf := e.expectIssued(t, name)
			waitFor(t, 10*time.Second, "the first renewal schedule", func() bool { return events.count(EventRenewalScheduled) == 1 })
			renewAt := m.Status(name).RenewAt
			if tc.status != 0 {
				e.Proxy.AddRule(certmgrtest.Rule{Class: certmgrtest.ClassOther, Status: tc.status})
			} else if err := e.SetRenewalInfo(t.Context(), leaf, tc.body); err != nil {
				t.Fatal(err)
			}
			p := polls(e)
			waitFor(t, 10*time.Second, "more polls", func() bool { return polls(e) >= p+5 })
			if n := e.Proxy.Counts(name).Orders; n != 1 {
				t.Errorf("%d orders, want 1", n)
			}
			if n := events.count(EventRenewalInfoUnusable); n != 1 {
				t.Errorf("%d events of unusable renewal information, want 1", n)
			}
			if n := strings.Count(e.logs.String(), EventRenewalInfoUnusable.String()); n != 1 {
				t.Errorf("%d log lines of unusable renewal information, want 1", n)
			}
			if got := m.Status(name).RenewAt; !got.Equal(renewAt) {
				t.Errorf("RenewAt %v, want %v as before", got, renewAt)
			}
		})
	}
}

// TestSuggestedRenewalWaitsForTheSchedule: a renewal the CA suggests
// waits while the CA's Retry-After is in force (here from its answer to
// the renewal's first order), and the valid certificate keeps being
// served.
func TestSuggestedRenewalWaitsForTheSchedule(t *testing.T) {
	t.Parallel()
	const name = "wait.test"
	e, m, _ := ariEnv(t, name)
	leaf := e.expectIssued(t, name)
	e.Proxy.AddRule(certmgrtest.Rule{Class: certmgrtest.ClassNewOrder, Identifier: name, Status: 429, RetryAfter: "3600"})
	now := time.Now()
	window := fmt.Sprintf(`{"suggestedWindow": {"start": %q, "end": %q}}`,
		now.Add(-time.Hour).Format(time.RFC3339), now.Add(time.Second).Format(time.RFC3339))
	if err := e.SetRenewalInfo(t.Context(), leaf, window); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 30*time.Second, "the rate-limited renewal", func() bool {
		return e.Proxy.Requests(certmgrtest.ClassNewOrder) == 2
	})
	waitFor(t, 10*time.Second, "the Retry-After in the status", func() bool {
		return m.Status(name).NextAttempt.After(now.Add(50 * time.Minute))
	})
	p := polls(e)
	waitFor(t, 10*time.Second, "more polls", func() bool { return polls(e) >= p+5 })
	if n := e.Proxy.Requests(certmgrtest.ClassNewOrder); n != 2 {
		t.Errorf("%d new-order requests, want the first and the rate-limited one", n)
	}
	if got := e.expectIssued(t, name); !got.Equal(leaf) {
		t.Error("another certificate is served")
	}
	if st := m.Status(name); st.State != StateValid {
		t.Errorf("Status = %+v, want valid", st)
	}
}

// TestWatchedCertificateIsTrackedAndRenewed: a replica that got a
// certificate only through the store's watch shows it valid in Status, and
// when the replica that ordered is gone and the CA revokes the
// certificate, this one replaces it. A replica whose HostPolicy refuses
// the name does not take it up.
func TestWatchedCertificateIsTrackedAndRenewed(t *testing.T) {
	t.Parallel()
	const name = "watched.test"
	ca := certmgrtest.Start(t, certmgrtest.Options{})
	ca.DNS.SetA(name, "127.0.0.1")
	store := certmgrtest.NewMemoryStore()
	ms := make([]*Manager, 3)
	for i := range ms {
		policy := autocert.HostWhitelist(name)
		if i == 2 {
			policy = autocert.HostWhitelist("other.test") // a replica that does not serve name
		}
		m, err := New(Config{Autocert: &autocert.Manager{Cache: store.Open(), Client: ca.NewClient(),
			HostPolicy: policy}, Logger: newTestLogger(&testsupport.Buffer{}),
			hooks: testHooks{renewalInfoMinPoll: 100 * time.Millisecond, renewalInfoMaxPoll: 100 * time.Millisecond}})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { m.Close() })
		ms[i] = m
	}
	var serving atomic.Pointer[Manager] // the replica the CA's validations reach
	serving.Store(ms[0])
	if err := ca.ServeTLS(&tls.Config{GetConfigForClient: func(*tls.ClientHelloInfo) (*tls.Config, error) {
		return serving.Load().TLSConfig(), nil
	}}, nil); err != nil {
		t.Fatal(err)
	}
	if err := ms[0].Provision(t.Context(), name); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 5*time.Second, "the watching replica's status", func() bool { return ms[1].Status(name).State == StateValid })
	cert, err := ms[1].GetCertificate(helloFor(name))
	if err != nil {
		t.Fatal(err)
	}
	ms[0].Close()
	serving.Store(ms[1])
	if err := ca.Revoke(t.Context(), cert); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 20*time.Second, "the replacement", func() bool {
		c, err := ms[1].GetCertificate(helloFor(name))
		return err == nil && !c.Leaf.Equal(cert.Leaf)
	})
	if n := ca.Proxy.Counts(name).Orders; n != 2 {
		t.Errorf("%d orders, want 2", n)
	}
	ms[2].stateMu.Lock()
	_, tracked := ms[2].domains[name]
	ms[2].stateMu.Unlock()
	if tracked {
		t.Errorf("a replica whose HostPolicy refuses %s tracks it: %+v", name, ms[2].Status(name))
	}
}

// TestRenewalInfoThatAlwaysAsksRenewsOnce: a CA whose renewal information
// asks for a renewal of every certificate, the new one included, gets one
// renewal, not one per poll.
func TestRenewalInfoThatAlwaysAsksRenewsOnce(t *testing.T) {
	t.Parallel()
	const name = "loop.test"
	e, m, events := ariEnv(t, name)
	leaf := e.expectIssued(t, name)
	// The CA dates certificates to the second: the renewed one must be
	// issued in a later second to be told from this one.
	waitFor(t, 5*time.Second, "a second past the first certificate's NotBefore", func() bool {
		return time.Now().After(leaf.NotBefore.Add(time.Second))
	})
	now := time.Now()
	e.Proxy.AddRule(certmgrtest.Rule{Class: certmgrtest.ClassOther, Status: 200,
		Body: fmt.Sprintf(`{"suggestedWindow": {"start": %q, "end": %q}}`,
			now.Add(-2*time.Hour).Format(time.RFC3339), now.Add(-time.Hour).Format(time.RFC3339))})
	waitFor(t, 20*time.Second, "the renewal", func() bool { return events.count(EventRenewed) == 1 })
	p := polls(e)
	waitFor(t, 10*time.Second, "more polls", func() bool { return polls(e) >= p+10 })
	if n := e.Proxy.Counts(name).Orders; n != 2 {
		t.Errorf("%d orders, want the first and one renewal", n)
	}
	if got := e.expectIssued(t, name); got.Equal(leaf) {
		t.Error("the first certificate is still served")
	}
	if got := m.Status(name); got.State != StateValid {
		t.Errorf("Status = %+v, want valid", got)
	}
}

// TestCAWithoutRenewalInfoLeavesRenewalToAutocert: a CA whose directory
// has no renewalInfo is never polled; autocert's timer renews as it
// always did.
func TestCAWithoutRenewalInfoLeavesRenewalToAutocert(t *testing.T) {
	t.Parallel()
	const name = "noari.test"
	e := newEnv(t, envOptions{names: []string{name}, pebble: certmgrtest.Options{CertValidity: time.Hour}})
	res, err := e.HTTPClient.Get(e.DirectoryURL)
	if err != nil {
		t.Fatal(err)
	}
	var dir map[string]any
	err = json.NewDecoder(res.Body).Decode(&dir)
	res.Body.Close()
	if err != nil || dir["renewalInfo"] == nil {
		t.Fatalf("the CA's directory: %v, %v; want one with renewalInfo to remove", dir, err)
	}
	delete(dir, "renewalInfo")
	body, err := json.Marshal(dir)
	if err != nil {
		t.Fatal(err)
	}
	e.Proxy.AddRule(certmgrtest.Rule{Class: certmgrtest.ClassDirectory, Status: 200, Body: string(body)})
	events := &eventLog{}
	m := e.start(t, func(c *Config) {
		c.hooks.renewalInfoMinPoll, c.hooks.renewalInfoMaxPoll = 100*time.Millisecond, 100*time.Millisecond
		c.OnEvent = events.add
		c.Autocert.RenewBefore = 2 * time.Hour // autocert renews the one-hour certificate at once
	})
	e.expectIssued(t, name)
	waitFor(t, 20*time.Second, "autocert's renewal", func() bool { return events.count(EventRenewed) == 1 })
	if ev := events.last(EventRenewed); ev.Path != PathRenewal {
		t.Errorf("renewed by %q, want autocert's timer", ev.Path)
	}
	if n := polls(e); n != 0 {
		t.Errorf("%d renewal information requests to a CA that offers none", n)
	}
	if st := m.Status(name); !st.RenewAt.IsZero() {
		t.Errorf("Status.RenewAt = %v, want none", st.RenewAt)
	}
	if n := strings.Count(e.logs.String(), "renewal information not offered"); n != 1 {
		t.Errorf("%d log lines say the CA offers no renewal information, want 1", n)
	}
}

// dueRenewals provisions n names on an env whose Manager polls renewal
// information once an hour on a fake clock, has the CA ask to renew every
// one of their certificates at once, adds rule at the CA for the polls,
// and starts the next round of polls. It returns the env and the count
// of polls before that round.
func dueRenewals(t *testing.T, n int, rule certmgrtest.Rule) (*env, int) {
	t.Helper()
	names := make([]string, n)
	for i := range names {
		names[i] = fmt.Sprintf("due%d.test", i)
	}
	e := newEnv(t, envOptions{names: names, clock: true})
	events := &eventLog{}
	m := e.start(t, func(c *Config) {
		c.hooks.renewalInfoMinPoll, c.hooks.renewalInfoMaxPoll = time.Hour, time.Hour
		c.OnEvent = events.add
	})
	for _, name := range names {
		if err := m.Provision(t.Context(), name); err != nil {
			t.Fatal(err)
		}
	}
	waitFor(t, 10*time.Second, "the first poll of every certificate", func() bool { return events.count(EventRenewalScheduled) == n })
	now := e.clock.Now()
	past := fmt.Sprintf(`{"suggestedWindow": {"start": %q, "end": %q}}`,
		now.Add(-2*time.Hour).Format(time.RFC3339), now.Add(-time.Hour).Format(time.RFC3339))
	for _, name := range names {
		c, err := m.GetCertificate(helloFor(name))
		if err != nil {
			t.Fatal(err)
		}
		if err := e.SetRenewalInfo(t.Context(), c.Leaf, past); err != nil {
			t.Fatal(err)
		}
	}
	t.Cleanup(e.Proxy.AddRule(rule))
	t.Cleanup(e.Proxy.Release)
	before := polls(e)
	e.clock.Advance(time.Hour + time.Minute)
	m.ari.wake <- struct{}{}
	return e, before
}

// TestRenewalInfoPollsAtMostEightAtOnce: a round of polls of many
// certificates goes out in parallel, at most maxRenewalInfoPolls at once,
// while the CA has not answered.
func TestRenewalInfoPollsAtMostEightAtOnce(t *testing.T) {
	t.Parallel()
	e, before := dueRenewals(t, 10, certmgrtest.Rule{Class: certmgrtest.ClassOther, Hold: true})
	waitFor(t, 10*time.Second, "polls in flight", func() bool { return polls(e)-before >= maxRenewalInfoPolls })
	if n := polls(e) - before; n != maxRenewalInfoPolls {
		t.Errorf("%d polls in flight while the CA answers none, want %d", n, maxRenewalInfoPolls)
	}
}

// TestRenewalStartsRightAfterItsPoll: a renewal that a poll finds due
// starts right after that poll, not once the round's other polls have
// been answered: the CA never answers one poll, and the other
// certificates are renewed meanwhile.
func TestRenewalStartsRightAfterItsPoll(t *testing.T) {
	t.Parallel()
	e, _ := dueRenewals(t, 4, certmgrtest.Rule{Class: certmgrtest.ClassOther, Hold: true, Times: 1})
	orders := e.Proxy.Requests(certmgrtest.ClassNewOrder)
	waitFor(t, 10*time.Second, "the renewals of the certificates whose poll was answered", func() bool {
		return e.Proxy.Requests(certmgrtest.ClassNewOrder)-orders >= 3
	})
}

// sharedPollCerts is the number of certificates of
// TestRenewalInfoPolledOncePerCluster: 5 in the suite; the acceptance run
// of issue 17 takes 1,000 (-ari.shared 1000, about a minute).
var sharedPollCerts = flag.Int("ari.shared", 5, "TestRenewalInfoPolledOncePerCluster: the certificates 3 replicas serve")

// TestRenewalInfoPolledOncePerCluster: 3 replicas on one store that serve
// the same certificates poll each certificate's renewal information once
// per interval for the cluster, not once each: one replica claims the
// poll, and the others take its answer from the store.
func TestRenewalInfoPolledOncePerCluster(t *testing.T) {
	t.Parallel()
	n := *sharedPollCerts
	names := make([]string, n)
	for i := range names {
		names[i] = fmt.Sprintf("shared%d.test", i)
	}
	checkLeaks(t)
	ca := certmgrtest.Start(t, certmgrtest.Options{})
	for _, name := range names {
		ca.DNS.SetA(name, "127.0.0.1")
	}
	// A minute ahead: the CA dates the certificates to the second, and a
	// replica takes from the store only those valid at its clock's now.
	clock := testsupport.NewClock(time.Now().Add(time.Minute))
	store := certmgrtest.NewMemoryStore()
	ms := make([]*Manager, 3)
	for i := range ms {
		m, err := New(Config{
			Autocert:    &autocert.Manager{Cache: store.Open(), Client: ca.NewClient(), HostPolicy: autocert.HostWhitelist(names...)},
			Logger:      newTestLogger(&testsupport.Buffer{}),
			OrderBudget: max(150, 2*n), // the default, 150 orders in 3 hours, below -ari.shared 1000
			hooks:       testHooks{now: clock.Now, renewalInfoMinPoll: time.Hour, renewalInfoMaxPoll: time.Hour},
		})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { m.Close() })
		ms[i] = m
	}
	if err := ca.ServeTLS(&tls.Config{GetConfigForClient: func(*tls.ClientHelloInfo) (*tls.Config, error) {
		return ms[0].TLSConfig(), nil
	}}, nil); err != nil {
		t.Fatal(err)
	}
	var next atomic.Int64
	var wg sync.WaitGroup
	for range 8 {
		wg.Go(func() {
			for i := int(next.Add(1)) - 1; i < n; i = int(next.Add(1)) - 1 {
				if err := ms[0].Provision(t.Context(), names[i]); err != nil {
					t.Error(err)
					return
				}
			}
		})
	}
	wg.Wait()
	if t.Failed() {
		return
	}
	// Every replica knows when it polls each certificate next: after now.
	settled := func() bool {
		now := clock.Now()
		for _, m := range ms {
			m.ari.mu.Lock()
			count, later := len(m.ari.certs), 0
			for _, ri := range m.ari.certs {
				if ri.nextPoll.After(now) {
					later++
				}
			}
			m.ari.mu.Unlock()
			if count != n || later != n {
				return false
			}
		}
		return true
	}
	ari := func() int { return ca.Proxy.Requests(certmgrtest.ClassOther) }
	for round := 1; round <= 3; round++ {
		waitFor(t, 10*time.Second+time.Duration(n)*20*time.Millisecond, fmt.Sprintf("round %d of polls", round), settled)
		if got := ari(); got != round*n {
			t.Fatalf("after round %d: %d renewal information polls for the cluster, want %d (one per certificate per round)", round, got, round*n)
		}
		clock.Advance(time.Hour + time.Minute)
		for _, m := range ms {
			select {
			case m.ari.wake <- struct{}{}:
			default:
			}
		}
	}
}

// TestRenewalInfoPollIntervals: when a certificate's renewal information
// is polled next, on a fake clock: 6 hours after an answer without a
// Retry-After; the CA's Retry-After, bounded to 1 minute and 24 hours; an
// hour after an answer that cannot be used; a minute after the CA could
// not be reached.
func TestRenewalInfoPollIntervals(t *testing.T) {
	clock := newFakeClock()
	now := clock.Now()
	window := fmt.Sprintf(`{"suggestedWindow": {"start": %q, "end": %q}}`,
		now.Add(60*24*time.Hour).Format(time.RFC3339), now.Add(62*24*time.Hour).Format(time.RFC3339))
	var (
		answerMu   sync.Mutex
		retryAfter string
		body       = window
		polled     int
	)
	var srv *httptest.Server
	srv = httptest.NewTLSServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/dir" {
			fmt.Fprintf(w, `{"renewalInfo": %q}`, srv.URL+"/ari")
			return
		}
		answerMu.Lock()
		defer answerMu.Unlock()
		polled++
		if body == "" {
			panic(http.ErrAbortHandler) // unreachable: no answer
		}
		if retryAfter != "" {
			w.Header().Set("Retry-After", retryAfter)
		}
		io.WriteString(w, body)
	}))
	t.Cleanup(srv.Close)
	m := newPureManager(t, clock, func(c *Config) {
		c.Autocert.Client = &acme.Client{DirectoryURL: srv.URL + "/dir", HTTPClient: srv.Client()}
	})
	const name = "intervals.test"
	k := certKey{domain: name}
	c := selfSigned(t, name, ecKey(t), "", now.Add(-time.Hour), now.Add(90*24*time.Hour))
	c.Leaf.AuthorityKeyId = []byte{1, 2, 3, 4}
	if _, err := m.domainFor(name); err != nil {
		t.Fatal(err)
	}
	nextPoll := func() time.Duration {
		m.ari.mu.Lock()
		defer m.ari.mu.Unlock()
		if ri := m.ari.certs[k]; ri != nil {
			return ri.nextPoll.Sub(clock.Now())
		}
		return -1
	}
	m.serve(k, c) // tracked, and polled at once by the Manager's loop
	waitFor(t, 10*time.Second, "the first poll", func() bool { return nextPoll() > 0 })
	if got := nextPoll(); got != 6*time.Hour {
		t.Errorf("after an answer without Retry-After: next poll in %v, want 6h", got)
	}
	for _, tc := range []struct {
		retryAfter, body string
		want             time.Duration
	}{
		{"7200", window, 2 * time.Hour},
		{"10", window, time.Minute},
		{"259200", window, 24 * time.Hour},
		{"", `{"suggestedWindow": {"start": "soon"`, time.Hour},
		{"", "", time.Minute},
	} {
		answerMu.Lock()
		retryAfter, body = tc.retryAfter, tc.body
		answerMu.Unlock()
		clock.Advance(time.Second)
		m.ari.mu.Lock()
		m.ari.certs[k].nextPoll = clock.Now() // due
		m.ari.mu.Unlock()
		m.pollAll([]certKey{k}, clock.Now())
		if got := nextPoll(); got != tc.want {
			t.Errorf("after Retry-After %q and %.20q: next poll in %v, want %v", tc.retryAfter, tc.body, got, tc.want)
		}
	}
	answerMu.Lock()
	defer answerMu.Unlock()
	if polled < 6 { // net/http sends a GET again on a broken connection
		t.Errorf("%d polls reached the CA, want at least 6", polled)
	}
}
