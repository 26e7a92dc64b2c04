package certmgr

import (
	"bytes"
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"hash/fnv"
	"net/http"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"golang.org/x/crypto/acme/autocert"
	"golang.org/x/net/idna"
)

// errFuzzStop ends autocert's GetCertificate at its HostPolicy, before it
// does anything but derive the name.
var errFuzzStop = errors.New("fuzz: stop at host policy")

// fuzzAutocertKey returns the key under which autocert's GetCertificate
// knows the server name, and whether it accepts the name at all. It asks
// autocert itself: GetCertificate refuses an empty name and a name with
// no dot inside strings.Trim(name, "."), maps the name with
// idna.Lookup.ToASCII (refusing what IDNA refuses), hands the result to
// the HostPolicy and keys the certificate by
// strings.TrimSuffix(result, ".").
func fuzzAutocertKey(name string) (string, bool) {
	var host string
	m := &autocert.Manager{HostPolicy: func(_ context.Context, h string) error {
		host = h
		return errFuzzStop
	}}
	if _, err := m.GetCertificate(&tls.ClientHelloInfo{ServerName: name}); !errors.Is(err, errFuzzStop) {
		return "", false
	}
	return strings.TrimSuffix(host, "."), true
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

// fuzzEmptyLabel reports whether the dot-separated name has an empty label.
func fuzzEmptyLabel(name string) bool {
	return slices.Contains(strings.Split(name, "."), "")
}

// fuzzCertifiable reports whether an autocert key is a DNS name a
// certificate can carry: at most maxNameLen bytes, two labels or more,
// none empty or over maxLabelLen bytes, not an IP address, and in the
// A-label form IDNA itself accepts unchanged.
func fuzzCertifiable(key string) bool {
	again, err := idna.Lookup.ToASCII(key)
	_, ipErr := netip.ParseAddr(key)
	return len(key) <= maxNameLen && strings.Contains(key, ".") && !fuzzEmptyLabel(key) &&
		!slices.ContainsFunc(strings.Split(key, "."), func(l string) bool { return len(l) > maxLabelLen }) &&
		ipErr != nil && err == nil && again == key
}

// fuzzStateSample returns failure records as saveState would write them.
func fuzzStateSample() map[string]failureRecord {
	t0 := time.Date(2026, 1, 17, 0, 27, 45, 0, time.UTC)
	return map[string]failureRecord{
		"example.com": {
			Failures:    2,
			LastError:   "urn:ietf:params:acme:error:connection: Timeout during connect",
			LastFailure: t0,
			NextAttempt: t0.Add(10 * time.Minute),
			Spends:      []spend{{At: t0.Add(-time.Minute), Authz: 1}, {At: t0, Authz: 2}},
		},
		"xn--bcher-kva.example": {
			Failures:    1,
			LastError:   "too many certificates already issued; retry after 2026-01-18 00:00:00 UTC",
			LastFailure: t0,
			NextAttempt: t0.Add(24 * time.Hour),
			RetryAfter:  t0.Add(24 * time.Hour),
		},
		"spent.example.org": {
			Spends: []spend{{At: t0, Authz: 1}},
		},
	}
}

// fuzzCheckRecord reports a decoded record that decodeState should have
// refused: the validation decodeState itself applies.
func fuzzCheckRecord(t *testing.T, name string, r failureRecord) {
	t.Helper()
	if n, err := normalize(name); err != nil || n != name {
		t.Errorf("decoded a record for %q, which normalizes to %q, %v", name, n, err)
	}
	if r.Failures < 0 || len(r.Spends) > maxSpends || (r.Failures > 0 && r.NextAttempt.IsZero()) {
		t.Errorf("decoded an inconsistent record for %q: %+v", name, r)
	}
	// Nothing in a store can push a wait past maxRetryAfter from now, or
	// date a failure or a spend after now.
	limit := fuzzNow.Add(maxRetryAfter)
	if r.NextAttempt.After(limit) || r.RetryAfter.After(limit) || r.LastFailure.After(fuzzNow) {
		t.Errorf("decoded a record for %q beyond the bounds: %+v", name, r)
	}
	for i, s := range r.Spends {
		if s.Authz < 1 || s.Authz > maxSpendAuthz || s.At.After(fuzzNow) || !s.At.After(fuzzNow.Add(-budgetWindow)) ||
			i > 0 && s.At.Before(r.Spends[i-1].At) {
			t.Errorf("decoded a record for %q with spend %d out of bounds or order: %+v", name, i, r.Spends)
		}
	}
	if len(r.LastError) > maxLastError {
		t.Errorf("decoded a record for %q with a LastError of %d bytes", name, len(r.LastError))
	}
}

// fuzzSameRecords reports whether a and b hold the same records; times
// are compared as instants (a location does not survive JSON).
func fuzzSameRecords(a, b map[string]failureRecord) bool {
	if len(a) != len(b) {
		return false
	}
	for name, x := range a {
		y, ok := b[name]
		if !ok || x.Failures != y.Failures || x.LastError != y.LastError ||
			!x.LastFailure.Equal(y.LastFailure) || !x.NextAttempt.Equal(y.NextAttempt) ||
			!x.RetryAfter.Equal(y.RetryAfter) || len(x.Spends) != len(y.Spends) {
			return false
		}
		for i := range x.Spends {
			if !x.Spends[i].At.Equal(y.Spends[i].At) || x.Spends[i].Authz != y.Spends[i].Authz || x.Spends[i].ID != y.Spends[i].ID {
				return false
			}
		}
	}
	return true
}

// FuzzDecodeState checks that decodeState never panics; that a blob it
// cannot read is an error with nothing else, and otherwise every domain
// of the blob is either a record that passes decodeState's validation or
// a bad entry; and that what it decodes survives encodeState and
// decodeState again unchanged, with nothing bad, and encodes to the same
// bytes a second time.
func FuzzDecodeState(f *testing.F) {
	valid, err := encodeState(fuzzStateSample())
	if err != nil {
		f.Fatal(err)
	}
	f.Add(valid)
	f.Add(bytes.Replace(valid, []byte(`"failures":1`), []byte(`"failures":"one"`), 1))
	f.Add([]byte(`{"version":1,"domains":{"example.com":{"failures":-1,"next_attempt":"2026-01-17T00:27:45Z"}}}`))
	f.Add([]byte(`{"version":1,"domains":{"Example.COM":{"failures":1,"next_attempt":"2026-01-17T00:27:45Z"},"example.net":{"failures":1}}}`))
	f.Add([]byte(`{"version":1,"domains":{"example.com":{"last_failure":"2026-01-17T00:27:45+23:59","next_attempt":"9999-12-31T23:59:59-23:59","spends":[]}}}`))
	f.Add([]byte(`{"version":1,"domains":{"example.com":null,"example.org":{},"x":[]}}`))
	f.Add([]byte(`{"version":1,"domains":null}`))
	f.Add([]byte(`{"version":1}`))
	f.Add([]byte(`{}`))
	f.Add([]byte(`null`))
	f.Add([]byte(``))
	f.Add(valid[:len(valid)/2])
	f.Add([]byte(`{"version":2,"domains":{}}`))
	f.Add([]byte(`{"version":"1","domains":{}}`))
	f.Fuzz(func(t *testing.T, data []byte) {
		recs, bad, err := decodeState(data, fuzzNow)
		var st struct {
			Version int                        `json:"version"`
			Domains map[string]json.RawMessage `json:"domains"`
		}
		if err != nil {
			if recs != nil || bad != nil {
				t.Fatalf("decodeState failed (%v) and still returned %d records and %d bad entries", err, len(recs), len(bad))
			}
			if json.Unmarshal(data, &st) == nil && st.Version == stateVersion {
				t.Fatalf("decodeState refuses a readable blob of version %d: %v", stateVersion, err)
			}
			return
		}
		if json.Unmarshal(data, &st) != nil || st.Version != stateVersion {
			t.Fatalf("decodeState reads a blob that is not JSON of version %d", stateVersion)
		}
		if recs == nil {
			t.Fatal("decodeState returned no error and a nil map")
		}
		if len(recs)+len(bad) != len(st.Domains) {
			t.Errorf("%d domains in the blob, but %d records and %d bad entries", len(st.Domains), len(recs), len(bad))
		}
		for name, r := range recs {
			fuzzCheckRecord(t, name, r)
		}
		again, err := encodeState(recs)
		if err != nil {
			t.Fatalf("encodeState of decoded records: %v", err)
		}
		recs2, bad2, err := decodeState(again, fuzzNow)
		if err != nil || len(bad2) > 0 {
			t.Fatalf("decodeState of re-encoded records: %v, bad %v", err, bad2)
		}
		if !fuzzSameRecords(recs, recs2) {
			t.Fatalf("round trip changed the records:\n%+v\n%+v", recs, recs2)
		}
		for name, r := range recs2 {
			fuzzCheckRecord(t, name, r)
		}
		third, err := encodeState(recs2)
		if err != nil || !bytes.Equal(again, third) {
			t.Fatalf("second encoding differs (%v):\n%s\n%s", err, again, third)
		}
	})
}

// fuzzNow is the fixed now of FuzzParseRetryAfter.
var fuzzNow = time.Date(2026, 1, 17, 0, 0, 0, 0, time.UTC)

// Acceptable results of parseRetryAfter: the zero time (nothing said), or
// an instant from year 1 to year 9999 UTC. The result becomes a record's
// RetryAfter and NextAttempt, which are persisted as JSON (encoding/json
// refuses a time outside years 0 to 9999); an instant before year 1 is
// before the zero time.
var (
	fuzzMinTime = time.Date(1, 1, 1, 0, 0, 0, 0, time.UTC)
	fuzzMaxTime = time.Date(9999, 12, 31, 23, 59, 59, 0, time.UTC)
)

// fuzzRetryOK reports whether t is an acceptable result.
func fuzzRetryOK(t time.Time) bool {
	return t.IsZero() || !t.Before(fuzzMinTime) && !t.After(fuzzMaxTime)
}

// FuzzParseRetryAfter checks that parseRetryAfter never panics and returns
// an acceptable time (see fuzzRetryOK) that a record can persist; that a
// header of n seconds (0 <= n <= 1e9) gives now+n, and a larger one a
// time no earlier than now+1e9 seconds; that an HTTP-date header gives
// that date when it is acceptable; and that, with no header, a detail
// that says "retry after" in Let's Encrypt's form or in RFC 3339, after
// any text that does not say it, gives that time.
func FuzzParseRetryAfter(f *testing.F) {
	for _, s := range [][2]string{
		{"120", ""},
		{" 0 ", ""},
		{"1000000000", ""},
		{"4294967296", ""},
		{"9223372036854775807", ""},
		{"99999999999999999999", ""},
		{"-5", "retry after 2026-01-17 00:27:45 UTC"},
		{"+7", ""},
		{"Sat, 17 Jan 2026 00:27:45 GMT", ""},
		{"Saturday, 17-Jan-26 00:27:45 GMT", ""},
		{"Sat Jan 17 00:27:45 2026", ""},
		{"Sat, 01 Jan 0000 00:00:00 GMT", ""},
		{"Fri, 31 Dec 9999 23:59:59 GMT", ""},
		{"", "too many certificates (5) already issued for this exact set of domains in the last 168h0m0s, retry after 2026-01-17 00:27:45 UTC: see https://letsencrypt.org/docs/rate-limits/#new-certificates-per-exact-set-of-hostnames"},
		{"", "Retry after 2023-08-04T12:00:00Z: see https://letsencrypt.org/docs/rate-limits/"},
		{"", "too many failed authorizations recently: Retry after 2023-08-04T12:00:00Z, please"},
		{"", "retry after 2023-08-04T12:00:00+02:00; later"},
		{"", "retry after 0000-01-01 00:00:00 UTC"},
		{"", "retry after 9999-12-31T23:59:59-23:59"},
		{"", "retry after 0001-01-01T00:00:00+01:00"},
		{"", "retry after tomorrow"},
		{"", "RETRY AFTER 2026-01-17 00:27:45 UTC"},
		{"", "\u0130\u0130\u0130\u0130 retry after 2026-01-17 00:27:45 UTC"},
		{"", "\u212a\u212a\u212a\u212a retry after 2026-01-17 00:27:45 UTC"},
		{"", "\u0130\u0130\u0130\u0130 "},
		{"", "\xffretry after "},
		{"", "\u023a\u023a\u023a\u023aretry after 2026-01-17 00:27:45 UTC"},
		{"soon", "no time here"},
		{"", "retry after "},
		{"", ""},
	} {
		f.Add(s[0], s[1])
	}
	f.Fuzz(func(t *testing.T, header, detail string) {
		got := parseRetryAfter(header, detail, fuzzNow)
		if !fuzzRetryOK(got) {
			t.Errorf("parseRetryAfter(%q, %q) = %v: outside years 1 to 9999", header, detail, got)
		}
		if _, err := json.Marshal(persistedDomain{NextAttempt: got, RetryAfter: got}); err != nil {
			t.Errorf("parseRetryAfter(%q, %q) = %v, which cannot be persisted: %v", header, detail, got, err)
		}
		h := strings.TrimSpace(header)
		if n, err := strconv.ParseInt(h, 10, 64); err == nil && n >= 0 {
			if n <= 1e9 {
				if want := fuzzNow.Add(time.Duration(n) * time.Second); !got.Equal(want) {
					t.Errorf("parseRetryAfter(%q, %q) = %v, want %v", header, detail, got, want)
				}
			} else if got.Before(fuzzNow.Add(1e9 * time.Second)) {
				t.Errorf("parseRetryAfter(%q, %q) = %v, before now+1e9s", header, detail, got)
			}
		} else if d, err := http.ParseTime(h); err == nil && fuzzRetryOK(d) && !got.Equal(d) {
			t.Errorf("parseRetryAfter(%q, %q) = %v, want %v", header, detail, got, d)
		}

		// The detail forms, without a header, after the fuzzed detail as
		// leading text when it does not say "retry after" itself, and
		// before the fuzzed header as trailing text.
		if strings.Contains(strings.ToLower(detail), "retry after") {
			return
		}
		hash := fnv.New64a()
		hash.Write([]byte(header))
		hash.Write([]byte(detail))
		lo, hi := fuzzMinTime.Unix(), fuzzMaxTime.Unix()
		want := time.Unix(lo+int64(hash.Sum64()%uint64(hi-lo+1)), 0).UTC()
		for _, d := range []string{
			detail + "retry after " + want.Format(time.DateTime) + " UTC" + header,
			detail + "Retry after " + want.Format(time.RFC3339) + ": " + header,
			detail + "Retry after " + want.Format(time.RFC3339) + ", " + header,
			detail + "Retry after " + want.Format(time.RFC3339),
		} {
			if got := parseRetryAfter("", d, fuzzNow); !got.Equal(want) {
				t.Errorf("parseRetryAfter(\"\", %q) = %v, want %v", d, got, want)
			}
		}
	})
}
