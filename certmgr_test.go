package certmgr

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"io"
	"log/slog"
	"net/http"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/crypto/acme"
	"golang.org/x/crypto/acme/autocert"

	"github.com/certmgr/certmgr/internal/leakcheck"
	"github.com/certmgr/certmgr/internal/pebbletest"
)

// testEnv is one integration test's CA, DNS and Manager.
type testEnv struct {
	*pebbletest.Env
	m    *Manager
	logs *syncBuffer
}

// startEnv starts Pebble and its DNS, programs each name to 127.0.0.1
// (where the VA finds the test's listeners), and makes a Manager for cfg
// whose Autocert accepts names. The Manager is closed, and goroutines
// checked for leaks, when the test ends.
func startEnv(t *testing.T, opts pebbletest.Options, cfg Config, names ...string) *testEnv {
	t.Helper()
	return launch(t, opts, cfg, false, names...)
}

// startDNSEnv is startEnv with the DNS pre-check on (see dnsConfig); the
// names are left for the test to program.
func startDNSEnv(t *testing.T, opts pebbletest.Options, cfg Config, names ...string) *testEnv {
	t.Helper()
	return launch(t, opts, cfg, true, names...)
}

func launch(t *testing.T, opts pebbletest.Options, cfg Config, dnsCheck bool, names ...string) *testEnv {
	t.Helper()
	checkLeaks(t)
	env := pebbletest.Start(t, opts)
	if dnsCheck {
		cfg = dnsConfig(env, cfg)
	} else {
		for _, n := range names {
			env.DNS.SetA(n, "127.0.0.1")
		}
	}
	if cfg.Autocert == nil {
		cfg.Autocert = &autocert.Manager{}
	}
	if cfg.Autocert.Client == nil {
		cfg.Autocert.Client = env.NewClient()
	}
	if cfg.Autocert.HostPolicy == nil && len(names) > 0 {
		cfg.Autocert.HostPolicy = autocert.HostWhitelist(names...)
	}
	logs := &syncBuffer{}
	if cfg.Logger == nil {
		cfg.Logger = newTestLogger(logs)
	}
	m, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		m.Close()
		if t.Failed() {
			t.Logf("certmgr log:\n%s", logs.String())
		}
	})
	return &testEnv{Env: env, m: m, logs: logs}
}

// serveCurrent serves TLS with the config of whichever Manager the
// returned pointer holds (e.m at first): one listener for the Managers a
// restart test makes one after the other.
func (e *testEnv) serveCurrent(t *testing.T) *atomic.Pointer[Manager] {
	var current atomic.Pointer[Manager]
	current.Store(e.m)
	e.ServeTLS(t, &tls.Config{GetConfigForClient: func(*tls.ClientHelloInfo) (*tls.Config, error) {
		return current.Load().TLSConfig(), nil
	}}, nil)
	return &current
}

// handshake connects to the TLS listener with SNI name and returns the
// leaf the server sent, verified against Pebble's root unless insecure.
func (e *testEnv) handshake(t *testing.T, name string, conf *tls.Config) (*x509.Certificate, error) {
	t.Helper()
	if conf == nil {
		conf = &tls.Config{}
	}
	conf = conf.Clone()
	conf.ServerName = name
	if conf.RootCAs == nil {
		conf.RootCAs = e.Roots
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	d := tls.Dialer{Config: conf}
	c, err := d.DialContext(ctx, "tcp", e.TLSListener.Addr().String())
	if err != nil {
		return nil, err
	}
	defer c.Close()
	return c.(*tls.Conn).ConnectionState().PeerCertificates[0], nil
}

// newTestLogger logs everything, Debug included, to w.
func newTestLogger(w io.Writer) *slog.Logger {
	return slog.New(slog.NewTextHandler(w, &slog.HandlerOptions{Level: slog.LevelDebug}))
}

// pemCert encodes c as autocert stores it: the key, then the chain.
func pemCert(t *testing.T, c *tls.Certificate) []byte {
	t.Helper()
	der, err := x509.MarshalPKCS8PrivateKey(c.PrivateKey)
	if err != nil {
		t.Fatal(err)
	}
	out := pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der})
	for _, b := range c.Certificate {
		out = append(out, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: b})...)
	}
	return out
}

