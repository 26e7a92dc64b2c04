package interop

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/crypto/acme"
	"golang.org/x/crypto/acme/autocert"

	"github.com/certmgr/certmgr"
)

var renewWatch = flag.Duration("renew.watch", 0, "how long TestStepCARenewBeforeLongerThanTheLifetime watches for orders once the renewals were refused")

// newManager returns a Manager of step-ca's on the DirCache dir for names,
// logging to logs; mod, if not nil, changes its Config first. It is
// closed when t ends.
func newManager(t *testing.T, ca *stepCA, dir string, logs *syncBuffer, names []string, mod func(*certmgr.Config)) *certmgr.Manager {
	t.Helper()
	cfg := certmgr.Config{
		Autocert: &autocert.Manager{
			Cache:      autocert.DirCache(dir),
			Client:     &acme.Client{DirectoryURL: ca.DirectoryURL, HTTPClient: ca.HTTPClient},
			HostPolicy: autocert.HostWhitelist(names...),
			Prompt:     autocert.AcceptTOS,
		},
		Logger: slog.New(slog.NewTextHandler(logs, &slog.HandlerOptions{Level: slog.LevelDebug})),
	}
	if mod != nil {
		mod(&cfg)
	}
	m, err := certmgr.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		m.Close()
		if t.Failed() {
			t.Logf("certmgr's log:\n%s", logs)
		}
	})
	return m
}

// handshake connects to addr with SNI name and returns the chain served
// and how long the handshake took.
func handshake(addr, name string) ([]*x509.Certificate, time.Duration, error) {
	start := time.Now()
	d := &tls.Dialer{Config: &tls.Config{ServerName: name, InsecureSkipVerify: true}}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	c, err := d.DialContext(ctx, "tcp", addr)
	took := time.Since(start)
	if err != nil {
		return nil, took, err
	}
	defer c.Close()
	return c.(*tls.Conn).ConnectionState().PeerCertificates, took, nil
}

// verify checks that chain is step-ca's certificate for name.
func verify(ca *stepCA, name string, chain []*x509.Certificate) error {
	if len(chain) == 0 {
		return errors.New("no certificate")
	}
	inter := x509.NewCertPool()
	for _, c := range chain[1:] {
		inter.AddCert(c)
	}
	_, err := chain[0].Verify(x509.VerifyOptions{DNSName: name, Roots: ca.Roots, Intermediates: inter})
	return err
}

// spends returns the failed authorizations that the failure record of
// name, persisted in the DirCache dir, holds.
func spends(t *testing.T, dir, name string) int {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(dir, "certmgr+state"))
	if err != nil {
		t.Fatal(err)
	}
	var st struct {
		Domains map[string]struct {
			Spends []struct {
				Authz int `json:"authz"`
			} `json:"spends"`
		} `json:"domains"`
	}
	if err := json.Unmarshal(b, &st); err != nil {
		t.Fatal(err)
	}
	n := 0
	for _, s := range st.Domains[name].Spends {
		n += s.Authz
	}
	return n
}

// waitFor polls cond until it holds, or fails t after d.
func waitFor(t *testing.T, d time.Duration, what string, cond func() bool) {
	t.Helper()
	for deadline := time.Now().Add(d); !cond(); time.Sleep(20 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %v waiting for %s", d, what)
		}
	}
}

