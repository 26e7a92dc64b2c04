// Package demoserver is the HTTPS server of the command examples/server,
// whose documentation describes its flags and behaviour: the plumbing of
// a deployable server around certmgr (flags, listeners, the embedded CA
// of -pebble, graceful shutdown, the status page). It is a package of its
// own so that builds of the command in other modules (etcdcache's
// examples/server, certmgrprom's) can add flags, supply the
// autocert.Cache and serve metrics through Hooks. Its certmgr-specific
// part is serve's: certmgr.New with the flags' Config, TLSConfig on the
// HTTPS listener, HTTPHandler on the HTTP one, Provision of the domains,
// StatusHandler behind the status page, and Close.
package demoserver

import (
	"context"
	"encoding/pem"
	"errors"
	"flag"
	"fmt"
	"html/template"
	"io"
	"log/slog"
	"mime"
	"net"
	"net/http"
	"net/netip"
	"os"
	"strings"
	"sync"
	"time"

	"golang.org/x/crypto/acme"
	"golang.org/x/crypto/acme/autocert"

	"github.com/certmgr/certmgr"
	"github.com/certmgr/certmgr/certmgrtest"
)

const (
	// stagingDirectory is Let's Encrypt's staging CA.
	stagingDirectory = "https://acme-staging-v02.api.letsencrypt.org/directory"
	// statusPath is where the status page is served.
	statusPath = "/certmgr/status"
	// metricsPath is where Hooks.Metrics's handler is served.
	metricsPath = "/metrics"
	// shutdownTimeout bounds the graceful shutdown.
	shutdownTimeout = 5 * time.Second
	// provisionTimeout bounds the first attempt for each domain.
	provisionTimeout = 2 * time.Minute
)

// Hooks let a build of the server add flags and supply the
// autocert.Cache. The zero value is the server as examples/server
// documents it.
type Hooks struct {
	// Flags, if not nil, adds flags to fs before the command line is
	// parsed.
	Flags func(fs *flag.FlagSet)

	// Check, if not nil, is called once the command line is parsed, with
	// given reporting whether a flag was on it. It reports whether Cache
	// supplies the autocert.Cache (then -cache-dir is neither needed nor
	// used), or an error for a command line that is not usable: the
	// server prints it after "server: " and exits with status 2.
	Check func(given func(name string) bool) (ownCache bool, err error)

	// Cache returns the autocert.Cache, when Check reported ownCache,
	// and a function that closes it; the server calls that function after
	// it closed its certmgr.Manager.
	Cache func() (cache autocert.Cache, close func() error, err error)

	// Metrics, if not nil, returns the handler served at /metrics (the
	// Prometheus text of certmgrprom, say), to loopback clients only
	// unless -status-public, as the status page.
	Metrics func(m *certmgr.Manager) http.Handler
}

// options are the command's flags.
type options struct {
	domains      []string
	knownIPs     []netip.Addr
	cacheDir     string
	email        string
	profile      string
	directory    string
	production   bool
	httpsAddr    string
	httpAddr     string
	status       bool
	statusPublic bool
	pebble       bool
	rootOut      string
	ownCache     bool // Hooks.Cache supplies the Cache
}

