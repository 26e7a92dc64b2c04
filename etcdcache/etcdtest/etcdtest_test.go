package etcdtest_test

import (
	"testing"

	"github.com/certmgr/certmgr"
	"github.com/certmgr/certmgr/certmgrtest"
	"github.com/certmgr/certmgr/etcdcache"
	"github.com/certmgr/certmgr/etcdcache/etcdtest"
)

// TestTwoReplicas: two replicas on one real etcd, the README's snippet:
// the second obtains the certificate, the CA validates through the
// first, and both serve it.
func TestTwoReplicas(t *testing.T) {
	ca := certmgrtest.Start(t, certmgrtest.Options{})
	client := etcdtest.Start(t)
	var ms []*certmgr.Manager
	for range 2 {
		cache, err := etcdcache.New(client, etcdcache.Options{Prefix: "/certmgr/"})
		if err != nil {
			t.Fatal(err)
		}
		am := ca.Autocert("www.example.test")
		am.Cache = cache
		m, err := certmgr.New(certmgr.Config{Autocert: am})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { m.Close(); cache.Close() })
		ms = append(ms, m)
	}
	ca.ServeTLS(ms[0].TLSConfig(), nil) // the CA validates through replica 0
	if err := ms[1].Provision(t.Context(), "www.example.test"); err != nil {
		t.Fatal(err)
	}
	cs, err := ca.Handshake(t.Context(), "www.example.test") // replica 0 serves it, verified
	if err != nil || !ms[1].Status("www.example.test").NotAfter.Equal(cs.PeerCertificates[0].NotAfter) {
		t.Fatalf("replica 0 serves %v (%v); replica 1: %+v", cs.PeerCertificates, err, ms[1].Status("www.example.test"))
	}
}