// TestStepCAIssues: a certificate from step-ca, by a handshake and by
// Provision, verified against step-ca's root; that step-ca offers no
// renewal information is said once.
func TestStepCAIssues(t *testing.T) {
	t.Parallel()
	const byHandshake, byProvision = "handshake.step.test", "provision.step.test"
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ca := startStepCA(t, l.Addr().(*net.TCPAddr).Port)
	ca.DNS.SetA(byHandshake, "127.0.0.1")
	ca.DNS.SetA(byProvision, "127.0.0.1")
	logs := &syncBuffer{}
	m := newManager(t, ca, t.TempDir(), logs, []string{byHandshake, byProvision}, nil)
	serveTLS(t, l, m.TLSConfig())

	chain, took, err := handshake(l.Addr().String(), byHandshake)
	if err != nil {
		t.Fatal(err)
	}
	if err := verify(ca, byHandshake, chain); err != nil {
		t.Errorf("the handshake's certificate: %v", err)
	}
	t.Logf("issued by a handshake in %v", took.Round(time.Millisecond))

	start := time.Now()
	if err := m.Provision(t.Context(), byProvision); err != nil {
		t.Fatal(err)
	}
	t.Logf("issued by Provision in %v", time.Since(start).Round(time.Millisecond))
	c, err := m.GetCertificate(&tls.ClientHelloInfo{ServerName: byProvision, SignatureSchemes: []tls.SignatureScheme{tls.ECDSAWithP256AndSHA256},
		SupportedCurves: []tls.CurveID{tls.CurveP256}, CipherSuites: []uint16{tls.TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256}})
	if err != nil {
		t.Fatal(err)
	}
	chain = nil
	for _, der := range c.Certificate {
		cert, err := x509.ParseCertificate(der)
		if err != nil {
			t.Fatal(err)
		}
		chain = append(chain, cert)
	}
	if err := verify(ca, byProvision, chain); err != nil {
		t.Errorf("Provision's certificate: %v", err)
	}
	for _, name := range []string{byHandshake, byProvision} {
		if st := m.Status(name); st.State != certmgr.StateValid {
			t.Errorf("%s: %+v, want valid", name, st)
		}
		if orders, failed := ca.Counts.of(name); orders != 1 || failed != 0 {
			t.Errorf("%s: %d orders, %d failed authorizations; want 1 and 0", name, orders, failed)
		}
	}
	// step-ca's directory has no renewalInfo: said once.
	waitFor(t, 10*time.Second, "the log to say the CA offers no renewal information", func() bool {
		return strings.Contains(logs.String(), "renewal information not offered")
	})
	if n := strings.Count(logs.String(), "renewal information not offered"); n != 1 {
		t.Errorf("%d log lines say the CA offers no renewal information, want 1", n)
	}
}

