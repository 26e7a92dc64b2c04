// Package pebbletest runs a complete ACME CA for tests, in process and on
// loopback only: Pebble's CA, VA and WFE (github.com/letsencrypt/pebble/v2),
// a counting, fault-injecting HTTPS proxy in front of the WFE, a loopback
// DNS server (internal/dnstest) that is the VA's only resolver, and the
// listeners the VA sends its challenges to. It needs no binary, no files
// and no network.
//
// Typical use, with golang.org/x/crypto/acme/autocert:
//
//	env := pebbletest.Start(t, pebbletest.Options{})
//	env.DNS.SetA("a.test", "127.0.0.1") // where the VA connects
//	m := &autocert.Manager{
//		Prompt:     autocert.AcceptTOS,
//		Client:     env.NewClient(),
//		HostPolicy: autocert.HostWhitelist("a.test"),
//	}
//	env.ServeTLS(t, m.TLSConfig(), nil) // TLS-ALPN-01 and the site
//	cs, err := env.Handshake(ctx, "a.test")  // issues, then verifies against env.Roots
//	c := env.Proxy.Counts("a.test")          // 1 order, 1 authz, 1 challenge response
//
// # What the VA does
//
// For a challenge on name N, Pebble's VA asks env.DNS (its VAAddr view, over
// TCP) for AAAA and then A records of N and connects to the first address
// found: TLS-ALPN-01 at the port of TLSListener, HTTP-01 at the port of
// HTTPListener (never 443 or 80). It validates from three connections at
// once. The dnstest VA view drops A and AAAA records outside 127.0.0.0/8 and
// ::1, so the VA cannot reach off the machine. Without Options.IPv6 nothing
// listens on ::1, so a test must not give N an AAAA record ::1 unless it
// wants the challenge to fail. For HTTP-01 the VA sends "Host: N:port";
// autocert's HTTPHandler passes that to the HostPolicy, and HostWhitelist
// rejects it, so ServePlain removes the port as a real port-80 request
// would have none. The VA follows HTTP-01 redirects, resolving names
// through env.DNS, but dials an IP literal (in a redirect, or an IP
// identifier) as it is: tests must use only loopback addresses there.
//
// # Pebble's behaviour as configured here
//
//   - The VA does not sleep before validating (PEBBLE_VA_NOSLEEP=1) and the
//     WFE never rejects a good nonce (PEBBLE_WFE_NONCEREJECT=0).
//   - A valid authorization is always reused for a later order of the same
//     account and identifier within its lifetime of one hour
//     (PEBBLE_AUTHZREUSE=100), so such an order needs no challenge. A test
//     that wants a fresh one uses another account or deactivates the
//     authorization (acme.Client.RevokeAuthorization).
//   - There is one certificate profile ("default"), with validity
//     Options.CertValidity; the CA's keys are ECDSA P-256, chain root ->
//     intermediate -> leaf; env.Roots holds the root.
//   - Pebble does no CAA checking at all: the identities in
//     Options.CAAIdentities only appear in the directory's meta.
//
// These environment variables are set in the process (they are read when
// the WFE and VA are made) and stay set. New refuses to start if
// PEBBLE_VA_ALWAYS_VALID is set, since that would skip validation.
//
// # The proxy
//
// env.DirectoryURL is the proxy's; all URLs Pebble returns point at the
// proxy too, so every ACME request passes it. See Proxy for counters, Rule
// for fault injection and Proxy.Wait for waiting on them. By default the
// proxy holds its answer to a challenge acceptance until the VA has decided
// and its answer to a finalize until the certificate is issued, so that
// x/crypto/acme sees the result on its first poll instead of after its
// default one-second poll interval; an issuance by autocert then takes
// about 50 ms (with -race) rather than 1.05 s (Options.NoSettle turns this
// off). Note that x/crypto/acme retries answers with status 429 or 5xx (and
// badNonce errors) until its context ends, unless Client.RetryBackoff
// returns 0; tests injecting such answers usually set it.
//
// # Cleaning up
//
// Close (which Start registers with tb.Cleanup) stops the proxy, listeners, servers started
// by ServeTLS and ServePlain, and the DNS server. Pebble's VA keeps a
// goroutine per Env (va.processTasks) that cannot be stopped, and
// validations in progress finish on their own; goroutine leak checks must
// ignore goroutines in Pebble's packages.
package pebbletest

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/letsencrypt/pebble/v2/ca"
	"github.com/letsencrypt/pebble/v2/db"
	"github.com/letsencrypt/pebble/v2/va"
	"github.com/letsencrypt/pebble/v2/wfe"
	"golang.org/x/crypto/acme"

	"github.com/certmgr/certmgr/internal/dnstest"
)

