package certmgrtest_test

import (
	"context"
	"fmt"
	"log"
	"time"

	"github.com/certmgr/certmgr"
	"github.com/certmgr/certmgr/certmgrtest"
)

// A certmgr.Manager obtains its first certificate from the test CA over
// TLS-ALPN-01, during a handshake.
func Example() {
	srv, err := certmgrtest.NewServer(certmgrtest.Options{})
	if err != nil {
		log.Fatal(err)
	}
	defer srv.Close()
	m, err := certmgr.New(certmgr.Config{Autocert: srv.Autocert("www.example.test")})
	if err != nil {
		log.Fatal(err)
	}
	defer m.Close()
	srv.ServeTLS(m.TLSConfig(), nil)
	cs, err := srv.Handshake(context.Background(), "www.example.test")
	if err != nil {
		log.Fatal(err)
	}
	leaf := cs.PeerCertificates[0]
	fmt.Println(leaf.DNSNames, leaf.NotAfter.Sub(leaf.NotBefore).Round(time.Hour))
	// Output: [www.example.test] 2160h0m0s
}