// insecure accepts any certificate: to see fallbacks.
var insecure = &tls.Config{InsecureSkipVerify: true}

// syncBuffer is a bytes.Buffer safe for concurrent writers.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// checkLeaks fails t if, once t's cleanups have run, goroutines of
// certmgr, autocert or acme are still running after a grace period in which
// detached work (autocert deactivating authorizations) ends.
func checkLeaks(t *testing.T) {
	t.Cleanup(func() {
		if left := settle(10*time.Second, nil); len(left) > 0 {
			t.Errorf("%d goroutine(s) left behind:\n%s", len(left), strings.Join(left, "\n\n"))
		}
	})
}

// waitDetached waits for the goroutines autocert detaches after an
// attempt (withdrawing unused authorizations, deleting challenge tokens).
func waitDetached(t *testing.T) {
	t.Helper()
	autocertOnly := func(stack string) bool { return strings.Contains(stack, "acme/autocert.") }
	if left := settle(10*time.Second, autocertOnly); len(left) > 0 {
		t.Fatalf("autocert's detached work did not end:\n%s", strings.Join(left, "\n\n"))
	}
}

// settle polls until no goroutine of certmgr, autocert or acme that keep
// selects (all, if keep is nil) is running, or d passes; it returns those
// still running.
func settle(d time.Duration, keep func(stack string) bool) []string {
	deadline := time.Now().Add(d)
	for {
		var left []string
		for _, g := range leakedGoroutines() {
			if keep == nil || keep(g) {
				left = append(left, g)
			}
		}
		if len(left) == 0 || time.Now().After(deadline) {
			return left
		}
		time.Sleep(5 * time.Millisecond) // polling with a deadline
	}
}

// leakedGoroutines returns the stacks of the goroutines of certmgr,
// autocert and acme, the test harness's and the tests' own left out.
func leakedGoroutines() []string {
	var leaked []string
	for _, g := range leakcheck.Stacks() {
		if strings.Contains(g, "leakedGoroutines") || strings.Contains(g, "pebble/v2") || strings.Contains(g, "internal/pebbletest") || strings.Contains(g, "internal/dnstest") {
			continue
		}
		if strings.Contains(g, "github.com/certmgr/certmgr.") || strings.Contains(g, "acme/autocert.") || strings.Contains(g, "x/crypto/acme.") {
			if !strings.Contains(g, "testing.tRunner") {
				leaked = append(leaked, g)
			}
		}
	}
	return leaked
}

// waitFor polls cond until it holds or d passes.
func waitFor(t *testing.T, d time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %v waiting for %s", d, what)
		}
		time.Sleep(5 * time.Millisecond) // polling with a deadline
	}
}

// Acceptance 1 (foundation): a server using TLSConfig through
// http.Server.ServeTLS obtains a certificate over TLS-ALPN-01 on the first
// handshake, with exactly one order and one authorization.
func TestTLSConfigObtainsOverTLSALPN(t *testing.T) {
	const name = "alpn.test"
	e := startEnv(t, pebbletest.Options{}, Config{}, name)
	e.ServeTLS(t, e.m.TLSConfig(), nil)

	leaf, err := e.handshake(t, name, nil)
	if err != nil {
		t.Fatalf("first handshake: %v", err)
	}
	if leaf.Subject.CommonName != name && !slices.Contains(leaf.DNSNames, name) {
		t.Errorf("leaf names %v, want %s", leaf.DNSNames, name)
	}
	c := e.Proxy.Counts(name)
	if c.Orders != 1 || c.Authzs != 1 || c.ChallengeResponses != 1 || c.FailedAuthzs != 0 {
		t.Errorf("proxy counted %+v, want 1 order, 1 authorization, 1 challenge response", c)
	}
	st := e.m.Status(name)
	if st.State != StateValid || !st.NotAfter.Equal(leaf.NotAfter) || st.Failures != 0 {
		t.Errorf("Status = %+v, want valid until %v", st, leaf.NotAfter)
	}
	if _, err := e.handshake(t, name, nil); err != nil {
		t.Fatalf("second handshake: %v", err)
	}
	if c2 := e.Proxy.Counts(name); c2 != c {
		t.Errorf("second handshake made ACME requests: %+v after %+v", c2, c)
	}
}

