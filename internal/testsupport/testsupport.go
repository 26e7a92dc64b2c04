// Package testsupport holds the helpers that the tests of several of this
// repository's packages and modules share: a log buffer, a settable
// clock, a browser's ClientHelloInfo, and what the tests of the
// examples' server need to run it and read its output.
package testsupport

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"io"
	"os"
	"strings"
	"sync"
	"testing"
	"time"
)

// Buffer is a bytes.Buffer safe for concurrent use. The zero value is an
// empty buffer.
type Buffer struct {
	mu sync.Mutex // guards b
	b  bytes.Buffer
}

func (b *Buffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.Write(p)
}

func (b *Buffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.String()
}

// Clock is a settable clock, safe for concurrent use: it moves only when
// told.
type Clock struct {
	mu sync.Mutex // guards t
	t  time.Time
}

// NewClock returns a clock at t.
func NewClock(t time.Time) *Clock { return &Clock{t: t} }

// Now returns the clock's time.
func (c *Clock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.t
}

// Advance moves the clock by d, back if d is negative.
func (c *Clock) Advance(d time.Duration) {
	c.mu.Lock()
	c.t = c.t.Add(d)
	c.mu.Unlock()
}

// Hello returns a modern browser's hello for name: TLS 1.3 and 1.2,
// ECDSA offered.
func Hello(name string) *tls.ClientHelloInfo {
	return &tls.ClientHelloInfo{
		ServerName:        name,
		SupportedVersions: []uint16{tls.VersionTLS13, tls.VersionTLS12},
		SignatureSchemes:  []tls.SignatureScheme{tls.ECDSAWithP256AndSHA256, tls.PSSWithSHA256, tls.PKCS1WithSHA256},
		SupportedCurves:   []tls.CurveID{tls.X25519, tls.CurveP256},
		CipherSuites: []uint16{tls.TLS_AES_128_GCM_SHA256, tls.TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
			tls.TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256},
	}
}

// PebbleDomains are the domains the examples' server serves by default
// with -pebble.
var PebbleDomains = []string{"a.pebble.test", "b.pebble.test"}

// Lines sends r's lines to the returned channel, which is closed at EOF.
func Lines(r io.Reader) <-chan string {
	lines := make(chan string, 64)
	go func() {
		defer close(lines)
		s := bufio.NewScanner(r)
		for s.Scan() {
			lines <- s.Text()
		}
	}()
	return lines
}

// WaitLines reads lines until one starts with each prefix of want, for
// 30 s at most, and returns the rest of those lines by prefix.
func WaitLines(t testing.TB, lines <-chan string, want ...string) map[string]string {
	t.Helper()
	got := make(map[string]string)
	timeout := time.After(30 * time.Second)
	for len(got) < len(want) {
		select {
		case line, ok := <-lines:
			if !ok {
				t.Fatalf("the server's output ended before lines starting with each of %q; lines seen: %v", want, got)
			}
			for _, p := range want {
				if rest, ok := strings.CutPrefix(line, p); ok {
					got[p] = rest
				}
			}
		case <-timeout:
			t.Fatalf("not all of %q within 30 s; lines seen: %v", want, got)
		}
	}
	return got
}

// Server is a server command's run function running in this process.
type Server struct {
	// Lines are the lines of its standard output; the channel is closed
	// when run returns.
	Lines <-chan string
	// Stderr is its standard error.
	Stderr *Buffer

	name   string
	cancel context.CancelFunc
	done   chan int
}

// StartServer calls run in a goroutine, with a context that Stop or the
// end of t cancels, and logs run's standard error when t ends. name is
// run's name in failure messages.
func StartServer(t testing.TB, name string, run func(ctx context.Context, stdout, stderr io.Writer) int) *Server {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	pr, pw := io.Pipe()
	s := &Server{Stderr: &Buffer{}, name: name, cancel: cancel, done: make(chan int, 1)}
	go func() {
		s.done <- run(ctx, pw, s.Stderr)
		pw.Close()
	}()
	s.Lines = Lines(pr)
	t.Cleanup(func() {
		t.Helper()
		cancel()
		t.Logf("server log:\n%s", s.Stderr.String())
	})
	return s
}

// Stop cancels run's context and fails t unless run returns 0 within
// timeout.
func (s *Server) Stop(t testing.TB, timeout time.Duration) {
	t.Helper()
	s.cancel()
	select {
	case code := <-s.done:
		if code != 0 {
			t.Errorf("%s returned %d, want 0", s.name, code)
		}
	case <-time.After(timeout):
		t.Fatalf("%s still running %v after its context ended", s.name, timeout)
	}
}

// RootPool returns a pool of the certificates in the PEM file rootFile,
// such as the one a server given -pebble-root-out writes.
func RootPool(t testing.TB, rootFile string) *x509.CertPool {
	t.Helper()
	pemData, err := os.ReadFile(rootFile)
	if err != nil {
		t.Fatal(err)
	}
	roots := x509.NewCertPool()
	if !roots.AppendCertsFromPEM(pemData) {
		t.Fatalf("%s holds no PEM certificate", rootFile)
	}
	return roots
}
