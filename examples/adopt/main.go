// Command adopt is the README's adoption snippet as a whole program: a
// server that gets its certificates from Let's Encrypt's production CA
// through certmgr. It needs ports 80 and 443 and a name pointing at it,
// so its test only builds it.
package main

import (
	"fmt"
	"log"
	"net/http"

	"golang.org/x/crypto/acme/autocert"

	"github.com/certmgr/certmgr"
)

func main() {
	if err := run(); err != nil {
		log.Fatal(err)
	}
}

func run() error {
	m, err := certmgr.New(certmgr.Config{Autocert: &autocert.Manager{
		Cache:      autocert.DirCache("/var/lib/certs"),
		HostPolicy: autocert.HostWhitelist("example.com"),
		Email:      "ops@example.com", // the CA's notices
		// Client nil: Let's Encrypt's production CA
		// (autocert.DefaultACMEDirectory); Prompt nil: its terms accepted.
	}})
	if err != nil {
		return err
	}
	defer m.Close() // waits for attempts in flight
	// Port 80: HTTP-01 validations, and a redirect to HTTPS.
	go http.ListenAndServe(":80", m.HTTPHandler(nil))
	srv := &http.Server{Addr: ":443", TLSConfig: m.TLSConfig(), Handler: http.HandlerFunc(hello)}
	return srv.ListenAndServeTLS("", "")
}

func hello(w http.ResponseWriter, r *http.Request) {
	fmt.Fprintf(w, "Hello from %s\n", r.Host)
}
