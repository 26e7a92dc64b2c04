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
//
// The description says which CA to trust and which etcd to use: ReadDemo
// refuses a file that is not a regular one, or that users other than its
// owner may write.
func ReadDemo(file string) (*Demo, error) {
	fi, err := os.Lstat(file)
	if errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("no shared demo: %s does not exist (start one with (cd etcdcache && go run ./examples/demoenv))", file)
	}
	if err != nil {
		return nil, err
	}
	if !fi.Mode().IsRegular() || fi.Mode().Perm()&0o022 != 0 {
		return nil, fmt.Errorf("%s: not a regular file that only its owner may write (%v)", file, fi.Mode())
	}
	b, err := os.ReadFile(file)
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

	written    []string // the files StartDemo wrote, which Close removes
	forwarders []*forwarder
}

// StartDemo starts a shared demo's CA for replicas replicas on etcd's
// client endpoint etcd: an embedded CA whose DNS server gives the demo
// names 127.0.0.1, and load balancers on the ports its validation
// authority connects to, which forward to the replicas' addresses,
// chosen among free ports of 127.0.0.1. It writes the Demo to file (only
// its owner may read it), and the PEM file it names beside it; if either
// exists, another demo may be running on it, and StartDemo fails. Close
// stops the demo and removes both files.
func StartDemo(file, etcd string, replicas int) (_ *DemoCA, err error) {
	if replicas < 1 {
		return nil, errors.New("a demo needs a replica at least")
	}
	if file == "" {
		return nil, errors.New("no file for the demo's description: there is no user cache directory for the default")
	}
	ca, err := certmgrtest.NewServer(certmgrtest.Options{})
	if err != nil {
		return nil, err
	}
	c := &DemoCA{CA: ca}
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
	addrs, err := freePorts(2 * replicas)
	if err != nil {
		return nil, err
	}
	httpsAddrs, httpAddrs := addrs[:replicas], addrs[replicas:]
	for i := range replicas {
		c.Demo.Replicas = append(c.Demo.Replicas, Replica{HTTPS: httpsAddrs[i], HTTP: httpAddrs[i]})
	}
	c.forwarders = []*forwarder{forward(ca.TLSListener, httpsAddrs), forward(ca.HTTPListener, httpAddrs)}

	var roots []byte
	for _, cert := range []*x509.Certificate{ca.Root, ca.ProxyCert} {
		roots = append(roots, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: cert.Raw})...)
	}
	desc, err := json.MarshalIndent(c.Demo, "", "  ")
	if err != nil {
		return nil, err
	}
	if err := os.MkdirAll(filepath.Dir(file), 0o700); err != nil {
		return nil, err
	}
	if err := writeNew(c.Demo.Roots, roots, 0o644); err != nil {
		return nil, err
	}
	c.written = append(c.written, c.Demo.Roots)
	if err := writeNew(file, append(desc, '\n'), 0o600); err != nil {
		return nil, err
	}
	c.written = append(c.written, file)
	return c, nil
}

// writeNew writes data to a new file of the given permissions, and fails
// if the file exists.
func writeNew(file string, data []byte, perm os.FileMode) error {
	f, err := os.OpenFile(file, os.O_WRONLY|os.O_CREATE|os.O_EXCL, perm)
	if errors.Is(err, os.ErrExist) {
		return fmt.Errorf("%s exists: a demo may be running on it (or one that crashed left it: remove it)", file)
	}
	if err != nil {
		return err
	}
	_, err = f.Write(data)
	return errors.Join(err, f.Close())
}

// Validations returns how many of the CA's validation connections were
// handed to each replica, in the order of Demo.Replicas.
func (c *DemoCA) Validations() []int {
	n := make([]int, len(c.Demo.Replicas))
	for _, f := range c.forwarders {
		for i, k := range f.handed() {
			n[i] += k
		}
	}
	return n
}

// Close stops the demo's CA and load balancers and removes its files.
func (c *DemoCA) Close() error {
	for _, f := range c.forwarders {
		f.close()
	}
	err := c.CA.Close()
	for _, file := range c.written {
		os.Remove(file)
	}
	return err
}

// freePorts returns n distinct addresses on 127.0.0.1 whose ports were
// free a moment ago.
func freePorts(n int) ([]string, error) {
	var addrs []string
	for range n {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return nil, err
		}
		defer ln.Close() // held until all are chosen, so that they differ
		addrs = append(addrs, ln.Addr().String())
	}
	return addrs, nil
}

// dialTimeout bounds a forwarder's connection to a backend.
const dialTimeout = 2 * time.Second

// A forwarder hands each connection it accepts to the next of its
// backends that accepts one, as a load balancer with health checks
// would: a replica not started yet, or stopped, is skipped.
type forwarder struct {
	ln       net.Listener
	backends []string

	mu     sync.Mutex // guards next, counts, conns and closed
	next   int
	counts []int // connections handed to each backend
	conns  map[net.Conn]bool
	closed bool

	wg sync.WaitGroup
}

// forward serves ln in the background until close.
func forward(ln net.Listener, backends []string) *forwarder {
	f := &forwarder{ln: ln, backends: backends, counts: make([]int, len(backends)), conns: make(map[net.Conn]bool)}
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
		k := (start + i) % len(f.backends)
		if b, err = net.DialTimeout("tcp", f.backends[k], dialTimeout); err == nil {
			f.mu.Lock()
			f.counts[k]++
			f.mu.Unlock()
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

// handed returns how many connections were handed to each backend.
func (f *forwarder) handed() []int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]int(nil), f.counts...)
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