// TestStepCAValidationFailing: step-ca leaves a failed validation's
// authorization pending, with the challenge pending and carrying its
// error (nothing listens) or invalid (a server without acme-tls/1).
// With 10 handshakes a second, each attempt ends within 15 s of the
// first answer that carries the error, with step-ca's detail; every
// handshake that starts after the first one timed out gets the fallback
// without waiting; the orders, the failed authorizations and the spends
// recorded agree; and a restarted Manager keeps the backoff, with no
// order.
func TestStepCAValidationFailing(t *testing.T) {
	t.Parallel()
	const down, noALPN = "down.step.test", "noalpn.step.test"
	const timeout = 3 * time.Second
	l, l4 := listenPair(t, "127.0.0.4")
	ca := startStepCA(t, l.Addr().(*net.TCPAddr).Port)
	ca.DNS.SetA(down, "127.0.0.3")   // nothing listens there
	ca.DNS.SetA(noALPN, "127.0.0.4") // a server without acme-tls/1
	dir, logs := t.TempDir(), &syncBuffer{}
	var (
		failedMu sync.Mutex
		failedAt = map[string]time.Time{}
	)
	m := newManager(t, ca, dir, logs, []string{down, noALPN}, func(c *certmgr.Config) {
		c.HandshakeTimeout = timeout
		c.OnEvent = func(e certmgr.Event) {
			if e.Kind == certmgr.EventFailed {
				failedMu.Lock()
				failedAt[e.Domain] = e.Time
				failedMu.Unlock()
			}
		}
	})
	serveTLS(t, l, m.TLSConfig())
	serveTLS(t, l4, &tls.Config{GetCertificate: m.GetCertificate, NextProtos: []string{"h2", "http/1.1"}})

	for _, name := range []string{down, noALPN} {
		t.Run(name, func(t *testing.T) {
			type result struct {
				start    time.Time
				took     time.Duration
				fallback bool
				err      error
			}
			var (
				resultsMu sync.Mutex
				results   []result
				wg        sync.WaitGroup
			)
			ended := func() bool {
				failedMu.Lock()
				defer failedMu.Unlock()
				return !failedAt[name].IsZero()
			}
			tick := time.NewTicker(100 * time.Millisecond)
			for i := 0; !ended(); i++ {
				if i == 600 {
					t.Fatal("the attempt still runs after 60 s")
				}
				<-tick.C
				wg.Add(1)
				go func() {
					defer wg.Done()
					r := result{start: time.Now()}
					chain, took, err := handshake(l.Addr().String(), name)
					r.took, r.err = took, err
					r.fallback = err == nil && verify(ca, name, chain) != nil
					resultsMu.Lock()
					results = append(results, r)
					resultsMu.Unlock()
				}()
			}
			tick.Stop()
			wg.Wait()

			first, detail := ca.Counts.firstErr(name)
			failedMu.Lock()
			end := failedAt[name]
			failedMu.Unlock()
			if first.IsZero() || end.Sub(first) > 15*time.Second {
				t.Errorf("the attempt ended %v after step-ca's first error (at %v), want within 15 s", end.Sub(first), first)
			}
			t.Logf("the attempt ended %v after step-ca's first error", end.Sub(first).Round(time.Millisecond))
			st := m.Status(name)
			if st.State != certmgr.StateBackoff || st.LastError == nil || detail == "" || !strings.Contains(st.LastError.Error(), detail) {
				t.Errorf("Status %+v, want backoff with step-ca's detail %q", st, detail)
			}
			if orders, failed := ca.Counts.of(name); orders != 1 || failed != 1 || spends(t, dir, name) != 1 {
				t.Errorf("%d orders and %d failed authorizations at step-ca, %d spends recorded; want 1 of each",
					orders, failed, spends(t, dir, name))
			}

			// The first handshake waited for the attempt until its
			// timeout; every one that started after that did not wait.
			// "Waited" is the library's own measure (gaveUp): half the
			// timeout or more. A handshake that does not wait takes a
			// few hundred milliseconds here under -race when the
			// machine is loaded, so a smaller bound fails by chance.
			slices.SortFunc(results, func(a, b result) int { return a.start.Compare(b.start) })
			firstEnd := results[0].start.Add(results[0].took)
			var after []time.Duration
			for _, r := range results {
				switch {
				case r.err != nil:
					t.Errorf("handshake at %v: %v", r.start, r.err)
				case !r.fallback:
					t.Errorf("handshake at %v got a certificate step-ca issued, want the fallback", r.start)
				case r.start.After(firstEnd):
					after = append(after, r.took)
					if r.took >= timeout/2 {
						t.Errorf("a handshake after the first timed out took %v: it waited", r.took)
					}
				}
			}
			slices.Sort(after)
			if len(after) == 0 {
				t.Fatalf("no handshake after the first timed out (%d in all)", len(results))
			}
			t.Logf("%d handshakes; the first took %v; the %d after it: p50 %v, p99 %v, max %v", len(results),
				results[0].took.Round(time.Millisecond), len(after), after[len(after)/2], after[len(after)*99/100], after[len(after)-1])
		})
	}

	// Restarted on the same Cache: the backoff holds, and no order goes
	// out.
	before := m.Status(down)
	m.Close()
	m2 := newManager(t, ca, dir, logs, []string{down, noALPN}, nil)
	if st := m2.Status(down); st.State != certmgr.StateBackoff || !st.NextAttempt.Equal(before.NextAttempt) {
		t.Errorf("after a restart: %+v, want the backoff until %v", st, before.NextAttempt)
	}
	if err := m2.Provision(t.Context(), down); !errors.Is(err, certmgr.ErrBackoff) {
		t.Errorf("Provision after a restart: %v, want ErrBackoff", err)
	}
	if orders, _ := ca.Counts.of(down); orders != 1 {
		t.Errorf("%d orders after the restart, want the 1 before it", orders)
	}
}

