package main

import (
	"bytes"
	"regexp"
	"strings"
	"testing"
)

// TestCluster runs the demo: three replicas on etcd make one order for
// the burst and all serve the same certificate.
func TestCluster(t *testing.T) {
	var out bytes.Buffer
	if err := run(&out); err != nil {
		t.Fatalf("run: %v\n%s", err, out.String())
	}
	if !strings.Contains(out.String(), "orders:  1 for the cluster") {
		t.Errorf("not one order:\n%s", out.String())
	}
	serials := regexp.MustCompile(`replica \d: state valid +serial ([0-9a-f]+)`).FindAllStringSubmatch(out.String(), -1)
	if len(serials) != 3 || serials[0][1] != serials[1][1] || serials[1][1] != serials[2][1] {
		t.Errorf("the replicas do not all serve one certificate:\n%s", out.String())
	}
}
