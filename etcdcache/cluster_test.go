package etcdcache

import (
	"context"
	"crypto/tls"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/certmgr/certmgr"
)

// TestBurstMakesOneOrder: 3 × 1,000 concurrent handshakes on three
// replicas for a fresh name make one order and one challenge response;
// the CA's three validation connections, through the round-robin
// balancer, reach all three replicas, two of which did not order; and
// every replica serves the same certificate, through the watch, within a
// second of its issuance.
func TestBurstMakesOneOrder(t *testing.T) {
	t.Parallel()
	const name = "burst.test"
	c := startCluster(t, clusterOptions{names: []string{name}})
	var (
		wg     sync.WaitGroup
		mu     sync.Mutex // guards issued
		issued time.Time  // when the first handshake got the certificate
	)
	for i := range 3000 {
		r := c.replicas[i%3]
		wg.Go(func() {
			if _, err := r.getCertificate(name); err != nil {
				t.Errorf("handshake %d: %v", i, err)
				return
			}
			mu.Lock()
			if issued.IsZero() {
				issued = time.Now()
			}
			mu.Unlock()
		})
	}
	wg.Wait()
	if got := c.ca.Proxy.Counts(name); got.Orders != 1 || got.ChallengeResponses != 1 {
		t.Errorf("%d orders and %d challenge responses for the burst, want 1 and 1", got.Orders, got.ChallengeResponses)
	}
	if conns := c.tlsLB.Conns(); slices.Contains(conns, 0) {
		t.Errorf("validation connections per replica %v: some replica got none", conns)
	}
	waitFor(t, time.Until(issued.Add(time.Second)), "every replica serving one certificate within 1 s", func() bool {
		s := c.serials(name)
		return s[0] != "" && s[0] == s[1] && s[1] == s[2]
	})
	for i, m := range c.managers() {
		if st := m.Status(name); st.State != certmgr.StateValid {
			t.Errorf("replica %d: state %v, want valid", i, st.State)
		}
	}
}

// TestValidationOnReplicasThatDidNotOrder: one replica orders; the CA's
// validation connections reach the others through the balancer, and
// they answer its challenges from the shared store, for TLS-ALPN-01 and
// for HTTP-01.
func TestValidationOnReplicasThatDidNotOrder(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name string
		opts clusterOptions
	}{
		{"tls-alpn-01", clusterOptions{}},
		{"http-01", clusterOptions{http01: true, noTLSALPN: true}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			const name = "elsewhere.test"
			tc.opts.names = []string{name}
			obtained := make(chan certmgr.Event, 1)
			tc.opts.config = func(i int, cfg *certmgr.Config) {
				if i == 0 {
					cfg.OnEvent = func(e certmgr.Event) {
						if e.Kind == certmgr.EventObtained {
							obtained <- e
						}
					}
				}
			}
			c := startCluster(t, tc.opts)
			ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
			defer cancel()
			if err := c.replicas[0].manager().Provision(ctx, name); err != nil {
				t.Fatal(err)
			}
			lb := c.tlsLB
			if tc.opts.noTLSALPN {
				lb = c.httpLB
			}
			if conns := lb.Conns(); conns[1]+conns[2] == 0 {
				t.Errorf("validation connections per replica %v: none reached a replica that did not order", conns)
			}
			if e := <-obtained; e.Challenge != tc.name {
				t.Errorf("validated by %q, want %q", e.Challenge, tc.name)
			}
		})
	}
}

// TestFailingValidationOneAttempt: while validation fails, a burst on
// three replicas makes one validation for the cluster, and every replica
// shows the same next attempt, within a second of the first.
func TestFailingValidationOneAttempt(t *testing.T) {
	t.Parallel()
	const name = "failing.test"
	c := startCluster(t, clusterOptions{names: []string{name}})
	c.ca.DNS.SetA(name, "127.0.0.3") // nothing listens there: validation fails
	var wg sync.WaitGroup
	for i := range 30 {
		r := c.replicas[i%3]
		wg.Go(func() {
			r.manager().GetCertificate(&tls.ClientHelloInfo{ServerName: name, SupportedVersions: []uint16{tls.VersionTLS13}})
		})
	}
	wg.Wait()
	ms := c.managers()
	// Every replica shows the cluster's record within a second of the
	// first that does.
	var next time.Time
	waitFor(t, 10*time.Second, "a replica showing the failure", func() bool {
		for _, m := range ms {
			if next = m.Status(name).NextAttempt; !next.IsZero() {
				return true
			}
		}
		return false
	})
	waitFor(t, time.Second, "the replicas agreeing on the next attempt", func() bool {
		for _, m := range ms {
			if !m.Status(name).NextAttempt.Equal(next) {
				return false
			}
		}
		return true
	})
	if got := c.ca.Proxy.Counts(name); got.ChallengeResponses != 1 || got.Orders != 1 {
		t.Errorf("%d orders and %d validations for the cluster, want 1 and 1 (%+v)", got.Orders, got.ChallengeResponses, got)
	}
}
