// Command cluster runs three certmgr replicas that act as one server
// through etcd, all on this machine: an embedded etcd server, an
// embedded ACME CA (Pebble) with its DNS server, and three Managers, each
// with its own etcd client and etcdcache.Cache, behind one listener that
// hands each connection to the next replica, as a round-robin load
// balancer would. It sends a burst of handshakes to all three for a fresh
// name and prints, per replica, its state and the serial it serves, and
// the cluster's order count. Run it, from the etcdcache module, with:
//
//	go run ./examples/cluster
package main

import (
	"crypto/tls"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/url"
	"os"
	"sync"
	"sync/atomic"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.etcd.io/etcd/server/v3/embed"
	"go.uber.org/zap"
	"golang.org/x/crypto/acme/autocert"

	"github.com/certmgr/certmgr"
	"github.com/certmgr/certmgr/certmgrtest"
	"github.com/certmgr/certmgr/etcdcache"
)

// name is the demo domain. It exists only in the embedded DNS server.
const name = "cluster.test"

// replicas is how many Managers the demo runs.
const replicas = 3

func main() {
	fs := flag.NewFlagSet("cluster", flag.ContinueOnError)
	fs.Usage = func() {
		fmt.Fprintln(fs.Output(), "usage: cluster\n\nRuns three replicas on an embedded etcd and CA, sends a burst of handshakes for one fresh name, and prints what each replica serves. It takes no flag.")
	}
	if err := fs.Parse(os.Args[1:]); err != nil || fs.NArg() > 0 {
		if errors.Is(err, flag.ErrHelp) {
			os.Exit(0)
		}
		fs.Usage()
		os.Exit(2)
	}
	if err := run(os.Stdout); err != nil {
		fmt.Fprintln(os.Stderr, "cluster:", err)
		os.Exit(1)
	}
}

// run runs the demo and reports on w.
func run(w io.Writer) error {
	dir, err := os.MkdirTemp("", "certmgr-cluster-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	etcd, err := startEtcd(dir)
	if err != nil {
		return err
	}
	defer etcd.Close()
	endpoint := etcd.Config().AdvertiseClientUrls[0].String()

	ca, err := certmgrtest.NewServer(certmgrtest.Options{})
	if err != nil {
		return err
	}
	defer ca.Close()
	ca.DNS.SetA(name, "127.0.0.1")

	ms := make([]*certmgr.Manager, replicas)
	for i := range ms {
		client, err := clientv3.New(clientv3.Config{Endpoints: []string{endpoint}, DialTimeout: 5 * time.Second, Logger: zap.NewNop()})
		if err != nil {
			return err
		}
		defer client.Close() // after the Cache's Close
		cache, err := etcdcache.New(client, etcdcache.Options{Prefix: "/certmgr/"})
		if err != nil {
			return err
		}
		defer cache.Close() // after the Manager's Close
		m, err := certmgr.New(certmgr.Config{
			Autocert: &autocert.Manager{Cache: cache, Client: ca.NewClient(), HostPolicy: autocert.HostWhitelist(name)},
			Logger:   slog.New(slog.NewTextHandler(io.Discard, nil)),
		})
		if err != nil {
			return err
		}
		defer m.Close()
		ms[i] = m
	}
	// One listener where the CA validates, each connection to the next
	// replica: the CA's validation may reach one that did not order.
	var next atomic.Uint64
	if err := ca.ServeTLS(&tls.Config{GetConfigForClient: func(*tls.ClientHelloInfo) (*tls.Config, error) {
		return ms[next.Add(1)%replicas].TLSConfig(), nil
	}}, nil); err != nil {
		return err
	}

	// The burst: 30 handshakes at once, 10 per replica.
	start := time.Now()
	var wg sync.WaitGroup
	for i := range 30 {
		wg.Go(func() {
			ms[i%replicas].GetCertificate(&tls.ClientHelloInfo{ServerName: name, SupportedVersions: []uint16{tls.VersionTLS13}})
		})
	}
	wg.Wait()
	took := time.Since(start)

	fmt.Fprintf(w, "domain:  %s\n", name)
	fmt.Fprintf(w, "burst:   30 handshakes on %d replicas in %s\n", replicas, took.Round(time.Millisecond))
	for i, m := range ms {
		serial := "-"
		if c, err := m.GetCertificate(&tls.ClientHelloInfo{ServerName: name, SupportedVersions: []uint16{tls.VersionTLS13}}); err == nil && !certmgr.IsFallback(c) {
			serial = c.Leaf.SerialNumber.Text(16)
		}
		fmt.Fprintf(w, "replica %d: state %-8s serial %s\n", i+1, m.Status(name).State, serial)
	}
	fmt.Fprintf(w, "orders:  %d for the cluster\n", ca.Proxy.Counts(name).Orders)
	return nil
}

// startEtcd starts a one-member etcd server on free loopback ports with
// its data in dir.
func startEtcd(dir string) (*embed.Etcd, error) {
	cfg := embed.NewConfig()
	cfg.Name = "demo"
	cfg.Dir = dir
	cfg.ZapLoggerBuilder = embed.NewZapLoggerBuilder(zap.NewNop())
	var urls [2]url.URL
	for i := range urls {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return nil, err
		}
		urls[i] = url.URL{Scheme: "http", Host: ln.Addr().String()}
		ln.Close()
	}
	cfg.ListenClientUrls, cfg.AdvertiseClientUrls = []url.URL{urls[0]}, []url.URL{urls[0]}
	cfg.ListenPeerUrls, cfg.AdvertisePeerUrls = []url.URL{urls[1]}, []url.URL{urls[1]}
	cfg.InitialCluster = cfg.Name + "=" + urls[1].String()
	e, err := embed.StartEtcd(cfg)
	if err != nil {
		return nil, err
	}
	select {
	case <-e.Server.ReadyNotify():
		return e, nil
	case <-time.After(30 * time.Second):
		e.Close()
		return nil, fmt.Errorf("etcd not ready within 30 s")
	}
}
