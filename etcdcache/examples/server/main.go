// Command server is the certmgr module's examples/server with the flag
// -etcd: an HTTPS server that gets its certificates from an ACME CA
// through certmgr and keeps them in etcd, so that several replicas of it,
// behind one name and a load balancer, act as one server. Every other
// flag, the status page at /certmgr/status and the line "status: URL" it
// prints once its domains are provisioned are those of the certmgr
// module's examples/server, whose documentation describes them; without
// -etcd, it is that server.
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
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"
	"golang.org/x/crypto/acme/autocert"

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

// run runs the server until ctx is done, and returns the exit status.
func run(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	var (
		etcd      string
		prefix    string
		endpoints []string
	)
	return demoserver.Run(ctx, args, stdout, stderr, demoserver.Hooks{
		Flags: func(fs *flag.FlagSet) {
			fs.StringVar(&etcd, "etcd", "", "etcd client endpoints, comma-separated (e.g. http://127.0.0.1:2379): keep certificates in etcd, instead of -cache-dir, for replicas to share")
			fs.StringVar(&prefix, "etcd-prefix", "/certmgr/", "with -etcd, the prefix of every etcd key the server uses")
		},
		Check: func(given func(string) bool) (bool, error) {
			if !given("etcd") {
				if given("etcd-prefix") {
					return false, errors.New("-etcd-prefix needs -etcd")
				}
				return false, nil
			}
			if given("cache-dir") {
				return false, errors.New("-etcd and -cache-dir do not go together")
			}
			for e := range strings.SplitSeq(etcd, ",") {
				if e = strings.TrimSpace(e); e == "" {
					return false, fmt.Errorf("-etcd %q: an empty endpoint", etcd)
				}
				endpoints = append(endpoints, e)
			}
			if prefix == "" {
				return false, errors.New("-etcd-prefix must not be empty")
			}
			return true, nil
		},
		Cache: func() (autocert.Cache, func() error, error) {
			return open(endpoints, prefix)
		},
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
