package certmgr

import (
	"context"
	"crypto/tls"
	"io"
	"log/slog"
	"net/netip"
	"testing"
	"time"

	"github.com/miekg/dns"
	"golang.org/x/crypto/acme/autocert"

	"github.com/certmgr/certmgr/certmgrtest"
	"github.com/certmgr/certmgr/internal/testsupport"
)

// benchCache returns a cache holding a Pebble-issued ECDSA certificate
// for name, and the CA that issued it.
func benchCache(b *testing.B, name string) (autocert.Cache, *certmgrtest.Server) {
	b.Helper()
	ca := certmgrtest.Start(b, certmgrtest.Options{})
	ca.DNS.SetA(name, "127.0.0.1")
	cache := autocert.DirCache(b.TempDir())
	m, err := New(Config{
		Autocert: &autocert.Manager{Cache: cache, Client: ca.NewClient(), HostPolicy: autocert.HostWhitelist(name)},
		Logger:   slog.New(slog.NewTextHandler(io.Discard, nil)),
	})
	if err != nil {
		b.Fatal(err)
	}
	defer m.Close()
	if err := ca.ServeTLS(m.TLSConfig(), nil); err != nil {
		b.Fatal(err)
	}
	if err := m.Provision(context.Background(), name); err != nil {
		b.Fatal(err)
	}
	return cache, ca
}

// benchManagers returns certmgr and bare autocert, both serving name's
// cached certificate. certmgr's DNS pre-check is on, against ca.DNS.
func benchManagers(b *testing.B, name string) (*Manager, *autocert.Manager, *certmgrtest.Server) {
	cache, ca := benchCache(b, name)
	policy := autocert.HostWhitelist(name)
	bare := &autocert.Manager{Cache: cache, Prompt: autocert.AcceptTOS, HostPolicy: policy, Client: ca.NewClient()}
	m, err := New(Config{
		Autocert: &autocert.Manager{Cache: cache, HostPolicy: policy, Client: ca.NewClient()},
		Logger:   slog.New(slog.NewTextHandler(io.Discard, nil)),
		DNS:      DNSCheck{KnownIPs: []netip.Addr{netip.MustParseAddr("127.0.0.1")}, Resolvers: []string{ca.DNS.Addr()}},
	})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { m.Close() })
	return m, bare, ca
}

// GetCertificate for a domain whose valid certificate is cached: certmgr
// beside bare autocert, and the DNS queries the pre-check costs there.
func BenchmarkGetCertificateCached(b *testing.B) {
	const name = "bench.test"
	m, bare, ca := benchManagers(b, name)
	hello := testsupport.Hello(name)
	for _, tt := range []struct {
		name string
		get  func(*tls.ClientHelloInfo) (*tls.Certificate, error)
	}{{"autocert", bare.GetCertificate}, {"certmgr", m.GetCertificate}} {
		if c, err := tt.get(hello); err != nil || IsFallback(c) { // loads from the cache
			b.Fatalf("%s: %v", tt.name, err)
		}
		queries := ca.DNS.Queries(name, dns.TypeA) + ca.DNS.Queries(name, dns.TypeAAAA)
		b.Run(tt.name, func(b *testing.B) {
			b.ReportAllocs()
			for b.Loop() {
				if _, err := tt.get(hello); err != nil {
					b.Fatal(err)
				}
			}
			n := ca.DNS.Queries(name, dns.TypeA) + ca.DNS.Queries(name, dns.TypeAAAA) - queries
			b.ReportMetric(float64(n)/float64(b.N), "dns-queries/op")
		})
	}
}

