package etcdcache

import (
	"context"
	"crypto/tls"
	"errors"
	"io"
	"log/slog"
	"net"
	"net/http"
	"sync"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"
	"golang.org/x/crypto/acme/autocert"

	"github.com/certmgr/certmgr"
	"github.com/certmgr/certmgr/certmgrtest"
	"github.com/certmgr/certmgr/etcdcache/internal/etcdtest"
	"github.com/certmgr/certmgr/internal/testhooks"
)

// cluster is replicas of one server on one in-process etcd and one test
// CA, as in production: each replica has its own etcd client, Cache and
// Manager, and its own TLS and HTTP listeners; round-robin balancers on
// the CA's validation ports hand each connection to the next replica, so
// that the CA's validation connections reach replicas that did not order.
// Each replica reaches etcd through a link of its own that a test cuts
// to partition it.
type cluster struct {
	t        *testing.T
	opts     clusterOptions
	etcd     *etcdtest.Server
	ca       *certmgrtest.Server
	replicas []*replica
	tlsLB    *certmgrtest.Balancer // on the CA's TLS-ALPN-01 port
	httpLB   *certmgrtest.Balancer // on the CA's HTTP-01 port
}

// clusterOptions configure a cluster. The zero value is 3 replicas.
type clusterOptions struct {
	replicas int                              // if zero, 3
	names    []string                         // the names the replicas serve, resolving to 127.0.0.1
	config   func(i int, cfg *certmgr.Config) // adjusts replica i's Config, if not nil
	now      func() time.Time                 // the Managers' clock; if nil, time.Now
	caOpts   certmgrtest.Options
	// http01 makes the replicas offer HTTP-01 after TLS-ALPN-01 (as a
	// server that calls HTTPHandler does): an attempt may then fail two
	// authorizations, not one.
	http01 bool
	// noTLSALPN closes every TLS-ALPN-01 validation connection, so that
	// only HTTP-01 validations succeed.
	noTLSALPN bool
	// renewalInfoPoll, if not zero, is the interval between two polls of
	// a certificate's renewal information, whatever the CA's Retry-After.
	renewalInfoPoll time.Duration
}

// replica is one server of a cluster. Its listeners outlive its Manager:
// a restarted replica serves on the same addresses.
type replica struct {
	c        *cluster
	link     *proxy // its path to etcd
	tlsL     net.Listener
	httpL    net.Listener
	tlsSrv   *http.Server
	httpSrv  *http.Server
	mu       sync.Mutex // guards m, h01, cache and cli
	m        *certmgr.Manager
	h01      http.Handler // m's HTTPHandler, with clusterOptions.http01
	cache    *Cache
	cli      *clientv3.Client
	restarts int
}

// reachesEtcd reports whether r's etcd client answers a read now.
func (r *replica) reachesEtcd() bool {
	r.mu.Lock()
	cli := r.cli
	r.mu.Unlock()
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	_, err := cli.Get(ctx, "/cluster/probe")
	return err == nil
}

// config returns the Config of r's Manager on cache: the cluster's names,
// CA and options.
func (r *replica) config(cache *Cache) certmgr.Config {
	var ac autocert.Cache = cache
	if r.c.opts.now != nil || r.c.opts.renewalInfoPoll != 0 {
		ac = &testhooks.Cache{Cache: cache, Now: r.c.opts.now, RenewalInfoPoll: r.c.opts.renewalInfoPoll}
	}
	cfg := certmgr.Config{
		Autocert: &autocert.Manager{Cache: ac, Client: r.c.ca.NewClient(),
			HostPolicy: autocert.HostWhitelist(r.c.opts.names...)},
		Logger: slog.New(slog.DiscardHandler),
	}
	if r.c.opts.config != nil {
		r.c.opts.config(r.index(), &cfg)
	}
	return cfg
}

