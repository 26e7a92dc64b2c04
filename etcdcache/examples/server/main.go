// Command server is the certmgr module's examples/server with the flag
// -etcd: an HTTPS server that gets its certificates from an ACME CA
// through certmgr and keeps them in etcd, so that several replicas of it,
// behind one name and a load balancer, act as one server. Every other
// flag, the status page at /certmgr/status and the line "status: URL" it
// prints once its domains are provisioned are those of the certmgr
// module's examples/server, whose documentation describes them; without
// -etcd or -demo, it is that server.
//
// Usage, from the etcdcache module:
//
//	go run ./examples/server -domain example.com [-domain www.example.com ...]
//	       -etcd http://10.0.0.5:2379[,http://10.0.0.6:2379,...] [-etcd-prefix /certmgr/]
//	       [-known-ip 203.0.113.7 ...] [-email ops@example.com]
//	       [-production | -directory URL] [-https-addr :443] [-http-addr :80]
//
//	go run ./examples/server -pebble -etcd http://127.0.0.1:2379 [-etcd-prefix /certmgr/]
//
//	go run ./examples/server -demo N [-demo-file FILE] [-etcd-prefix /certmgr/]
//
// With -etcd (etcd's client endpoints, comma-separated), the server makes
// one etcd client and an etcdcache.Cache on it, which takes the place of
// -cache-dir (the two do not go together): certificates, the ACME account
// key, challenge tokens and certmgr's failure records are kept under
// -etcd-prefix ("/certmgr/" by default, used as it is, so it usually ends
// with a slash), and the replicas take a lock in etcd before they order a
// domain's certificate, so that one order serves them all. The Cache needs
// read and write permission on that prefix only; see the etcdcache package
// for its keys. At shutdown the server closes its certmgr Manager, then the
// Cache (which gives up its etcd lease and locks), then the client.
//
// With -pebble, each process runs its own Pebble CA, so replicas run with
// -pebble do not share one; and the certificates a run leaves in etcd come
// from a CA that is gone at the next run, which still finds and serves
// them. Give each -pebble run an -etcd-prefix of its own, or delete its
// keys afterwards (etcdctl del --prefix /certmgr/).
//
// With -demo N, the server is replica N (from 1) of the shared demo that
// examples/demoenv runs: one etcd, one Pebble CA and its DNS server for
// every replica, each in a process of its own. It reads the demo's
// description from -demo-file (certmgr-demo.json in the user's cache
// directory, where demoenv writes it by default), and serves the demo's
// names on that replica's loopback ports, which demoenv's load balancer
// forwards the CA's validations to:
//
//	go run ./examples/demoenv    # one terminal: etcd, the CA, the DNS server
//	go run ./examples/server -demo 1
//	go run ./examples/server -demo 2
//
// The replicas order each name once between them, and serve the same
// certificate; each prints its status URL and a curl command line.
//
// Every call to certmgr and etcdcache is in this file, which is meant to
// be copied: serve is the whole of what a server does with them. The rest
// is the plumbing of the package examples/demoserver.
package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"os"
	"os/signal"
	"syscall"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"
	"golang.org/x/crypto/acme/autocert"

	"github.com/certmgr/certmgr"
	"github.com/certmgr/certmgr/etcdcache"
	"github.com/certmgr/certmgr/examples/demoserver"
)

// dialTimeout bounds the etcd client's connection attempts.
const dialTimeout = 5 * time.Second

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	code := run(ctx, os.Args[1:], os.Stdout, os.Stderr)
	stop()
	os.Exit(code)
}

// run runs the server until ctx is done, and returns the exit status: 0,
// 1 if the server failed, 2 for a command line that is not usable.
func run(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	o, code := demoserver.Parse(args, stderr, true)
	if o == nil {
		return code
	}
	log := slog.New(slog.NewTextHandler(stderr, nil))
	if err := serve(ctx, o, stdout, log); err != nil {
		log.Error("server failed", "error", err)
		return 1
	}
	return 0
}

// serve serves o's domains until ctx is done.
func serve(ctx context.Context, o *demoserver.Options, stdout io.Writer, log *slog.Logger) error {
	env, err := demoserver.Open(o, log) // the CA, the listeners; with -demo, the etcd
	if err != nil {
		return err
	}
	defer env.Close() // last

	am := &autocert.Manager{
		Prompt:     autocert.AcceptTOS, // running the server accepts the CA's terms
		HostPolicy: autocert.HostWhitelist(o.Domains...),
		Email:      o.Email,
		Client:     env.Client,
	}
	switch {
	case len(o.Etcd) > 0:
		cache, closeCache, err := open(o.Etcd, o.EtcdPrefix)
		if err != nil {
			return err
		}
		defer func() { // after the Manager's Close
			if err := closeCache(); err != nil {
				log.Warn("closing the cache", "error", err)
			}
		}()
		am.Cache = cache
	case o.CacheDir != "": // else, with -pebble, in memory
		am.Cache = autocert.DirCache(o.CacheDir)
	}
	m, err := certmgr.New(certmgr.Config{
		Autocert: am,
		Logger:   log,
		DNS:      certmgr.DNSCheck{KnownIPs: o.KnownIPs, Resolvers: env.Resolvers},
		Profile:  o.Profile,
	})
	if err != nil {
		return err
	}
	defer m.Close() // after the servers stopped: waits for attempts in flight

	mux := http.NewServeMux()
	if o.Status {
		mux.Handle(demoserver.StatusPath, o.Private(demoserver.StatusPage(m.Domains, m.StatusHandler())))
	}
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintf(w, "Hello from %s\n", r.Host)
	})
	return env.Serve(ctx, stdout, mux, m.TLSConfig(), m.HTTPHandler(nil), func(ctx context.Context) {
		demoserver.Provision(ctx, o.Domains, m.Provision, log)
	})
}

// open returns an etcdcache.Cache under prefix on a new client of the
// etcd endpoints, and a function that closes the Cache, then the client.
func open(endpoints []string, prefix string) (autocert.Cache, func() error, error) {
	client, err := clientv3.New(clientv3.Config{Endpoints: endpoints, DialTimeout: dialTimeout, Logger: zap.NewNop()})
	if err != nil {
		return nil, nil, fmt.Errorf("etcd client: %w", err)
	}
	cache, err := etcdcache.New(client, etcdcache.Options{Prefix: prefix})
	if err != nil {
		client.Close()
		return nil, nil, err
	}
	return cache, func() error {
		cerr := cache.Close() // first: it revokes its lease through the client
		return errors.Join(cerr, client.Close())
	}, nil
}
