package demoserver

import (
	"bytes"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// TestUsage checks that wrong command lines are refused before anything
// starts, with one line saying why.
func TestUsage(t *testing.T) {
	dir := t.TempDir()
	for msg, args := range map[string][]string{
		"unexpected arguments: unexpected":                           {"unexpected"},
		"-cache-dir does not go with -pebble":                        {"-pebble", "-cache-dir", dir},
		"-production does not go with -pebble":                       {"-pebble", "-production"},
		"-https-addr does not go with -pebble":                       {"-pebble", "-https-addr", ":8443"},
		"no -domain given":                                           {"-cache-dir", dir},
		"-cache-dir is required: certificates must survive restarts": {"-domain", "example.com"},
		"-production and -directory do not go together":              {"-domain", "example.com", "-cache-dir", dir, "-production", "-directory", "https://ca.example/dir"},
		"-pebble-root-out needs -pebble":                             {"-domain", "example.com", "-cache-dir", dir, "-pebble-root-out", dir + "/root.pem"},
	} {
		var stderr bytes.Buffer
		if o, code := Parse(args, &stderr, false); o != nil || code != 2 || stderr.String() != "server: "+msg+"\n" {
			t.Errorf("server %q: %v, exit status %d, stderr %q; want nil, 2 and %q", args, o, code, stderr.String(), "server: "+msg)
		}
	}
	for _, args := range [][]string{{"-pebble", "-known-ip", "not-an-ip"}, {"-no-such-flag"}} {
		if o, code := Parse(args, io.Discard, false); o != nil || code != 2 {
			t.Errorf("server %q: %v, exit status %d, want nil and 2", args, o, code)
		}
	}
	var stderr bytes.Buffer
	if o, code := Parse([]string{"-help"}, &stderr, false); o != nil || code != 0 {
		t.Errorf("server -help: %v, exit status %d, want nil and 0", o, code)
	}
	if !strings.Contains(stderr.String(), "-cache-dir") {
		t.Errorf("server -help does not list -cache-dir:\n%s", stderr.String())
	}
}

// TestParse checks the Options of usable command lines.
func TestParse(t *testing.T) {
	o, code := Parse([]string{"-domain", "example.com", "-cache-dir", "/var/lib/certs", "-production"}, io.Discard, false)
	if o == nil || code != 0 {
		t.Fatalf("exit status %d", code)
	}
	if o.Directory != "https://acme-v02.api.letsencrypt.org/directory" || o.HTTPSAddr != ":443" || o.HTTPAddr != ":80" || !o.Status || o.StatusPublic {
		t.Errorf("-production: %+v", o)
	}
	o, _ = Parse([]string{"-pebble"}, io.Discard, false)
	if o == nil || strings.Join(o.Domains, ",") != "a.pebble.test,b.pebble.test" || len(o.KnownIPs) != 1 || o.KnownIPs[0].String() != "127.0.0.1" {
		t.Errorf("-pebble: %+v, want the demo names and 127.0.0.1", o)
	}
	o, _ = Parse([]string{"-demo", "2"}, io.Discard, true)
	if o == nil || o.Demo != 2 || o.DemoFile != DefaultDemoFile() || o.EtcdPrefix != "/certmgr/" {
		t.Errorf("-demo 2: %+v", o)
	}
	o, _ = Parse([]string{"-domain", "example.com", "-etcd", "http://127.0.0.1:2379, http://127.0.0.2:2379"}, io.Discard, true)
	if o == nil || strings.Join(o.Etcd, " ") != "http://127.0.0.1:2379 http://127.0.0.2:2379" {
		t.Errorf("-etcd: %+v", o)
	}
}

// TestStatusLoopbackOnly: without -status-public, Private answers
// loopback clients only.
func TestStatusLoopbackOnly(t *testing.T) {
	h := http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) { io.WriteString(w, "status") })
	for _, public := range []bool{false, true} {
		p := (&Options{StatusPublic: public}).Private(h)
		for addr, loopback := range map[string]bool{"127.0.0.1:5000": true, "[::1]:5000": true, "198.51.100.7:5000": false, "[2001:db8::1]:443": false} {
			r := httptest.NewRequest("GET", "/certmgr/status", nil)
			r.RemoteAddr = addr
			w := httptest.NewRecorder()
			p.ServeHTTP(w, r)
			if want := map[bool]int{true: 200, false: 404}[loopback || public]; w.Code != want {
				t.Errorf("-status-public=%v, from %s: %d, want %d", public, addr, w.Code, want)
			}
		}
	}
}