// startCluster starts etcd, the CA, the replicas and the balancers, and
// stops them in t's cleanup.
func startCluster(t *testing.T, opts clusterOptions) *cluster {
	t.Helper()
	if opts.replicas == 0 {
		opts.replicas = 3
	}
	c := &cluster{t: t, opts: opts, etcd: etcdtest.Start(t)}
	c.ca = certmgrtest.Start(t, opts.caOpts)
	for _, name := range opts.names {
		c.ca.DNS.SetA(name, "127.0.0.1")
	}
	var tlsAddrs, httpAddrs []string
	for range opts.replicas {
		r := &replica{c: c, link: startProxy(t, c.etcd.Host())}
		var err error
		if r.tlsL, err = net.Listen("tcp", "127.0.0.1:0"); err != nil {
			t.Fatal(err)
		}
		if r.httpL, err = net.Listen("tcp", "127.0.0.1:0"); err != nil {
			t.Fatal(err)
		}
		r.tlsSrv = &http.Server{
			TLSConfig: &tls.Config{GetConfigForClient: func(*tls.ClientHelloInfo) (*tls.Config, error) {
				m := r.manager()
				if m == nil {
					return nil, errors.New("the replica is down")
				}
				return m.TLSConfig(), nil
			}},
			Handler:  http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) { io.WriteString(w, "ok\n") }),
			ErrorLog: discardLog,
		}
		r.httpSrv = &http.Server{
			Handler: http.HandlerFunc(func(w http.ResponseWriter, req *http.Request) {
				r.mu.Lock()
				h := r.h01
				r.mu.Unlock()
				if h == nil {
					http.Error(w, "the replica is down", http.StatusServiceUnavailable)
					return
				}
				if host, _, err := net.SplitHostPort(req.Host); err == nil {
					req.Host = host // as a validation on port 80 would send it
				}
				h.ServeHTTP(w, req)
			}),
			ErrorLog: discardLog,
		}
		go r.tlsSrv.ServeTLS(r.tlsL, "", "")
		go r.httpSrv.Serve(r.httpL)
		tlsAddrs = append(tlsAddrs, r.tlsL.Addr().String())
		httpAddrs = append(httpAddrs, r.httpL.Addr().String())
		c.replicas = append(c.replicas, r)
		r.open()
	}
	if opts.noTLSALPN {
		tlsAddrs = nil
	}
	c.tlsLB = certmgrtest.NewBalancer(c.ca.TLSListener, tlsAddrs...)
	c.httpLB = certmgrtest.NewBalancer(c.ca.HTTPListener, httpAddrs...)
	t.Cleanup(func() {
		for _, r := range c.replicas {
			r.stop()
			r.tlsSrv.Close()
			r.httpSrv.Close()
		}
		c.tlsLB.Close()
		c.httpLB.Close()
	})
	return c
}

var discardLog = slog.NewLogLogger(slog.DiscardHandler, slog.LevelError)

// open starts the replica's client, Cache and Manager.
func (r *replica) open() {
	t := r.c.t
	t.Helper()
	cli, err := clientv3.New(clientv3.Config{Endpoints: []string{"http://" + r.link.addr()},
		DialTimeout: 5 * time.Second, Logger: zap.NewNop()})
	if err != nil {
		t.Fatal(err)
	}
	cache, err := New(cli, Options{Prefix: "/cluster/", LeaseTTL: testTTL})
	if err != nil {
		cli.Close()
		t.Fatal(err)
	}
	m, err := certmgr.New(r.config(cache))
	if err != nil {
		cache.Close()
		cli.Close()
		t.Fatal(err)
	}
	var h01 http.Handler
	if r.c.opts.http01 {
		h01 = m.HTTPHandler(nil)
	}
	r.mu.Lock()
	r.m, r.h01, r.cache, r.cli = m, h01, cache, cli
	r.mu.Unlock()
}

// stop closes the replica's Manager, then its Cache, then its client, as
// a graceful shutdown does. The Cache's Close may fail when etcd cannot
// be reached; that is reported by the Cache's own tests.
func (r *replica) stop() {
	r.mu.Lock()
	m, cache, cli := r.m, r.cache, r.cli
	r.m, r.h01, r.cache, r.cli = nil, nil, nil, nil
	r.mu.Unlock()
	if m == nil {
		return
	}
	m.Close()
	cache.Close()
	cli.Close()
}

// restart stops the replica and opens it again, with the same listeners.
func (r *replica) restart() {
	r.stop()
	r.open()
	r.restarts++
}

func (r *replica) manager() *certmgr.Manager {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.m
}

func (r *replica) index() int {
	for i, o := range r.c.replicas {
		if o == r {
			return i
		}
	}
	return -1
}

// handshake completes a TLS handshake with the replica itself for
// serverName, verifying the chain against the CA's roots.
func (r *replica) handshake(ctx context.Context, serverName string) (tls.ConnectionState, error) {
	d := tls.Dialer{Config: &tls.Config{ServerName: serverName, RootCAs: r.c.ca.Roots}}
	conn, err := d.DialContext(ctx, "tcp", r.tlsL.Addr().String())
	if err != nil {
		return tls.ConnectionState{}, err
	}
	defer conn.Close()
	return conn.(*tls.Conn).ConnectionState(), nil
}

// getCertificate asks the replica's Manager for serverName's certificate,
// as a TLS 1.3 handshake would.
func (r *replica) getCertificate(serverName string) (*tls.Certificate, error) {
	return r.manager().GetCertificate(&tls.ClientHelloInfo{ServerName: serverName,
		SupportedVersions: []uint16{tls.VersionTLS13}})
}

// managers returns the replicas' Managers.
func (c *cluster) managers() []*certmgr.Manager {
	ms := make([]*certmgr.Manager, len(c.replicas))
	for i, r := range c.replicas {
		ms[i] = r.manager()
	}
	return ms
}

// waitFor polls cond every 10 ms until it holds, failing the test after
// timeout.
func waitFor(t *testing.T, timeout time.Duration, what string, cond func() bool) {
	t.Helper()
	for deadline := time.Now().Add(timeout); !cond(); time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %v waiting for %s", timeout, what)
		}
	}
}

// serials returns the serial number each replica serves for name, through
// a handshake with it, or "" where the handshake fails.
func (c *cluster) serials(name string) []string {
	out := make([]string, len(c.replicas))
	for i, r := range c.replicas {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		cs, err := r.handshake(ctx, name)
		cancel()
		if err == nil {
			out[i] = cs.PeerCertificates[0].SerialNumber.String()
		}
	}
	return out
}
