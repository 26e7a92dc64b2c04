package main

import (
	"context"
	"crypto/tls"
	"io"
	"net"
	"net/http"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/certmgr/certmgr/internal/testsupport"
)

// TestMetrics runs the server against the embedded CA and reads its
// /metrics: every demo domain's certificate, valid.
func TestMetrics(t *testing.T) {
	rootFile := filepath.Join(t.TempDir(), "root.pem")
	srv := testsupport.StartServer(t, "run", func(ctx context.Context, stdout, stderr io.Writer) int {
		return run(ctx, []string{"-pebble", "-pebble-root-out", rootFile}, stdout, stderr)
	})
	status := testsupport.WaitLines(t, srv.Lines, "status: ")["status: "]
	url := strings.TrimSuffix(status, "/certmgr/status") + "/metrics"
	tr := &http.Transport{TLSClientConfig: &tls.Config{RootCAs: testsupport.RootPool(t, rootFile), ServerName: testsupport.PebbleDomains[0]},
		DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
			_, port, err := net.SplitHostPort(addr) // the demo names resolve nowhere: as curl --resolve
			if err != nil {
				return nil, err
			}
			return (&net.Dialer{}).DialContext(ctx, network, net.JoinHostPort("127.0.0.1", port))
		}}
	t.Cleanup(tr.CloseIdleConnections)
	res, err := (&http.Client{Transport: tr, Timeout: 10 * time.Second}).Get(url)
	if err != nil {
		t.Fatal(err)
	}
	body, err := io.ReadAll(res.Body)
	res.Body.Close()
	if err != nil || res.StatusCode != http.StatusOK {
		t.Fatalf("GET %s: %d, %v", url, res.StatusCode, err)
	}
	for _, d := range testsupport.PebbleDomains {
		for _, want := range []string{`certmgr_domain_state{domain="` + d + `",state="valid"} 1`,
			`certmgr_certificate_expiration_timestamp_seconds{domain="` + d + `"}`} {
			if !strings.Contains(string(body), want) {
				t.Errorf("/metrics lacks %q:\n%s", want, body)
			}
		}
	}
	srv.Stop(t, 5*time.Second)
}
