package etcdcache

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"strings"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/certmgr/certmgr"
	"github.com/certmgr/certmgr/certmgrtest"
	"github.com/certmgr/certmgr/internal/leakcheck"
)

// leaseOf returns the ID of the lease r's Cache holds its locks under.
func leaseOf(t *testing.T, r *replica) clientv3.LeaseID {
	t.Helper()
	r.mu.Lock()
	cache := r.cache
	r.mu.Unlock()
	cache.mu.Lock()
	defer cache.mu.Unlock()
	if cache.sess == nil {
		t.Fatal("the replica's Cache has no lease")
	}
	return cache.sess.s.Lease()
}

// TestCrashTakeover: the replica ordering a name stops mid-order (its
// challenge held at the CA) as a crashed or frozen one would: it is cut
// off from etcd, and the load balancer takes it out of the rotation. The
// survivor, asked for the same name meanwhile, orders only once etcd has
// expired the holder's lease, never before, and a few seconds after at
// most; it gets the certificate. The holder sends nothing more for its
// order once it counts its lease lost: the CA sees one finalization, the
// survivor's. When it is back, the holder serves the survivor's
// certificate.
func TestCrashTakeover(t *testing.T) {
	t.Parallel()
	const name = "takeover.test"
	c := startCluster(t, clusterOptions{names: []string{name}})
	holder, survivor := c.replicas[0], c.replicas[1]
	c.ca.Proxy.AddRule(certmgrtest.Rule{Class: certmgrtest.ClassChallenge, Identifier: name, Hold: true, Times: 1})
	ctx, cancel := context.WithTimeout(t.Context(), 60*time.Second)
	defer cancel()
	held := make(chan error, 1)
	go func() { held <- holder.manager().Provision(ctx, name) }()
	waitFor(t, 10*time.Second, "the holder's challenge at the CA", func() bool {
		return c.ca.Proxy.Requests(certmgrtest.ClassChallenge) == 1
	})
	lease := leaseOf(t, holder)
	holder.link.cut()
	c.tlsLB.SetDown(0, true)
	cut := time.Now()
	took := make(chan error, 1)
	go func() { took <- survivor.manager().Provision(ctx, name) }()

	direct := clientOf(t, c.etcd.Endpoint())
	var expired, ordered time.Time
	for ordered.IsZero() {
		// The order count is read before the lease: an order seen while
		// the lease is still alive came before its expiry.
		orders := c.ca.Proxy.Counts(name).Orders
		resp, err := direct.TimeToLive(ctx, lease)
		if err != nil {
			t.Fatal(err)
		}
		now := time.Now()
		if resp.TTL == -1 && expired.IsZero() {
			expired = now
		}
		if orders > 1 {
			if expired.IsZero() {
				t.Fatalf("the survivor ordered %v after the cut, while the holder's lease was alive", now.Sub(cut))
			}
			ordered = now
		}
		if now.Sub(cut) > 30*time.Second {
			t.Fatalf("no takeover 30 s after the cut (lease expired: %v)", !expired.IsZero())
		}
		time.Sleep(10 * time.Millisecond)
	}
	t.Logf("lease expired %v after the cut; the survivor ordered %v after that",
		expired.Sub(cut).Round(time.Millisecond), ordered.Sub(expired).Round(time.Millisecond))
	if d := ordered.Sub(expired); d > 5*time.Second {
		t.Errorf("the survivor ordered %v after the lease expired, want a few seconds at most", d)
	}
	if err := <-took; err != nil {
		t.Fatalf("the survivor: %v", err)
	}
	c.ca.Proxy.Release()
	if err := <-held; err == nil {
		t.Error("the holder got a certificate for an order it went on with after losing its lock")
	}
	if n := c.ca.Proxy.Requests(certmgrtest.ClassFinalize); n != 1 {
		t.Errorf("%d finalizations, want the survivor's alone", n)
	}
	holder.link.heal()
	c.tlsLB.SetDown(0, false)
	waitFor(t, 30*time.Second, "every replica serving the survivor's certificate", func() bool {
		s := c.serials(name)
		return s[0] != "" && s[0] == s[1] && s[1] == s[2]
	})
	if n := c.ca.Proxy.Counts(name).Orders; n != 2 {
		t.Errorf("%d orders, want the lost holder's and the survivor's", n)
	}
}

