package certmgr

import (
	"encoding/json"
	"errors"
	"fmt"
	"net/http/httptest"
	"reflect"
	"testing"
	"time"

	"golang.org/x/crypto/acme/autocert"
)

// TestStatusComputation: statusLocked as a table, on a domain built by
// hand at a fixed now, with no jitter in either schedule (the longest
// backoff is 24 h, the longest DNS recheck 10 min).
func TestStatusComputation(t *testing.T) {
	clock := newFakeClock()
	now := clock.Now()
	m := newPureManager(t, clock, func(c *Config) {
		c.Backoff.Jitter = -1
		c.DNSRecheck.Jitter = -1
	})
	errCA := errors.New("certmgr: a.test: Connection refused")
	errDNS := fmt.Errorf("%w: a.test: A 127.0.0.2 is not a known IP", ErrDNSNotReady)
	failed := func(n int, next time.Time) failureRecord {
		return failureRecord{Failures: n, LastError: "certmgr: a.test: Connection refused", LastFailure: now, NextAttempt: next}
	}
	for _, tt := range []struct {
		name string
		d    domain
		want Status
	}{
		{"none", domain{}, Status{}},
		{"valid", domain{notAfter: now.Add(time.Hour)},
			Status{State: StateValid, NotAfter: now.Add(time.Hour)}},
		{"expired", domain{notAfter: now},
			Status{}},
		{"obtaining", domain{attempt: &attempt{}},
			Status{State: StateObtaining}},
		{"renewing", domain{attempt: &attempt{path: PathRenewal}, notAfter: now.Add(time.Hour)},
			Status{State: StateValid, NotAfter: now.Add(time.Hour)}},
		{"backoff", domain{fail: failed(1, now.Add(time.Minute)), lastErr: errCA},
			Status{State: StateBackoff, Failures: 1, LastError: errCA, NextAttempt: now.Add(time.Minute)}},
		{"backoff due", domain{fail: failed(2, now), lastErr: errCA},
			Status{State: StateBackoff, Failures: 2, LastError: errCA}},
		{"backoff from a far future", domain{fail: failed(1, now.Add(1000*time.Hour)), lastErr: errCA},
			Status{State: StateBackoff, Failures: 1, LastError: errCA, NextAttempt: now.Add(24 * time.Hour)}},
		{"CA's Retry-After beyond the schedule", domain{fail: failureRecord{Failures: 1, NextAttempt: now.Add(72 * time.Hour), RetryAfter: now.Add(48 * time.Hour)}, lastErr: errCA},
			Status{State: StateBackoff, Failures: 1, LastError: errCA, NextAttempt: now.Add(48 * time.Hour)}},
		{"CA's Retry-After beyond a week", domain{fail: failureRecord{Failures: 1, NextAttempt: now.Add(1000 * time.Hour), RetryAfter: now.Add(1000 * time.Hour)}, lastErr: errCA},
			Status{State: StateBackoff, Failures: 1, LastError: errCA, NextAttempt: now.Add(maxRetryAfter)}},
		{"obtaining after failures", domain{fail: failed(1, now), lastErr: errCA, attempt: &attempt{}},
			Status{State: StateObtaining, Failures: 1, LastError: errCA}},
		{"waiting for DNS", domain{dnsErr: errDNS, dnsNext: now.Add(30 * time.Second)},
			Status{State: StateWaitingDNS, LastError: errDNS, NextAttempt: now.Add(30 * time.Second)}},
		{"DNS recheck from a far future", domain{dnsErr: errDNS, dnsNext: now.Add(time.Hour)},
			Status{State: StateWaitingDNS, LastError: errDNS, NextAttempt: now.Add(10 * time.Minute)}},
		{"DNS recheck due", domain{dnsErr: errDNS, dnsNext: now},
			Status{State: StateWaitingDNS, LastError: errDNS}},
		{"waiting for DNS after failures", domain{fail: failed(1, now.Add(time.Minute)), lastErr: errCA, dnsErr: errDNS, dnsNext: now.Add(5 * time.Minute)},
			Status{State: StateWaitingDNS, Failures: 1, LastError: errDNS, NextAttempt: now.Add(5 * time.Minute)}},
		{"valid, renewal failed", domain{notAfter: now.Add(time.Hour), fail: failed(1, now.Add(time.Minute)), lastErr: errCA},
			Status{State: StateValid, NotAfter: now.Add(time.Hour), Failures: 1, LastError: errCA, NextAttempt: now.Add(time.Minute)}},
		{"valid, renewal held by DNS", domain{notAfter: now.Add(time.Hour), dnsErr: errDNS, dnsNext: now.Add(30 * time.Second)},
			Status{State: StateValid, NotAfter: now.Add(time.Hour), LastError: errDNS, NextAttempt: now.Add(30 * time.Second)}},
	} {
		t.Run(tt.name, func(t *testing.T) {
			d := tt.d
			d.name = "a.test"
			before := d
			m.stateMu.Lock()
			got, _ := m.statusLocked(&d, now)
			m.stateMu.Unlock()
			want := tt.want
			want.Domain = "a.test"
			if !reflect.DeepEqual(got, want) {
				t.Errorf("statusLocked =\n%+v\nwant\n%+v", got, want)
			}
			if !reflect.DeepEqual(d, before) {
				t.Errorf("statusLocked wrote to the domain:\n%+v\nwas\n%+v", d, before)
			}
		})
	}
}

