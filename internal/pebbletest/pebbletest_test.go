package pebbletest

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"net/http"
	"strings"
	"testing"
	"time"

	"golang.org/x/crypto/acme"
	"golang.org/x/crypto/acme/autocert"

	"github.com/certmgr/certmgr/internal/leakcheck"
)

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

// newManager returns an autocert manager for names on env, with an
// in-memory account and certificate store.
func newManager(env *Env, names ...string) *autocert.Manager {
	return &autocert.Manager{
		Prompt:     autocert.AcceptTOS,
		Client:     env.NewClient(),
		HostPolicy: autocert.HostWhitelist(names...),
	}
}

// TestAutocertTLSALPN issues a certificate with TLS-ALPN-01 through the
// proxy and checks what the proxy counted.
func TestAutocertTLSALPN(t *testing.T) {
	env := Start(t, Options{})
	env.DNS.SetA("a.test", "127.0.0.1")
	m := newManager(env, "a.test")
	env.ServeTLS(t, m.TLSConfig(), nil)
	ctx := testContext(t)

	start := time.Now()
	cs, err := env.Handshake(ctx, "a.test")
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
	if got := env.Proxy.Counts("a.test"); got != want {
		t.Errorf("Counts(a.test) = %+v, want %+v", got, want)
	}
	if got := env.Proxy.Total(); got != want {
		t.Errorf("Total() = %+v, want %+v", got, want)
	}
	if n := env.Proxy.Requests(ClassNewOrder); n != 1 {
		t.Errorf("new-order requests = %d, want 1", n)
	}
	if n := env.Proxy.Requests(ClassCert); n != 1 {
		t.Errorf("cert requests = %d, want 1", n)
	}
	if p := env.Proxy.Problems(); len(p) != 0 {
		t.Errorf("problems: %+v", p)
	}

	// The certificate is now cached: no new order. (autocert may still be
	// checking, in the background, for pending authorizations to
	// deactivate.)
	if _, err := env.Handshake(ctx, "a.test"); err != nil {
		t.Fatalf("second handshake: %v", err)
	}
	if n := env.Proxy.Requests(ClassNewOrder); n != 1 {
		t.Errorf("new-order requests after second handshake = %d, want 1", n)
	}
}

// TestAutocertHTTP01 issues with HTTP-01 and a short certificate validity.
// autocert always tries TLS-ALPN-01 first; with the TLS listener closed
// that fails at once (connection refused), and autocert starts a new order
// for HTTP-01.
func TestAutocertHTTP01(t *testing.T) {
	env := Start(t, Options{CertValidity: time.Hour})
	env.DNS.SetA("h.test", "127.0.0.1")
	m := newManager(env, "h.test")
	env.ServePlain(t, m.HTTPHandler(nil))
	env.TLSListener.Close()

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
	if _, err := leaf.Verify(x509.VerifyOptions{DNSName: "h.test", Roots: env.Roots, Intermediates: intermediates(t, cert.Certificate[1:])}); err != nil {
		t.Errorf("verify: %v", err)
	}
	if got := leaf.NotAfter.Sub(leaf.NotBefore); got != time.Hour-time.Second {
		// Pebble sets NotAfter to NotBefore + validity - 1 s.
		t.Errorf("validity %v, want 1h-1s", got)
	}
	want := Counts{Orders: 2, Authzs: 2, ChallengeResponses: 2, FailedAuthzs: 1}
	if got := env.Proxy.Counts("h.test"); got != want {
		t.Errorf("Counts = %+v, want %+v", got, want)
	}
}

// TestFailedAuthz lets TLS-ALPN-01 fail (the listener is closed; a listener
// that is open but not served would hold the VA for its 15 s timeout) and
// checks the failure is counted with its problem.
func TestFailedAuthz(t *testing.T) {
	env := Start(t, Options{})
	env.DNS.SetA("f.test", "127.0.0.1")
	env.TLSListener.Close()
	m := newManager(env, "f.test")

	if _, err := m.GetCertificate(helloFor("f.test")); err == nil {
		t.Fatal("GetCertificate succeeded without a challenge server")
	}
	// autocert's second order finds no challenge type left to try.
	want := Counts{Orders: 2, Authzs: 2, ChallengeResponses: 1, FailedAuthzs: 1}
	if got := env.Proxy.Counts("f.test"); got != want {
		t.Errorf("Counts = %+v, want %+v", got, want)
	}
	var found bool
	for _, p := range env.Proxy.Problems() {
		if p.Class == ClassAuthz && !p.Injected && len(p.Identifiers) == 1 && p.Identifiers[0] == "f.test" {
			found = true
			t.Logf("problem: %s: %s", p.Type, p.Detail)
		}
	}
	if !found {
		t.Errorf("no challenge problem recorded: %+v", env.Proxy.Problems())
	}
}

