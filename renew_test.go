package certmgr

import (
	"context"
	crand "crypto/rand"
	"crypto/rsa"
	"errors"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/certmgr/certmgr/certmgrtest"
	"github.com/certmgr/certmgr/internal/testsupport"
	"golang.org/x/crypto/acme/autocert"
)

// TestRenewalInfoAttemptIsOfItsKeyType: in a cluster, a renewal the CA
// asked for, of a domain's ECDSA certificate (expired meanwhile), is not
// taken as done because the store holds a valid RSA certificate this
// replica never served: the attempt orders, and ends with the CA's answer,
// not with a certificate it does not have.
func TestRenewalInfoAttemptIsOfItsKeyType(t *testing.T) {
	t.Parallel()
	const name = "keytype.test"
	ca := certmgrtest.Start(t, certmgrtest.Options{})
	ca.DNS.SetA(name, "127.0.0.3") // nothing listens there: the order's validation fails
	store := certmgrtest.NewMemoryStore()
	replica := store.Open()
	rsaKey, err := rsa.GenerateKey(crand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	now := time.Now()
	rsaCert := selfSigned(t, name, rsaKey, "another replica", now.Add(-time.Minute), now.Add(24*time.Hour))
	if err := replica.Put(t.Context(), name+"+rsa", pemCert(t, rsaCert)); err != nil {
		t.Fatal(err)
	}
	clock := testsupport.NewClock(now)
	m, err := New(Config{Autocert: &autocert.Manager{Cache: replica, Client: ca.NewClient(),
		HostPolicy: autocert.HostWhitelist(name)}, Logger: newTestLogger(&testsupport.Buffer{}), hooks: testHooks{now: clock.Now}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { m.Close() })
	d, err := m.domainFor(name)
	if err != nil {
		t.Fatal(err)
	}
	k := certKey{domain: name}
	m.serve(k, selfSigned(t, name, ecKey(t), "this replica", now.Add(-time.Minute), now.Add(time.Hour)))
	clock.Advance(2 * time.Hour) // the ECDSA certificate expired
	a, err := m.begin(d, k, PathRenewalInfo)
	if err != nil {
		t.Fatal(err)
	}
	select {
	case <-a.done:
	case <-time.After(30 * time.Second):
		t.Fatal("the renewal did not end")
	}
	if a.err == nil {
		t.Errorf("the renewal succeeded with %v, want the CA's failure", a.cert)
	}
	if n := ca.Proxy.Counts(name).Orders; n != 1 {
		t.Errorf("%d orders, want the renewal's", n)
	}
}

// TestRenewalInfoAttemptOrdersAlone: while a renewal the CA asked for is
// in flight, only its own autocert.Manager orders; an order of the
// domain's autocert.Manager (its timer) is refused, lest the domain get
// two certificates.
func TestRenewalInfoAttemptOrdersAlone(t *testing.T) {
	clock := newFakeClock()
	m := newPureManager(t, clock, nil)
	d, err := m.domainFor("a.test")
	if err != nil {
		t.Fatal(err)
	}
	current, own := m.newAutocert(nil, m.cache), m.newAutocert(nil, m.cache)
	d.am = current
	order := func(am *autocert.Manager) *http.Request {
		req, _ := http.NewRequest("POST", "https://ca.invalid/new-order", nil)
		return req.WithContext(context.WithValue(req.Context(), senderKey{}, am))
	}
	m.stateMu.Lock()
	d.attempt = &attempt{key: certKey{domain: "a.test"}, path: PathRenewalInfo, start: clock.Now(), done: make(chan struct{})}
	m.stateMu.Unlock()
	if _, err := m.admitOrder(order(current), "a.test"); !errors.Is(err, ErrBackoff) {
		t.Errorf("the domain's autocert ordering while the renewal's has not started: %v, want ErrBackoff", err)
	}
	m.stateMu.Lock()
	d.attempt.am = own
	m.stateMu.Unlock()
	if _, err := m.admitOrder(order(current), "a.test"); !errors.Is(err, ErrBackoff) {
		t.Errorf("the domain's autocert ordering during the renewal: %v, want ErrBackoff", err)
	}
	if _, err := m.admitOrder(order(own), "a.test"); err != nil {
		t.Errorf("the renewal's own order: %v", err)
	}
}

// TestRenewBeforeBoundedToTwoThirdsOfTheLifetime: with a RenewBefore
// longer than a third of the certificate's lifetime, autocert's timer may
// renew a certificate only once it has lived two thirds of it (once per
// certificate, not again and again); without one, with the RSA
// certificate due, or for a certificate shorter than three hours (whose
// renewal autocert, after a refusal, might try again only once it
// expired), nothing is refused.
func TestRenewBeforeBoundedToTwoThirdsOfTheLifetime(t *testing.T) {
	clock := newFakeClock()
	m := newPureManager(t, clock, func(c *Config) { c.Autocert.RenewBefore = 720 * time.Hour })
	unbounded := newPureManager(t, clock, nil)
	const name = "bound.test"
	t0 := clock.Now()
	leaf := selfSigned(t, name, ecKey(t), "", t0, t0.Add(24*time.Hour))
	check := func(m *Manager) error {
		m.stateMu.Lock()
		defer m.stateMu.Unlock()
		d := m.domains[name]
		return m.checkRenewBeforeLocked(d, clock.Now())
	}
	for _, m := range []*Manager{m, unbounded} {
		if _, err := m.domainFor(name); err != nil {
			t.Fatal(err)
		}
		m.serve(certKey{domain: name}, leaf)
	}
	if err := check(m); !errors.Is(err, ErrBackoff) || !errors.Is(err, errRenewBefore) {
		t.Errorf("a fresh certificate: %v, want ErrBackoff and errRenewBefore", err)
	}
	if err := check(unbounded); err != nil {
		t.Errorf("without RenewBefore: %v, want nil", err)
	}
	m.serve(certKey{domain: name, rsa: true}, selfSigned(t, name, ecKey(t), "", t0, t0.Add(3*time.Hour-time.Second)))
	if err := check(m); err != nil {
		t.Errorf("beside a certificate shorter than three hours: %v, want nil", err)
	}
	m.stateMu.Lock()
	m.unserveLocked(name)
	m.stateMu.Unlock()
	m.serve(certKey{domain: name}, leaf)
	clock.Advance(16*time.Hour - time.Second)
	if err := check(m); err == nil {
		t.Error("a second before two thirds of the lifetime: nil, want refused")
	}
	old := selfSigned(t, name, ecKey(t), "", t0.Add(-20*time.Hour), t0.Add(4*time.Hour))
	m.serve(certKey{domain: name, rsa: true}, old) // due, beside the fresh ECDSA one
	if err := check(m); err != nil {
		t.Errorf("the RSA certificate due: %v, want nil", err)
	}
	m.stateMu.Lock()
	m.unserveLocked(name)
	m.stateMu.Unlock()
	m.serve(certKey{domain: name}, leaf)
	clock.Advance(time.Second)
	if err := check(m); err != nil {
		t.Errorf("at two thirds of the lifetime: %v, want nil", err)
	}
}

// TestRenewBeforeLongerThanTheLifetimeMakesOneOrder: 24-hour
// certificates and a RenewBefore of 720 hours (autocert would renew each
// new certificate at once, forever): one order per name, autocert's
// renewals refused, and that said once in the log.
func TestRenewBeforeLongerThanTheLifetimeMakesOneOrder(t *testing.T) {
	t.Parallel()
	names := []string{"a.day.test", "b.day.test"}
	e := newEnv(t, envOptions{names: names, pebble: certmgrtest.Options{CertValidity: 24 * time.Hour}})
	m := e.start(t, func(c *Config) { c.Autocert.RenewBefore = 720 * time.Hour })
	for _, n := range names {
		if err := m.Provision(t.Context(), n); err != nil {
			t.Fatal(err)
		}
	}
	// autocert's timer renews at once after each issuance.
	waitFor(t, 10*time.Second, "autocert's renewal of both names refused", func() bool {
		return m.refusedOrders.Load() >= int64(len(names))
	})
	for _, n := range names {
		if c := e.Proxy.Counts(n); c.Orders != 1 {
			t.Errorf("%s: %d orders, want 1", n, c.Orders)
		}
		if st := m.Status(n); st.State != StateValid || st.Failures != 0 {
			t.Errorf("%s: %+v, want valid, no failure", n, st)
		}
	}
	if n := strings.Count(e.logs.String(), "RenewBefore bounded"); n != 1 {
		t.Errorf("%d log lines say RenewBefore is bounded, want 1", n)
	}
}

// TestRenewalGuard: after a renewal, in this process or, as the record
// says, on any replica, autocert's timer may not renew again for a
// quarter of the certificate's lifetime: no renewal loop, whatever
// RenewBefore or the CA says. An order of a domain never renewed passes.
func TestRenewalGuard(t *testing.T) {
	clock := newFakeClock()
	m := newPureManager(t, clock, nil)
	d, err := m.domainFor("guard.test")
	if err != nil {
		t.Fatal(err)
	}
	req := httptest.NewRequest("POST", "https://ca/new-order", nil)
	check := func() error {
		m.stateMu.Lock()
		defer m.stateMu.Unlock()
		return m.checkOrderLocked(req.WithContext(t.Context()), d, d.name, clock.Now())
	}
	m.stateMu.Lock()
	d.am = nil // the request names no autocert.Manager: neither does the domain
	d.lifetime = 24 * time.Hour
	m.stateMu.Unlock()
	if err := check(); err != nil {
		t.Fatalf("never renewed: %v, want nil", err)
	}
	m.stateMu.Lock()
	d.fail.Renewed = clock.Now()
	m.stateMu.Unlock()
	clock.Advance(6*time.Hour - time.Second)
	if err := check(); !errors.Is(err, ErrBackoff) {
		t.Errorf("within a quarter of the lifetime of the renewal: %v, want ErrBackoff", err)
	}
	clock.Advance(time.Second)
	if err := check(); err != nil {
		t.Errorf("a quarter of the lifetime later: %v, want nil", err)
	}
}