// TestStatusOfPersistedFailure: a failure persisted by an earlier Manager
// is reported as an *AttemptError carrying the CA's words.
func TestStatusOfPersistedFailure(t *testing.T) {
	clock := newFakeClock()
	m := newPureManager(t, clock, nil)
	d := &domain{name: "a.test", fail: failureRecord{Failures: 1, LastError: "certmgr: a.test: Connection refused", NextAttempt: clock.Now().Add(time.Minute)}}
	m.stateMu.Lock()
	st, _ := m.statusLocked(d, clock.Now())
	m.stateMu.Unlock()
	var ae *AttemptError
	if !errors.As(st.LastError, &ae) || ae.Domain != "a.test" || ae.Detail != "Connection refused" ||
		st.LastError.Error() != "certmgr: a.test: Connection refused" || st.State != StateBackoff {
		t.Errorf("Status = %+v (%#v), want backoff with an *AttemptError carrying the CA's detail", st, st.LastError)
	}
}

// TestStatusOfUnknownNames: a name certmgr does not know, or that is not
// a valid name, is StateNone under its normalised (or lower-cased) name.
func TestStatusOfUnknownNames(t *testing.T) {
	m := newPureManager(t, newFakeClock(), nil)
	for in, want := range map[string]string{"Never.Seen.": "never.seen", "A..Test": "a..test", "": ""} {
		if st := m.Status(in); !reflect.DeepEqual(st, Status{Domain: want}) {
			t.Errorf("Status(%q) = %+v, want none for %q", in, st, want)
		}
	}
}

// TestDomainsSorted: Domains lists every known domain, sorted by name,
// each with its Status, and never a name the HostPolicy refused.
func TestDomainsSorted(t *testing.T) {
	clock := newFakeClock()
	m := newPureManager(t, clock, func(c *Config) {
		c.Autocert.HostPolicy = autocert.HostWhitelist("a.test", "b.test", "c.test")
	})
	for _, n := range []string{"c.test", "a.test", "b.test"} {
		d, err := m.domainFor(n)
		if err != nil {
			t.Fatal(err)
		}
		m.stateMu.Lock()
		d.notAfter = clock.Now().Add(time.Hour)
		m.stateMu.Unlock()
	}
	if _, err := m.GetCertificate(helloFor("refused.test")); !errors.Is(err, ErrHostNotAllowed) {
		t.Fatalf("GetCertificate(refused.test) = %v", err)
	}
	var got []string
	for _, s := range m.Domains() {
		got = append(got, s.Domain+"="+s.State.String())
		if s != m.Status(s.Domain) {
			t.Errorf("Domains() has %+v, Status has %+v", s, m.Status(s.Domain))
		}
	}
	if want := "[a.test=valid b.test=valid c.test=valid]"; fmt.Sprint(got) != want {
		t.Errorf("Domains() = %v, want %s", got, want)
	}
}

// TestStateString: each State's name, and a number for any other.
func TestStateString(t *testing.T) {
	for s, want := range map[State]string{StateNone: "none", StateObtaining: "obtaining", StateValid: "valid",
		StateBackoff: "backoff", StateWaitingDNS: "waiting-dns", State(7): "State(7)", State(-1): "State(-1)"} {
		if got := s.String(); got != want {
			t.Errorf("State(%d).String() = %q, want %q", int(s), got, want)
		}
	}
}

