package etcdcache

import (
	"context"
	"crypto/tls"
	"fmt"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/certmgr/certmgr"
	"github.com/certmgr/certmgr/certmgrtest"
)

// ariCluster is a cluster of 3 replicas that poll the CA's renewal
// information every 100 ms, and the renewals they made.
type ariCluster struct {
	*cluster
	name string

	mu       sync.Mutex
	renewals []string      // "replica i at <time>", one per EventRenewed of name
	asked    [3]bool       // replica i reported the CA's suggestion to renew now
	first    chan struct{} // closed at the first renewal
	firstAt  time.Time     // the first renewal's
	askedBy  [3]bool       // asked, at the first renewal
}

// startARICluster starts an ariCluster serving name.
func startARICluster(t *testing.T, name string) *ariCluster {
	ac := &ariCluster{name: name, first: make(chan struct{})}
	ac.cluster = startCluster(t, clusterOptions{
		names:           []string{name},
		renewalInfoPoll: 100 * time.Millisecond,
		config: func(i int, cfg *certmgr.Config) {
			cfg.OnEvent = func(e certmgr.Event) {
				if e.Domain != name {
					return
				}
				if e.Kind == certmgr.EventRenewalSuggested {
					ac.mu.Lock()
					ac.asked[i] = true
					ac.mu.Unlock()
				}
				if e.Kind != certmgr.EventRenewed {
					return
				}
				now := time.Now()
				ac.mu.Lock()
				defer ac.mu.Unlock()
				ac.renewals = append(ac.renewals, fmt.Sprintf("replica %d at %s (path %s)", i, now.Format("15:04:05.000"), e.Path))
				if len(ac.renewals) == 1 {
					ac.firstAt, ac.askedBy = now, ac.asked
					close(ac.first)
				}
			}
		},
	})
	return ac
}

// renewed returns the renewals the replicas reported.
func (ac *ariCluster) renewed() []string {
	ac.mu.Lock()
	defer ac.mu.Unlock()
	return slices.Clone(ac.renewals)
}

// obtain has the cluster obtain name's certificate with one order, waits
// until every replica serves it, and returns it as replica 0 serves it.
// Every replica provisions the domain before the certificate exists (the
// test holds the domain's lock meanwhile, as a replica busy with it
// would), so that each knows the domain, as one that had a handshake for
// it before the certificate existed does: each then polls the renewal
// information, and would renew when the CA asks.
func (ac *ariCluster) obtain(t *testing.T) *tls.Certificate {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
	defer cancel()
	locks := watchLockEntries(t, ac.cluster, ac.name)
	_, _, unlock, err := newCache(t, clientOf(t, ac.etcd.Endpoint()), "/cluster/").Lock(ctx, "domain/"+ac.name)
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	for i, r := range ac.replicas {
		wg.Go(func() {
			if err := r.manager().Provision(ctx, ac.name); err != nil {
				t.Errorf("replica %d: Provision: %v", i, err)
			}
		})
	}
	waitFor(t, 10*time.Second, "the three replicas' attempts to wait for the lock", func() bool {
		return locks.count() == 4 // the test's entry and the replicas'
	})
	unlock()
	wg.Wait()
	if t.Failed() {
		t.FailNow()
	}
	if got := ac.ca.Proxy.Counts(ac.name); got.Orders != 1 {
		t.Fatalf("%d orders for the first certificate, want 1 (%+v)", got.Orders, got)
	}
	cert, err := ac.replicas[0].getCertificate(ac.name)
	if err != nil || certmgr.IsFallback(cert) {
		t.Fatalf("replica 0 after Provision: %v (fallback %v)", err, cert != nil && certmgr.IsFallback(cert))
	}
	want := cert.Leaf.SerialNumber.String()
	waitFor(t, 5*time.Second, "every replica to serve the first certificate", func() bool {
		s := ac.serials(ac.name)
		return s[0] == want && s[1] == want && s[2] == want
	})
	for i, m := range ac.managers() {
		if st := m.Status(ac.name); st.State != certmgr.StateValid || !st.NotAfter.Equal(cert.Leaf.NotAfter) {
			t.Fatalf("replica %d: Status %+v, want valid until %v", i, st, cert.Leaf.NotAfter)
		}
	}
	// The CA dates certificates to the second: a renewed certificate's
	// expiry is later than this one's once a second has passed.
	waitFor(t, 5*time.Second, "a second past the first certificate's NotBefore", func() bool {
		return time.Now().After(cert.Leaf.NotBefore.Add(time.Second))
	})
	return cert
}