// GetCertificate for a domain whose valid certificate is cached: a
// Manager that polls the CA's renewal information (the default; its first
// poll has scheduled the renewal) beside one that never polls it. The
// renewal information is kept beside the served certificates, not on the
// handshake path: the two should not differ.
func BenchmarkGetCertificateCachedRenewalInfo(b *testing.B) {
	const name = "bench.test"
	cache, ca := benchCache(b, name)
	hello := testsupport.Hello(name)
	newManager := func(noRenewalInfo bool) *Manager {
		cfg := Config{
			Autocert: &autocert.Manager{Cache: cache, HostPolicy: autocert.HostWhitelist(name), Client: ca.NewClient()},
			Logger:   slog.New(slog.NewTextHandler(io.Discard, nil)),
		}
		cfg.hooks.noRenewalInfo = noRenewalInfo
		m, err := New(cfg)
		if err != nil {
			b.Fatal(err)
		}
		b.Cleanup(func() { m.Close() })
		if c, err := m.GetCertificate(hello); err != nil || IsFallback(c) { // loads from the cache
			b.Fatalf("renewal information off %v: %v", noRenewalInfo, err)
		}
		return m
	}
	polled, off := newManager(false), newManager(true)
	if !waitForCond(10*time.Second, func() bool { return !polled.Status(name).RenewAt.IsZero() }) {
		b.Fatal("the polled Manager scheduled no renewal from the CA's renewal information")
	}
	if at := off.Status(name).RenewAt; !at.IsZero() {
		b.Fatalf("the Manager with renewal information off scheduled a renewal at %v", at)
	}
	for _, tt := range []struct {
		name string
		m    *Manager
	}{{"polled", polled}, {"off", off}} {
		b.Run(tt.name, func(b *testing.B) {
			b.ReportAllocs()
			for b.Loop() {
				if _, err := tt.m.GetCertificate(hello); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

// GetCertificate for a domain in backoff: the fallback, at once.
func BenchmarkGetCertificateBackoff(b *testing.B) {
	const name = "backoff.test"
	ca := certmgrtest.Start(b, certmgrtest.Options{})
	ca.DNS.SetA(name, "127.0.0.3") // nothing answers the VA there
	m, err := New(Config{
		Autocert: &autocert.Manager{Client: ca.NewClient(), HostPolicy: autocert.HostWhitelist(name)},
		Logger:   slog.New(slog.NewTextHandler(io.Discard, nil)),
	})
	if err != nil {
		b.Fatal(err)
	}
	defer m.Close()
	if err := m.Provision(context.Background(), name); err == nil {
		b.Fatal("Provision succeeded")
	}
	hello := testsupport.Hello(name)
	if c, err := m.GetCertificate(hello); err != nil || !IsFallback(c) {
		b.Fatalf("not the fallback: %v", err)
	}
	b.ReportAllocs()
	for b.Loop() {
		if _, err := m.GetCertificate(hello); err != nil {
			b.Fatal(err)
		}
	}
}

// A full TLS handshake over loopback: certmgr's TLSConfig beside
// autocert's. The client offers TLS 1.3 and TLS 1.2 suites, so that both
// serve the ECDSA certificate.
func BenchmarkHandshake(b *testing.B) {
	const name = "bench.test"
	m, bare, ca := benchManagers(b, name)
	client := &tls.Config{ServerName: name, RootCAs: ca.Roots}
	for _, tt := range []struct {
		name string
		conf *tls.Config
	}{{"autocert", bare.TLSConfig()}, {"certmgr", m.TLSConfig()}} {
		ln, err := tls.Listen("tcp", "127.0.0.1:0", tt.conf)
		if err != nil {
			b.Fatal(err)
		}
		done := make(chan struct{})
		go func() {
			defer close(done)
			for {
				c, err := ln.Accept()
				if err != nil {
					return
				}
				c.(*tls.Conn).Handshake()
				c.Close()
			}
		}()
		handshake := func() {
			c, err := tls.Dial("tcp", ln.Addr().String(), client)
			if err != nil {
				b.Fatal(err)
			}
			c.Close()
		}
		handshake() // loads the certificate
		b.Run(tt.name, func(b *testing.B) {
			b.ReportAllocs()
			for b.Loop() {
				handshake()
			}
		})
		ln.Close()
		<-done
	}
}
