package certmgr

import (
	"strings"
	"testing"
)

// TestNormalize: the one name under which every part of certmgr knows a
// server name, and what it refuses.
func TestNormalize(t *testing.T) {
	for _, tt := range []struct {
		in, want string // want "": refused
		err      string // in the refusal
	}{
		{"example.com", "example.com", ""},
		{"Example.COM.", "example.com", ""},
		{"bücher.example", "xn--bcher-kva.example", ""},
		{"BÜCHER.example", "xn--bcher-kva.example", ""},
		{"xn--bcher-kva.example", "xn--bcher-kva.example", ""},
		{"a\u3002b", "", "two labels"}, // as autocert: no ASCII dot
		{"", "", "missing server name"},
		{"localhost", "", "two labels"},
		{"com.", "", "two labels"},
		{"a..b", "", "empty label"},
		{".a.b", "", "empty label"},
		{"a_b.example", "", "invalid character"},
		{"-a.example", "", "invalid character"},
		{"1.2.3.4", "", "IP address"},
		{strings.Repeat("a", 64) + ".test", "", "label over 63 bytes"},
		{strings.Repeat("a.", 127) + "a", "", "too long"},
		{strings.Repeat("a", 4*maxNameLen+1), "", "too long"},
	} {
		got, err := normalize(tt.in)
		if tt.want != "" {
			if err != nil || got != tt.want {
				t.Errorf("normalize(%q) = %q, %v; want %q", tt.in, got, err, tt.want)
			}
			continue
		}
		if err == nil || !strings.HasPrefix(err.Error(), "certmgr: ") || !strings.Contains(err.Error(), tt.err) {
			t.Errorf("normalize(%q) = %q, %v; want an error naming %q", tt.in, got, err, tt.err)
		}
	}
}

// FuzzNormalize checks that normalize never panics and that a name it
// accepts is known to certmgr as it is to autocert: lower-case ASCII, no
// trailing dot, at least two labels, at most maxNameLen bytes, a fixed
// point of normalize, and equal to autocert's key for the same server
// name. A name autocert refuses, normalize refuses too.
//
// normalize may refuse a name that autocert accepts, but only one that no
// certificate can carry (the CA would refuse the order), see
// fuzzCertifiable: an input of more than 4*maxNameLen bytes (refused
// before IDNA sees it), or one whose autocert key is longer than
// maxNameLen bytes (RFC 1035), has an empty label (".a.b", "a..b",
// "a.b.."), has a single label ("localhost.xn--", whose last label is
// empty in punycode), or is not an A-label name IDNA accepts (invalid
// UTF-8, which IDNA encodes as U+FFFD; "ℶ.0", whose mapping makes it
// right-to-left after the bidi check). Every other refusal of a name
// autocert accepts is reported.
func FuzzNormalize(f *testing.F) {
	for _, s := range []string{
		"example.com", "EXAMPLE.COM", "www.Example.COM.", "a.b", "a.b.",
		"localhost", "com.", ".com", "..", ".", "",
		"a..b", ".a.b", "a.b..", "a.b.\u3002",
		"xn--bcher-kva.example", "bücher.example", "BÜCHER.example",
		"ß.de", "faß.de", "σς.gr", "a\u3002b", "a\uff0eb", "a\uff61b",
		"a_b.example", "-a.example", "a-.example", "a b.example",
		"xn--a.com", "XN--A.com", "\u200d.example", "a\u200db.example",
		"\u0627\u0644.example", "1.2.3.4", "[::1]", "a.b:443",
		strings.Repeat("a.", 126) + "a", strings.Repeat("a.", 127) + "a",
		strings.Repeat("\u00e9", 300) + ".com",
	} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, name string) {
		out, err := normalize(name)
		if len(name) > 4*maxNameLen {
			// Refused by length alone. Asking autocert too would only
			// slow the fuzzer down on inputs it grows long.
			if err == nil {
				t.Errorf("normalize accepts a name of %d bytes as %q", len(name), out)
			}
			return
		}
		key, ok := fuzzAutocertKey(name)
		if err != nil {
			if ok && fuzzCertifiable(key) {
				t.Errorf("normalize(%q) refuses (%v) a name autocert accepts as %q", name, err, key)
			}
			return
		}
		if !ok {
			t.Errorf("normalize(%q) = %q, but autocert refuses the name", name, out)
		} else if out != key {
			t.Errorf("normalize(%q) = %q, autocert's key is %q", name, out, key)
		}
		for i := 0; i < len(out); i++ {
			if c := out[i]; c >= 0x80 || 'A' <= c && c <= 'Z' {
				t.Errorf("normalize(%q) = %q: not lower-case ASCII", name, out)
				break
			}
		}
		if strings.HasSuffix(out, ".") {
			t.Errorf("normalize(%q) = %q: trailing dot", name, out)
		}
		if fuzzEmptyLabel(out) {
			t.Errorf("normalize(%q) = %q: empty label", name, out)
		}
		if !strings.Contains(strings.Trim(out, "."), ".") {
			t.Errorf("normalize(%q) = %q: fewer than two labels", name, out)
		}
		if len(out) > maxNameLen {
			t.Errorf("normalize(%q) = %q: %d bytes, over %d", name, out, len(out), maxNameLen)
		}
		if again, err := normalize(out); err != nil || again != out {
			t.Errorf("normalize(%q) = %q, but normalize(%q) = %q, %v: not idempotent", name, out, out, again, err)
		}
	})
}
