package certmgrtest

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"io"
	"net/http"
	"runtime"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/miekg/dns"
	"golang.org/x/crypto/acme"
)

var _ TB = testing.TB(nil)

func testContext(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
	t.Cleanup(cancel)
	return ctx
}

func newKey(t *testing.T) crypto.Signer {
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	return k
}

// helloFor returns a ClientHelloInfo for name that makes autocert choose
// an ECDSA certificate.
func helloFor(name string) *tls.ClientHelloInfo {
	return &tls.ClientHelloInfo{
		ServerName:       name,
		SignatureSchemes: []tls.SignatureScheme{tls.ECDSAWithP256AndSHA256},
		SupportedCurves:  []tls.CurveID{tls.CurveP256},
		CipherSuites:     []uint16{tls.TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256},
	}
}

func intermediates(t *testing.T, ders [][]byte) *x509.CertPool {
	pool := x509.NewCertPool()
	for _, der := range ders {
		c, err := x509.ParseCertificate(der)
		if err != nil {
			t.Fatal(err)
		}
		pool.AddCert(c)
	}
	return pool
}

// TestAutocertTLSALPN issues a certificate with TLS-ALPN-01 through the
// proxy and checks what the proxy counted.
func TestAutocertTLSALPN(t *testing.T) {
	srv := Start(t, Options{})
	m := srv.Autocert("a.test")
	wantAnswer(t, query(t, "udp", srv.DNS.Addr(), "a.test", dns.TypeA), dns.RcodeSuccess, "a.test. 127.0.0.1")
	if err := srv.ServeTLS(m.TLSConfig(), nil); err != nil {
		t.Fatal(err)
	}
	ctx := testContext(t)

	start := time.Now()
	cs, err := srv.Handshake(ctx, "a.test")
	if err != nil {
		t.Fatalf("handshake: %v", err)
	}
	t.Logf("first handshake (account, order, TLS-ALPN-01, issuance) took %v", time.Since(start))

	leaf := cs.PeerCertificates[0]
	if err := leaf.VerifyHostname("a.test"); err != nil {
		t.Error(err)
	}
	if got := leaf.NotAfter.Sub(leaf.NotBefore); got < 89*24*time.Hour {
		t.Errorf("validity %v, want Pebble's default of 90 days", got)
	}
	want := Counts{Orders: 1, Authzs: 1, ChallengeResponses: 1}
	if got := srv.Proxy.Counts("a.test"); got != want {
		t.Errorf("Counts(a.test) = %+v, want %+v", got, want)
	}
	if got := srv.Proxy.Total(); got != want {
		t.Errorf("Total() = %+v, want %+v", got, want)
	}
	if n := srv.Proxy.Requests(ClassNewOrder); n != 1 {
		t.Errorf("new-order requests = %d, want 1", n)
	}
	if n := srv.Proxy.Requests(ClassCert); n != 1 {
		t.Errorf("cert requests = %d, want 1", n)
	}
	if p := srv.Proxy.Problems(); len(p) != 0 {
		t.Errorf("problems: %+v", p)
	}

	// The certificate is now cached: no new order. (autocert may still be
	// checking, in the background, for pending authorizations to
	// deactivate.)
	if _, err := srv.Handshake(ctx, "a.test"); err != nil {
		t.Fatalf("second handshake: %v", err)
	}
	if n := srv.Proxy.Requests(ClassNewOrder); n != 1 {
		t.Errorf("new-order requests after second handshake = %d, want 1", n)
	}
}

// TestAutocertHTTP01 issues with HTTP-01 and a short certificate validity.
// autocert always tries TLS-ALPN-01 first; with the TLS listener closed
// that fails at once (connection refused), and autocert starts a new order
// for HTTP-01.
func TestAutocertHTTP01(t *testing.T) {
	srv := Start(t, Options{CertValidity: time.Hour})
	m := srv.Autocert("h.test")
	if err := srv.ServePlain(m.HTTPHandler(nil)); err != nil {
		t.Fatal(err)
	}
	srv.TLSListener.Close()

	start := time.Now()
	cert, err := m.GetCertificate(helloFor("h.test"))
	if err != nil {
		t.Fatalf("GetCertificate: %v", err)
	}
	t.Logf("HTTP-01 issuance took %v", time.Since(start))
	leaf, err := x509.ParseCertificate(cert.Certificate[0])
	if err != nil {
		t.Fatal(err)
	}
	if _, err := leaf.Verify(x509.VerifyOptions{DNSName: "h.test", Roots: srv.Roots, Intermediates: intermediates(t, cert.Certificate[1:])}); err != nil {
		t.Errorf("verify: %v", err)
	}
	if got := leaf.NotAfter.Sub(leaf.NotBefore); got != time.Hour-time.Second {
		// Pebble sets NotAfter to NotBefore + validity - 1 s.
		t.Errorf("validity %v, want 1h-1s", got)
	}
	want := Counts{Orders: 2, Authzs: 2, ChallengeResponses: 2, FailedAuthzs: 1}
	if got := srv.Proxy.Counts("h.test"); got != want {
		t.Errorf("Counts = %+v, want %+v", got, want)
	}
}

