package certmgr

import (
	"bytes"
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"net/http"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/crypto/acme/autocert"

	"github.com/certmgr/certmgr/internal/testsupport"
)

// TestStateRoundTrip: what encodeState writes, decodeState reads back
// unchanged, and encodes to the same bytes.
func TestStateRoundTrip(t *testing.T) {
	recs := fuzzStateSample()
	data, err := encodeState(recs)
	if err != nil {
		t.Fatal(err)
	}
	now := time.Date(2026, 1, 17, 0, 28, 0, 0, time.UTC) // the records' time
	got, bad, err := decodeState(data, now)
	if err != nil || len(bad) > 0 {
		t.Fatalf("decodeState: %v, bad %v", err, bad)
	}
	if !fuzzSameRecords(recs, got) {
		t.Errorf("round trip changed the records:\n%+v\n%+v", recs, got)
	}
	again, err := encodeState(got)
	if err != nil || !bytes.Equal(again, data) {
		t.Errorf("second encoding differs (%v):\n%s\n%s", err, data, again)
	}
	if empty, err := encodeState(nil); err != nil || string(empty) != `{"version":1,"domains":{}}` {
		t.Errorf("encodeState(nil) = %s, %v", empty, err)
	}
}

// TestDecodeStateRefuses: a blob that cannot be read is an error; an
// entry that is no valid record is left out and reported, and the others
// are kept.
func TestDecodeStateRefuses(t *testing.T) {
	for _, tt := range []struct {
		blob string
		err  string // the error, or "" for none
		bad  string // in the one bad entry's error, or ""
	}{
		{blob: `{not json`, err: "corrupt"},
		{blob: `{"version":99,"domains":{}}`, err: "unknown version 99"},
		{blob: `{}`, err: "unknown version 0"},
		{blob: `{"version":1,"domains":{"a.test":{"failures":"x"}}}`, bad: `"a.test" is corrupt`},
		{blob: `{"version":1,"domains":{"A.test":{"failures":1,"next_attempt":"2030-01-01T00:00:00Z"}}}`, bad: `invalid domain "A.test"`},
		{blob: `{"version":1,"domains":{"a..test":{}}}`, bad: `invalid domain "a..test"`},
		{blob: `{"version":1,"domains":{"a.test":{"failures":-1,"next_attempt":"2030-01-01T00:00:00Z"}}}`, bad: `"a.test" is inconsistent`},
		{blob: `{"version":1,"domains":{"a.test":{"failures":2}}}`, bad: `"a.test" is inconsistent`},
	} {
		good := tt.blob
		if tt.err == "" { // a valid entry beside the bad one
			good = strings.Replace(good, `"domains":{`, `"domains":{"good.test":{"failures":1,"next_attempt":"2030-01-01T00:00:00Z"},`, 1)
		}
		recs, bad, err := decodeState([]byte(good), time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC))
		if tt.err != "" {
			if err == nil || !strings.Contains(err.Error(), tt.err) || recs != nil || bad != nil {
				t.Errorf("decodeState(%s) = %v, %v, %v; want only an error naming %q", good, recs, bad, err, tt.err)
			}
			continue
		}
		if err != nil || len(bad) != 1 || !strings.Contains(bad[0].Error(), tt.bad) || len(recs) != 1 || recs["good.test"].Failures != 1 {
			t.Errorf("decodeState(%s) = %v, %v, %v; want good.test kept and one bad entry naming %q", good, recs, bad, err, tt.bad)
		}
	}
}

