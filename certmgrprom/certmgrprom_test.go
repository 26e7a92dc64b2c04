package certmgrprom

import (
	"bufio"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/big"
	"net/http/httptest"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"golang.org/x/crypto/acme"
	"golang.org/x/crypto/acme/autocert"

	"github.com/certmgr/certmgr"
	"github.com/certmgr/certmgr/certmgrtest"
	"github.com/certmgr/certmgr/internal/testhooks"
	"github.com/certmgr/certmgr/internal/testsupport"
)

// TestCollector scrapes the collector of a Manager on the test CA
// through promhttp: one certificate valid (90 days, from the Cache), one
// name whose validation fails, and one certificate overdue for renewal
// (an hour's, 50 minutes later on the Manager's clock, its renewals
// bound to fail); every pinned metric has its value, and the output
// passes client_golang's linter.
func TestCollector(t *testing.T) {
	const valid, failing, late = "valid.test", "failing.test", "late.test"
	ca := certmgrtest.Start(t, certmgrtest.Options{CertValidity: time.Hour})
	ca.DNS.SetA(valid, "127.0.0.1")
	ca.DNS.SetA(late, "127.0.0.1")
	ca.DNS.SetA(failing, "127.0.0.3") // nothing listens there
	cache := autocert.DirCache(t.TempDir())
	now := time.Now()
	validNotAfter := now.Add(90 * 24 * time.Hour).Truncate(time.Second)
	if err := cache.Put(t.Context(), valid, certPEM(t, valid, now.Add(-time.Hour).Truncate(time.Second), validNotAfter)); err != nil {
		t.Fatal(err)
	}
	clock := testsupport.NewClock(now)
	m, err := certmgr.New(certmgr.Config{
		Autocert: &autocert.Manager{Cache: &testhooks.Cache{Cache: cache, Now: clock.Now}, Client: ca.NewClient(),
			HostPolicy: autocert.HostWhitelist(valid, failing, late)},
		Logger: slog.New(slog.DiscardHandler),
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { m.Close() })
	if err := ca.ServeTLS(m.TLSConfig(), nil); err != nil {
		t.Fatal(err)
	}
	if err := m.Provision(t.Context(), late); err != nil {
		t.Fatal(err)
	}
	var ae *certmgr.AttemptError
	if err := m.Provision(t.Context(), failing); !errors.As(err, &ae) {
		t.Fatalf("Provision(%s) = %v, want the CA's failure", failing, err)
	}
	if c, err := m.GetCertificate(testsupport.Hello(valid)); err != nil || certmgr.IsFallback(c) {
		t.Fatalf("the cached certificate of %s: %v", valid, err)
	}
	if c, err := m.GetCertificate(testsupport.Hello(failing)); err != nil || !certmgr.IsFallback(c) {
		t.Fatalf("%s: %v, want the fallback", failing, err)
	}
	lateCert, err := m.GetCertificate(testsupport.Hello(late))
	if err != nil {
		t.Fatal(err)
	}
	// The renewal information of the CA's certificate polled, so that
	// what is due does not change meanwhile (the self-signed one has no
	// authority key identifier: none is polled).
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(10 * time.Millisecond) { // polling with a deadline
		if c := m.Counters(); c.RenewalInfoAnswered >= 1 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("renewal information not polled: %+v", m.Counters())
		}
	}
	ca.DNS.SetA(late, "127.0.0.3") // its renewals fail
	clock.Advance(50 * time.Minute)

	reg := prometheus.NewRegistry()
	reg.MustRegister(NewCollector(m))
	srv := httptest.NewServer(promhttp.HandlerFor(reg, promhttp.HandlerOpts{}))
	t.Cleanup(srv.Close)
	res, err := srv.Client().Get(srv.URL)
	if err != nil {
		t.Fatal(err)
	}
	body, err := io.ReadAll(res.Body)
	res.Body.Close()
	if err != nil || res.StatusCode != 200 {
		t.Fatalf("scrape: %d, %v", res.StatusCode, err)
	}
	got := parse(t, string(body))

	lateNotAfter := float64(lateCert.Leaf.NotAfter.Unix())
	// Due at the time the CA's renewal information picked, or autocert's
	// (two thirds of the lifetime) if that comes first.
	lateDue := m.Status(late).RenewDue
	leaf := lateCert.Leaf
	if lateDue.IsZero() || lateDue.After(leaf.NotAfter.Add(-leaf.NotAfter.Sub(leaf.NotBefore)/3)) {
		t.Errorf("%s due for renewal at %v, want by two thirds of its lifetime", late, lateDue)
	}
	want := map[string]float64{
		`certmgr_certificate_expiration_timestamp_seconds{domain="late.test"}`:  lateNotAfter,
		`certmgr_certificate_expiration_timestamp_seconds{domain="valid.test"}`: float64(validNotAfter.Unix()),
		`certmgr_certificate_renewal_timestamp_seconds{domain="late.test"}`:     float64(lateDue.Unix()) + float64(lateDue.Nanosecond())/1e9,
		`certmgr_certificate_renewal_timestamp_seconds{domain="valid.test"}`:    float64(validNotAfter.Add(-30 * 24 * time.Hour).Unix()),
		`certmgr_renewal_overdue{domain="late.test"}`:                           1,
		`certmgr_renewal_overdue{domain="valid.test"}`:                          0,
		`certmgr_domain_state{domain="late.test",state="valid"}`:                1,
		`certmgr_domain_state{domain="late.test",state="backoff"}`:              0,
		`certmgr_domain_state{domain="valid.test",state="valid"}`:               1,
		`certmgr_domain_state{domain="failing.test",state="backoff"}`:           1,
		`certmgr_domain_state{domain="failing.test",state="valid"}`:             0,
		`certmgr_domain_state{domain="failing.test",state="none"}`:              0,
		`certmgr_domain_failures{domain="failing.test"}`:                        1,
		`certmgr_handshakes_total{answer="certificate"}`:                        2,
		`certmgr_handshakes_total{answer="fallback"}`:                           1,
		`certmgr_handshakes_total{answer="refused"}`:                            0,
		`certmgr_failed_authorizations_total`:                                   1,
		`certmgr_orders_total`:                                                  2,
		`certmgr_attempts_total{path="provision",result="succeeded"}`:           1,
		`certmgr_attempts_total{path="provision",result="failed"}`:              1,
		`certmgr_lock_waits_total`:                                              0,
	}
	for series, v := range want {
		if g, ok := got[series]; !ok || g != v {
			t.Errorf("%s = %v (found: %v), want %v", series, g, ok, v)
		}
	}
	if n := got[`certmgr_handshakes_total{answer="challenge"}`]; n < 1 {
		t.Errorf("%v challenge handshakes, want the CA's validations of %s", n, late)
	}
	for _, absent := range []string{`certmgr_certificate_expiration_timestamp_seconds{domain="failing.test"}`,
		`certmgr_renewal_overdue{domain="failing.test"}`} {
		if _, ok := got[absent]; ok {
			t.Errorf("%s is reported; a domain without a certificate has none", absent)
		}
	}
	if t.Failed() {
		t.Logf("scraped:\n%s", body)
	}
	problems, err := testutil.CollectAndLint(NewCollector(m))
	if err != nil || len(problems) > 0 {
		t.Errorf("lint: %v, %+v", err, problems)
	}
}

