package certmgrtest

import (
	"context"
	"crypto/tls"
	"errors"
	"net/http"
	"testing"
	"time"

	"golang.org/x/crypto/acme"
)

// waitFor waits, at most 10 s, until cond returns true.
func waitFor(t *testing.T, p *Proxy, cond func() bool) {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
	defer cancel()
	if err := p.WaitFor(ctx, cond); err != nil {
		t.Fatalf("condition not met: %v (requests: %d, totals: %+v)", err, p.Requests(ClassAny), p.Total())
	}
}

// TestFailedAuthz lets TLS-ALPN-01 fail (the listener is closed; a listener
// that is open but not served would hold the VA for its 15 s timeout) and
// checks the failure is counted with its problem.
func TestFailedAuthz(t *testing.T) {
	srv := Start(t, Options{})
	m := srv.Autocert("f.test")
	srv.TLSListener.Close()

	if _, err := m.GetCertificate(helloFor("f.test")); err == nil {
		t.Fatal("GetCertificate succeeded without a challenge server")
	}
	// autocert's second order finds no challenge type left to try.
	want := Counts{Orders: 2, Authzs: 2, ChallengeResponses: 1, FailedAuthzs: 1}
	if got := srv.Proxy.Counts("f.test"); got != want {
		t.Errorf("Counts = %+v, want %+v", got, want)
	}
	var found bool
	for _, p := range srv.Proxy.Problems() {
		if p.Class == ClassAuthz && !p.Injected && len(p.Identifiers) == 1 && p.Identifiers[0] == "f.test" {
			found = true
			t.Logf("problem: %s: %s", p.Type, p.Detail)
		}
	}
	if !found {
		t.Errorf("no challenge problem recorded: %+v", srv.Proxy.Problems())
	}
}

// TestRateLimitRule answers new-order with 429 and checks acme.RateLimit
// recognizes the error.
func TestRateLimitRule(t *testing.T) {
	srv := Start(t, Options{})
	ctx := testContext(t)
	srv.Proxy.AddRule(Rule{
		Class:      ClassNewOrder,
		Identifier: "r.test",
		Status:     http.StatusTooManyRequests,
		RetryAfter: "120",
		Detail:     "too many certificates",
		Times:      1,
	})

	cl := srv.NewClient()
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
	if got := srv.Proxy.Counts("r.test"); got.Orders != 0 {
		t.Errorf("Counts = %+v, want no order", got)
	}
	probs := srv.Proxy.Problems()
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
	if got := srv.Proxy.Counts("r.test"); got.Orders != 1 || got.Authzs != 1 {
		t.Errorf("Counts = %+v, want 1 order, 1 authz", got)
	}
}

// TestHoldAndMalformedDirectory checks Hold with Release, WaitFor, and a
// Body override.
func TestHoldAndMalformedDirectory(t *testing.T) {
	srv := Start(t, Options{})
	ctx := testContext(t)

	remove := srv.Proxy.AddRule(Rule{Class: ClassDirectory, Status: http.StatusOK, Body: "{not json"})
	cl := srv.NewClient()
	if _, err := cl.Discover(ctx); err == nil {
		t.Fatal("Discover accepted a malformed directory")
	}
	remove()

	srv.Proxy.AddRule(Rule{Class: ClassDirectory, Hold: true, Times: 1})
	done := make(chan error, 1)
	go func() {
		_, err := srv.NewClient().Discover(ctx)
		done <- err
	}()
	waitFor(t, srv.Proxy, func() bool { return srv.Proxy.Requests(ClassDirectory) == 2 })
	select {
	case err := <-done:
		t.Fatalf("held Discover returned: %v", err)
	default:
	}
	srv.Proxy.Release()
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
	srv, err := NewServer(Options{})
	if err != nil {
		t.Fatal(err)
	}
	srv.Proxy.AddRule(Rule{Hold: true})
	done := make(chan error, 1)
	go func() {
		_, err := srv.NewClient().Discover(t.Context())
		done <- err
	}()
	waitFor(t, srv.Proxy, func() bool { return srv.Proxy.Requests(ClassAny) == 1 })
	if err := srv.Close(); err != nil {
		t.Fatal(err)
	}
	if err := <-done; err == nil {
		t.Fatal("Discover succeeded through a closed proxy")
	}
}

