package main

import (
	"bytes"
	"context"
	"crypto/tls"
	"encoding/json"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/certmgr/certmgr/internal/testsupport"
)

const (
	// statusPath is where the status page is served.
	statusPath = "/certmgr/status"
	// shutdownTimeout is how long a shutdown may take.
	shutdownTimeout = 5 * time.Second
)

// domainStatus is the part of a domain's row of the JSON status page that
// the tests check.
type domainStatus struct {
	Domain   string    `json:"domain"`
	State    string    `json:"state"`
	NotAfter time.Time `json:"not_after"`
}

// waitStatusURL returns the URL of the line "status: URL" from lines.
func waitStatusURL(t *testing.T, lines <-chan string) string {
	t.Helper()
	url := testsupport.WaitLines(t, lines, "status: ")["status: "]
	if want := "https://" + testsupport.PebbleDomains[0] + ":"; !strings.HasPrefix(url, want) || !strings.HasSuffix(url, statusPath) {
		t.Fatalf("status URL %q, want %sPORT%s", url, want, statusPath)
	}
	return url
}

// statusClient returns a client that trusts only the root certificate in
// the PEM file rootFile and expects the certificate of serverName.
func statusClient(t *testing.T, rootFile, serverName string) *http.Client {
	t.Helper()
	tr := &http.Transport{TLSClientConfig: &tls.Config{RootCAs: testsupport.RootPool(t, rootFile), ServerName: serverName},
		DialContext: loopbackDial}
	t.Cleanup(tr.CloseIdleConnections)
	return &http.Client{Transport: tr, Timeout: 10 * time.Second}
}

// loopbackDial dials 127.0.0.1 at addr's port, as curl --resolve does
// for the demo names, which resolve nowhere.
func loopbackDial(ctx context.Context, network, addr string) (net.Conn, error) {
	_, port, err := net.SplitHostPort(addr)
	if err != nil {
		return nil, err
	}
	return (&net.Dialer{}).DialContext(ctx, network, net.JoinHostPort("127.0.0.1", port))
}

// get fetches url with the given Accept header and returns the body and
// the Content-Type.
func get(t *testing.T, c *http.Client, url, accept string) (body, contentType string) {
	t.Helper()
	req, err := http.NewRequest(http.MethodGet, url, nil)
	if err != nil {
		t.Fatal(err)
	}
	if accept != "" {
		req.Header.Set("Accept", accept)
	}
	resp, err := c.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("GET %s: %s", url, resp.Status)
	}
	return string(b), resp.Header.Get("Content-Type")
}

// checkJSONStatus checks that the JSON status page lists every demo domain
// as valid, over connections verified for each domain.
func checkJSONStatus(t *testing.T, url, rootFile string) {
	t.Helper()
	for _, d := range testsupport.PebbleDomains {
		c := statusClient(t, rootFile, d)
		for _, tc := range []struct{ url, accept string }{
			{url, "application/json"},
			{url + "?format=json", ""},
		} {
			body, ctype := get(t, c, tc.url, tc.accept)
			if ctype != "application/json" {
				t.Errorf("GET %s (Accept %q): Content-Type %q, want application/json", tc.url, tc.accept, ctype)
			}
			var domains []domainStatus // certmgr.Status as JSON
			if err := json.Unmarshal([]byte(body), &domains); err != nil {
				t.Fatalf("status page: %v\n%s", err, body)
			}
			states := make(map[string]string)
			for _, s := range domains {
				states[s.Domain] = s.State
				if s.State == "valid" && !s.NotAfter.After(time.Now()) {
					t.Errorf("%s: valid, but not_after is %v", s.Domain, s.NotAfter)
				}
			}
			for _, want := range testsupport.PebbleDomains {
				if states[want] != "valid" {
					t.Errorf("%s: state %q, want valid\n%s", want, states[want], body)
				}
			}
		}
	}
}

// TestPebble runs the server in process against the embedded CA.
func TestPebble(t *testing.T) {
	rootFile := filepath.Join(t.TempDir(), "root.pem")
	srv := testsupport.StartServer(t, "run", func(ctx context.Context, stdout, stderr io.Writer) int {
		return run(ctx, []string{"-pebble", "-pebble-root-out", rootFile}, stdout, stderr)
	})

	url := waitStatusURL(t, srv.Lines)
	checkJSONStatus(t, url, rootFile)

	body, ctype := get(t, statusClient(t, rootFile, testsupport.PebbleDomains[0]), url, "text/html")
	if !strings.HasPrefix(ctype, "text/html") {
		t.Errorf("HTML status page: Content-Type %q", ctype)
	}
	for _, want := range append([]string{"<table>", "<td>valid</td>"}, testsupport.PebbleDomains...) {
		if !strings.Contains(body, want) {
			t.Errorf("HTML status page lacks %q:\n%s", want, body)
		}
	}

	srv.Stop(t, shutdownTimeout)
}