// TestDecodeStateBoundsRecords: whatever a store says, a decoded record
// waits at most maxRetryAfter from now, dates nothing after now, and keeps
// at most maxSpends spends, every authorization still counted.
func TestDecodeStateBoundsRecords(t *testing.T) {
	now := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	spends := strings.Repeat(`{"at":"2025-12-31T23:59:00Z","authz":1},`, maxSpends) + `{"at":"2030-01-01T00:00:00Z","authz":1}`
	blob := `{"version":1,"domains":{"a.test":{"failures":1,"last_error":"` + strings.Repeat("x", 2*maxLastError) + `",` +
		`"last_failure":"9999-01-01T00:00:00Z","next_attempt":"9999-01-01T00:00:00Z","retry_after":"9999-01-01T00:00:00Z","spends":[` + spends + `]}}}`
	recs, bad, err := decodeState([]byte(blob), now)
	if err != nil || len(bad) > 0 {
		t.Fatalf("decodeState: %v, %v", err, bad)
	}
	r := recs["a.test"]
	limit := now.Add(maxRetryAfter)
	if !r.NextAttempt.Equal(limit) || !r.RetryAfter.Equal(limit) || !r.LastFailure.Equal(now) || len(r.LastError) != maxLastError {
		t.Errorf("record %+v not bounded from now", r)
	}
	if len(r.Spends) > maxSpends || r.spentSince(now.Add(-time.Hour), now) != maxSpends+1 || r.Spends[len(r.Spends)-1].At.After(now) {
		t.Errorf("spends %+v, want at most %d, all %d authorizations counted, none after now", r.Spends, maxSpends, maxSpends+1)
	}
}

// TestNewLoadsPersistedState: a Manager knows every domain an earlier one
// persisted from New on, with its failure record and its cached
// certificate's expiry, and reports a corrupt entry as a cache error.
func TestNewLoadsPersistedState(t *testing.T) {
	clock := newFakeClock()
	cache := &memCache{m: make(map[string][]byte)}
	now := clock.Now()
	state, err := encodeState(map[string]failureRecord{
		"backoff.test": {Failures: 2, LastError: "certmgr: backoff.test: Connection refused", LastFailure: now, NextAttempt: now.Add(10 * time.Minute)},
		"valid.test":   {},
		"refused.test": {Failures: 1, NextAttempt: now.Add(time.Minute)},
	})
	if err != nil {
		t.Fatal(err)
	}
	cache.m[stateKey] = bytes.Replace(state, []byte(`"domains":{`), []byte(`"domains":{"bad.test":{"failures":"x"},`), 1)
	cert := selfSigned(t, "valid.test", ecKey(t), "test", now.Add(-time.Hour), now.Add(24*time.Hour))
	cache.m["valid.test"] = pemCert(t, cert)

	var events []Event
	m := newPureManager(t, clock, func(c *Config) {
		c.Autocert.Cache = cache
		c.Autocert.HostPolicy = autocert.HostWhitelist("backoff.test", "valid.test", "bad.test")
		c.OnEvent = func(e Event) { events = append(events, e) }
	})
	if len(events) != 1 || events[0].Kind != EventCacheError || !strings.Contains(events[0].Err.Error(), "bad.test") {
		t.Errorf("events %v, want one cache error naming bad.test", events)
	}
	st := m.Status("backoff.test")
	var ae *AttemptError
	if st.State != StateBackoff || st.Failures != 2 || !st.NextAttempt.Equal(now.Add(10*time.Minute)) ||
		!errors.As(st.LastError, &ae) || ae.Detail != "Connection refused" {
		t.Errorf("Status(backoff.test) = %+v, want the persisted backoff with the CA's detail", st)
	}
	if st := m.Status("valid.test"); st.State != StateValid || !st.NotAfter.Equal(cert.Leaf.NotAfter) {
		t.Errorf("Status(valid.test) = %+v, want valid until %v", st, cert.Leaf.NotAfter)
	}
	var names []string
	for _, s := range m.Domains() {
		names = append(names, s.Domain)
	}
	if strings.Join(names, " ") != "backoff.test valid.test" {
		t.Errorf("Domains() = %v, want the persisted names the HostPolicy allows", names)
	}
}