// TestRateLimitRule answers new-order with 429 and checks acme.RateLimit
// recognizes the error.
func TestRateLimitRule(t *testing.T) {
	env := Start(t, Options{})
	ctx := testContext(t)
	env.Proxy.AddRule(Rule{
		Class:      ClassNewOrder,
		Identifier: "r.test",
		Status:     http.StatusTooManyRequests,
		RetryAfter: "120",
		Detail:     "too many certificates",
		Times:      1,
	})

	cl := env.NewClient()
	cl.Key = newKey(t)
	// acme.Client retries 429 answers until ctx ends; give up at once.
	cl.RetryBackoff = func(int, *http.Request, *http.Response) time.Duration { return 0 }
	if _, err := cl.Register(ctx, &acme.Account{}, acme.AcceptTOS); err != nil {
		t.Fatalf("Register: %v", err)
	}
	_, err := cl.AuthorizeOrder(ctx, acme.DomainIDs("r.test"))
	d, ok := acme.RateLimit(err)
	if !ok || d != 2*time.Minute {
		t.Fatalf("AuthorizeOrder error %v: RateLimit = %v, %v; want 2m0s, true", err, d, ok)
	}
	var ae *acme.Error
	if !errors.As(err, &ae) || ae.Detail != "too many certificates" {
		t.Errorf("error %#v, want the rule's detail", err)
	}
	if got := env.Proxy.Counts("r.test"); got.Orders != 0 {
		t.Errorf("Counts = %+v, want no order", got)
	}
	probs := env.Proxy.Problems()
	if len(probs) != 1 || !probs[0].Injected || probs[0].Status != 429 {
		t.Errorf("Problems = %+v", probs)
	}

	// The rule applied once; the nonce it carried keeps the client working.
	o, err := cl.AuthorizeOrder(ctx, acme.DomainIDs("r.test"))
	if err != nil {
		t.Fatalf("second AuthorizeOrder: %v", err)
	}
	if o.Status != acme.StatusPending || len(o.AuthzURLs) != 1 {
		t.Errorf("order %+v", o)
	}
	if got := env.Proxy.Counts("r.test"); got.Orders != 1 || got.Authzs != 1 {
		t.Errorf("Counts = %+v, want 1 order, 1 authz", got)
	}
}

// TestHoldAndMalformedDirectory checks Hold with Release, Wait, and a Body
// override.
func TestHoldAndMalformedDirectory(t *testing.T) {
	env := Start(t, Options{})
	ctx := testContext(t)

	remove := env.Proxy.AddRule(Rule{Class: ClassDirectory, Status: http.StatusOK, Body: "{not json"})
	cl := env.NewClient()
	if _, err := cl.Discover(ctx); err == nil {
		t.Fatal("Discover accepted a malformed directory")
	}
	remove()

	env.Proxy.AddRule(Rule{Class: ClassDirectory, Hold: true, Times: 1})
	done := make(chan error, 1)
	go func() {
		_, err := env.NewClient().Discover(ctx)
		done <- err
	}()
	env.Proxy.Wait(t, 10*time.Second, func() bool { return env.Proxy.Requests(ClassDirectory) == 2 })
	select {
	case err := <-done:
		t.Fatalf("held Discover returned: %v", err)
	default:
	}
	env.Proxy.Release()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("released Discover: %v", err)
		}
	case <-ctx.Done():
		t.Fatal("released Discover did not return")
	}
}

// TestHeldAtClose checks that Close does not wait for a held request.
func TestHeldAtClose(t *testing.T) {
	env, err := New(Options{})
	if err != nil {
		t.Fatal(err)
	}
	env.Proxy.AddRule(Rule{Hold: true})
	done := make(chan error, 1)
	go func() {
		_, err := env.NewClient().Discover(t.Context())
		done <- err
	}()
	env.Proxy.Wait(t, 10*time.Second, func() bool { return env.Proxy.Requests(ClassAny) == 1 })
	if err := env.Close(); err != nil {
		t.Fatal(err)
	}
	if err := <-done; err == nil {
		t.Fatal("Discover succeeded through a closed proxy")
	}
}