// parse parses args into o and fills in the defaults. If args are not
// usable, it returns ok false, having explained why on stderr, and help true
// if -help was asked for.
func (o *options) parse(args []string, stderr io.Writer, h *Hooks) (ok bool, help bool) {
	fs := flag.NewFlagSet("server", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Func("domain", "a domain to serve (repeatable)", func(s string) error {
		o.domains = append(o.domains, s)
		return nil
	})
	fs.Func("known-ip", "an address this server answers on; domains must resolve only to these (repeatable; default: no DNS check)", func(s string) error {
		a, err := netip.ParseAddr(s)
		if err != nil {
			return errors.New("not an IP address")
		}
		o.knownIPs = append(o.knownIPs, a.Unmap())
		return nil
	})
	fs.StringVar(&o.cacheDir, "cache-dir", "", "directory keeping certificates and the account key (required without -pebble)")
	fs.StringVar(&o.email, "email", "", "contact address given to the CA")
	fs.StringVar(&o.profile, "profile", "", `the ACME certificate profile every order asks for (Let's Encrypt: "classic", "tlsserver", "shortlived"); the CA's default if empty`)
	fs.StringVar(&o.directory, "directory", stagingDirectory, "ACME directory URL")
	fs.BoolVar(&o.production, "production", false, "use Let's Encrypt's production CA ("+autocert.DefaultACMEDirectory+")")
	fs.StringVar(&o.httpsAddr, "https-addr", ":443", "HTTPS listen address")
	fs.StringVar(&o.httpAddr, "http-addr", ":80", "HTTP listen address (HTTP-01 and redirects)")
	fs.BoolVar(&o.status, "status", true, "serve the status page at "+statusPath)
	fs.BoolVar(&o.statusPublic, "status-public", false, "serve the status page to every client, not only to loopback ones (told by the remote address: behind a proxy on the same host, every client is on loopback)")
	fs.BoolVar(&o.pebble, "pebble", false, "run against an embedded Pebble CA on loopback")
	fs.StringVar(&o.rootOut, "pebble-root-out", "", "with -pebble, write Pebble's root certificate to this PEM file")
	if h.Flags != nil {
		h.Flags(fs)
	}
	if err := fs.Parse(args); err != nil {
		return false, errors.Is(err, flag.ErrHelp)
	}
	set := make(map[string]bool)
	fs.Visit(func(f *flag.Flag) { set[f.Name] = true })
	fail := func(msg string) (bool, bool) {
		fmt.Fprintln(stderr, "server:", msg)
		return false, false
	}
	if fs.NArg() > 0 {
		return fail("unexpected arguments: " + strings.Join(fs.Args(), " "))
	}
	if h.Check != nil {
		own, err := h.Check(func(name string) bool { return set[name] })
		if err != nil {
			return fail(err.Error())
		}
		if own && h.Cache == nil {
			panic("demoserver: Hooks.Check reported ownCache, but Hooks.Cache is nil")
		}
		o.ownCache = own
	}
	if o.pebble {
		for _, name := range []string{"cache-dir", "directory", "production", "https-addr", "http-addr"} {
			if set[name] {
				return fail("-" + name + " does not go with -pebble")
			}
		}
		if len(o.domains) == 0 {
			o.domains = []string{"a.pebble.test", "b.pebble.test"}
		}
		if len(o.knownIPs) == 0 {
			o.knownIPs = []netip.Addr{netip.MustParseAddr("127.0.0.1")}
		}
		return true, false
	}
	switch {
	case set["pebble-root-out"]:
		return fail("-pebble-root-out needs -pebble")
	case len(o.domains) == 0:
		return fail("no -domain given")
	case o.cacheDir == "" && !o.ownCache:
		return fail("-cache-dir is required: certificates must survive restarts")
	case o.production && set["directory"]:
		return fail("-production and -directory do not go together")
	}
	if o.production {
		o.directory = autocert.DefaultACMEDirectory
	}
	return true, false
}

// Run runs the server with the command-line arguments args (without the
// program name) until ctx is done, and returns the exit status: 0, 1 if
// the server failed, 2 for a command line that is not usable. It prints
// the lines "status: URL" and the like on stdout, and its log on stderr.
func Run(ctx context.Context, args []string, stdout, stderr io.Writer, h Hooks) int {
	var o options
	if ok, help := o.parse(args, stderr, &h); !ok {
		if help {
			return 0
		}
		return 2
	}
	log := slog.New(slog.NewTextHandler(stderr, &slog.HandlerOptions{Level: slog.LevelInfo}))
	if err := serve(ctx, &o, &h, stdout, log); err != nil {
		log.Error("server failed", "error", err)
		return 1
	}
	return 0
}

// serve sets up the Manager and the servers, provisions the domains and
// serves until ctx is done; then it shuts down.
func serve(ctx context.Context, o *options, hooks *Hooks, stdout io.Writer, log *slog.Logger) (err error) {
	am := &autocert.Manager{
		Prompt:     autocert.AcceptTOS,
		HostPolicy: autocert.HostWhitelist(o.domains...),
		Email:      o.email,
	}
	cfg := certmgr.Config{Autocert: am, Logger: log, DNS: certmgr.DNSCheck{KnownIPs: o.knownIPs}, Profile: o.profile}
	var httpsLn, httpLn net.Listener
	var ca *certmgrtest.Server
	if o.pebble {
		if ca, err = certmgrtest.NewServer(certmgrtest.Options{}); err != nil {
			return err
		}
		defer ca.Close() // last, after the servers, the Manager and the Cache
		for _, d := range o.domains {
			ca.DNS.SetA(d, "127.0.0.1")
		}
		am.Client = ca.NewClient()
		cfg.DNS.Resolvers = []string{ca.DNS.Addr()}
		httpsLn, httpLn = ca.TLSListener, ca.HTTPListener
	} else {
		if !o.ownCache {
			am.Cache = autocert.DirCache(o.cacheDir)
		}
		am.Client = &acme.Client{DirectoryURL: o.directory}
		if len(o.knownIPs) == 0 {
			log.Warn("no -known-ip given: domains' DNS is not checked before ACME attempts")
		}
		if httpsLn, err = net.Listen("tcp", o.httpsAddr); err != nil {
			return err
		}
		defer httpsLn.Close()
		if httpLn, err = net.Listen("tcp", o.httpAddr); err != nil {
			return err
		}
		defer httpLn.Close()
	}
	if o.ownCache {
		var closeCache func() error
		if am.Cache, closeCache, err = hooks.Cache(); err != nil {
			return err
		}
		if closeCache != nil {
			defer func() { // after the Manager's Close
				if err := closeCache(); err != nil {
					log.Warn("closing the cache", "error", err)
				}
			}()
		}
	}

	m, err := certmgr.New(cfg)
	if err != nil {
		return err
	}
	defer m.Close() // after the servers have stopped

	// The site, and the status page.
	mux := http.NewServeMux()
	if o.status {
		h := statusHandler(m)
		if !o.statusPublic {
			h = loopbackOnly(h)
		}
		mux.Handle(statusPath, h)
	}
	if hooks.Metrics != nil {
		h := hooks.Metrics(m)
		if !o.statusPublic {
			h = loopbackOnly(h)
		}
		mux.Handle(metricsPath, h)
	}
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintf(w, "Hello from %s\n", r.Host)
	})
	// Handshake errors from scanners and old clients are common; they are
	// logged at Debug level.
	errLog := slog.NewLogLogger(log.Handler(), slog.LevelDebug)
	httpsSrv := &http.Server{
		Handler:           mux,
		TLSConfig:         m.TLSConfig(),
		ReadHeaderTimeout: 10 * time.Second,
		IdleTimeout:       2 * time.Minute,
		ErrorLog:          errLog,
	}
	httpSrv := &http.Server{
		Handler:           m.HTTPHandler(nil),
		ReadHeaderTimeout: 10 * time.Second,
		IdleTimeout:       2 * time.Minute,
		ErrorLog:          errLog,
	}
	serveErr := make(chan error, 2)
	go func() { serveErr <- httpsSrv.ServeTLS(httpsLn, "", "") }()
	go func() { serveErr <- httpSrv.Serve(httpLn) }()
	log.Info("serving", "https", httpsLn.Addr().String(), "http", httpLn.Addr().String(),
		"directory", am.Client.DirectoryURL, "domains", strings.Join(o.domains, ","))

	// Provision every domain now rather than at its first visitor.
	pctx, stopProvisioning := context.WithCancel(ctx)
	defer stopProvisioning()
	provisioned := make(chan struct{})
	go func() {
		defer close(provisioned)
		provision(pctx, m, o.domains, log)
	}()
	select {
	case <-provisioned:
	case <-ctx.Done():
	case err = <-serveErr:
	}

	if err == nil && ctx.Err() == nil {
		rootFile := o.rootOut
		if ca != nil {
			if rootFile == "" {
				// curl needs the root to verify the demo's certificates.
				f, ferr := os.CreateTemp("", "pebble-root-*.pem")
				if ferr == nil {
					rootFile = f.Name()
					f.Close()
					defer os.Remove(rootFile)
				}
			}
			pemRoot := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: ca.Root.Raw})
			if err := os.WriteFile(rootFile, pemRoot, 0o644); err != nil {
				log.Error("writing the Pebble root", "error", err)
			} else {
				fmt.Fprintf(stdout, "root: %s\n", rootFile)
			}
		}
		fmt.Fprintf(stdout, "https: %s\n", httpsLn.Addr())
		if o.status {
			url := statusURL(o, httpsLn.Addr())
			fmt.Fprintf(stdout, "status: %s\n", url)
			if ca != nil {
				// The demo names resolve nowhere: curl is told where.
				_, port, _ := net.SplitHostPort(httpsLn.Addr().String())
				fmt.Fprintf(stdout, "try: curl --cacert %s --resolve %s:%s:127.0.0.1 %s\n", rootFile, o.domains[0], port, url)
			}
		}
		select {
		case <-ctx.Done():
		case err = <-serveErr:
		}
	}

	// Shut down: stop accepting, let requests in progress finish (for at
	// most shutdownTimeout), then stop the Manager, the Cache and the CA
	// (deferred).
	log.Info("shutting down")
	sctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), shutdownTimeout)
	defer cancel()
	var wg sync.WaitGroup
	for _, srv := range []*http.Server{httpsSrv, httpSrv} {
		wg.Go(func() {
			if srv.Shutdown(sctx) != nil {
				srv.Close()
			}
		})
	}
	wg.Wait()
	stopProvisioning()
	<-provisioned
	return err
}