// TestSaveStateWritesWhatMatters: the state holds every domain with a
// failure record or a valid certificate, and nothing else.
func TestSaveStateWritesWhatMatters(t *testing.T) {
	clock := newFakeClock()
	m := newPureManager(t, clock, nil)
	now := clock.Now()
	for name, set := range map[string]func(d *domain){
		"failed.test":  func(d *domain) { d.fail.fail(now, "refused", 1, 4, m.cfg.Backoff, time.Time{}, 0) },
		"valid.test":   func(d *domain) { d.notAfter = now.Add(time.Hour) },
		"expired.test": func(d *domain) { d.notAfter = now },
		"spent.test":   func(d *domain) { d.fail.Spends = []spend{{At: now.Add(-time.Minute), Authz: 1}} },
		"idle.test":    func(d *domain) {},
	} {
		d, err := m.domainFor(name)
		if err != nil {
			t.Fatal(err)
		}
		set(d)
	}
	m.saveState()
	recs := persistedAt(t, m.cache, now)
	var names []string
	for n := range recs {
		names = append(names, n)
	}
	spent := recs["spent.test"]
	if len(recs) != 3 || recs["failed.test"].Failures != 1 || spent.spentSince(now.Add(-time.Hour), now) != 1 {
		t.Errorf("persisted %v, want failed.test, spent.test and valid.test", recs)
	}
	if _, ok := recs["valid.test"]; !ok {
		t.Errorf("persisted %v, want valid.test among them", names)
	}
}

// TestRestartKeepsBackoff: a second Manager on the same cache keeps the
// first one's backoff (no ACME request, the fallback served, Status from
// New on); a corrupt persisted entry is logged and ignored.
func TestRestartKeepsBackoff(t *testing.T) {
	const name = "restart.test"
	e := newEnv(t, envOptions{names: []string{name}})
	m1 := e.start(t, nil)
	e.DNS.SetA(name, "127.0.0.3")
	if err := m1.Provision(context.Background(), name); err == nil {
		t.Fatal("Provision succeeded; validation should fail")
	}
	first := m1.Status(name)
	if first.State != StateBackoff {
		t.Fatalf("Status = %+v, want backoff", first)
	}
	m1.Close()

	// A corrupt entry beside the good one, as another version might write.
	data, err := e.cache.Get(context.Background(), stateKey)
	if err != nil {
		t.Fatal(err)
	}
	data = []byte(strings.Replace(string(data), `"domains":{`, `"domains":{"bad.test":{"failures":"x"},`, 1))
	if err := e.cache.Put(context.Background(), stateKey, data); err != nil {
		t.Fatal(err)
	}

	logs := &testsupport.Buffer{}
	// The second Manager's ACME requests, counted apart from what the
	// first one's detached work may still send.
	requests := &countingTransport{next: e.HTTPClient.Transport}
	m2 := e.start(t, func(c *Config) {
		c.Autocert.Client.HTTPClient = &http.Client{Transport: requests}
		c.Autocert.HostPolicy = autocert.HostWhitelist(name, "bad.test")
		c.Logger = newTestLogger(logs)
	})
	st := m2.Status(name)
	if st.State != StateBackoff || st.Failures != 1 || !st.NextAttempt.Equal(first.NextAttempt) || st.LastError == nil {
		t.Errorf("Status after restart = %+v, want %+v", st, first)
	}
	if !strings.Contains(logs.String(), "bad.test") || !strings.Contains(logs.String(), "cache error") {
		t.Errorf("the corrupt entry was not logged:\n%s", logs)
	}
	if st := m2.Status("bad.test"); st.State != StateNone {
		t.Errorf("corrupt entry gave state %+v", st)
	}
	c, err := m2.GetCertificate(&tls.ClientHelloInfo{ServerName: name})
	if err != nil || !IsFallback(c) {
		t.Fatalf("GetCertificate = %v, %v; want the fallback", c, err)
	}
	if err := m2.Provision(context.Background(), name); !errors.Is(err, ErrBackoff) {
		t.Errorf("Provision after restart = %v, want ErrBackoff", err)
	}
	if n := requests.n.Load(); n != 0 {
		t.Errorf("%d ACME requests after restart, want none", n)
	}
}

