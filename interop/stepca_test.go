package interop

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"log"
	"math/big"
	"net"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/certmgr/certmgr/certmgrtest"
)

// stepCABinary is the step-ca that TestMain built.
var stepCABinary string

func TestMain(m *testing.M) {
	os.Exit(run(m))
}

func run(m *testing.M) int {
	dir, err := os.MkdirTemp("", "certmgr-interop-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer os.RemoveAll(dir)
	stepCABinary = filepath.Join(dir, "step-ca")
	start := time.Now()
	// In a module of its own, with its own dependency versions.
	build := exec.Command("go", "build", "-o", stepCABinary, "github.com/smallstep/certificates/cmd/step-ca")
	build.Dir = "stepca"
	build.Env = append(os.Environ(), "GOWORK=off", "CGO_ENABLED=0")
	if out, err := build.CombinedOutput(); err != nil {
		fmt.Fprintf(os.Stderr, "building step-ca: %v\n%s", err, out)
		return 1
	}
	fmt.Fprintf(os.Stderr, "step-ca built in %v\n", time.Since(start).Round(100*time.Millisecond))
	return m.Run()
}

// stepCA is a running step-ca with one ACME provisioner, behind a
// counting reverse proxy, resolving names through its own DNS server.
type stepCA struct {
	// DirectoryURL is the ACME directory, at the proxy; HTTPClient
	// trusts the proxy.
	DirectoryURL string
	HTTPClient   *http.Client
	// Roots holds step-ca's root: it verifies what step-ca issues.
	Roots *x509.CertPool
	// DNS answers step-ca's lookups.
	DNS *certmgrtest.DNSServer
	// Counts is what the proxy saw.
	Counts *counts

	log *syncBuffer // step-ca's output
}

// startStepCA starts step-ca for t, validating tls-alpn-01 challenges on
// tlsPort of the address each name resolves to. It is stopped when t
// ends, and its output is shown if t failed.
func startStepCA(t *testing.T, tlsPort int) *stepCA {
	t.Helper()
	dir := t.TempDir()
	rootCert, interCert, interKey := makeCA(t)
	writePEM(t, filepath.Join(dir, "root_ca.crt"), "CERTIFICATE", rootCert.Raw)
	writePEM(t, filepath.Join(dir, "intermediate_ca.crt"), "CERTIFICATE", interCert.Raw)
	keyDER, err := x509.MarshalECPrivateKey(interKey)
	if err != nil {
		t.Fatal(err)
	}
	writePEM(t, filepath.Join(dir, "intermediate_ca_key"), "EC PRIVATE KEY", keyDER)

	dns, err := certmgrtest.NewDNSServer()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { dns.Close() })

	addr := freeAddr(t, "127.0.0.1")
	config := map[string]any{
		"root":     filepath.Join(dir, "root_ca.crt"),
		"crt":      filepath.Join(dir, "intermediate_ca.crt"),
		"key":      filepath.Join(dir, "intermediate_ca_key"),
		"address":  addr,
		"dnsNames": []string{"127.0.0.1", "localhost"},
		"logger":   map[string]string{"format": "text"},
		"db":       map[string]string{"type": "bbolt", "dataSource": filepath.Join(dir, "db")},
		"authority": map[string]any{
			"provisioners": []map[string]string{{"type": "ACME", "name": "acme"}},
		},
	}
	b, err := json.Marshal(config)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "ca.json"), b, 0o600); err != nil {
		t.Fatal(err)
	}

	ctx, cancel := context.WithCancel(context.Background())
	cmd := exec.CommandContext(ctx, stepCABinary, filepath.Join(dir, "ca.json"),
		"--insecure", "--acme-tls-port", strconv.Itoa(tlsPort), "--resolver", dns.Addr())
	cmd.Env = append(os.Environ(), "STEPPATH="+filepath.Join(dir, "step"), "HOME="+dir)
	ca := &stepCA{log: &syncBuffer{}, DNS: dns, Counts: newCounts()}
	cmd.Stdout, cmd.Stderr = ca.log, ca.log
	cmd.WaitDelay = 5 * time.Second
	if err := cmd.Start(); err != nil {
		cancel()
		t.Fatal(err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	t.Cleanup(func() {
		cancel()
		<-exited
		if t.Failed() {
			t.Logf("step-ca's output:\n%s", ca.log)
		}
	})

	ca.Roots = x509.NewCertPool()
	ca.Roots.AddCert(rootCert)
	upstream := &http.Transport{TLSClientConfig: &tls.Config{RootCAs: ca.Roots}}
	t.Cleanup(upstream.CloseIdleConnections)
	target := &url.URL{Scheme: "https", Host: addr}
	front := httptest.NewUnstartedServer(&httputil.ReverseProxy{
		// step-ca builds the URLs it returns from the Host header: they
		// then lead back to the proxy.
		Rewrite: func(r *httputil.ProxyRequest) {
			r.SetURL(target)
			r.Out.Host = r.In.Host
		},
		Transport:      upstream,
		ModifyResponse: ca.Counts.observe,
		ErrorLog:       log.New(ca.log, "proxy: ", 0), // step-ca is not up yet, say
	})
	front.StartTLS()
	t.Cleanup(front.Close)
	ca.HTTPClient = front.Client()
	ca.DirectoryURL = front.URL + "/acme/acme/directory"

	// Ready once it serves its directory.
	deadline := time.Now().Add(30 * time.Second)
	for {
		res, err := ca.HTTPClient.Get(ca.DirectoryURL)
		if err == nil {
			res.Body.Close()
			if res.StatusCode == http.StatusOK {
				break
			}
		}
		select {
		case err := <-exited:
			t.Fatalf("step-ca exited: %v\n%s", err, ca.log)
		case <-time.After(50 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			t.Fatalf("step-ca does not serve its directory after 30 s: %v\n%s", err, ca.log)
		}
	}
	return ca
}

// makeCA returns a root and an intermediate certificate, P-256, and the
// intermediate's key.
func makeCA(t *testing.T) (root, inter *x509.Certificate, interKey *ecdsa.PrivateKey) {
	t.Helper()
	rootKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	interKey, err = ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	now := time.Now()
	rootTmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "certmgr interop root"},
		NotBefore: now.Add(-time.Hour), NotAfter: now.Add(24 * time.Hour),
		KeyUsage: x509.KeyUsageCertSign | x509.KeyUsageCRLSign, BasicConstraintsValid: true, IsCA: true, MaxPathLen: 1,
	}
	rootDER, err := x509.CreateCertificate(rand.Reader, rootTmpl, rootTmpl, rootKey.Public(), rootKey)
	if err != nil {
		t.Fatal(err)
	}
	root, err = x509.ParseCertificate(rootDER)
	if err != nil {
		t.Fatal(err)
	}
	interTmpl := &x509.Certificate{
		SerialNumber: big.NewInt(2), Subject: pkix.Name{CommonName: "certmgr interop intermediate"},
		NotBefore: now.Add(-time.Hour), NotAfter: now.Add(24 * time.Hour),
		KeyUsage: x509.KeyUsageCertSign | x509.KeyUsageCRLSign, BasicConstraintsValid: true, IsCA: true, MaxPathLen: 0, MaxPathLenZero: true,
	}
	interDER, err := x509.CreateCertificate(rand.Reader, interTmpl, root, interKey.Public(), rootKey)
	if err != nil {
		t.Fatal(err)
	}
	inter, err = x509.ParseCertificate(interDER)
	if err != nil {
		t.Fatal(err)
	}
	return root, inter, interKey
}