// TestIPv6 validates a name whose only address is ::1.
func TestIPv6(t *testing.T) {
	srv := Start(t, Options{IPv6: true})
	if p, p6 := port(srv.TLSListener), port(srv.TLSListener6); p != p6 {
		t.Fatalf("ports %d and %d differ", p, p6)
	}
	m := srv.Autocert("six.test")
	srv.DNS.SetA("six.test")
	srv.DNS.SetAAAA("six.test", "::1")
	if err := srv.ServeTLS(m.TLSConfig(), nil); err != nil {
		t.Fatal(err)
	}
	if _, err := srv.Handshake(testContext(t), "six.test"); err != nil {
		t.Fatal(err)
	}
}

// TestNoSettle issues without the proxy's settling: x/crypto/acme then
// waits its default poll interval for the authorization and the order.
func TestNoSettle(t *testing.T) {
	if testing.Short() {
		t.Skip("takes about two seconds")
	}
	srv := Start(t, Options{NoSettle: true})
	m := srv.Autocert("slow.test")
	if err := srv.ServeTLS(m.TLSConfig(), nil); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	if _, err := srv.Handshake(testContext(t), "slow.test"); err != nil {
		t.Fatal(err)
	}
	t.Logf("issuance without settling took %v", time.Since(start))
	if got, want := srv.Proxy.Counts("slow.test"), (Counts{Orders: 1, Authzs: 1, ChallengeResponses: 1}); got != want {
		t.Errorf("Counts = %+v, want %+v", got, want)
	}
}

// TestServeErrors checks the errors of ServeTLS and ServePlain.
func TestServeErrors(t *testing.T) {
	srv, err := NewServer(Options{})
	if err != nil {
		t.Fatal(err)
	}
	cfg := &tls.Config{GetCertificate: func(*tls.ClientHelloInfo) (*tls.Certificate, error) {
		return nil, errors.New("no certificate")
	}}
	if err := srv.ServeTLS(nil, nil); err == nil {
		t.Error("ServeTLS with a nil config succeeded")
	}
	if err := srv.ServeTLS(cfg, nil); err != nil {
		t.Fatal(err)
	}
	if err := srv.ServeTLS(cfg, nil); err == nil {
		t.Error("second ServeTLS succeeded")
	}
	if err := srv.ServePlain(nil); err != nil {
		t.Fatal(err)
	}
	if err := srv.ServePlain(nil); err == nil {
		t.Error("second ServePlain succeeded")
	}
	if err := srv.Close(); err != nil {
		t.Fatal(err)
	}
	if err := srv.Close(); err != nil {
		t.Errorf("second Close: %v", err)
	}

	srv, err = NewServer(Options{})
	if err != nil {
		t.Fatal(err)
	}
	if err := srv.Close(); err != nil {
		t.Fatal(err)
	}
	if err := srv.ServeTLS(cfg, nil); !errors.Is(err, errClosed) {
		t.Errorf("ServeTLS after Close: %v, want %v", err, errClosed)
	}
	if err := srv.ServePlain(nil); !errors.Is(err, errClosed) {
		t.Errorf("ServePlain after Close: %v, want %v", err, errClosed)
	}
}

// TestServePlainStripsPort checks that the handler given to ServePlain
// sees the Host without its port.
func TestServePlainStripsPort(t *testing.T) {
	srv := Start(t, Options{})
	h := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, r.Host) })
	if err := srv.ServePlain(h); err != nil {
		t.Fatal(err)
	}
	tr := &http.Transport{}
	defer tr.CloseIdleConnections()
	url := "http://" + srv.HTTPListener.Addr().String() + "/"
	resp, err := (&http.Client{Transport: tr}).Get(url)
	if err != nil {
		t.Fatal(err)
	}
	body, err := io.ReadAll(resp.Body)
	resp.Body.Close()
	if err != nil || string(body) != "127.0.0.1" {
		t.Errorf("GET %s: handler saw Host %q (%v), want 127.0.0.1", url, body, err)
	}
}