// provision obtains the certificates of domains in parallel and logs the
// outcomes; certmgr itself logs the details.
func provision(ctx context.Context, m *certmgr.Manager, domains []string, log *slog.Logger) {
	var wg sync.WaitGroup
	for _, d := range domains {
		wg.Go(func() {
			pctx, cancel := context.WithTimeout(ctx, provisionTimeout)
			defer cancel()
			start := time.Now()
			if err := m.Provision(pctx, d); err != nil {
				log.Warn("provisioning failed; handshakes will retry as backoff allows", "domain", d, "error", err)
				return
			}
			log.Info("provisioned", "domain", d, "took", time.Since(start).Round(time.Millisecond),
				"not_after", m.Status(d).NotAfter)
		})
	}
	wg.Wait()
}

// statusURL returns the status page's URL as printed at start.
func statusURL(o *options, addr net.Addr) string {
	host := o.domains[0]
	if _, port, err := net.SplitHostPort(addr.String()); err == nil && port != "443" {
		host = net.JoinHostPort(host, port)
	}
	return "https://" + host + statusPath
}

// domainStatus is one domain's row of the status page.
type domainStatus struct {
	Domain      string    `json:"domain"`
	State       string    `json:"state"`
	NotAfter    time.Time `json:"not_after,omitzero"`
	Failures    int       `json:"failures"`
	LastError   string    `json:"last_error,omitempty"`
	NextAttempt time.Time `json:"next_attempt,omitzero"`
}

