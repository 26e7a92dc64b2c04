package demoserver

import (
	"context"
	"crypto/tls"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"os"
	"strings"
	"sync"
	"time"

	"golang.org/x/crypto/acme"

	"github.com/certmgr/certmgr/certmgrtest"
)

const (
	// StatusPath is where the server serves its status page.
	StatusPath = "/certmgr/status"
	// shutdownTimeout bounds the graceful shutdown.
	shutdownTimeout = 5 * time.Second
)

// Env is where a server runs: the ACME CA it talks to, the DNS servers
// of its DNS check, its listeners, and, with -pebble, the embedded CA.
type Env struct {
	// Client is the ACME client for the CA: Options.Directory's, the
	// embedded CA's with -pebble, the shared demo's with -demo.
	Client *acme.Client
	// Resolvers are the DNS servers of certmgr's DNS check: nil (the
	// system's) but with -pebble or -demo, where the names exist only in
	// the demo's DNS server.
	Resolvers []string
	// HTTPS and HTTP are the listeners: Options.HTTPSAddr and HTTPAddr,
	// the ports the embedded CA validates against with -pebble, this
	// replica's with -demo.
	HTTPS, HTTP net.Listener

	o        *Options
	log      *slog.Logger
	ca       *certmgrtest.Server // with -pebble
	rootFile string              // the demo CA's root, for curl
	closers  []func()            // in the reverse order
}

// Open makes the Env that o describes, logging to log: it opens the
// listeners, starts the embedded CA and writes its root (-pebble-root-out)
// or reads the shared demo's description, and fails if any of that does.
// With -demo, it fills in o's domains, known IPs and etcd endpoints from
// the demo's description. Close releases the Env.
func Open(o *Options, log *slog.Logger) (_ *Env, err error) {
	e := &Env{o: o, log: log}
	defer func() {
		if err != nil {
			e.Close() // what was opened before the error
		}
	}()
	switch {
	case o.Pebble:
		if e.ca, err = certmgrtest.NewServer(certmgrtest.Options{}); err != nil {
			return nil, err
		}
		e.closers = append(e.closers, func() { e.ca.Close() })
		for _, d := range o.Domains {
			e.ca.DNS.SetA(d, "127.0.0.1")
		}
		e.Client = e.ca.NewClient()
		e.Resolvers = []string{e.ca.DNS.Addr()}
		e.HTTPS, e.HTTP = e.ca.TLSListener, e.ca.HTTPListener
		if e.rootFile, err = e.writeRoot(o.RootOut); err != nil {
			return nil, err
		}
		return e, nil
	case o.Demo > 0:
		d, err := ReadDemo(o.DemoFile)
		if err != nil {
			return nil, err
		}
		if o.Demo > len(d.Replicas) {
			return nil, fmt.Errorf("-demo %d: the demo in %s has %d replicas", o.Demo, o.DemoFile, len(d.Replicas))
		}
		o.Domains = d.Domains
		o.KnownIPs = []netip.Addr{netip.MustParseAddr("127.0.0.1")}
		o.Etcd = []string{d.Etcd}
		if e.Client, err = d.client(); err != nil {
			return nil, err
		}
		e.Resolvers = []string{d.DNS}
		e.rootFile = d.Roots
		r := d.Replicas[o.Demo-1]
		if err := e.listen(r.HTTPS, r.HTTP); err != nil {
			return nil, err
		}
		return e, nil
	}
	e.Client = &acme.Client{DirectoryURL: o.Directory}
	if len(o.KnownIPs) == 0 {
		log.Warn("no -known-ip given: domains' DNS is not checked before ACME attempts")
	}
	if err := e.listen(o.HTTPSAddr, o.HTTPAddr); err != nil {
		return nil, err
	}
	return e, nil
}

// listen opens the listeners on the addresses.
func (e *Env) listen(httpsAddr, httpAddr string) (err error) {
	if e.HTTPS, err = net.Listen("tcp", httpsAddr); err != nil {
		return err
	}
	e.closers = append(e.closers, func() { e.HTTPS.Close() })
	if e.HTTP, err = net.Listen("tcp", httpAddr); err != nil {
		return err
	}
	e.closers = append(e.closers, func() { e.HTTP.Close() })
	return nil
}