// Options configure an Env. The zero value is ready to use.
type Options struct {
	// CAAIdentities are the CA's identities, shown in the directory's
	// meta.caaIdentities; if empty, []string{"pebble.test"}. Pebble checks
	// no CAA records (see the package documentation).
	CAAIdentities []string
	// CertValidity is the validity of issued certificates, rounded up to
	// whole seconds; if zero, Pebble's default of 90 days.
	CertValidity time.Duration
	// Log receives Pebble's log and the servers' error logs, from many
	// goroutines, also after Close; if nil, they are discarded.
	Log io.Writer
	// IPv6 also opens TLSListener6 and HTTPListener6 on [::1] at the same
	// ports as TLSListener and HTTPListener, so that a name whose AAAA is
	// ::1 can be validated.
	IPv6 bool
	// NoSettle makes the proxy answer challenge acceptances and finalize
	// requests as soon as Pebble does, as a real CA would; clients then
	// observe Pebble's asynchronous processing and poll.
	NoSettle bool
}

// Env is a running test CA. Its fields must not be changed.
type Env struct {
	// DirectoryURL is the ACME directory URL, at the proxy.
	DirectoryURL string
	// HTTPClient trusts the proxy's TLS certificate; use it for every
	// request to DirectoryURL and the URLs it leads to.
	HTTPClient *http.Client
	// Roots holds Pebble's root certificate, to verify issued ones.
	Roots *x509.CertPool
	// Root is Pebble's root certificate, for programs that hand it on.
	Root *x509.Certificate
	// DNS is the VA's resolver; tests program names there and may point
	// the code under test at DNS.Addr().
	DNS *dnstest.Server
	// Proxy sits in front of Pebble's WFE.
	Proxy *Proxy

	// TLSListener (127.0.0.1) is where the VA connects for TLS-ALPN-01,
	// HTTPListener (127.0.0.1) for HTTP-01. Serve on them with ServeTLS and
	// ServePlain, or directly.
	TLSListener, HTTPListener net.Listener
	// TLSListener6 and HTTPListener6 are on [::1] at the same ports, when
	// Options.IPv6 is set; otherwise nil.
	TLSListener6, HTTPListener6 net.Listener

	server    *httptest.Server // the proxy's HTTPS server
	errLog    *log.Logger
	closeOnce sync.Once
	closeErr  error

	mu      sync.Mutex
	closing bool
	served  []*http.Server
	serveWG sync.WaitGroup
}

// envMu serializes the environment-variable setup and the construction of
// Pebble's parts that read it.
var envMu sync.Mutex

// pebbleEnv are the environment variables set before making the WFE and VA.
var pebbleEnv = [][2]string{
	{"PEBBLE_VA_NOSLEEP", "1"},
	{"PEBBLE_WFE_NONCEREJECT", "0"},
	{"PEBBLE_AUTHZREUSE", "100"},
}