func writePEM(t *testing.T, path, typ string, der []byte) {
	t.Helper()
	if err := os.WriteFile(path, pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der}), 0o600); err != nil {
		t.Fatal(err)
	}
}

// freeAddr returns host:port with a port free on host a moment ago.
func freeAddr(t *testing.T, host string) string {
	t.Helper()
	l, err := net.Listen("tcp", net.JoinHostPort(host, "0"))
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}

// counts is what the proxy in front of step-ca saw, by identifier.
type counts struct {
	mu         sync.Mutex
	orders     map[string]int       // new orders step-ca made
	failed     map[string]int       // authorizations shown with a challenge's error, or invalid
	firstError map[string]time.Time // when the first such answer passed
	detail     map[string]string    // the first error's detail
	seen       map[string]bool      // authorization URLs counted in failed
	serverErrs int                  // 5xx answers
}

func newCounts() *counts {
	return &counts{orders: make(map[string]int), failed: make(map[string]int),
		firstError: make(map[string]time.Time), detail: make(map[string]string), seen: make(map[string]bool)}
}

// observe reads one answer of step-ca's as it passes.
func (c *counts) observe(res *http.Response) error {
	body, err := io.ReadAll(res.Body)
	res.Body.Close()
	res.Body = io.NopCloser(bytes.NewReader(body))
	if err != nil {
		return err
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	path := res.Request.URL.Path
	switch {
	case res.StatusCode >= 500:
		c.serverErrs++
	case strings.HasSuffix(path, "/new-order") && res.StatusCode == http.StatusCreated:
		var o struct{ Identifiers []struct{ Value string } }
		if json.Unmarshal(body, &o) == nil {
			for _, id := range o.Identifiers {
				c.orders[id.Value]++
			}
		}
	case strings.Contains(path, "/authz/") && res.StatusCode == http.StatusOK:
		var z struct {
			Status     string
			Identifier struct{ Value string }
			Challenges []struct {
				Status string
				Error  *struct{ Type, Detail string }
			}
		}
		if json.Unmarshal(body, &z) != nil {
			return nil
		}
		failed, detail := z.Status == "invalid", ""
		for _, ch := range z.Challenges {
			failed = failed || ch.Error != nil || ch.Status == "invalid"
			if ch.Error != nil {
				detail = ch.Error.Detail
			}
		}
		if failed && !c.seen[path] {
			c.seen[path] = true
			c.failed[z.Identifier.Value]++
			if _, ok := c.firstError[z.Identifier.Value]; !ok {
				c.firstError[z.Identifier.Value] = time.Now()
				c.detail[z.Identifier.Value] = detail
			}
		}
	}
	return nil
}

// of returns the orders and failed authorizations seen for name.
func (c *counts) of(name string) (orders, failed int) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.orders[name], c.failed[name]
}

