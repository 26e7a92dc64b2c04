package certmgr_test

import (
	"context"
	"fmt"
	"io"
	"log"
	"log/slog"
	"net/http"
	"net/netip"
	"time"

	"golang.org/x/crypto/acme/autocert"

	"github.com/certmgr/certmgr"
	"github.com/certmgr/certmgr/certmgrtest"
)

// A server that built its own tls.Config asks certmgr for one instead.
func Example() {
	m, err := certmgr.New(certmgr.Config{
		Autocert: &autocert.Manager{
			Cache:      autocert.DirCache("/var/lib/certmgr"),
			HostPolicy: autocert.HostWhitelist("example.com"),
		},
		DNS: certmgr.DNSCheck{KnownIPs: []netip.Addr{netip.MustParseAddr("203.0.113.7")}},
	})
	if err != nil {
		log.Fatal(err)
	}
	defer m.Close()
	go http.ListenAndServe(":80", m.HTTPHandler(nil)) // http-01, and a redirect to https
	srv := &http.Server{Addr: ":443", TLSConfig: m.TLSConfig()}
	log.Fatal(srv.ListenAndServeTLS("", ""))
}

// Status tells an operator where each domain stands. Here, against an
// embedded ACME CA, one domain gets its certificate and another, whose
// validation fails, backs off.
func ExampleManager_Status() {
	ca, err := certmgrtest.NewServer(certmgrtest.Options{})
	if err != nil {
		log.Fatal(err)
	}
	defer ca.Close()
	ca.DNS.SetA("good.example.test", "127.0.0.1") // where the CA finds this server
	ca.DNS.SetA("bad.example.test", "127.0.0.3")  // where nothing answers

	m, err := certmgr.New(certmgr.Config{
		Autocert: &autocert.Manager{
			Client:     ca.NewClient(),
			HostPolicy: autocert.HostWhitelist("good.example.test", "bad.example.test"),
		},
		Logger: slog.New(slog.NewTextHandler(io.Discard, nil)),
	})
	if err != nil {
		log.Fatal(err)
	}
	defer m.Close()
	srv := &http.Server{TLSConfig: m.TLSConfig()}
	go srv.ServeTLS(ca.TLSListener, "", "")
	defer srv.Close()

	for _, name := range []string{"good.example.test", "bad.example.test"} {
		m.Provision(context.Background(), name)
	}
	for _, s := range m.Domains() {
		switch s.State {
		case certmgr.StateValid:
			fmt.Printf("%s: %v for %v\n", s.Domain, s.State, time.Until(s.NotAfter).Round(24*time.Hour))
		case certmgr.StateBackoff:
			fmt.Printf("%s: %v after %d failure; next attempt in %v\n", s.Domain, s.State, s.Failures,
				time.Until(s.NextAttempt).Round(time.Minute))
		}
	}
	// Output:
	// bad.example.test: backoff after 1 failure; next attempt in 1m0s
	// good.example.test: valid for 2160h0m0s
}

// CheckDNS is the pre-check certmgr runs before every ACME attempt, for
// operators' pre-flight tooling. Here it asks an in-process DNS server.
func ExampleCheckDNS() {
	srv, err := certmgrtest.NewDNSServer()
	if err != nil {
		log.Fatal(err)
	}
	defer srv.Close()
	srv.SetA("ready.example.test", "127.0.0.1")
	srv.SetA("moved.example.test", "127.0.0.2")

	opts := certmgr.DNSCheck{
		KnownIPs:  []netip.Addr{netip.MustParseAddr("127.0.0.1")},
		Resolvers: []string{srv.Addr()},
	}
	for _, name := range []string{"ready.example.test", "moved.example.test"} {
		if err := certmgr.CheckDNS(context.Background(), name, opts); err != nil {
			fmt.Println(err)
			continue
		}
		fmt.Println(name, "is ready")
	}
	// Output:
	// ready.example.test is ready
	// certmgr: DNS not ready: moved.example.test: A 127.0.0.2 is not a known IP (known: 127.0.0.1)
}