// TestSIGTERM builds the command, runs it with -pebble, checks its status
// page over a verified connection and stops it with SIGTERM.
func TestSIGTERM(t *testing.T) {
	if testing.Short() {
		t.Skip("builds the command")
	}
	dir := t.TempDir()
	bin := filepath.Join(dir, "server")
	goTool, err := exec.LookPath("go")
	if err != nil {
		t.Fatalf("the go command is needed to build the server: %v", err)
	}
	build := exec.Command(goTool, "build", "-o", bin, ".")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}

	rootFile := filepath.Join(dir, "root.pem")
	cmd := exec.Command(bin, "-pebble", "-pebble-root-out", rootFile)
	pr, pw, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer pr.Close()
	var stderr testsupport.Buffer
	cmd.Stdout, cmd.Stderr = pw, &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	pw.Close()
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	waited := false
	defer func() {
		if !waited {
			cmd.Process.Kill()
			<-exited
		}
		t.Logf("server log:\n%s", stderr.String())
	}()

	url := waitStatusURL(t, testsupport.Lines(pr))
	checkJSONStatus(t, url, rootFile)

	if err := cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	select {
	case err := <-exited:
		waited = true
		if err != nil {
			t.Errorf("after SIGTERM: %v, want exit status 0", err)
		}
		t.Logf("exited %v after SIGTERM", time.Since(start).Round(time.Millisecond))
	case <-time.After(shutdownTimeout):
		t.Errorf("still running %v after SIGTERM", shutdownTimeout)
	}
}

// TestNoEtcd: this build refuses -etcd, -etcd-prefix and -demo, naming
// the build that has them, before anything starts.
func TestNoEtcd(t *testing.T) {
	for _, args := range [][]string{
		{"-etcd", "http://127.0.0.1:2379"},
		{"-pebble", "-etcd", "http://127.0.0.1:2379"},
		{"-pebble", "-etcd-prefix", "/certmgr/"},
		{"-domain", "example.com", "-etcd", "http://127.0.0.1:2379", "-etcd-prefix", "/certmgr/"},
		{"-demo", "1"},
		{"-demo", "1", "-demo-file", "/tmp/demo.json"},
	} {
		var stdout, stderr bytes.Buffer
		if code := run(context.Background(), args, &stdout, &stderr); code != 2 {
			t.Errorf("server %q: exit status %d, want 2\n%s", args, code, stderr.String())
		}
		msg := stderr.String()
		if !strings.HasPrefix(msg, "server: ") || strings.Count(msg, "\n") != 1 || !strings.HasSuffix(msg, "\n") ||
			!strings.Contains(msg, "no etcd support") || !strings.Contains(msg, "(cd etcdcache && go run ./examples/server -etcd ...)") {
			t.Errorf("server %q: stderr %q, want one line \"server: ...\" naming the etcdcache build", args, msg)
		}
		if stdout.Len() > 0 {
			t.Errorf("server %q: printed %q", args, stdout.String())
		}
	}
}

// TestStartFailures: what cannot start (a port taken, a root file that
// cannot be written) ends the server with status 1 and one "server
// failed" line, having released what it had opened: a listener opened
// before the failure is free again.
func TestStartFailures(t *testing.T) {
	taken, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer taken.Close()
	free, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	freeAddr := free.Addr().String()
	free.Close()

	dir := t.TempDir()
	for name, args := range map[string][]string{
		"HTTPS port taken": {"-domain", "example.com", "-cache-dir", dir, "-https-addr", taken.Addr().String(), "-http-addr", freeAddr},
		"HTTP port taken":  {"-domain", "example.com", "-cache-dir", dir, "-https-addr", freeAddr, "-http-addr", taken.Addr().String()},
		"root not written": {"-pebble", "-pebble-root-out", filepath.Join(dir, "no-such-dir", "root.pem")},
	} {
		var stdout, stderr bytes.Buffer
		if code := run(context.Background(), args, &stdout, &stderr); code != 1 {
			t.Errorf("%s: exit status %d, want 1\n%s", name, code, stderr.String())
		}
		if n := strings.Count(stderr.String(), "msg=\"server failed\""); n != 1 {
			t.Errorf("%s: %d lines \"server failed\", want 1:\n%s", name, n, stderr.String())
		}
		if stdout.Len() > 0 {
			t.Errorf("%s: printed %q", name, stdout.String())
		}
		ln, err := net.Listen("tcp", freeAddr)
		if err != nil {
			t.Errorf("%s: %s not released: %v", name, freeAddr, err)
			continue
		}
		ln.Close()
	}
}