// writeRoot writes the embedded CA's root certificate to file, or to a
// temporary file removed at Close if file is empty, and returns the
// file's name.
func (e *Env) writeRoot(file string) (string, error) {
	if file == "" {
		f, err := os.CreateTemp("", "pebble-root-*.pem")
		if err != nil {
			return "", err
		}
		f.Close()
		file = f.Name()
		e.closers = append(e.closers, func() { os.Remove(file) })
	}
	pemRoot := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: e.ca.Root.Raw})
	if err := os.WriteFile(file, pemRoot, 0o644); err != nil {
		return "", fmt.Errorf("writing the Pebble root: %w", err)
	}
	return file, nil
}

// Close closes the listeners and stops the embedded CA. Call it after
// the certmgr.Manager's Close.
func (e *Env) Close() {
	for i := len(e.closers) - 1; i >= 0; i-- {
		e.closers[i]()
	}
	e.closers = nil
}

// Serve serves site over TLS with tlsConfig on the HTTPS listener, and
// plain on the HTTP one, and runs provision. Once provision returns, it
// prints on stdout the lines "https: ADDR" and, with the status page,
// "status: URL", with a demo CA also "root: FILE" and a curl command line
// ("try: ..."). It serves until ctx is done or a server fails; then it
// shuts both servers down, letting requests in progress finish for at
// most 5 s, and waits for provision, whose context it cancels.
func (e *Env) Serve(ctx context.Context, stdout io.Writer, site http.Handler, tlsConfig *tls.Config, plain http.Handler, provision func(context.Context)) error {
	// Handshake errors from scanners and old clients are common; they are
	// logged at Debug level.
	errLog := slog.NewLogLogger(e.log.Handler(), slog.LevelDebug)
	httpsSrv := &http.Server{Handler: site, TLSConfig: tlsConfig, ReadHeaderTimeout: 10 * time.Second,
		IdleTimeout: 2 * time.Minute, ErrorLog: errLog}
	httpSrv := &http.Server{Handler: plain, ReadHeaderTimeout: 10 * time.Second, IdleTimeout: 2 * time.Minute, ErrorLog: errLog}
	serveErr := make(chan error, 2)
	go func() { serveErr <- httpsSrv.ServeTLS(e.HTTPS, "", "") }()
	go func() { serveErr <- httpSrv.Serve(e.HTTP) }()
	e.log.Info("serving", "https", e.HTTPS.Addr().String(), "http", e.HTTP.Addr().String(),
		"directory", e.Client.DirectoryURL, "domains", strings.Join(e.o.Domains, ","))

	pctx, stopProvisioning := context.WithCancel(ctx)
	defer stopProvisioning()
	provisioned := make(chan struct{})
	go func() {
		defer close(provisioned)
		provision(pctx)
	}()
	var err error
	select {
	case <-provisioned:
	case <-ctx.Done():
	case err = <-serveErr:
	}
	if err == nil && ctx.Err() == nil {
		e.printReady(stdout)
		select {
		case <-ctx.Done():
		case err = <-serveErr:
		}
	}

	e.log.Info("shutting down")
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
	if errors.Is(err, http.ErrServerClosed) {
		err = nil
	}
	return err
}

// printReady prints the lines that say where the server is.
func (e *Env) printReady(stdout io.Writer) {
	if e.rootFile != "" {
		fmt.Fprintf(stdout, "root: %s\n", e.rootFile)
	}
	fmt.Fprintf(stdout, "https: %s\n", e.HTTPS.Addr())
	if !e.o.Status || len(e.o.Domains) == 0 {
		return
	}
	host := e.o.Domains[0]
	_, port, err := net.SplitHostPort(e.HTTPS.Addr().String())
	if err == nil && port != "443" {
		host = net.JoinHostPort(host, port)
	}
	url := "https://" + host + StatusPath
	fmt.Fprintf(stdout, "status: %s\n", url)
	if e.rootFile != "" {
		// The demo names resolve nowhere: curl is told where.
		fmt.Fprintf(stdout, "try: curl --cacert %s --resolve %s:%s:127.0.0.1 %s\n", e.rootFile, e.o.Domains[0], port, url)
	}
}
