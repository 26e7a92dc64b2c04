package main

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"io"
	"net"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"

	"github.com/certmgr/certmgr/certmgrtest"
	"github.com/certmgr/certmgr/etcdcache/internal/etcdtest"
	"github.com/certmgr/certmgr/examples/demoserver"
	"github.com/certmgr/certmgr/internal/leakcheck"
	"github.com/certmgr/certmgr/internal/testsupport"
)

// ours returns the stacks of the goroutines of certmgr (the server, the
// Manager, the Cache, the embedded CA), autocert, acme and etcd clients,
// the running tests' own left out, and Pebble's, which the embedded CA
// cannot stop (see certmgrtest's documentation).
func ours() []string {
	var found []string
	for _, g := range leakcheck.Stacks() {
		if strings.Contains(g, "testing.tRunner") || strings.Contains(g, "letsencrypt/pebble") {
			continue
		}
		if strings.Contains(g, "github.com/certmgr/certmgr") ||
			strings.Contains(g, "acme/autocert.") || strings.Contains(g, "x/crypto/acme.") ||
			strings.Contains(g, "go.etcd.io/etcd/client/v3") && !strings.Contains(g, "go.etcd.io/etcd/server/v3") {
			found = append(found, g)
		}
	}
	return found
}

// TestEtcd runs the server in process with -pebble and -etcd: a
// handshake verified against the CA's root gets the certificate that is
// stored in etcd under -etcd-prefix, where every key the server wrote is;
// at shutdown the lease's lock entries go, and no goroutine is left.
func TestEtcd(t *testing.T) {
	const prefix = "/replicas/"
	const domain = "a.pebble.test"
	endpoint := etcdtest.Start(t).Endpoint()
	before := len(ours())
	cli, err := clientv3.New(clientv3.Config{Endpoints: []string{endpoint}, DialTimeout: dialTimeout, Logger: zap.NewNop()})
	if err != nil {
		t.Fatal(err)
	}
	defer cli.Close()

	rootFile := filepath.Join(t.TempDir(), "root.pem")
	srv := testsupport.StartServer(t, "run", func(ctx context.Context, stdout, stderr io.Writer) int {
		return run(ctx, []string{"-pebble", "-pebble-root-out", rootFile, "-etcd", endpoint, "-etcd-prefix", prefix}, stdout, stderr)
	})
	got := testsupport.WaitLines(t, srv.Lines, "https: ", "status: ")

	// A handshake, verified against the CA's root.
	roots := testsupport.RootPool(t, rootFile)
	conn, err := tls.DialWithDialer(&net.Dialer{Timeout: 10 * time.Second}, "tcp", got["https: "], &tls.Config{RootCAs: roots, ServerName: domain})
	if err != nil {
		t.Fatalf("handshake for %s: %v", domain, err)
	}
	served := conn.ConnectionState().PeerCertificates[0]
	conn.Close()

	// The certificate in etcd is the one served.
	ectx, ecancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer ecancel()
	resp, err := cli.Get(ectx, prefix+"cache/"+domain)
	if err != nil {
		t.Fatal(err)
	}
	if len(resp.Kvs) != 1 {
		t.Fatalf("no key %s in etcd", prefix+"cache/"+domain)
	}
	var stored *x509.Certificate
	for rest := resp.Kvs[0].Value; stored == nil; {
		var b *pem.Block
		if b, rest = pem.Decode(rest); b == nil {
			t.Fatalf("%s holds no certificate", prefix+"cache/"+domain)
		}
		if b.Type == "CERTIFICATE" {
			if stored, err = x509.ParseCertificate(b.Bytes); err != nil {
				t.Fatal(err)
			}
		}
	}
	if !stored.Equal(served) {
		t.Errorf("the certificate served (serial %x) is not the one in etcd (serial %x)", served.SerialNumber, stored.SerialNumber)
	}

	// Every key is under the prefix: both domains' certificates and
	// records, the account key.
	all, err := cli.Get(ectx, "", clientv3.WithFromKey(), clientv3.WithKeysOnly())
	if err != nil {
		t.Fatal(err)
	}
	keys := make(map[string]bool)
	for _, kv := range all.Kvs {
		k := string(kv.Key)
		if !strings.HasPrefix(k, prefix) {
			t.Errorf("key %q is not under %s", k, prefix)
		}
		keys[k] = true
	}
	for _, k := range []string{"cache/a.pebble.test", "cache/b.pebble.test", "cache/certmgr+record+a.pebble.test", "cache/certmgr+record+b.pebble.test", "cache/acme_account+key"} {
		if !keys[prefix+k] {
			t.Errorf("no key %s in etcd; keys: %v", prefix+k, keys)
		}
	}

	srv.Stop(t, 10*time.Second)

	// The Cache gave up its lease at shutdown: no lock entry is left.
	locks, err := cli.Get(ectx, prefix+"locks/", clientv3.WithPrefix(), clientv3.WithKeysOnly())
	if err != nil {
		t.Fatal(err)
	}
	for _, kv := range locks.Kvs {
		t.Errorf("lock entry %s left after shutdown", kv.Key)
	}
	cli.Close()

	deadline := time.Now().Add(10 * time.Second)
	for {
		left := ours()
		if len(left) <= before {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d goroutines left after shutdown (%d before):\n%s", len(left), before, strings.Join(left, "\n\n"))
		}
		time.Sleep(10 * time.Millisecond) // polling with a deadline
	}
}