// TestEtcdRestartUnderLiveReplicas stops etcd under three live replicas
// (their connections dropped, as a crash would) and starts it again on
// the same data. Meanwhile every replica keeps serving the certificate it
// has; a name none has is answered with the fallback within the
// handshake timeout, and no order is made for it (no order without a
// reservation in the store). Once etcd is back, the same replicas, not
// restarted, resume by themselves: the name that waited gets one order,
// and every replica serves its certificate.
func TestEtcdRestartUnderLiveReplicas(t *testing.T) {
	t.Parallel()
	const served, waited = "served.test", "waited.test"
	const handshakeTimeout = time.Second
	c := startCluster(t, clusterOptions{names: []string{served, waited},
		config: func(_ int, cfg *certmgr.Config) { cfg.HandshakeTimeout = handshakeTimeout }})
	ms := c.managers()
	ctx, cancel := context.WithTimeout(t.Context(), 60*time.Second)
	defer cancel()
	if err := ms[0].Provision(ctx, served); err != nil {
		t.Fatal(err)
	}
	var before []string
	waitFor(t, 10*time.Second, "every replica serving the first certificate", func() bool {
		before = c.serials(served)
		return before[0] != "" && before[0] == before[1] && before[1] == before[2]
	})

	for _, r := range c.replicas {
		r.link.cut()
	}
	c.etcd.Stop()
	if after := c.serials(served); strings.Join(after, " ") != strings.Join(before, " ") {
		t.Errorf("serials served while etcd is down: %v, want %v", after, before)
	}
	for i, r := range c.replicas {
		leaf := fallbackHandshake(t, r, waited, handshakeTimeout+3*time.Second)
		if _, err := leaf.Verify(x509.VerifyOptions{DNSName: waited, Roots: c.ca.Roots}); err == nil {
			t.Errorf("replica %d served a CA-issued certificate for %s while etcd is down", i, waited)
		}
	}
	if n := c.ca.Proxy.Counts(waited).Orders; n != 0 {
		t.Errorf("%d orders while etcd is down, want none", n)
	}

	c.etcd.Start(t)
	for _, r := range c.replicas {
		r.link.heal()
	}
	// Every replica's client has reconnected before the first handshake
	// orders: the CA may validate through any of them, and one that
	// cannot read the store yet has no token to answer with.
	for i, r := range c.replicas {
		waitFor(t, 30*time.Second, fmt.Sprintf("replica %d to reach etcd again", i), r.reachesEtcd)
	}
	t.Cleanup(func() {
		if t.Failed() {
			for i, m := range ms {
				t.Logf("replica %d: %+v", i, m.Status(waited))
			}
			t.Logf("orders: %+v", c.ca.Proxy.Counts(waited))
		}
	})
	waitFor(t, 30*time.Second, "every replica serving the waiting name's certificate", func() bool {
		s := c.serials(waited)
		return s[0] != "" && s[0] == s[1] && s[1] == s[2]
	})
	if n := c.ca.Proxy.Counts(waited).Orders; n != 1 {
		t.Errorf("%d orders for the name that waited, want 1", n)
	}
	for i, r := range c.replicas {
		if r.manager() != ms[i] || r.restarts != 0 {
			t.Errorf("replica %d was replaced", i)
		}
	}
}