// TestStatusJSON: a Status marshals to snake-case keys, its state by
// name, its error as text and no zero time, and back; a State round-trips
// through its text.
func TestStatusJSON(t *testing.T) {
	now := time.Date(2026, 12, 7, 10, 0, 0, 0, time.UTC)
	s := Status{Domain: "a.test", State: StateBackoff, Failures: 2, LastError: errors.New("certmgr: a.test: Connection refused"),
		NextAttempt: now.Add(time.Minute)}
	data, err := json.Marshal(s)
	if err != nil {
		t.Fatal(err)
	}
	var m map[string]any
	if err := json.Unmarshal(data, &m); err != nil {
		t.Fatal(err)
	}
	want := map[string]any{"domain": "a.test", "state": "backoff", "failures": 2.0, "last_error": "certmgr: a.test: Connection refused",
		"next_attempt": "2026-12-07T10:01:00Z", "renewal_overdue": false}
	if !reflect.DeepEqual(m, want) {
		t.Errorf("json.Marshal = %s, want the keys and values %v", data, want)
	}
	valid := Status{Domain: "b.test", State: StateValid, NotAfter: now.Add(90 * 24 * time.Hour), RenewAt: now.Add(60 * 24 * time.Hour),
		RenewDue: now.Add(59 * 24 * time.Hour), RenewalOverdue: true}
	for _, in := range []Status{s, valid} {
		data, err := json.Marshal(in)
		if err != nil {
			t.Fatal(err)
		}
		var out Status
		if err := json.Unmarshal(data, &out); err != nil {
			t.Fatal(err)
		}
		if out.LastError != nil && in.LastError != nil && out.LastError.Error() == in.LastError.Error() {
			out.LastError = in.LastError
		}
		if !reflect.DeepEqual(out, in) {
			t.Errorf("round trip of %s: %+v, want %+v", data, out, in)
		}
	}
	for st := StateNone; st <= StateWaitingDNS; st++ {
		text, err := st.MarshalText()
		var back State
		if err != nil || back.UnmarshalText(text) != nil || back != st || string(text) != st.String() {
			t.Errorf("State %d: text %q (%v), back %d", st, text, err, back)
		}
	}
	if _, err := State(9).MarshalText(); err == nil {
		t.Error("State(9).MarshalText: no error")
	}
	var st State
	if err := st.UnmarshalText([]byte("expired")); err == nil {
		t.Error(`UnmarshalText("expired"): no error`)
	}
}

// TestStatusHandler: GET gives every domain's JSON, ?domain= one, or 404
// for a name certmgr knows nothing of; other methods get 405.
func TestStatusHandler(t *testing.T) {
	clock := newFakeClock()
	m := newPureManager(t, clock, nil)
	now := clock.Now()
	for _, name := range []string{"b.test", "a.test"} {
		if _, err := m.domainFor(name); err != nil {
			t.Fatal(err)
		}
		m.serve(certKey{domain: name}, selfSigned(t, name, ecKey(t), "", now.Add(-time.Hour), now.Add(24*time.Hour)))
	}
	h := m.StatusHandler()
	get := func(method, target string) *httptest.ResponseRecorder {
		rec := httptest.NewRecorder()
		h.ServeHTTP(rec, httptest.NewRequest(method, target, nil))
		return rec
	}
	rec := get("GET", "/status")
	var all []map[string]any
	if err := json.Unmarshal(rec.Body.Bytes(), &all); err != nil || rec.Code != 200 || rec.Header().Get("Content-Type") != "application/json" ||
		len(all) != 2 || all[0]["domain"] != "a.test" || all[1]["state"] != "valid" || all[0]["renew_due"] != now.Add(24*time.Hour-25*time.Hour/3).Format(time.RFC3339) {
		t.Errorf("GET: %d %s (%v), want both domains, valid, sorted, due at two thirds of their life", rec.Code, rec.Body, err)
	}
	rec = get("GET", "/status?domain=A.test")
	var one map[string]any
	if err := json.Unmarshal(rec.Body.Bytes(), &one); err != nil || rec.Code != 200 || one["domain"] != "a.test" {
		t.Errorf("GET ?domain=A.test: %d %s", rec.Code, rec.Body)
	}
	if rec := get("GET", "/status?domain=unknown.test"); rec.Code != 404 {
		t.Errorf("GET ?domain=unknown.test: %d, want 404", rec.Code)
	}
	if rec := get("POST", "/status"); rec.Code != 405 {
		t.Errorf("POST: %d, want 405", rec.Code)
	}
}
