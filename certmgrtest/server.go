package certmgrtest

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
	"time"

	"github.com/letsencrypt/pebble/v2/ca"
	"github.com/letsencrypt/pebble/v2/db"
	"github.com/letsencrypt/pebble/v2/va"
	"github.com/letsencrypt/pebble/v2/wfe"
	"golang.org/x/crypto/acme"
	"golang.org/x/crypto/acme/autocert"
)

// Options configure a Server. The zero value is ready to use.
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
	// PendingFailures makes the test CA report a failed validation as
	// step-ca v0.30 does: the authorization and its order stay
	// "pending"; a challenge whose validation could not connect stays
	// "pending" too, carrying its error, and one that failed otherwise is
	// "invalid". Pebble itself failed them, and Counts.FailedAuthzs
	// counts them.
	PendingFailures bool
	// Profiles are certificate profiles the CA offers besides "default"
	// (whose lifetime is CertValidity), by name, with their certificates'
	// lifetime, rounded up to whole seconds. Pebble picks a profile at
	// random for an order that names none: with Profiles, an order that
	// should get the default must name it.
	Profiles map[string]time.Duration
}

// Server is a running test CA. Its fields must not be changed.
type Server struct {
	// DirectoryURL is the ACME directory URL, at the proxy.
	DirectoryURL string
	// HTTPClient trusts the proxy's TLS certificate; use it for every
	// request to DirectoryURL and the URLs it leads to.
	HTTPClient *http.Client
	// Roots holds Pebble's root certificate, to verify issued ones.
	Roots *x509.CertPool
	// Root is Pebble's root certificate, for programs that hand it on.
	Root *x509.Certificate
	// ProxyCert is the proxy's TLS certificate, which HTTPClient trusts,
	// for ACME clients in other processes.
	ProxyCert *x509.Certificate
	// DNS is the VA's resolver; tests program names there and may point
	// the code under test at DNS.Addr().
	DNS *DNSServer
	// Proxy sits in front of Pebble's WFE.
	Proxy *Proxy

	// TLSListener (127.0.0.1) is where the VA connects for TLS-ALPN-01,
	// HTTPListener (127.0.0.1) for HTTP-01. Serve on them with ServeTLS and
	// ServePlain, or directly.
	TLSListener, HTTPListener net.Listener
	// TLSListener6 and HTTPListener6 are on [::1] at the same ports, when
	// Options.IPv6 is set; otherwise nil.
	TLSListener6, HTTPListener6 net.Listener

	front      *httptest.Server // the proxy's HTTPS server
	management http.Handler     // Pebble's management interface, served in-process
	errLog     *log.Logger
	closeOnce  sync.Once
	closeErr   error
	serveWG    sync.WaitGroup // goroutines running the servers in served
	connWG     sync.WaitGroup // connections of the servers in served, until closed or hijacked

	servedMu    sync.Mutex // guards closed, served, tlsServed and plainServed
	closed      bool
	served      []*http.Server
	tlsServed   bool
	plainServed bool
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

// errClosed is returned by ServeTLS and ServePlain on a closed Server.
var errClosed = errors.New("certmgrtest: Server closed")

// NewServer starts a Server. The caller must Close it. Tests may use Start
// instead.
func NewServer(opts Options) (*Server, error) {
	if v := os.Getenv("PEBBLE_VA_ALWAYS_VALID"); v != "" {
		return nil, fmt.Errorf("certmgrtest: PEBBLE_VA_ALWAYS_VALID=%q is set in the environment; it would make Pebble skip validation", v)
	}
	if opts.CertValidity < 0 {
		return nil, fmt.Errorf("certmgrtest: negative CertValidity %v", opts.CertValidity)
	}
	out := opts.Log
	if out == nil {
		out = io.Discard
	}
	s := &Server{errLog: log.New(out, "certmgrtest: ", log.Lmicroseconds)}
	fail := func(err error) (*Server, error) {
		s.Close()
		return nil, err
	}

	var err error
	if s.DNS, err = NewDNSServer(); err != nil {
		return fail(err)
	}
	if err := s.listen(opts.IPv6); err != nil {
		return fail(err)
	}

	caaIDs := opts.CAAIdentities
	if len(caaIDs) == 0 {
		caaIDs = []string{"pebble.test"}
	}
	validity := uint64((opts.CertValidity + time.Second - 1) / time.Second)
	profiles := map[string]ca.Profile{
		"default": {Description: "certmgrtest profile", ValidityPeriod: validity},
	}
	for name, life := range opts.Profiles {
		profiles[name] = ca.Profile{Description: "certmgrtest profile " + name, ValidityPeriod: uint64((life + time.Second - 1) / time.Second)}
	}

	logger := log.New(out, "pebble: ", log.Lmicroseconds)
	store := db.NewMemoryStore()
	envMu.Lock()
	for _, kv := range pebbleEnv {
		if err := os.Setenv(kv[0], kv[1]); err != nil {
			envMu.Unlock()
			return fail(fmt.Errorf("certmgrtest: %w", err))
		}
	}
	authority := ca.New(logger, store, "", "ecdsa", 0, 1, profiles)
	vaImpl := va.New(logger, port(s.HTTPListener), port(s.TLSListener), false, s.DNS.VAAddr(), store)
	wfeImpl := wfe.New(logger, store, vaImpl, authority, caaIDs, false, false, 0, 0)
	envMu.Unlock()

	s.Root = authority.GetRootCert(0).Cert
	s.Roots = x509.NewCertPool()
	s.Roots.AddCert(s.Root)

	s.Proxy = newProxy(wfeImpl.Handler(), store, !opts.NoSettle)
	s.Proxy.pending = opts.PendingFailures
	s.management = wfeImpl.ManagementHandler()
	s.front = httptest.NewUnstartedServer(s.Proxy)
	s.front.Config.ErrorLog = s.errLog
	s.front.StartTLS()
	s.HTTPClient = s.front.Client()
	s.ProxyCert = s.front.Certificate()
	s.DirectoryURL = s.front.URL + wfe.DirectoryPath
	return s, nil
}

// port returns the TCP port ln listens on.
func port(ln net.Listener) int {
	return ln.Addr().(*net.TCPAddr).Port
}

// listenAttempts bounds the retries to find ports free on both 127.0.0.1
// and ::1.
const listenAttempts = 20

// listen opens the challenge listeners.
func (s *Server) listen(ipv6 bool) error {
	var err error
	if s.TLSListener, s.TLSListener6, err = listenPair(ipv6); err != nil {
		return fmt.Errorf("certmgrtest: TLS-ALPN-01 listener: %w", err)
	}
	if s.HTTPListener, s.HTTPListener6, err = listenPair(ipv6); err != nil {
		return fmt.Errorf("certmgrtest: HTTP-01 listener: %w", err)
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

// Close stops everything the Server started and waits for the goroutines
// serving it (see the package documentation for what remains). It is safe
// to call more than once; later calls return the first call's error.
func (s *Server) Close() error {
	s.closeOnce.Do(func() {
		if s.Proxy != nil {
			s.Proxy.close()
		}
		if s.front != nil {
			s.front.Close()
		}
		s.servedMu.Lock()
		s.closed = true
		served := s.served
		s.servedMu.Unlock()
		for _, hs := range served {
			hs.Close()
		}
		s.serveWG.Wait()
		s.connWG.Wait() // no connection is added once the servers have returned
		for _, ln := range []net.Listener{s.TLSListener, s.HTTPListener, s.TLSListener6, s.HTTPListener6} {
			if ln != nil {
				ln.Close() // already closed if served; the error says nothing
			}
		}
		if s.DNS != nil {
			s.closeErr = s.DNS.Close()
		}
	})
	return s.closeErr
}

// NewClient returns an ACME client for the Server, without a Key:
// autocert sets one, other users must.
func (s *Server) NewClient() *acme.Client {
	return &acme.Client{DirectoryURL: s.DirectoryURL, HTTPClient: s.HTTPClient}
}

// Autocert returns a new autocert.Manager that obtains certificates for
// hosts from the Server: its Prompt is autocert.AcceptTOS, its Client comes
// from NewClient, its HostPolicy is autocert.HostWhitelist(hosts...), and it
// has no Cache. The caller may change it before use.
//
// As a side effect, Autocert replaces the A records of each host in DNS
// with 127.0.0.1, so that the VA reaches TLSListener and HTTPListener; it
// leaves the hosts' other records as they are.
func (s *Server) Autocert(hosts ...string) *autocert.Manager {
	for _, h := range hosts {
		s.DNS.SetA(h, "127.0.0.1")
	}
	return &autocert.Manager{
		Prompt:     autocert.AcceptTOS,
		Client:     s.NewClient(),
		HostPolicy: autocert.HostWhitelist(hosts...),
	}
}

// ServeTLS serves h over TLS with cfg (for instance an autocert.Manager's
// TLSConfig) on TLSListener and TLSListener6, in the background until
// Close; a nil h answers every request with 200 "ok". cfg must provide the
// certificates; ServeTLS uses a clone of it. A serve error other than the
// server's closing goes to Options.Log. ServeTLS returns an error if cfg
// is nil, if the Server is closed, or if ServeTLS was called before.
func (s *Server) ServeTLS(cfg *tls.Config, h http.Handler) error {
	if cfg == nil {
		return errors.New("certmgrtest: ServeTLS with a nil tls.Config")
	}
	if h == nil {
		h = okHandler
	}
	s.servedMu.Lock()
	defer s.servedMu.Unlock()
	switch {
	case s.closed:
		return errClosed
	case s.tlsServed:
		return errors.New("certmgrtest: ServeTLS called twice")
	}
	s.tlsServed = true
	for _, ln := range []net.Listener{s.TLSListener, s.TLSListener6} {
		if ln == nil {
			continue
		}
		hs := &http.Server{Handler: h, TLSConfig: cfg.Clone()}
		s.serveLocked(hs, func() error { return hs.ServeTLS(ln, "", "") })
	}
	return nil
}

// ServePlain serves h over plain HTTP on HTTPListener and HTTPListener6,
// in the background until Close, removing the port from each request's
// Host first so that h sees what a validation on port 80 would send; a
// nil h answers every request with 200 "ok". A serve error other than the
// server's closing goes to Options.Log. ServePlain returns an error if the
// Server is closed or if ServePlain was called before.
func (s *Server) ServePlain(h http.Handler) error {
	if h == nil {
		h = okHandler
	}
	h = stripPort(h)
	s.servedMu.Lock()
	defer s.servedMu.Unlock()
	switch {
	case s.closed:
		return errClosed
	case s.plainServed:
		return errors.New("certmgrtest: ServePlain called twice")
	}
	s.plainServed = true
	for _, ln := range []net.Listener{s.HTTPListener, s.HTTPListener6} {
		if ln == nil {
			continue
		}
		hs := &http.Server{Handler: h}
		s.serveLocked(hs, func() error { return hs.Serve(ln) })
	}
	return nil
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

// serveLocked runs hs with run in a goroutine that Close waits for, as it
// waits for hs's connections. s.servedMu must be held and s not closed.
func (s *Server) serveLocked(hs *http.Server, run func() error) {
	hs.ErrorLog = s.errLog
	hs.ConnState = func(_ net.Conn, state http.ConnState) {
		switch state {
		case http.StateNew:
			s.connWG.Add(1)
		case http.StateHijacked, http.StateClosed:
			s.connWG.Done()
		}
	}
	s.served = append(s.served, hs)
	s.serveWG.Add(1)
	go func() {
		defer s.serveWG.Done()
		if err := run(); !errors.Is(err, http.ErrServerClosed) {
			s.errLog.Printf("serving: %v", err)
		}
	}()
}

// Handshake connects to TLSListener with SNI serverName, completes a TLS
// handshake verifying the chain against Roots and serverName, and returns
// the connection state (its PeerCertificates[0] is the leaf). With an
// autocert manager served by ServeTLS, the first handshake for a name makes
// the manager obtain the certificate.
func (s *Server) Handshake(ctx context.Context, serverName string) (tls.ConnectionState, error) {
	d := tls.Dialer{Config: &tls.Config{ServerName: serverName, RootCAs: s.Roots}}
	c, err := d.DialContext(ctx, "tcp", s.TLSListener.Addr().String())
	if err != nil {
		return tls.ConnectionState{}, err
	}
	defer c.Close()
	return c.(*tls.Conn).ConnectionState(), nil
}