// fallbackHandshake completes a handshake with r for name without
// verifying the chain, within timeout, and returns the leaf.
func fallbackHandshake(t *testing.T, r *replica, name string, timeout time.Duration) *x509.Certificate {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), timeout)
	defer cancel()
	d := tls.Dialer{Config: &tls.Config{ServerName: name, InsecureSkipVerify: true}}
	conn, err := d.DialContext(ctx, "tcp", r.tlsL.Addr().String())
	if err != nil {
		t.Fatalf("handshake for %s within %v: %v", name, timeout, err)
	}
	defer conn.Close()
	return conn.(*tls.Conn).ConnectionState().PeerCertificates[0]
}

// TestWholeClusterRestart stops every replica and starts them all again
// on the same etcd: the certificate is served at once with no new order,
// and a failing name's backoff holds: no order for it before its next
// attempt, on any replica, which all show the same one.
func TestWholeClusterRestart(t *testing.T) {
	t.Parallel()
	const good, failing = "good.test", "failing.test"
	c := startCluster(t, clusterOptions{names: []string{good, failing},
		config: func(_ int, cfg *certmgr.Config) { cfg.HandshakeTimeout = 5 * time.Second }})
	c.ca.DNS.SetA(failing, "127.0.0.3") // nothing listens there: validation fails
	ctx, cancel := context.WithTimeout(t.Context(), 60*time.Second)
	defer cancel()
	ms := c.managers()
	if err := ms[0].Provision(ctx, good); err != nil {
		t.Fatal(err)
	}
	if err := ms[1].Provision(ctx, failing); err == nil {
		t.Fatal("validation succeeded for the failing name")
	}
	next := ms[1].Status(failing).NextAttempt
	if next.IsZero() {
		t.Fatal("no next attempt after a failure")
	}
	var serials []string
	waitFor(t, 10*time.Second, "every replica serving the certificate", func() bool {
		serials = c.serials(good)
		return serials[0] != "" && serials[0] == serials[1] && serials[1] == serials[2]
	})
	orders := map[string]int{good: c.ca.Proxy.Counts(good).Orders, failing: c.ca.Proxy.Counts(failing).Orders}

	for _, r := range c.replicas {
		r.stop()
	}
	for _, r := range c.replicas {
		r.open()
	}
	if after := c.serials(good); strings.Join(after, " ") != strings.Join(serials, " ") {
		t.Errorf("serials after the restart: %v, want %v", after, serials)
	}
	for i, r := range c.replicas {
		if err := r.manager().Provision(ctx, failing); err == nil {
			t.Errorf("replica %d: the failing name succeeded", i)
		}
		if got := r.manager().Status(failing).NextAttempt; !got.Equal(next) {
			t.Errorf("replica %d: next attempt %v after the restart, want %v", i, got, next)
		}
	}
	for name, n := range orders {
		if got := c.ca.Proxy.Counts(name).Orders; got != n {
			t.Errorf("%s: %d orders after the restart, want %d as before", name, got, n)
		}
	}
}

// TestReplicasLeaveNoGoroutine: once every replica's Manager, Cache and
// client are closed, none of their goroutines is left, nor any of
// autocert's.
func TestReplicasLeaveNoGoroutine(t *testing.T) {
	t.Parallel()
	leakcheck.Label(testLabel, t.Name()) // the goroutines it starts are its own: see goroutinesOf
	const name = "leak.test"
	before := len(clusterGoroutines(t))
	c := startCluster(t, clusterOptions{names: []string{name}})
	for _, r := range c.replicas {
		if _, err := r.getCertificate(name); err != nil {
			t.Fatal(err)
		}
	}
	if n := len(clusterGoroutines(t)); n <= before {
		t.Fatalf("%d goroutines of the replicas while they run, %d before: the check sees none", n, before)
	}
	for _, r := range c.replicas {
		r.stop()
	}
	waitGoroutinesGone(t, before, func() []string { return clusterGoroutines(t) })
}

// clusterGoroutines returns the stacks of the goroutines of certmgr,
// autocert, this package and etcd's client.
func clusterGoroutines(t *testing.T) []string {
	return goroutinesOf(t, "certmgr.(*", "acme/autocert.", "etcdcache.(*Cache)", "go.etcd.io/etcd/client/v3")
}