// New starts an Env. The caller must Close it. Tests use Start.
func New(opts Options) (_ *Env, err error) {
	if v := os.Getenv("PEBBLE_VA_ALWAYS_VALID"); v != "" {
		return nil, fmt.Errorf("pebbletest: PEBBLE_VA_ALWAYS_VALID=%q is set in the environment; it would make Pebble skip validation", v)
	}
	if opts.CertValidity < 0 {
		return nil, fmt.Errorf("pebbletest: negative CertValidity %v", opts.CertValidity)
	}
	out := opts.Log
	if out == nil {
		out = io.Discard
	}
	e := &Env{errLog: log.New(out, "pebbletest: ", log.Lmicroseconds)}
	defer func() {
		if err != nil {
			e.Close()
		}
	}()

	if e.DNS, err = dnstest.Start(); err != nil {
		return nil, fmt.Errorf("pebbletest: starting DNS: %w", err)
	}
	if err := e.listen(opts.IPv6); err != nil {
		return nil, err
	}

	caaIDs := opts.CAAIdentities
	if len(caaIDs) == 0 {
		caaIDs = []string{"pebble.test"}
	}
	validity := uint64((opts.CertValidity + time.Second - 1) / time.Second)
	profiles := map[string]ca.Profile{
		"default": {Description: "pebbletest profile", ValidityPeriod: validity},
	}

	logger := log.New(out, "pebble: ", log.Lmicroseconds)
	store := db.NewMemoryStore()
	envMu.Lock()
	for _, kv := range pebbleEnv {
		if err := os.Setenv(kv[0], kv[1]); err != nil {
			envMu.Unlock()
			return nil, fmt.Errorf("pebbletest: %w", err)
		}
	}
	authority := ca.New(logger, store, "", "ecdsa", 0, 1, profiles)
	vaImpl := va.New(logger, port(e.HTTPListener), port(e.TLSListener), false, e.DNS.VAAddr(), store)
	wfeImpl := wfe.New(logger, store, vaImpl, authority, caaIDs, false, false, 0, 0)
	envMu.Unlock()

	e.Root = authority.GetRootCert(0).Cert
	e.Roots = x509.NewCertPool()
	e.Roots.AddCert(e.Root)

	e.Proxy = newProxy(wfeImpl.Handler(), store, !opts.NoSettle)
	e.server = httptest.NewUnstartedServer(e.Proxy)
	e.server.Config.ErrorLog = e.errLog
	e.server.StartTLS()
	e.HTTPClient = e.server.Client()
	e.DirectoryURL = e.server.URL + wfe.DirectoryPath
	return e, nil
}

// Start is New for tests: it fails tb if the Env cannot start and closes
// the Env in tb's cleanup.
func Start(tb testing.TB, opts Options) *Env {
	tb.Helper()
	e, err := New(opts)
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() {
		if err := e.Close(); err != nil {
			tb.Errorf("pebbletest: Close: %v", err)
		}
	})
	return e
}

// port returns the TCP port ln listens on.
func port(ln net.Listener) int {
	return ln.Addr().(*net.TCPAddr).Port
}

// listenAttempts bounds the retries to find ports free on both 127.0.0.1
// and ::1.
const listenAttempts = 20

// listen opens the challenge listeners.
func (e *Env) listen(ipv6 bool) error {
	var err error
	if e.TLSListener, e.TLSListener6, err = listenPair(ipv6); err != nil {
		return fmt.Errorf("pebbletest: TLS-ALPN-01 listener: %w", err)
	}
	if e.HTTPListener, e.HTTPListener6, err = listenPair(ipv6); err != nil {
		return fmt.Errorf("pebbletest: HTTP-01 listener: %w", err)
	}
	return nil
}

// listenPair listens on a free TCP port of 127.0.0.1 and, if ipv6, on the
// same port of ::1.
func listenPair(ipv6 bool) (v4, v6 net.Listener, err error) {
	for range listenAttempts {
		v4, err = net.Listen("tcp4", "127.0.0.1:0")
		if err != nil || !ipv6 {
			return v4, nil, err
		}
		v6, err = net.Listen("tcp6", net.JoinHostPort("::1", strconv.Itoa(port(v4))))
		if err == nil {
			return v4, v6, nil
		}
		v4.Close()
	}
	return nil, nil, fmt.Errorf("no port free on both 127.0.0.1 and ::1 in %d attempts: %w", listenAttempts, err)
}

