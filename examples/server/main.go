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
// on: this build refuses -etcd, -etcd-prefix, -demo and -demo-file, and
// the build in the etcdcache module, which takes the same flags, has
// them; there, -demo N runs the server as replica N of a shared demo.
//
// Every call to certmgr is in this file, which is meant to be copied:
// serve is the whole of what a server does with certmgr. The rest
// (flags, listeners, the embedded CA, the status page, the graceful
// shutdown) is the plumbing of the package examples/demoserver, which
// links the embedded CA (Pebble) into the binary: a production server
// that needs no -pebble opens its listeners and acme.Client itself
// instead of calling demoserver.Open.
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
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"os"
	"os/signal"
	"syscall"

	"golang.org/x/crypto/acme/autocert"

	"github.com/certmgr/certmgr"
	"github.com/certmgr/certmgr/examples/demoserver"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	code := run(ctx, os.Args[1:], os.Stdout, os.Stderr)
	stop()
	os.Exit(code)
}

// run runs the server until ctx is done, and returns the exit status: 0,
// 1 if the server failed, 2 for a command line that is not usable.
func run(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	o, code := demoserver.Parse(args, stderr, false)
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
	env, err := demoserver.Open(o, log) // the CA, the listeners
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
	if o.CacheDir != "" { // else, with -pebble, in memory
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
	// HTTPS with certmgr's TLSConfig (it offers acme-tls/1 for TLS-ALPN-01);
	// HTTP-01 and redirects on HTTP; every domain provisioned at start
	// rather than at its first visitor.
	return env.Serve(ctx, stdout, mux, m.TLSConfig(), m.HTTPHandler(nil), func(ctx context.Context) {
		demoserver.Provision(ctx, o.Domains, m.Provision, log)
	})
}