// TestStepCABurst: 40 new names at once while 10 names whose validation
// fails are in flight: every one of the 40 gets a certificate, through
// step-ca's 500s ("changed since last read") if it answers any.
func TestStepCABurst(t *testing.T) {
	t.Parallel()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ca := startStepCA(t, l.Addr().(*net.TCPAddr).Port)
	var good, bad, all []string
	for i := range 40 {
		good = append(good, fmt.Sprintf("n%d.burst.test", i))
		ca.DNS.SetA(good[i], "127.0.0.1")
	}
	for i := range 10 {
		bad = append(bad, fmt.Sprintf("f%d.burst.test", i))
		ca.DNS.SetA(bad[i], "127.0.0.3") // nothing listens there
	}
	all = slices.Concat(good, bad)
	m := newManager(t, ca, t.TempDir(), &syncBuffer{}, all, nil)
	serveTLS(t, l, m.TLSConfig())

	ctx, cancel := context.WithTimeout(t.Context(), 2*time.Minute)
	defer cancel()
	var wg sync.WaitGroup
	errs := make([]error, len(all))
	for i, name := range bad {
		wg.Add(1)
		go func() {
			defer wg.Done()
			errs[len(good)+i] = m.Provision(ctx, name)
		}()
	}
	waitFor(t, 30*time.Second, "the failing names' orders", func() bool {
		for _, name := range bad {
			if orders, _ := ca.Counts.of(name); orders == 0 {
				return false
			}
		}
		return true
	})
	start := time.Now()
	var goodWG sync.WaitGroup
	for i, name := range good {
		goodWG.Add(1)
		go func() {
			defer goodWG.Done()
			errs[i] = m.Provision(ctx, name)
		}()
	}
	goodWG.Wait()
	took := time.Since(start)
	wg.Wait()
	for i, name := range good {
		if errs[i] != nil {
			t.Errorf("%s: %v", name, errs[i])
		}
	}
	for i, name := range bad {
		if ae := (*certmgr.AttemptError)(nil); !errors.As(errs[len(good)+i], &ae) {
			t.Errorf("%s: %v, want the CA's failure", name, errs[len(good)+i])
		}
	}
	t.Logf("40 names issued in %v beside 10 failing; step-ca answered 500 %d times", took.Round(time.Millisecond), ca.Counts.errs5xx())
}

// TestStepCARenewBeforeLongerThanTheLifetime: step-ca issues 24-hour
// certificates; with a RenewBefore of 720 hours autocert would renew each
// new one at once, forever. One order per name: each renewal autocert's
// timer tries at once is refused, and that is said once.
func TestStepCARenewBeforeLongerThanTheLifetime(t *testing.T) {
	t.Parallel()
	names := []string{"a.day.step.test", "b.day.step.test"}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ca := startStepCA(t, l.Addr().(*net.TCPAddr).Port)
	logs := &syncBuffer{}
	m := newManager(t, ca, t.TempDir(), logs, names, func(c *certmgr.Config) { c.Autocert.RenewBefore = 720 * time.Hour })
	serveTLS(t, l, m.TLSConfig())
	for _, name := range names {
		ca.DNS.SetA(name, "127.0.0.1")
		if err := m.Provision(t.Context(), name); err != nil {
			t.Fatal(err)
		}
	}
	// autocert's timer tries to renew each at once: certmgr refuses it,
	// and says so at Debug level.
	waitFor(t, 30*time.Second, "autocert's renewals refused", func() bool {
		refused := 0
		for _, line := range strings.Split(logs.String(), "\n") {
			if strings.Contains(line, "order refused") && strings.Contains(line, "RenewBefore exceeds") {
				refused++
			}
		}
		return refused >= len(names)
	})
	// With -renew.watch, orders are watched for that long after.
	for end := time.Now().Add(*renewWatch); ; time.Sleep(time.Second) {
		for _, name := range names {
			if orders, _ := ca.Counts.of(name); orders != 1 {
				t.Fatalf("%s: %d orders, want 1", name, orders)
			}
		}
		if !time.Now().Before(end) {
			break
		}
	}
	if n := strings.Count(logs.String(), "RenewBefore bounded"); n != 1 {
		t.Errorf("%d log lines say RenewBefore is bounded, want 1", n)
	}
}