// echo serves on a new loopback listener, answering each connection with
// its name, until the test ends.
func echo(t *testing.T, name string) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			io.WriteString(c, name)
			c.Close()
		}
	}()
	return ln.Addr().String()
}

// dialRead connects to addr and returns what it reads until EOF.
func dialRead(addr string) (string, error) {
	c, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		return "", err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(5 * time.Second))
	b, err := io.ReadAll(c)
	return string(b), err
}

// TestForwarderSkipsStoppedBackends: the demo's load balancer hands each
// connection to the next backend in turn, or, if that one refuses it, to
// the first after it that accepts it; so every connection is served
// while one backend accepts, however many arrive at once.
func TestForwarderSkipsStoppedBackends(t *testing.T) {
	addrs, err := freePorts(1) // nothing listens there
	if err != nil {
		t.Fatal(err)
	}
	stopped := addrs[0]
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	f := forward(ln, []string{echo(t, "one"), stopped, echo(t, "two")})
	defer f.close()
	var got []string
	for range 4 {
		s, err := dialRead(ln.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		got = append(got, s)
	}
	if s := strings.Join(got, " "); s != "one two two one" {
		t.Errorf("connections reached %q, want one two two one", s)
	}
	if n := f.handed(); n[0] != 2 || n[1] != 0 || n[2] != 2 {
		t.Errorf("handed %v, want [2 0 2]", n)
	}

	// At once, with one backend of three accepting.
	ln2, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	f2 := forward(ln2, []string{stopped, stopped, echo(t, "up")})
	defer f2.close()
	const n = 30
	results := make(chan string, n)
	for range n {
		go func() {
			s, err := dialRead(ln2.Addr().String())
			if err != nil {
				s = err.Error()
			}
			results <- s
		}()
	}
	for range n {
		if s := <-results; s != "up" {
			t.Errorf("a connection got %q, want up", s)
		}
	}
}

// TestDemoFiles: StartDemo writes a description that ReadDemo reads, with
// a PEM file that makes a working ACME client; it refuses to write over a
// running demo's; ReadDemo refuses a file others may write; Close removes
// both files.
func TestDemoFiles(t *testing.T) {
	file := filepath.Join(t.TempDir(), "demo.json")
	c, err := StartDemo(file, "http://127.0.0.1:2379", 2)
	if err != nil {
		t.Fatal(err)
	}
	d, err := ReadDemo(file)
	if err != nil {
		t.Fatal(err)
	}
	if d.Directory != c.CA.DirectoryURL || d.Etcd != "http://127.0.0.1:2379" || len(d.Replicas) != 2 || len(d.Domains) != 2 {
		t.Errorf("read %+v", d)
	}
	for _, r := range d.Replicas {
		for _, a := range []string{r.HTTPS, r.HTTP} {
			if ap, err := net.ResolveTCPAddr("tcp", a); err != nil || !ap.IP.IsLoopback() {
				t.Errorf("replica address %q: not on loopback", a)
			}
		}
	}
	client, err := d.client()
	if err != nil {
		t.Fatal(err)
	}
	if _, err := client.Discover(t.Context()); err != nil {
		t.Errorf("the demo's ACME client: %v", err)
	}
	if _, err := StartDemo(file, "http://127.0.0.1:2379", 2); err == nil || !strings.Contains(err.Error(), "exists") {
		t.Errorf("a second StartDemo on the file: %v, want an error saying it exists", err)
	}
	if _, err := ReadDemo(file); err != nil {
		t.Errorf("the first demo's file after a second StartDemo failed: %v", err)
	}
	if err := os.Chmod(file, 0o620); err != nil {
		t.Fatal(err)
	}
	if _, err := ReadDemo(file); err == nil {
		t.Errorf("ReadDemo of a file others may write: no error")
	}
	c.Close()
	for _, f := range []string{file, d.Roots} {
		if _, err := os.Stat(f); !os.IsNotExist(err) {
			t.Errorf("%s left after Close (%v)", f, err)
		}
	}
	if _, err := ReadDemo(file); err == nil || !strings.Contains(err.Error(), "examples/demoenv") {
		t.Errorf("ReadDemo of no file: %v, want an error naming examples/demoenv", err)
	}
}