// expectOneRenewal asserts that the cluster renews name's certificate
// old once: one renewal order in all, some polls after it, the renewed
// certificate served by every replica within a few seconds of the
// renewal, and every replica's Status.NotAfter later than old's.
func (ac *ariCluster) expectOneRenewal(t *testing.T, old *tls.Certificate, since time.Time) {
	t.Helper()
	name, first := ac.name, old.Leaf.SerialNumber.String()
	select {
	case <-ac.first:
	case <-time.After(30 * time.Second):
		t.Fatalf("no renewal within 30 s (orders %+v)", ac.ca.Proxy.Counts(name))
	}
	var last []string
	waitFor(t, 5*time.Second, "every replica to serve one renewed certificate", func() bool {
		last = ac.serials(name)
		return last[0] != "" && last[0] != first && last[0] == last[1] && last[1] == last[2]
	})
	ac.mu.Lock()
	firstAt, askedBy := ac.firstAt, ac.askedBy
	ac.mu.Unlock()
	t.Logf("renewed %v after the CA asked (replicas that had seen the suggestion by then: %v); every replica served %s %v after the renewal",
		firstAt.Sub(since).Round(time.Millisecond), askedBy, last[0], time.Since(firstAt).Round(time.Millisecond))

	// Several more polls by each replica, and still one renewal.
	p := ac.ca.Proxy.Requests(certmgrtest.ClassOther)
	waitFor(t, 10*time.Second, "more polls of the renewal information", func() bool {
		return ac.ca.Proxy.Requests(certmgrtest.ClassOther) >= p+9
	})
	if got := ac.ca.Proxy.Counts(name); got.Orders != 2 {
		t.Errorf("%d orders in all, want 2: the first certificate and one renewal for the cluster (%+v); renewals: %v",
			got.Orders, got, ac.renewed())
	}
	if r := ac.renewed(); len(r) != 1 || !strings.HasSuffix(r[0], "(path "+string(certmgr.PathRenewalInfo)+")") {
		t.Errorf("renewals reported: %v, want one, on the path %s", r, certmgr.PathRenewalInfo)
	}
	for i, m := range ac.managers() {
		if st := m.Status(name); !st.NotAfter.After(old.Leaf.NotAfter) || st.State != certmgr.StateValid {
			t.Errorf("replica %d: Status %+v, want valid with NotAfter after the first certificate's %v", i, st, old.Leaf.NotAfter)
		}
	}
	if s := ac.serials(name); s[0] == first || s[0] != s[1] || s[1] != s[2] {
		t.Errorf("the replicas serve %v at the end, want one renewed certificate (first %s)", s, first)
	}
}

// TestRenewalInfoRenewsOnceForTheCluster: the CA opens the renewal window
// of a certificate that 3 replicas serve and poll (sharing the answer:
// which of them saw the window before the renewal is only logged); the
// cluster makes one renewal order; every replica serves the renewed
// certificate.
func TestRenewalInfoRenewsOnceForTheCluster(t *testing.T) {
	t.Parallel()
	const name = "ari.test"
	ac := startARICluster(t, name)
	cert := ac.obtain(t)
	// A window open since an hour, ending in 30 s: the time each replica
	// picks in it is past (renewal at once) or within 30 s.
	now := time.Now()
	window := fmt.Sprintf(`{"suggestedWindow": {"start": %q, "end": %q}}`,
		now.Add(-time.Hour).Format(time.RFC3339), now.Add(30*time.Second).Format(time.RFC3339))
	if err := ac.ca.SetRenewalInfo(t.Context(), cert.Leaf, window); err != nil {
		t.Fatal(err)
	}
	ac.expectOneRenewal(t, cert, time.Now())
}

// TestRevokedCertificateReplacedOnceForTheCluster: a certificate that 3
// replicas serve is revoked; the CA's renewal information then suggests
// a window already past, and the cluster makes one order for its
// replacement; every replica serves it.
func TestRevokedCertificateReplacedOnceForTheCluster(t *testing.T) {
	t.Parallel()
	const name = "revoked.test"
	ac := startARICluster(t, name)
	cert := ac.obtain(t)
	if err := ac.ca.Revoke(t.Context(), cert); err != nil {
		t.Fatal(err)
	}
	ac.expectOneRenewal(t, cert, time.Now())
}

// TestRenewalGuardHoldsForTheCluster: after the cluster renewed a
// certificate the CA asked to renew, no replica renews it again within
// the hour when the CA asks again, not even one started after the
// renewal, which knows it only from the cluster's record.
func TestRenewalGuardHoldsForTheCluster(t *testing.T) {
	t.Parallel()
	const name = "guard.test"
	ac := startARICluster(t, name)
	cert := ac.obtain(t)
	past := func() string { // a window that has ended: renew at once
		now := time.Now()
		return fmt.Sprintf(`{"suggestedWindow": {"start": %q, "end": %q}}`,
			now.Add(-2*time.Hour).Format(time.RFC3339), now.Add(-time.Hour).Format(time.RFC3339))
	}
	if err := ac.ca.SetRenewalInfo(t.Context(), cert.Leaf, past()); err != nil {
		t.Fatal(err)
	}
	ac.expectOneRenewal(t, cert, time.Now())

	ac.replicas[2].restart()
	renewed, err := ac.replicas[0].getCertificate(name)
	if err != nil {
		t.Fatal(err)
	}
	ac.mu.Lock()
	ac.asked = [3]bool{}
	ac.mu.Unlock()
	if err := ac.ca.SetRenewalInfo(t.Context(), renewed.Leaf, past()); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 10*time.Second, "the restarted replica to serve the renewed certificate and see the CA ask again", func() bool {
		ac.serials(name) // the restarted replica loads the certificate at its first handshake
		ac.mu.Lock()
		defer ac.mu.Unlock()
		return ac.asked[2]
	})
	p := ac.ca.Proxy.Requests(certmgrtest.ClassOther)
	waitFor(t, 10*time.Second, "more polls of the renewal information", func() bool {
		return ac.ca.Proxy.Requests(certmgrtest.ClassOther) >= p+9
	})
	if got := ac.ca.Proxy.Counts(name); got.Orders != 2 {
		t.Errorf("%d orders, want 2: the first certificate and one renewal; renewals: %v", got.Orders, ac.renewed())
	}
}