// TestAuthzReuse checks the documented reuse of a valid authorization by
// a later order of the same account, using acme.Client directly, and that
// ExpireAuthorizations ends it.
func TestAuthzReuse(t *testing.T) {
	srv := Start(t, Options{})
	srv.DNS.SetA("reuse.test", "127.0.0.1")
	ctx := testContext(t)
	cl := srv.NewClient()
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
	err = srv.ServeTLS(&tls.Config{
		NextProtos:   []string{acme.ALPNProto},
		Certificates: []tls.Certificate{cert},
	}, nil)
	if err != nil {
		t.Fatal(err)
	}
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
	if got, want := srv.Proxy.Counts("reuse.test"), (Counts{Orders: 2, Authzs: 1, ChallengeResponses: 1}); got != want {
		t.Errorf("Counts = %+v, want %+v", got, want)
	}

	if n := srv.Proxy.ExpireAuthorizations("REUSE.test"); n != 1 {
		t.Errorf("ExpireAuthorizations = %d, want 1", n)
	}
	o3, err := cl.AuthorizeOrder(ctx, acme.DomainIDs("reuse.test"))
	if err != nil {
		t.Fatal(err)
	}
	if o3.Status != acme.StatusPending || len(o3.AuthzURLs) != 1 || o3.AuthzURLs[0] == z.URI {
		t.Errorf("third order %+v, want pending with a new authorization", o3)
	}
	if got, want := srv.Proxy.Counts("reuse.test"), (Counts{Orders: 3, Authzs: 2, ChallengeResponses: 1}); got != want {
		t.Errorf("Counts = %+v, want %+v", got, want)
	}
}

func TestClassString(t *testing.T) {
	for c, want := range map[Class]string{ClassAny: "any", ClassNewOrder: "new-order", ClassOther: "other", ClassOther + 1: "Class(13)"} {
		if got := c.String(); got != want {
			t.Errorf("Class(%d).String() = %q, want %q", int(c), got, want)
		}
	}
}

// TestKeepPending: with Options.PendingFailures, an invalid authorization
// or order is shown pending, and so is a challenge that could not
// connect, with its error; a challenge that failed otherwise stays
// invalid, and anything else is passed as it is.
func TestKeepPending(t *testing.T) {
	for _, tt := range []struct {
		class    Class
		in, want string
	}{
		{ClassAuthz,
			`{"status":"invalid","challenges":[{"status":"invalid","error":{"type":"urn:ietf:params:acme:error:unauthorized","detail":"Failed to connect to 127.0.0.3:5001 for the tls-alpn-01 challenge"}}]}`,
			`{"challenges":[{"error":{"type":"urn:ietf:params:acme:error:unauthorized","detail":"Failed to connect to 127.0.0.3:5001 for the tls-alpn-01 challenge"},"status":"pending"}],"status":"pending"}`},
		{ClassAuthz,
			`{"status":"invalid","challenges":[{"status":"invalid","error":{"type":"urn:ietf:params:acme:error:unauthorized","detail":"Cannot negotiate ALPN protocol"}}]}`,
			`{"challenges":[{"error":{"type":"urn:ietf:params:acme:error:unauthorized","detail":"Cannot negotiate ALPN protocol"},"status":"invalid"}],"status":"pending"}`},
		{ClassChallenge,
			`{"status":"invalid","error":{"type":"urn:ietf:params:acme:error:connection","detail":"refused"}}`,
			`{"error":{"type":"urn:ietf:params:acme:error:connection","detail":"refused"},"status":"pending"}`},
		{ClassOrder, `{"status":"invalid"}`, `{"status":"pending"}`},
		{ClassAuthz, `{"status":"valid","challenges":[]}`, `{"status":"valid","challenges":[]}`},
		{ClassCert, `{"status":"invalid"}`, `{"status":"invalid"}`},
		{ClassAuthz, `not json`, `not json`},
	} {
		if got := string(keepPending(tt.class, []byte(tt.in))); got != tt.want {
			t.Errorf("keepPending(%v, %s) =\n %s, want\n %s", tt.class, tt.in, got, tt.want)
		}
	}
}