// TestUsage checks that wrong uses of -etcd and -demo are refused before
// anything starts.
func TestUsage(t *testing.T) {
	dir := t.TempDir()
	for msg, args := range map[string][]string{
		"-etcd and -cache-dir do not go together": {"-domain", "example.com", "-cache-dir", dir, "-etcd", "http://127.0.0.1:2379"},
		"-cache-dir does not go with -pebble":     {"-pebble", "-cache-dir", dir},
		"-etcd-prefix needs -etcd":                {"-pebble", "-etcd-prefix", "/certmgr/"},
		`-etcd ",": an empty endpoint`:            {"-pebble", "-etcd", ","},
		`-etcd "": an empty endpoint`:             {"-pebble", "-etcd", ""},
		"-etcd-prefix must not be empty":          {"-pebble", "-etcd", "http://127.0.0.1:2379", "-etcd-prefix", ""},
		"no -domain given":                        {"-etcd", "http://127.0.0.1:2379"},
		"-demo: replicas are numbered from 1":     {"-demo", "0"},
		"-pebble does not go with -demo":          {"-demo", "1", "-pebble"},
		"-etcd does not go with -demo":            {"-demo", "1", "-etcd", "http://127.0.0.1:2379"},
		"-https-addr does not go with -demo":      {"-demo", "2", "-https-addr", ":8443"},
		"-demo-file needs -demo":                  {"-pebble", "-demo-file", dir + "/demo.json"},
		"-domain does not go with -demo":          {"-demo", "1", "-domain", "example.com"},
		"-known-ip does not go with -demo":        {"-demo", "1", "-known-ip", "127.0.0.1"},
		"-etcd-prefix does not go with -demo":     {"-demo", "1", "-etcd-prefix", "/other/"},
	} {
		var stderr bytes.Buffer
		if code := run(context.Background(), args, io.Discard, &stderr); code != 2 || stderr.String() != "server: "+msg+"\n" {
			t.Errorf("server %q: exit status %d, stderr %q; want 2 and %q", args, code, stderr.String(), "server: "+msg)
		}
	}
}

