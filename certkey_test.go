package certmgr

import (
	"crypto/rand"
	"crypto/rsa"
	"strings"
	"testing"
	"time"
)

// TestCertKeys: which Cache keys hold certificates, and for which key.
func TestCertKeys(t *testing.T) {
	for key, want := range map[string]bool{
		"a.test": true, "a.test+rsa": true, "a.test+token": false, "a.test+http-01": false,
		accountKeyName: false, stateKey: false,
	} {
		if got := isCertKey(key); got != want {
			t.Errorf("isCertKey(%q) = %v, want %v", key, got, want)
		}
	}
	for _, k := range []certKey{{domain: "a.test"}, {domain: "a.test", rsa: true}} {
		if got := certKeyOf(k.cacheKey()); got != k {
			t.Errorf("certKeyOf(%q) = %+v, want %+v", k.cacheKey(), got, k)
		}
	}
}

// TestParseCert: a cached certificate is usable only for its name and key
// type, and while it is valid; decodeCert wants the key then a chain that
// matches it.
func TestParseCert(t *testing.T) {
	t.Parallel()
	now := newFakeClock().Now()
	key := ecKey(t)
	cert := selfSigned(t, "a.test", key, "test", now.Add(-time.Hour), now.Add(time.Hour))
	data := pemCert(t, cert)
	if c, err := parseCert(certKey{domain: "a.test"}, data, now); err != nil || !c.Leaf.Equal(cert.Leaf) {
		t.Fatalf("parseCert = %v, %v", c, err)
	}
	rsaKey, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	for _, tt := range []struct {
		name string
		k    certKey
		data []byte
		now  time.Time
		want string
	}{
		{"other name", certKey{domain: "b.test"}, data, now, "b.test"},
		{"other key type", certKey{domain: "a.test", rsa: true}, data, now, "wrong key type"},
		{"not yet valid", certKey{domain: "a.test"}, data, now.Add(-2 * time.Hour), "not valid now"},
		{"expired", certKey{domain: "a.test"}, data, now.Add(time.Hour), "not valid now"},
		{"no key", certKey{domain: "a.test"}, data[strings.Index(string(data), "-----BEGIN CERTIFICATE"):], now, "no private key"},
		{"no chain", certKey{domain: "a.test"}, data[:strings.Index(string(data), "-----BEGIN CERTIFICATE")], now, "malformed"},
		{"trailing garbage", certKey{domain: "a.test"}, append(append([]byte{}, data...), "garbage"...), now, "malformed"},
		{"key of another certificate", certKey{domain: "a.test"}, swapKey(t, data, rsaKey), now, "does not match"},
	} {
		if _, err := parseCert(tt.k, tt.data, tt.now); err == nil || !strings.Contains(err.Error(), tt.want) {
			t.Errorf("%s: parseCert = %v, want an error naming %q", tt.name, err, tt.want)
		}
	}
}