// parse reads the Prometheus text format: series (name and labels, as
// written) to value.
func parse(t *testing.T, text string) map[string]float64 {
	t.Helper()
	out := make(map[string]float64)
	sc := bufio.NewScanner(strings.NewReader(text))
	for sc.Scan() {
		line := sc.Text()
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		i := strings.LastIndexByte(line, ' ')
		v, err := strconv.ParseFloat(line[i+1:], 64)
		if i < 0 || err != nil {
			t.Fatalf("cannot read %q", line)
		}
		out[line[:i]] = v
	}
	return out
}

// certPEM returns a key and a self-signed certificate for name, valid
// from notBefore to notAfter, as autocert stores them.
func certPEM(t *testing.T, name string, notBefore, notAfter time.Time) []byte {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(7), Subject: pkix.Name{CommonName: name}, DNSNames: []string{name},
		NotBefore: notBefore, NotAfter: notAfter, KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	if err != nil {
		t.Fatal(err)
	}
	keyDER, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	return append(pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: keyDER}),
		pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})...)
}

// BenchmarkScrape10000: one scrape, through promhttp, of a Manager that
// serves 10,000 domains.
func BenchmarkScrape10000(b *testing.B) {
	const n = 10000
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		b.Fatal(err)
	}
	keyDER, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		b.Fatal(err)
	}
	keyPEM := pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: keyDER})
	cache := autocert.DirCache(b.TempDir())
	now := time.Now()
	names := make([]string, n)
	for i := range names {
		names[i] = fmt.Sprintf("site%05d.scrape.test", i)
		tmpl := &x509.Certificate{SerialNumber: big.NewInt(int64(i + 1)), Subject: pkix.Name{CommonName: names[i]}, DNSNames: []string{names[i]},
			NotBefore: now.Add(-time.Hour), NotAfter: now.Add(90 * 24 * time.Hour), KeyUsage: x509.KeyUsageDigitalSignature,
			ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}}
		der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
		if err != nil {
			b.Fatal(err)
		}
		if err := cache.Put(b.Context(), names[i], append(slices.Clone(keyPEM), pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})...)); err != nil {
			b.Fatal(err)
		}
	}
	m, err := certmgr.New(certmgr.Config{
		Autocert: &autocert.Manager{Cache: cache, HostPolicy: func(context.Context, string) error { return nil },
			Client: &acme.Client{DirectoryURL: "https://127.0.0.1:1/directory"}}, // never asked: every certificate is cached
		Logger:     slog.New(slog.DiscardHandler),
		MaxDomains: n,
	})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { m.Close() })
	for _, name := range names {
		if c, err := m.GetCertificate(testsupport.Hello(name)); err != nil || certmgr.IsFallback(c) {
			b.Fatalf("%s: %v", name, err)
		}
	}
	reg := prometheus.NewRegistry()
	reg.MustRegister(NewCollector(m))
	h := promhttp.HandlerFor(reg, promhttp.HandlerOpts{})
	var size int
	b.ResetTimer()
	for b.Loop() {
		rec := httptest.NewRecorder()
		h.ServeHTTP(rec, httptest.NewRequest("GET", "/metrics", nil))
		size = rec.Body.Len()
	}
	b.ReportMetric(float64(size), "bytes/scrape")
}
