// Command server is examples/server with Prometheus metrics: the same
// flags and status page, and the Manager's metrics (certmgrprom) at
// /metrics, to loopback clients only unless -status-public.
//
//	go run ./certmgrprom/examples/server -pebble
//
// Every call to certmgr and certmgrprom is in this file, which is meant to
// be copied: serve is the whole of what a server does with them. The rest
// is the plumbing of the package examples/demoserver.
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

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"golang.org/x/crypto/acme/autocert"

	"github.com/certmgr/certmgr"
	"github.com/certmgr/certmgr/certmgrprom"
	"github.com/certmgr/certmgr/examples/demoserver"
)

// metricsPath is where the metrics are served.
const metricsPath = "/metrics"

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

	reg := prometheus.NewRegistry()
	reg.MustRegister(certmgrprom.NewCollector(m))
	mux := http.NewServeMux()
	mux.Handle(metricsPath, o.Private(promhttp.HandlerFor(reg, promhttp.HandlerOpts{})))
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