// TestIPv6 validates a name whose only address is ::1.
func TestIPv6(t *testing.T) {
	env := Start(t, Options{IPv6: true})
	if p, p6 := port(env.TLSListener), port(env.TLSListener6); p != p6 {
		t.Fatalf("ports %d and %d differ", p, p6)
	}
	env.DNS.SetAAAA("six.test", "::1")
	m := newManager(env, "six.test")
	env.ServeTLS(t, m.TLSConfig(), nil)
	if _, err := env.Handshake(testContext(t), "six.test"); err != nil {
		t.Fatal(err)
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

// TestNoSettle issues without the proxy's settling: x/crypto/acme then
// waits its default poll interval for the authorization and the order.
func TestNoSettle(t *testing.T) {
	if testing.Short() {
		t.Skip("takes about two seconds")
	}
	env := Start(t, Options{NoSettle: true})
	env.DNS.SetA("slow.test", "127.0.0.1")
	m := newManager(env, "slow.test")
	env.ServeTLS(t, m.TLSConfig(), nil)
	start := time.Now()
	if _, err := env.Handshake(testContext(t), "slow.test"); err != nil {
		t.Fatal(err)
	}
	t.Logf("issuance without settling took %v", time.Since(start))
	if got, want := env.Proxy.Counts("slow.test"), (Counts{Orders: 1, Authzs: 1, ChallengeResponses: 1}); got != want {
		t.Errorf("Counts = %+v, want %+v", got, want)
	}
}

// TestAuthzReuse checks the documented reuse of a valid authorization by
// a later order of the same account, using acme.Client directly.
func TestAuthzReuse(t *testing.T) {
	env := Start(t, Options{})
	env.DNS.SetA("reuse.test", "127.0.0.1")
	ctx := testContext(t)
	cl := env.NewClient()
	cl.Key = newKey(t)
	if _, err := cl.Register(ctx, &acme.Account{}, acme.AcceptTOS); err != nil {
		t.Fatal(err)
	}
	o, err := cl.AuthorizeOrder(ctx, acme.DomainIDs("reuse.test"))
	if err != nil {
		t.Fatal(err)
	}
	z, err := cl.GetAuthorization(ctx, o.AuthzURLs[0])
	if err != nil {
		t.Fatal(err)
	}
	var chal *acme.Challenge
	for _, c := range z.Challenges {
		if c.Type == "tls-alpn-01" {
			chal = c
		}
	}
	if chal == nil {
		t.Fatalf("no tls-alpn-01 challenge in %+v", z.Challenges)
	}
	cert, err := cl.TLSALPN01ChallengeCert(chal.Token, "reuse.test")
	if err != nil {
		t.Fatal(err)
	}
	env.ServeTLS(t, &tls.Config{
		NextProtos:   []string{acme.ALPNProto},
		Certificates: []tls.Certificate{cert},
	}, nil)
	if _, err := cl.Accept(ctx, chal); err != nil {
		t.Fatal(err)
	}
	if _, err := cl.WaitAuthorization(ctx, z.URI); err != nil {
		t.Fatal(err)
	}

	o2, err := cl.AuthorizeOrder(ctx, acme.DomainIDs("reuse.test"))
	if err != nil {
		t.Fatal(err)
	}
	if o2.Status != acme.StatusReady || len(o2.AuthzURLs) != 1 || o2.AuthzURLs[0] != z.URI {
		t.Errorf("second order %+v, want ready with authorization %s", o2, z.URI)
	}
	if got, want := env.Proxy.Counts("reuse.test"), (Counts{Orders: 2, Authzs: 1, ChallengeResponses: 1}); got != want {
		t.Errorf("Counts = %+v, want %+v", got, want)
	}
}

// TestCloseLeavesOnlyPebble checks that, once Close returns, every
// goroutine the Env started ends except Pebble's own.
func TestCloseLeavesOnlyPebble(t *testing.T) {
	before := goroutines()
	env, err := New(Options{IPv6: true})
	if err != nil {
		t.Fatal(err)
	}
	ctx := testContext(t)
	cl := env.NewClient()
	cl.Key = newKey(t)
	if _, err := cl.Register(ctx, &acme.Account{}, acme.AcceptTOS); err != nil {
		t.Fatal(err)
	}
	env.ServeTLS(t, &tls.Config{GetCertificate: func(*tls.ClientHelloInfo) (*tls.Certificate, error) {
		return nil, errors.New("no certificate")
	}}, nil)
	env.ServePlain(t, nil)
	if err := env.Close(); err != nil {
		t.Fatal(err)
	}

	// Connection goroutines of the client and servers end shortly after
	// their connections close; wait for that, bounded.
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
	m := make(map[string]string)
	for i, g := range leakcheck.Stacks() {
		if i == 0 {
			continue // the calling goroutine
		}
		id, _, _ := strings.Cut(strings.TrimPrefix(g, "goroutine "), " ")
		m[id] = g
	}
	return m
}