// firstErr returns when the first answer that carried an error for name
// passed, and the error's detail.
func (c *counts) firstErr(name string) (time.Time, string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.firstError[name], c.detail[name]
}

// errs5xx returns the 5xx answers seen.
func (c *counts) errs5xx() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.serverErrs
}

// syncBuffer is a bytes.Buffer safe for concurrent use.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.String()
}

// serveTLS accepts connections on l and completes a handshake on each
// with config, until t ends.
func serveTLS(t *testing.T, l net.Listener, config *tls.Config) {
	t.Helper()
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			wg.Add(1)
			go func() {
				defer wg.Done()
				defer c.Close()
				tc := tls.Server(c, config)
				ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
				defer cancel()
				if tc.HandshakeContext(ctx) == nil {
					// Give the client time to read the handshake's end.
					c.SetReadDeadline(time.Now().Add(time.Second))
					io.Copy(io.Discard, c)
				}
			}()
		}
	}()
	t.Cleanup(func() {
		l.Close()
		wg.Wait()
	})
}

// listenPair listens on 127.0.0.1 and on other (another loopback address)
// at one port, for step-ca validates every name on one port.
func listenPair(t *testing.T, other string) (main, second net.Listener) {
	t.Helper()
	for range 20 {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		_, port, _ := net.SplitHostPort(l.Addr().String())
		l2, err := net.Listen("tcp", net.JoinHostPort(other, port))
		if err == nil {
			return l, l2
		}
		l.Close()
		if !errors.Is(err, syscall.EADDRINUSE) {
			t.Fatal(err)
		}
	}
	t.Fatal("no port free on both addresses")
	return nil, nil
}

// TestStepCAPinned: the stepca module pins step-ca. Reading its go.mod
// and go.sum here also ties go test's cached results to them: TestMain's
// build of step-ca happens in a child process, whose reads the test cache
// does not see, and before the test log starts.
func TestStepCAPinned(t *testing.T) {
	mod, err := os.ReadFile(filepath.Join("stepca", "go.mod"))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := os.ReadFile(filepath.Join("stepca", "go.sum")); err != nil {
		t.Fatal(err)
	}
	if !regexp.MustCompile(`(?m)^\s*(require\s+)?github\.com/smallstep/certificates v\d+\.\d+\.\d+(\s|$)`).Match(mod) {
		t.Errorf("stepca/go.mod does not require a released step-ca:\n%s", mod)
	}
}
