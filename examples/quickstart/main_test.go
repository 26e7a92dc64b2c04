package main

import (
	"bytes"
	"strings"
	"testing"
)

// TestQuickstart runs the demo: it must obtain a certificate over
// TLS-ALPN-01 with one order and report its issuer and validity.
func TestQuickstart(t *testing.T) {
	var out bytes.Buffer
	if err := run(&out); err != nil {
		t.Fatalf("run: %v\n%s", err, out.String())
	}
	for _, want := range []string{
		"domain:    quickstart.test",
		"challenge: tls-alpn-01",
		"issuer:    Pebble Intermediate CA",
		"valid:     ",
		"orders:    1\n",
		"response:  200 OK",
		"state:     valid",
	} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("output lacks %q:\n%s", want, out.String())
		}
	}
}