var statusPage = template.Must(template.New("status").Funcs(template.FuncMap{
	"when": func(t time.Time) string {
		if t.IsZero() {
			return "—"
		}
		return t.UTC().Format("2006-01-02 15:04:05 UTC")
	},
}).Parse(`<!DOCTYPE html>
<html lang="en">
<head><meta charset="utf-8"><title>Certificates</title>
<style>body{font-family:sans-serif}th,td{padding:.2em .8em;text-align:left;vertical-align:top}</style>
</head>
<body>
<h1>Certificates</h1>
<table>
<tr><th>Domain</th><th>State</th><th>Not after</th><th>Failures</th><th>Last error</th><th>Next attempt</th></tr>
{{range .}}<tr><td>{{.Domain}}</td><td>{{.State}}</td><td>{{when .NotAfter}}</td><td>{{.Failures}}</td><td>{{.LastError}}</td><td>{{when .NextAttempt}}</td></tr>
{{else}}<tr><td colspan="6">No domain yet.</td></tr>
{{end}}</table>
</body>
</html>
`))

// loopbackOnly answers 404 to clients not on a loopback address.
func loopbackOnly(h http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		ap, err := netip.ParseAddrPort(r.RemoteAddr)
		if err != nil || !ap.Addr().Unmap().IsLoopback() {
			http.NotFound(w, r)
			return
		}
		h.ServeHTTP(w, r)
	})
}

// statusHandler serves m.Domains() as an HTML table, or, when the
// request asks for JSON, m.StatusHandler's.
func statusHandler(m *certmgr.Manager) http.Handler {
	js := m.StatusHandler()
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method != http.MethodGet && r.Method != http.MethodHead {
			w.Header().Set("Allow", "GET, HEAD")
			http.Error(w, "method not allowed", http.StatusMethodNotAllowed)
			return
		}
		if wantsJSON(r) {
			w.Header().Add("Vary", "Accept")
			js.ServeHTTP(w, r)
			return
		}
		rows := []domainStatus{}
		for _, s := range m.Domains() {
			row := domainStatus{
				Domain:      s.Domain,
				State:       s.State.String(),
				NotAfter:    s.NotAfter,
				Failures:    s.Failures,
				NextAttempt: s.NextAttempt,
			}
			if s.LastError != nil {
				row.LastError = s.LastError.Error()
			}
			rows = append(rows, row)
		}
		w.Header().Set("Cache-Control", "no-store")
		w.Header().Add("Vary", "Accept")
		w.Header().Set("Content-Type", "text/html; charset=utf-8")
		statusPage.Execute(w, rows)
	})
}

// wantsJSON reports whether r asks for JSON (the Manager's
// StatusHandler: an array of certmgr.Status), by ?format=json or by
// naming application/json in Accept.
func wantsJSON(r *http.Request) bool {
	if r.URL.Query().Get("format") == "json" {
		return true
	}
	for _, accept := range r.Header.Values("Accept") {
		for part := range strings.SplitSeq(accept, ",") {
			if t, _, err := mime.ParseMediaType(part); err == nil && t == "application/json" {
				return true
			}
		}
	}
	return false
}
