package demoserver

import (
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"golang.org/x/crypto/acme"

	"github.com/certmgr/certmgr/certmgrtest"
)

// Demo describes a shared demo, as StartDemo writes it in JSON: one ACME
// CA, its DNS server and one etcd, for replicas of the server running in
// processes of their own (-demo N).
type Demo struct {
	// Directory is the CA's ACME directory URL.
	Directory string `json:"directory"`
	// Roots names a PEM file holding the CA's root certificate, which
	// verifies the certificates it issues, and the ACME server's TLS
	// certificate.
	Roots string `json:"roots"`
	// DNS is the address of the DNS server where Domains resolve to
	// 127.0.0.1; the CA's validation authority asks it too.
	DNS string `json:"dns"`
	// Etcd is etcd's client endpoint.
	Etcd string `json:"etcd"`
	// Domains are the names the replicas serve.
	Domains []string `json:"domains"`
	// Replicas are the replicas' listen addresses, on 127.0.0.1. The CA
	// validates through a load balancer that hands each connection to the
	// next replica that accepts it.
	Replicas []Replica `json:"replicas"`
}

// Replica is one replica's listen addresses in a Demo.
type Replica struct {
	HTTPS string `json:"https"`
	HTTP  string `json:"http"`
}

// ReadDemo reads the Demo in file.
func ReadDemo(file string) (*Demo, error) {
	b, err := os.ReadFile(file)
	if errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("no shared demo: %s does not exist (start one with (cd etcdcache && go run ./examples/demoenv))", file)
	}
	if err != nil {
		return nil, err
	}
	var d Demo
	if err := json.Unmarshal(b, &d); err != nil {
		return nil, fmt.Errorf("%s: %w", file, err)
	}
	if d.Directory == "" || d.Roots == "" || d.DNS == "" || d.Etcd == "" || len(d.Domains) == 0 {
		return nil, fmt.Errorf("%s: not a complete demo description", file)
	}
	return &d, nil
}

// client returns an ACME client of the demo's CA.
func (d *Demo) client() (*acme.Client, error) {
	pemData, err := os.ReadFile(d.Roots)
	if err != nil {
		return nil, err
	}
	roots := x509.NewCertPool()
	if !roots.AppendCertsFromPEM(pemData) {
		return nil, fmt.Errorf("%s holds no PEM certificate", d.Roots)
	}
	tr := http.DefaultTransport.(*http.Transport).Clone()
	tr.TLSClientConfig = &tls.Config{RootCAs: roots}
	return &acme.Client{DirectoryURL: d.Directory, HTTPClient: &http.Client{Transport: tr}}, nil
}

// DemoCA is the CA of a shared demo, started by StartDemo.
type DemoCA struct {
	// CA is the embedded CA.
	CA *certmgrtest.Server
	// Demo is what StartDemo wrote.
	Demo Demo

	file       string
	forwarders []*forwarder
}

// StartDemo starts a shared demo's CA for replicas replicas on etcd's
// client endpoint etcd: an embedded CA whose DNS server gives the demo
// names 127.0.0.1, and load balancers on the ports its validation
// authority connects to, which forward to the replicas' addresses,
// chosen among free ports of 127.0.0.1. It writes the Demo to file, and
// the PEM file it names beside it. Close stops it and removes both files.
func StartDemo(file, etcd string, replicas int) (_ *DemoCA, err error) {
	if replicas < 1 {
		return nil, errors.New("a demo needs a replica at least")
	}
	ca, err := certmgrtest.NewServer(certmgrtest.Options{})
	if err != nil {
		return nil, err
	}
	c := &DemoCA{CA: ca, file: file}
	defer func() {
		if err != nil {
			c.Close()
		}
	}()
	c.Demo = Demo{Directory: ca.DirectoryURL, DNS: ca.DNS.Addr(), Etcd: etcd, Domains: DemoDomains(),
		Roots: strings.TrimSuffix(file, filepath.Ext(file)) + "-roots.pem"}
	for _, d := range c.Demo.Domains {
		ca.DNS.SetA(d, "127.0.0.1")
	}
	var httpsAddrs, httpAddrs []string
	for range replicas {
		r := Replica{}
		if r.HTTPS, err = freePort(); err != nil {
			return nil, err
		}
		if r.HTTP, err = freePort(); err != nil {
			return nil, err
		}
		c.Demo.Replicas = append(c.Demo.Replicas, r)
		httpsAddrs, httpAddrs = append(httpsAddrs, r.HTTPS), append(httpAddrs, r.HTTP)
	}
	c.forwarders = []*forwarder{forward(ca.TLSListener, httpsAddrs), forward(ca.HTTPListener, httpAddrs)}

	var roots []byte
	for _, cert := range []*x509.Certificate{ca.Root, ca.ProxyCert} {
		roots = append(roots, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: cert.Raw})...)
	}
	if err := os.MkdirAll(filepath.Dir(file), 0o700); err != nil {
		return nil, err
	}
	if err := os.WriteFile(c.Demo.Roots, roots, 0o644); err != nil {
		return nil, err
	}
	desc, err := json.MarshalIndent(c.Demo, "", "  ")
	if err != nil {
		return nil, err
	}
	if err := os.WriteFile(file, append(desc, '\n'), 0o600); err != nil {
		return nil, err
	}
	return c, nil
}