// TestDemo runs the README's two-replica demo in process: a shared demo
// (examples/demoenv's) on a real etcd, and two replicas run with -demo 1
// and -demo 2, both serving before the CA answers an order. The CA's
// validations reach both replicas, whichever ordered; each replica serves
// every demo name with the same certificate, verified against the demo's
// roots; and the CA saw one order per name.
func TestDemo(t *testing.T) {
	file := filepath.Join(t.TempDir(), "demo.json")
	demo, err := demoserver.StartDemo(file, etcdtest.Start(t).Endpoint(), 2)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { demo.Close() }) // after the replicas' cleanups
	// No order is answered until both replicas serve, so that either may
	// get the validations of the other's order.
	removeHold := demo.CA.Proxy.AddRule(certmgrtest.Rule{Class: certmgrtest.ClassNewOrder, Hold: true})

	var servers []*testsupport.Server
	for i := range 2 {
		args := []string{"-demo", strconv.Itoa(i + 1), "-demo-file", file}
		servers = append(servers, testsupport.StartServer(t, "replica "+args[1], func(ctx context.Context, stdout, stderr io.Writer) int {
			return run(ctx, args, stdout, stderr)
		}))
	}
	deadline := time.Now().Add(30 * time.Second)
	for _, srv := range servers {
		for !strings.Contains(srv.Stderr.String(), "msg=serving") {
			if time.Now().After(deadline) {
				t.Fatalf("a replica does not serve within 30 s:\n%s", srv.Stderr.String())
			}
			time.Sleep(10 * time.Millisecond) // polling with a deadline
		}
	}
	removeHold()
	demo.CA.Proxy.Release()

	var addrs []string
	for i, srv := range servers {
		got := testsupport.WaitLines(t, srv.Lines, "https: ", "root: ", "try: ")
		if got["https: "] != demo.Demo.Replicas[i].HTTPS || got["root: "] != demo.Demo.Roots {
			t.Errorf("replica %d printed %v; want its address in the demo, %s, and the demo's roots", i+1, got, demo.Demo.Replicas[i].HTTPS)
		}
		addrs = append(addrs, got["https: "])
	}
	if v := demo.Validations(); v[0] == 0 || v[1] == 0 {
		t.Errorf("validation connections per replica: %v, want some to each", v)
	}

	roots := testsupport.RootPool(t, demo.Demo.Roots)
	for _, d := range demo.Demo.Domains {
		var serials []string
		for _, addr := range addrs {
			conn, err := tls.DialWithDialer(&net.Dialer{Timeout: 10 * time.Second}, "tcp", addr, &tls.Config{RootCAs: roots, ServerName: d})
			if err != nil {
				t.Fatalf("handshake for %s at %s: %v", d, addr, err)
			}
			serials = append(serials, conn.ConnectionState().PeerCertificates[0].SerialNumber.String())
			conn.Close()
		}
		if serials[0] != serials[1] {
			t.Errorf("%s: the replicas serve serials %v, want one certificate", d, serials)
		}
		if n := demo.CA.Proxy.Counts(d).Orders; n != 1 {
			t.Errorf("%s: %d orders, want 1 for both replicas", d, n)
		}
	}
	for _, srv := range servers {
		srv.Stop(t, 10*time.Second)
	}
}

// TestDemoStartFailures: a replica whose demo is not there, or has no
// room for it, ends with status 1 and says why.
func TestDemoStartFailures(t *testing.T) {
	file := filepath.Join(t.TempDir(), "demo.json")
	demo, err := demoserver.StartDemo(file, "http://127.0.0.1:2379", 2) // no replica gets as far as etcd
	if err != nil {
		t.Fatal(err)
	}
	defer demo.Close()
	for want, args := range map[string][]string{
		"does not exist": {"-demo", "1", "-demo-file", file + ".missing"},
		"-demo 3: the demo in " + file + " has 2": {"-demo", "3", "-demo-file", file},
	} {
		var stderr bytes.Buffer
		if code := run(context.Background(), args, io.Discard, &stderr); code != 1 || !strings.Contains(stderr.String(), want) {
			t.Errorf("server %q: exit status %d, stderr %q; want 1 and %q", args, code, stderr.String(), want)
		}
	}
}

// TestStopDuringAnOrder stops the server while its orders are held at
// the CA: it stops within the shutdown's bound, logs nothing above Info
// level (the provisioning it cuts short included), and leaves no lock
// entry in etcd.
func TestStopDuringAnOrder(t *testing.T) {
	file := filepath.Join(t.TempDir(), "demo.json")
	endpoint := etcdtest.Start(t).Endpoint()
	cli, err := clientv3.New(clientv3.Config{Endpoints: []string{endpoint}, DialTimeout: dialTimeout, Logger: zap.NewNop()})
	if err != nil {
		t.Fatal(err)
	}
	defer cli.Close()
	demo, err := demoserver.StartDemo(file, endpoint, 1)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { demo.Close() })
	demo.CA.Proxy.AddRule(certmgrtest.Rule{Class: certmgrtest.ClassNewOrder, Hold: true})

	srv := testsupport.StartServer(t, "run", func(ctx context.Context, stdout, stderr io.Writer) int {
		return run(ctx, []string{"-demo", "1", "-demo-file", file}, stdout, stderr)
	})
	ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
	defer cancel()
	if err := demo.CA.Proxy.WaitFor(ctx, func() bool { return demo.CA.Proxy.Requests(certmgrtest.ClassNewOrder) >= 2 }); err != nil {
		t.Fatalf("no order for both names: %v", err)
	}
	srv.Stop(t, 10*time.Second)

	for line := range strings.Lines(srv.Stderr.String()) {
		if strings.Contains(line, "level=WARN") || strings.Contains(line, "level=ERROR") {
			t.Errorf("logged: %s", line)
		}
	}
	locks, err := cli.Get(ctx, "/certmgr/locks/", clientv3.WithPrefix(), clientv3.WithKeysOnly())
	if err != nil {
		t.Fatal(err)
	}
	for _, kv := range locks.Kvs {
		t.Errorf("lock entry %s left after shutdown", kv.Key)
	}
}
