package certmgr

import (
	"context"
	crand "crypto/rand"
	"crypto/rsa"
	"errors"
	"net/http"
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
