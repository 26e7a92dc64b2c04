package etcdcache

import (
	"context"
	"crypto/tls"
	"io"
	"log/slog"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/crypto/acme/autocert"

	"github.com/certmgr/certmgr"
	"github.com/certmgr/certmgr/certmgrtest"
)

// TestReplicasOnEtcd: three replicas, each with its own client and Cache
// on one etcd, behind one listener served by each in turn as a
// round-robin load balancer would: a burst of handshakes on all three for
// a fresh name makes one order (the CA's validation connections reach
// replicas that did not order), and every replica serves the same
// certificate, through the watch, within a second.
func TestReplicasOnEtcd(t *testing.T) {
	const name = "cluster.test"
	srv := startEtcd(t)
	ca := certmgrtest.Start(t, certmgrtest.Options{})
	ca.DNS.SetA(name, "127.0.0.1")
	ms := make([]*certmgr.Manager, 3)
	for i := range ms {
		m, err := certmgr.New(certmgr.Config{
			Autocert: &autocert.Manager{Cache: newCache(t, srv.client(t), "/cluster/"), Client: ca.NewClient(),
				HostPolicy: autocert.HostWhitelist(name)},
			Logger: slog.New(slog.NewTextHandler(io.Discard, nil)),
		})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { m.Close() }) // before its Cache's Close
		ms[i] = m
	}
	var next atomic.Uint64
	if err := ca.ServeTLS(&tls.Config{GetConfigForClient: func(*tls.ClientHelloInfo) (*tls.Config, error) {
		return ms[next.Add(1)%3].TLSConfig(), nil
	}}, nil); err != nil {
		t.Fatal(err)
	}

	var wg sync.WaitGroup
	for i := range 30 {
		wg.Go(func() {
			if _, err := ms[i%3].GetCertificate(&tls.ClientHelloInfo{ServerName: name,
				SupportedVersions: []uint16{tls.VersionTLS13}}); err != nil {
				t.Errorf("handshake %d: %v", i, err)
			}
		})
	}
	wg.Wait()
	if n := ca.Proxy.Counts(name).Orders; n != 1 {
		t.Errorf("%d orders for a burst on 3 replicas, want 1", n)
	}
	deadline := time.Now().Add(time.Second)
	for {
		serials := map[string]bool{}
		for _, m := range ms {
			st := m.Status(name)
			if st.State == certmgr.StateValid {
				cs, err := ca.Handshake(context.Background(), name)
				if err != nil {
					t.Fatal(err)
				}
				serials[cs.PeerCertificates[0].SerialNumber.String()] = true
			}
		}
		if len(serials) == 1 && allValid(ms, name) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("not every replica serves one certificate a second after the burst: %v", serials)
		}
		time.Sleep(10 * time.Millisecond) // polling with a deadline
	}
}

func allValid(ms []*certmgr.Manager, name string) bool {
	for _, m := range ms {
		if m.Status(name).State != certmgr.StateValid {
			return false
		}
	}
	return true
}

// TestReplicasOnEtcdShareOneRecord: while validation fails, a burst on
// three replicas on etcd makes one validation for the cluster, and every
// replica shows the same next attempt.
func TestReplicasOnEtcdShareOneRecord(t *testing.T) {
	const name = "failing.test"
	srv := startEtcd(t)
	ca := certmgrtest.Start(t, certmgrtest.Options{})
	ca.DNS.SetA(name, "127.0.0.3") // nothing listens there: validation fails
	ms := make([]*certmgr.Manager, 3)
	for i := range ms {
		m, err := certmgr.New(certmgr.Config{
			Autocert: &autocert.Manager{Cache: newCache(t, srv.client(t), "/failing/"), Client: ca.NewClient(),
				HostPolicy: autocert.HostWhitelist(name)},
			Logger: slog.New(slog.NewTextHandler(io.Discard, nil)),
		})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { m.Close() })
		ms[i] = m
	}
	var wg sync.WaitGroup
	for i := range 30 {
		wg.Go(func() {
			ms[i%3].GetCertificate(&tls.ClientHelloInfo{ServerName: name, SupportedVersions: []uint16{tls.VersionTLS13}})
		})
	}
	wg.Wait()
	deadline := time.Now().Add(10 * time.Second)
	for {
		next := ms[0].Status(name).NextAttempt
		same := !next.IsZero()
		for _, m := range ms[1:] {
			same = same && m.Status(name).NextAttempt.Equal(next)
		}
		if same {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the replicas do not agree on the next attempt: %v, %v, %v",
				ms[0].Status(name), ms[1].Status(name), ms[2].Status(name))
		}
		time.Sleep(10 * time.Millisecond) // polling with a deadline
	}
	if c := ca.Proxy.Counts(name); c.ChallengeResponses != 1 {
		t.Errorf("%d validations for the cluster, want 1 (%+v)", c.ChallengeResponses, c)
	}
}