// Close stops the demo's CA and load balancers and removes its files.
func (c *DemoCA) Close() error {
	for _, f := range c.forwarders {
		f.close()
	}
	err := c.CA.Close()
	os.Remove(c.file)
	if c.Demo.Roots != "" {
		os.Remove(c.Demo.Roots)
	}
	return err
}

// freePort returns an address on 127.0.0.1 with a port free a moment
// ago.
func freePort() (string, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return "", err
	}
	defer ln.Close()
	return ln.Addr().String(), nil
}

// dialTimeout bounds a forwarder's connection to a backend.
const dialTimeout = 2 * time.Second

// A forwarder hands each connection it accepts to the next of its
// backends that accepts one, as a load balancer with health checks
// would: a replica not started yet, or stopped, is skipped.
type forwarder struct {
	ln       net.Listener
	backends []string

	mu     sync.Mutex // guards next, conns and closed
	next   int
	conns  map[net.Conn]bool
	closed bool

	wg sync.WaitGroup
}

// forward serves ln in the background until close.
func forward(ln net.Listener, backends []string) *forwarder {
	f := &forwarder{ln: ln, backends: backends, conns: make(map[net.Conn]bool)}
	f.wg.Go(func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			f.wg.Go(func() { f.handle(c) })
		}
	})
	return f
}

// handle forwards c to the next backend in turn, or, if it refuses, to
// the first after it that accepts.
func (f *forwarder) handle(c net.Conn) {
	defer c.Close()
	if !f.track(c) {
		return
	}
	defer f.untrack(c)
	f.mu.Lock()
	start := f.next
	f.next = (f.next + 1) % len(f.backends)
	f.mu.Unlock()
	var b net.Conn
	for i := range f.backends {
		var err error
		addr := f.backends[(start+i)%len(f.backends)]
		if b, err = net.DialTimeout("tcp", addr, dialTimeout); err == nil {
			break
		}
	}
	if b == nil {
		return
	}
	defer b.Close()
	if !f.track(b) {
		return
	}
	defer f.untrack(b)
	done := make(chan struct{})
	go func() {
		io.Copy(b, c)
		b.(*net.TCPConn).CloseWrite()
		close(done)
	}()
	io.Copy(c, b)
	c.Close() // ends the copy above, if the client is still sending
	<-done
}

// track records conn for close, unless the forwarder is closed.
func (f *forwarder) track(conn net.Conn) bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.closed {
		return false
	}
	f.conns[conn] = true
	return true
}

func (f *forwarder) untrack(conn net.Conn) {
	f.mu.Lock()
	defer f.mu.Unlock()
	delete(f.conns, conn)
}

// close closes the listener and every connection, and waits for the
// forwarder's goroutines.
func (f *forwarder) close() {
	f.ln.Close()
	f.mu.Lock()
	f.closed = true
	for c := range f.conns {
		c.Close()
	}
	f.mu.Unlock()
	f.wg.Wait()
}
