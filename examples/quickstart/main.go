// Command quickstart obtains a real certificate from a real ACME CA and
// serves HTTPS with it, all on this machine and in under a second.
//
// The CA is Pebble, Let's Encrypt's test CA, started in process together
// with a DNS server that it uses to find the names it validates. Nothing
// leaves the loopback interface. Run it with:
//
//	go run ./examples/quickstart
package main

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"os"
	"time"

	"github.com/certmgr/certmgr"
	"github.com/certmgr/certmgr/certmgrtest"
)

// name is the demo domain. It exists only in the embedded DNS server.
const name = "quickstart.test"

func main() {
	if err := run(os.Stdout); err != nil {
		fmt.Fprintln(os.Stderr, "quickstart:", err)
		os.Exit(1)
	}
}

// run runs the demo and reports on w.
func run(w io.Writer) error {
	// 1. Start the CA and its DNS server.
	ca, err := certmgrtest.NewServer(certmgrtest.Options{})
	if err != nil {
		return err
	}
	defer ca.Close()

	// 2. Create the Manager. Autocert holds the ACME settings: ca.Autocert
	// makes them for the CA and, in the CA's DNS server, points the demo
	// name at 127.0.0.1, where our HTTPS server will listen. certmgr adds
	// a DNS pre-check (name must resolve to one of DNS.KnownIPs before the
	// CA is asked), backoff, status and events. OnEvent tells us which
	// challenge the CA validated.
	obtained := make(chan certmgr.Event, 1)
	m, err := certmgr.New(certmgr.Config{
		Autocert: ca.Autocert(name),
		Logger:   slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelInfo})),
		DNS: certmgr.DNSCheck{
			KnownIPs:  []netip.Addr{netip.MustParseAddr("127.0.0.1")},
			Resolvers: []string{ca.DNS.Addr()},
		},
		OnEvent: func(e certmgr.Event) {
			if e.Kind == certmgr.EventObtained {
				select {
				case obtained <- e:
				default:
				}
			}
		},
	})
	if err != nil {
		return err
	}
	defer m.Close()

	// 3. Serve HTTPS with the Manager's TLS config, on the port where the
	// CA sends its TLS-ALPN-01 validation (443 in real life).
	srv := &http.Server{
		TLSConfig: m.TLSConfig(),
		Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			fmt.Fprintf(w, "Hello from %s\n", r.Host)
		}),
	}
	go srv.ServeTLS(ca.TLSListener, "", "")
	defer func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		srv.Shutdown(ctx)
	}()

	// 4. Visit https://quickstart.test/ as a browser would, trusting the
	// CA's root. The first handshake makes certmgr obtain the certificate.
	addr := ca.TLSListener.Addr().String()
	client := &http.Client{
		Timeout: 20 * time.Second,
		Transport: &http.Transport{
			TLSClientConfig: &tls.Config{RootCAs: ca.Roots, ServerName: name},
			DialContext: func(ctx context.Context, network, _ string) (net.Conn, error) {
				return (&net.Dialer{}).DialContext(ctx, network, addr)
			},
		},
	}
	start := time.Now()
	resp, err := client.Get("https://" + name + "/")
	if err != nil {
		return err
	}
	took := time.Since(start)
	resp.Body.Close()
	client.CloseIdleConnections()

	// 5. Report what happened.
	// OnEvent is called before the handshake that waited for the
	// certificate goes on, so the event is here already.
	var ev certmgr.Event
	select {
	case ev = <-obtained:
	default:
		return errors.New("no certificate was obtained")
	}
	leaf := resp.TLS.PeerCertificates[0]
	fmt.Fprintf(w, "domain:    %s\n", name)
	fmt.Fprintf(w, "challenge: %s\n", ev.Challenge)
	fmt.Fprintf(w, "issuer:    %s\n", leaf.Issuer.CommonName)
	fmt.Fprintf(w, "valid:     %s → %s (UTC)\n", leaf.NotBefore.UTC().Format(time.DateTime), leaf.NotAfter.UTC().Format(time.DateTime))
	fmt.Fprintf(w, "took:      %s (first request, issuance included)\n", took.Round(time.Millisecond))
	fmt.Fprintf(w, "orders:    %d\n", ca.Proxy.Counts(name).Orders)
	fmt.Fprintf(w, "response:  %s\n", resp.Status)
	fmt.Fprintf(w, "state:     %s\n", m.Status(name).State)
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("unexpected response %s", resp.Status)
	}
	return nil
}
