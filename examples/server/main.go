// Command server is an HTTPS server that gets its certificates from an ACME
// CA (Let's Encrypt by default) through certmgr, and shows their state at
// /certmgr/status.
//
// Usage:
//
//	server -domain example.com [-domain www.example.com ...]
//	       -cache-dir /var/lib/certmgr [-known-ip 203.0.113.7 ...]
//	       [-email ops@example.com] [-production | -directory URL]
//	       [-https-addr :443] [-http-addr :80] [-status=true]
//
//	server -pebble [-domain a.pebble.test ...] [-pebble-root-out root.pem]
//
//	(cd etcdcache && go run ./examples/server -etcd URL[,URL...] [-etcd-prefix /certmgr/] ...)
//
// It uses Let's Encrypt's staging CA unless -production is given, so that a
// first try costs nothing against the production rate limits; staging
// certificates are not trusted by browsers. Certificates and account keys
// are kept in -cache-dir, which must survive restarts. With -known-ip, every
// ACME attempt first checks that the domain resolves only to those addresses
// (run examples/dnscheck for a report). Running it means accepting the CA's
// terms of service.
//
// The HTTPS server answers TLS-ALPN-01 validations and serves the site; the
// HTTP server answers HTTP-01 validations and redirects everything else to
// HTTPS. At start, every domain is provisioned in parallel; then the program
// prints the status page's URL on a line "status: URL". The page is an HTML
// table, or JSON when the request asks for application/json or has
// ?format=json. SIGINT or SIGTERM shuts it down gracefully within 5 s.
//
// With -pebble, everything runs on this machine: an embedded Pebble CA and
// DNS server, the demo domains a.pebble.test and b.pebble.test (unless
// -domain is given) resolving to 127.0.0.1, and HTTPS and HTTP on the
// loopback ports Pebble validates against. -pebble-root-out writes Pebble's
// root certificate to a PEM file for clients to trust.
//
// With -etcd, replicas of the server act as one: certificates, account
// key, challenge tokens and failure records are kept in etcd (under
// -etcd-prefix, "/certmgr/" by default) instead of -cache-dir, and one
// replica at a time orders a domain's certificate (see the etcdcache
// package). That needs etcd's client, which this module does not depend
// on: this build refuses -etcd and -etcd-prefix, and the build in the
// etcdcache module, which takes the same flags, has them.
//
// The status page names domains, addresses and errors: it answers only
// clients on loopback addresses, unless -status-public is given. It tells
// them by the connection's remote address: behind a reverse proxy or TCP
// forwarder on the same host every client comes from loopback, so there
// turn the page off (-status=false) or keep the proxy from forwarding
// /certmgr/status.
package main

import (
	"context"
	"errors"
	"flag"
	"io"
	"os"
	"os/signal"
	"syscall"

	"github.com/certmgr/certmgr/examples/demoserver"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	code := run(ctx, os.Args[1:], os.Stdout, os.Stderr)
	stop()
	os.Exit(code)
}

// errNoEtcd refuses -etcd and -etcd-prefix.
var errNoEtcd = errors.New("this build has no etcd support: run (cd etcdcache && go run ./examples/server -etcd ...) instead")

// run runs the server until ctx is done, and returns the exit status.
func run(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	return demoserver.Run(ctx, args, stdout, stderr, demoserver.Hooks{
		// The flags of the etcdcache module's build, so that a command
		// line for it gets told where to go rather than an unknown flag.
		Flags: func(fs *flag.FlagSet) {
			fs.String("etcd", "", "etcd client endpoints, comma-separated: not in this build, see the etcdcache module's examples/server")
			fs.String("etcd-prefix", "/certmgr/", "prefix of the etcd keys: not in this build, see the etcdcache module's examples/server")
		},
		Check: func(given func(string) bool) (bool, error) {
			if given("etcd") || given("etcd-prefix") {
				return false, errNoEtcd
			}
			return false, nil
		},
	})
}