// Acceptance 2 (foundation): a hand-made tls.Config without
// acme.ALPNProto makes TLS-ALPN-01 fail at the handshake, and autocert then
// spends a second order (and authorization) on http-01.
func TestHandMadeConfigWithoutALPNFails(t *testing.T) {
	const name = "noalpn.test"
	e := startEnv(t, pebbletest.Options{}, Config{HandshakeTimeout: 30 * time.Second}, name)
	e.m.HTTPHandler(nil) // in use, as in the incident; nothing answers port 80
	e.HTTPListener.Close()
	handMade := &tls.Config{GetCertificate: e.m.GetCertificate, NextProtos: []string{"h2", "http/1.1"}}
	e.ServeTLS(t, handMade, nil)

	leaf, err := e.handshake(t, name, insecure)
	if err != nil {
		t.Fatalf("handshake: %v", err)
	}
	if !strings.Contains(leaf.Subject.String(), "certmgr fallback") {
		t.Errorf("got %v, want the fallback certificate", leaf.Subject)
	}
	c := e.Proxy.Counts(name)
	// autocert's order loop: tls-alpn-01 fails, a new order for http-01
	// fails, and a third order finds no challenge type left to try.
	if c.Orders != 3 || c.FailedAuthzs != 2 {
		t.Errorf("proxy counted %+v, want 3 orders and 2 failed authorizations", c)
	}
	found := false
	for _, p := range e.Proxy.Problems() {
		if strings.Contains(p.Detail, "tls-alpn-01") {
			found = true
		}
	}
	if !found {
		t.Errorf("no TLS-ALPN-01 failure among the CA's problems: %+v", e.Proxy.Problems())
	}
	st := e.m.Status(name)
	if st.State != StateBackoff || st.Failures != 1 || st.LastError == nil {
		t.Errorf("Status = %+v, want backoff after 1 failure", st)
	}
}

// Acceptance 3 (foundation): http-01 through HTTPHandler obtains a
// certificate when no TLS port is reachable.
func TestHTTP01WithoutTLSPort(t *testing.T) {
	const name = "http01.test"
	e := startEnv(t, pebbletest.Options{}, Config{}, name)
	e.ServePlain(t, e.m.HTTPHandler(nil))
	e.TLSListener.Close() // tls-alpn-01 connections are refused

	if err := e.m.Provision(context.Background(), name); err != nil {
		t.Fatalf("Provision: %v", err)
	}
	cert, err := e.m.GetCertificate(&tls.ClientHelloInfo{ServerName: name, SupportedVersions: []uint16{tls.VersionTLS13}})
	if err != nil {
		t.Fatal(err)
	}
	if IsFallback(cert) {
		t.Fatal("got the fallback certificate")
	}
	if _, err := cert.Leaf.Verify(x509.VerifyOptions{DNSName: name, Roots: e.Roots, Intermediates: intermediates(cert)}); err != nil {
		t.Errorf("certificate does not verify against Pebble's root: %v", err)
	}
	if c := e.Proxy.Counts(name); c.Orders != 2 || c.FailedAuthzs != 1 {
		t.Errorf("proxy counted %+v, want 2 orders: tls-alpn-01 failed, http-01 passed", c)
	}
}

func intermediates(c *tls.Certificate) *x509.CertPool {
	p := x509.NewCertPool()
	for _, der := range c.Certificate[1:] {
		if ic, err := x509.ParseCertificate(der); err == nil {
			p.AddCert(ic)
		}
	}
	return p
}

