package main

import (
	"bytes"
	"strings"
	"testing"

	"github.com/certmgr/certmgr/certmgrtest"
)

// Every test points the command at a loopback DNS server of its own with
// -resolver, so no other server is ever asked.

func runCmd(t *testing.T, args ...string) (int, string) {
	t.Helper()
	var stdout, stderr bytes.Buffer
	code := run(args, &stdout, &stderr)
	t.Logf("dnscheck %s: exit %d\n%s%s", strings.Join(args, " "), code, stdout.String(), stderr.String())
	return code, stdout.String() + stderr.String()
}

func TestReady(t *testing.T) {
	srv := certmgrtest.StartDNS(t)
	srv.SetA("ready.test", "127.0.0.1")
	srv.SetCAA("ready.test", certmgrtest.CAA{Tag: "issue", Value: "letsencrypt.org"})

	code, out := runCmd(t, "-known-ip", "127.0.0.1", "-resolver", srv.Addr(), "-caa", "letsencrypt.org", "ready.test")
	if code != 0 {
		t.Errorf("exit status %d, want 0", code)
	}
	for _, want := range []string{"127.0.0.1", "known", "allows letsencrypt.org", "READY"} {
		if !strings.Contains(out, want) {
			t.Errorf("output lacks %q", want)
		}
	}
	if strings.Contains(out, "NOT READY") {
		t.Error("output says NOT READY")
	}
}

func TestUnknownAddress(t *testing.T) {
	srv := certmgrtest.StartDNS(t)
	srv.SetA("stray.test", "127.0.0.2")

	code, out := runCmd(t, "-known-ip", "127.0.0.1", "-resolver", srv.Addr(), "stray.test")
	if code != 1 {
		t.Errorf("exit status %d, want 1", code)
	}
	for _, want := range []string{"127.0.0.2", "NOT KNOWN", "NOT READY", "not a known IP"} {
		if !strings.Contains(out, want) {
			t.Errorf("output lacks %q", want)
		}
	}
}

func TestCAAForbids(t *testing.T) {
	srv := certmgrtest.StartDNS(t)
	srv.SetA("www.caa.test", "127.0.0.1")
	srv.SetCAA("caa.test", certmgrtest.CAA{Tag: "issue", Value: "ca.example"})

	code, out := runCmd(t, "-known-ip", "127.0.0.1", "-resolver", srv.Addr(), "-caa", "letsencrypt.org", "www.caa.test")
	if code != 1 {
		t.Errorf("exit status %d, want 1", code)
	}
	for _, want := range []string{"caa.test: 0 issue", "another CA: ca.example", "NOT READY"} {
		if !strings.Contains(out, want) {
			t.Errorf("output lacks %q", want)
		}
	}
}

func TestCNAMEAndSeveralNames(t *testing.T) {
	srv := certmgrtest.StartDNS(t)
	srv.SetCNAME("alias.test", "target.test")
	srv.SetA("target.test", "127.0.0.1")
	srv.SetAAAA("target.test", "::1")

	code, out := runCmd(t, "-known-ip", "127.0.0.1", "-known-ip", "::1", "-resolver", srv.Addr(), "alias.test", "missing.test")
	if code != 1 {
		t.Errorf("exit status %d, want 1 (missing.test is not ready)", code)
	}
	for _, want := range []string{"alias.test → target.test", "::1", "no such name", "missing.test: A lookup: NXDOMAIN"} {
		if !strings.Contains(out, want) {
			t.Errorf("output lacks %q", want)
		}
	}
	if strings.Count(out, "NOT READY") != 1 {
		t.Errorf("want exactly one NOT READY")
	}
}

func TestUsage(t *testing.T) {
	for _, args := range [][]string{
		{},
		{"example.test"},
		{"-known-ip", "127.0.0.1"},
		{"-known-ip", "not-an-ip", "example.test"},
		{"-known-ip", "127.0.0.1", "-resolver", "no port", "example.test"},
		{"-known-ip", "127.0.0.1", "-resolver", "127.0.0.1:1", "127.0.0.1"},
		{"-known-ip", "127.0.0.1", "-resolver", "127.0.0.1:1", "-timeout", "0s", "example.test"},
	} {
		if code, _ := runCmd(t, args...); code != 2 {
			t.Errorf("dnscheck %q: exit status %d, want 2", args, code)
		}
	}
}