// countingTransport counts the requests it passes on.
type countingTransport struct {
	next http.RoundTripper
	n    atomic.Int64
}

func (c *countingTransport) RoundTrip(r *http.Request) (*http.Response, error) {
	c.n.Add(1)
	return c.next.RoundTrip(r)
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

// TestUnreadableStateLosesNothing: while the persisted records cannot be
// read, no order is made and nothing is written over them; once they can,
// they bind. A record whose HostPolicy check errors is kept as it is.
func TestUnreadableStateLosesNothing(t *testing.T) {
	t.Parallel()
	const (
		limited = "limited.test"
		other   = "other.test"
	)
	e := newEnv(t, envOptions{names: []string{keptName, limited, other}, hsBound: faultHSTimeout + faultHSMargin,
		config: func(c *Config) { c.HandshakeTimeout = faultHSTimeout }})
	now := time.Now()
	want := failureRecord{Failures: 1, LastError: "rate limited", LastFailure: now.Add(-time.Minute),
		NextAttempt: now.Add(72 * time.Hour), RetryAfter: now.Add(72 * time.Hour),
		Spends: []spend{{At: now.Add(-10 * time.Minute), Authz: 2}}}
	data, err := encodeState(map[string]failureRecord{limited: want})
	if err != nil {
		t.Fatal(err)
	}
	if err := e.cache.Put(context.Background(), stateKey, data); err != nil {
		t.Fatal(err)
	}
	var failing atomic.Bool // reads of the records fail
	failing.Store(true)
	fc := &blockingCache{Cache: e.cache, block: func(key string) error {
		if key == stateKey && failing.Load() {
			return errors.New("store unavailable")
		}
		return nil
	}}
	m := e.start(t, func(c *Config) {
		c.Autocert.Cache = fc
		c.hooks.cacheRetry = time.Hour // read again only when Retry asks
	})
	if err := m.Provision(context.Background(), other); !errors.Is(err, ErrBackoff) {
		t.Errorf("Provision with the records unread = %v, want ErrBackoff", err)
	}
	if n := e.Proxy.Counts(other).Orders; n != 0 {
		t.Errorf("%d orders while the records were unread", n)
	}
	if rec := persisted(t, e.cache)[limited]; !rec.RetryAfter.Equal(want.RetryAfter) {
		t.Fatalf("the unread record was overwritten: %+v", rec)
	}

	failing.Store(false)
	m.Retry(other) // reads them again
	if st := m.Status(limited); st.Failures != 1 || !st.NextAttempt.Equal(want.RetryAfter) {
		t.Errorf("Status once read = %+v, want the persisted failure until %v", st, want.RetryAfter)
	}
	if err := m.Provision(context.Background(), limited); !errors.Is(err, ErrBackoff) {
		t.Errorf("Provision of the rate-limited domain = %v, want ErrBackoff", err)
	}
	if err := m.Provision(context.Background(), other); err != nil {
		t.Fatalf("Provision once the records are read: %v", err)
	}
	if rec := persisted(t, e.cache)[limited]; !rec.RetryAfter.Equal(want.RetryAfter) {
		t.Errorf("after a save, the record is %+v", rec)
	}
	closeWithin(t, m, time.Second)

	// A HostPolicy that errors on the name when New runs: its record stays.
	const third = "third.test"
	e.DNS.SetA(third, "127.0.0.1")
	m2 := e.start(t, func(c *Config) {
		c.Autocert.HostPolicy = func(_ context.Context, host string) error {
			if host == third || host == keptName {
				return nil
			}
			return errors.New("policy backend unavailable")
		}
	})
	if err := m2.Provision(context.Background(), third); err != nil {
		t.Fatalf("Provision %s: %v", third, err)
	}
	if rec := persisted(t, e.cache)[limited]; !rec.RetryAfter.Equal(want.RetryAfter) {
		t.Errorf("with its HostPolicy check failing, the record became %+v", rec)
	}
}