// Acceptance 4 (foundation): New validates its Config; TLSConfig returns
// distinct configs; names are normalised as autocert does.
func TestNewRejectsNilAutocert(t *testing.T) {
	_, err := New(Config{})
	if err == nil || !strings.Contains(err.Error(), "Autocert") || !strings.HasPrefix(err.Error(), "certmgr: ") {
		t.Fatalf("New(Config{}) = %v, want an error naming Autocert", err)
	}
	for _, cfg := range []Config{
		{Autocert: &autocert.Manager{}, HandshakeTimeout: -1},
		{Autocert: &autocert.Manager{}, DNS: DNSCheck{KnownIPs: []netip.Addr{netip.MustParseAddr("127.0.0.1")}, Resolvers: []string{"no-port"}}},
	} {
		if _, err := New(cfg); err == nil {
			t.Errorf("New(%+v) accepted it", cfg)
		}
	}
}

func TestTLSConfigDistinct(t *testing.T) {
	m, err := New(Config{Autocert: &autocert.Manager{}, Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	a, b := m.TLSConfig(), m.TLSConfig()
	if a == b || &a.NextProtos[0] == &b.NextProtos[0] {
		t.Fatal("TLSConfig returned shared state")
	}
	for _, c := range []*tls.Config{a, b} {
		if c.MinVersion != tls.VersionTLS12 || c.GetCertificate == nil ||
			!slices.Contains(c.NextProtos, "h2") || !slices.Contains(c.NextProtos, "http/1.1") || !slices.Contains(c.NextProtos, acme.ALPNProto) {
			t.Errorf("TLSConfig() = %+v", c)
		}
	}
	a.NextProtos[0] = "changed"
	if m.TLSConfig().NextProtos[0] != "h2" {
		t.Error("changing one config changed the next")
	}
}

func TestNamesNormalised(t *testing.T) {
	e := startEnv(t, pebbletest.Options{}, Config{}, "example.com")
	e.ServeTLS(t, e.m.TLSConfig(), nil)
	leaf, err := e.handshake(t, "example.com", nil)
	if err != nil {
		t.Fatal(err)
	}
	for _, sni := range []string{"Example.COM.", "EXAMPLE.com", "example.com."} {
		c, err := e.m.GetCertificate(&tls.ClientHelloInfo{ServerName: sni, SupportedVersions: []uint16{tls.VersionTLS13}})
		if err != nil {
			t.Fatalf("GetCertificate(%q): %v", sni, err)
		}
		if !c.Leaf.Equal(leaf) {
			t.Errorf("GetCertificate(%q) returned another certificate", sni)
		}
	}
	if got := e.Proxy.Counts("example.com").Orders; got != 1 {
		t.Errorf("%d orders, want 1", got)
	}
	if _, err := e.m.GetCertificate(&tls.ClientHelloInfo{ServerName: "other.com"}); !errors.Is(err, ErrHostNotAllowed) {
		t.Errorf("refused name: err = %v, want ErrHostNotAllowed", err)
	}
}

// TestTLSConfigSurvivesNextProtosEdit: a validation still works after
// the config's NextProtos lost acme-tls/1.
func TestTLSConfigSurvivesNextProtosEdit(t *testing.T) {
	const name = "edited.test"
	e := startEnv(t, pebbletest.Options{}, Config{}, name)
	conf := e.m.TLSConfig()
	conf.NextProtos = []string{"http/1.1"}
	e.ServeTLS(t, conf, nil)
	if _, err := e.handshake(t, name, nil); err != nil {
		t.Fatal(err)
	}
	if c := e.Proxy.Counts(name); c.Orders != 1 || c.FailedAuthzs != 0 {
		t.Errorf("proxy counted %+v, want 1 order and no failure", c)
	}
}

// Keep net/http imported for handlers used by later tests.
var _ http.Handler = http.NotFoundHandler()