// TestCloseWaitsForHandlers checks that Close returns only after the
// handlers of requests in progress have returned.
func TestCloseWaitsForHandlers(t *testing.T) {
	srv, err := NewServer(Options{})
	if err != nil {
		t.Fatal(err)
	}
	entered, cancelled, release := make(chan struct{}), make(chan struct{}), make(chan struct{})
	h := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		close(entered)
		<-r.Context().Done() // Close closed the connection
		close(cancelled)
		<-release
	})
	if err := srv.ServePlain(h); err != nil {
		t.Fatal(err)
	}
	tr := &http.Transport{}
	defer tr.CloseIdleConnections()
	got := make(chan error, 1)
	go func() {
		resp, err := (&http.Client{Transport: tr}).Get("http://" + srv.HTTPListener.Addr().String() + "/")
		if err == nil {
			resp.Body.Close()
		}
		got <- err
	}()
	<-entered
	closed := make(chan error, 1)
	go func() { closed <- srv.Close() }()
	<-cancelled
	select {
	case err := <-closed:
		t.Errorf("Close returned (%v) while a handler was running", err)
		closed <- err
	default:
	}
	close(release)
	if err := <-closed; err != nil {
		t.Error(err)
	}
	if err := <-got; err == nil {
		t.Error("the request succeeded through a closed server")
	}
}

// fakeTB is a TB whose Fatal ends the goroutine, as testing.TB's does.
type fakeTB struct {
	failed   atomic.Bool
	cleanups []func()
}

func (*fakeTB) Helper()              {}
func (tb *fakeTB) Cleanup(f func())  { tb.cleanups = append(tb.cleanups, f) }
func (tb *fakeTB) Fatal(args ...any) { tb.failed.Store(true); runtime.Goexit() }

// TestStartFails checks that Start fails its TB, without registering a
// cleanup, when the Server cannot start.
func TestStartFails(t *testing.T) {
	t.Setenv("PEBBLE_VA_ALWAYS_VALID", "1")
	var tb fakeTB
	done := make(chan *Server)
	go func() {
		defer close(done)
		done <- Start(&tb, Options{})
	}()
	if s := <-done; s != nil {
		t.Errorf("Start returned %v", s)
	}
	if !tb.failed.Load() || len(tb.cleanups) != 0 {
		t.Errorf("failed %v with %d cleanups, want failed with none", tb.failed.Load(), len(tb.cleanups))
	}
}

// TestCloseLeavesOnlyPebble checks that, once Close returns, every
// goroutine the Server started ends except Pebble's own.
func TestCloseLeavesOnlyPebble(t *testing.T) {
	before := goroutines()
	srv, err := NewServer(Options{IPv6: true})
	if err != nil {
		t.Fatal(err)
	}
	ctx := testContext(t)
	cl := srv.NewClient()
	cl.Key = newKey(t)
	if _, err := cl.Register(ctx, &acme.Account{}, acme.AcceptTOS); err != nil {
		t.Fatal(err)
	}
	err = srv.ServeTLS(&tls.Config{GetCertificate: func(*tls.ClientHelloInfo) (*tls.Certificate, error) {
		return nil, errors.New("no certificate")
	}}, nil)
	if err != nil {
		t.Fatal(err)
	}
	if err := srv.ServePlain(nil); err != nil {
		t.Fatal(err)
	}
	if _, err := srv.Handshake(ctx, "none.test"); err == nil {
		t.Fatal("handshake succeeded without a certificate")
	}
	if err := srv.Close(); err != nil {
		t.Fatal(err)
	}

	// The client's connection goroutines end shortly after their
	// connections close; wait for that, bounded.
	deadline := time.Now().Add(10 * time.Second)
	for {
		var extra []string
		for id, stack := range goroutines() {
			if _, ok := before[id]; !ok && !strings.Contains(stack, "letsencrypt/pebble") {
				extra = append(extra, stack)
			}
		}
		if len(extra) == 0 {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("goroutines left after Close:\n%s", strings.Join(extra, "\n\n"))
		}
		time.Sleep(10 * time.Millisecond) // polling a condition, bounded above
	}
}

// goroutines returns the stacks of all goroutines but the caller's, by id.
func goroutines() map[string]string {
	buf := make([]byte, 1<<20)
	for {
		n := runtime.Stack(buf, true)
		if n < len(buf) {
			buf = buf[:n]
			break
		}
		buf = make([]byte, 2*len(buf))
	}
	m := make(map[string]string)
	for i, g := range strings.Split(string(buf), "\n\n") {
		if i == 0 {
			continue // the calling goroutine
		}
		id, _, _ := strings.Cut(strings.TrimPrefix(g, "goroutine "), " ")
		m[id] = g
	}
	return m
}