// Close stops everything the Env started (see the package documentation
// for what remains). It is safe to call more than once.
func (e *Env) Close() error {
	e.closeOnce.Do(func() {
		if e.Proxy != nil {
			e.Proxy.close()
		}
		if e.server != nil {
			e.server.Close()
		}
		e.mu.Lock()
		e.closing = true
		served := e.served
		e.mu.Unlock()
		for _, s := range served {
			s.Close()
		}
		e.serveWG.Wait()
		for _, ln := range []net.Listener{e.TLSListener, e.HTTPListener, e.TLSListener6, e.HTTPListener6} {
			if ln != nil {
				ln.Close() // already closed if served; the error says nothing
			}
		}
		if e.DNS != nil {
			e.closeErr = e.DNS.Close()
		}
	})
	return e.closeErr
}

// NewClient returns an ACME client for the Env, without a Key: autocert
// sets one, other users must.
func (e *Env) NewClient() *acme.Client {
	return &acme.Client{DirectoryURL: e.DirectoryURL, HTTPClient: e.HTTPClient}
}

// ServeTLS serves h over TLS with cfg (for instance an autocert.Manager's
// TLSConfig) on TLSListener and TLSListener6, until Close; a nil h answers
// every request with 200 "ok". A serve error other than the server's
// closing is reported with tb.Errorf. Call it at most once per Env.
func (e *Env) ServeTLS(tb testing.TB, cfg *tls.Config, h http.Handler) {
	tb.Helper()
	if h == nil {
		h = okHandler
	}
	for _, ln := range []net.Listener{e.TLSListener, e.TLSListener6} {
		if ln == nil {
			continue
		}
		s := &http.Server{Handler: h, TLSConfig: cfg.Clone(), ErrorLog: e.errLog}
		e.serve(tb, s, func() error { return s.ServeTLS(ln, "", "") })
	}
}

// ServePlain serves h over plain HTTP on HTTPListener and HTTPListener6,
// until Close, removing the port from each request's Host first so that h
// sees what a validation on port 80 would send; a nil h answers every
// request with 200 "ok". A serve error other than the server's closing is
// reported with tb.Errorf. Call it at most once per Env.
func (e *Env) ServePlain(tb testing.TB, h http.Handler) {
	tb.Helper()
	if h == nil {
		h = okHandler
	}
	h = stripPort(h)
	for _, ln := range []net.Listener{e.HTTPListener, e.HTTPListener6} {
		if ln == nil {
			continue
		}
		s := &http.Server{Handler: h, ErrorLog: e.errLog}
		e.serve(tb, s, func() error { return s.Serve(ln) })
	}
}

var okHandler = http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
	_, _ = io.WriteString(w, "ok\n")
})

// stripPort returns h with the port removed from requests' Host.
func stripPort(h http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if host, _, err := net.SplitHostPort(r.Host); err == nil {
			r = r.WithContext(r.Context()) // a shallow copy
			r.Host = host
		}
		h.ServeHTTP(w, r)
	})
}

// serve runs s with run in a goroutine that Close waits for.
func (e *Env) serve(tb testing.TB, s *http.Server, run func() error) {
	tb.Helper()
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.closing {
		tb.Fatal("pebbletest: serving on a closed Env")
	}
	e.served = append(e.served, s)
	e.serveWG.Add(1)
	go func() {
		defer e.serveWG.Done()
		if err := run(); !errors.Is(err, http.ErrServerClosed) {
			tb.Errorf("pebbletest: serving: %v", err)
		}
	}()
}

// Handshake connects to TLSListener with SNI serverName, completes a TLS
// handshake verifying the chain against Roots and serverName, and returns
// the connection state (its PeerCertificates[0] is the leaf). With an
// autocert manager served by ServeTLS, the first handshake for a name makes
// the manager obtain the certificate.
func (e *Env) Handshake(ctx context.Context, serverName string) (tls.ConnectionState, error) {
	d := tls.Dialer{Config: &tls.Config{ServerName: serverName, RootCAs: e.Roots}}
	c, err := d.DialContext(ctx, "tcp", e.TLSListener.Addr().String())
	if err != nil {
		return tls.ConnectionState{}, err
	}
	defer c.Close()
	return c.(*tls.Conn).ConnectionState(), nil
}
