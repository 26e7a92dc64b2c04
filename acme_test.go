package certmgr

import (
	"bytes"
	"context"
	"crypto"
	"encoding/base64"
	"encoding/json"
	"errors"
	"hash/fnv"
	"io"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"testing"
	"time"
)

// acmeResponse is a response of the CA with status, header h and body.
func acmeResponse(status int, h http.Header, body string) *http.Response {
	if h == nil {
		h = http.Header{}
	}
	return &http.Response{StatusCode: status, Header: h, Body: io.NopCloser(strings.NewReader(body))}
}

// jws returns a JWS request body whose payload is payload.
func jws(payload string) []byte {
	b, _ := json.Marshal(map[string]string{
		"protected": base64.RawURLEncoding.EncodeToString([]byte(`{"alg":"ES256"}`)),
		"payload":   base64.RawURLEncoding.EncodeToString([]byte(payload)),
		"signature": "c2ln",
	})
	return b
}

// TestObserverReadsResponses: what the observer makes of each kind of
// answer of the CA about an order (reservation r1), without a CA: problem
// documents (their detail, Retry-After and type), new orders (whose URLs
// it tracks), authorizations (failed, valid or pending) and challenges.
func TestObserverReadsResponses(t *testing.T) {
	retryAt := time.Date(2026, 1, 17, 0, 27, 45, 0, time.UTC)
	dated := http.Header{"Retry-After": {retryAt.Format(http.TimeFormat)}}
	for _, tt := range []struct {
		name     string
		newOrder bool
		res      *http.Response
		body     string
		want     observation
		tracked  []string // URLs now owned by the domain
	}{
		{name: "rate limited", res: acmeResponse(429, dated, ""),
			body: `{"type":"urn:ietf:params:acme:error:rateLimited","detail":"too many new orders"}`,
			want: observation{problem: "too many new orders", rateLimited: true, retryAfter: retryAt}},
		{name: "new order rate limited", newOrder: true, res: acmeResponse(429, dated, ""),
			body: `{"type":"urn:ietf:params:acme:error:rateLimited","detail":"too many new orders"}`,
			want: observation{orderFailed: true, problem: "too many new orders", rateLimited: true, retryAfter: retryAt}},
		{name: "rate limited, Retry-After in the detail", res: acmeResponse(429, nil, ""),
			body: `{"type":"urn:ietf:params:acme:error:RateLimited","detail":"too many certificates; retry after 2026-01-17 00:27:45 UTC"}`,
			want: observation{problem: "too many certificates; retry after 2026-01-17 00:27:45 UTC", rateLimited: true, retryAfter: retryAt}},
		{name: "bad nonce", res: acmeResponse(400, dated, ""),
			body: `{"type":"urn:ietf:params:acme:error:badNonce","detail":"JWS has an invalid anti-replay nonce"}`,
			want: observation{unavailable: true}},
		{name: "new order bad nonce", newOrder: true, res: acmeResponse(400, nil, ""),
			body: `{"type":"urn:ietf:params:acme:error:badNonce","detail":"JWS has an invalid anti-replay nonce"}`,
			want: observation{orderFailed: true, unavailable: true}},
		{name: "refused", res: acmeResponse(403, nil, ""),
			body: `{"type":"urn:ietf:params:acme:error:rejectedIdentifier","detail":"policy forbids it"}`,
			want: observation{problem: "policy forbids it", refused: true}},
		{name: "server error", res: acmeResponse(503, dated, ""), body: `not json`,
			want: observation{problem: "Service Unavailable", retryAfter: retryAt, unavailable: true}},
		{name: "server error without detail", res: acmeResponse(500, nil, ""), body: `{}`,
			want: observation{problem: "Internal Server Error", unavailable: true}},
		{name: "new order", newOrder: true, res: acmeResponse(201, http.Header{"Location": {"https://ca/order/1"}}, ""),
			body: `{"status":"pending","authorizations":["https://ca/authz/1","https://ca/authz/2"],"finalize":"https://ca/finalize/1"}`,
			want: observation{order: true}, tracked: []string{"https://ca/authz/1", "https://ca/authz/2", "https://ca/finalize/1", "https://ca/order/1"}},
		{name: "pending authorization", res: acmeResponse(200, nil, ""),
			body: `{"status":"pending","challenges":[{"url":"https://ca/chall/1"},{"url":"https://ca/chall/2"}]}`,
			want: observation{answered: true}, tracked: []string{"https://ca/chall/1", "https://ca/chall/2"}},
		{name: "expired authorization", res: acmeResponse(200, nil, ""),
			body: `{"status":"expired","challenges":[{"url":"https://ca/chall/6"}]}`,
			want: observation{ended: true}, tracked: []string{"https://ca/chall/6"}},
		{name: "failed authorization", res: acmeResponse(200, nil, ""),
			body: `{"status":"invalid","challenges":[{"url":"https://ca/chall/3"},{"url":"https://ca/chall/4","error":{"detail":"Connection refused"}}]}`,
			want: observation{authzFailed: true, problem: "Connection refused"}, tracked: []string{"https://ca/chall/3"}},
		{name: "valid authorization", res: acmeResponse(200, nil, ""),
			body: `{"status":"valid","challenges":[{"url":"https://ca/chall/5"}]}`,
			want: observation{authzValid: true}, tracked: []string{"https://ca/chall/5"}},
		{name: "challenge accepted", res: acmeResponse(200, nil, ""),
			body: `{"type":"tls-alpn-01","token":"tok","status":"processing"}`,
			want: observation{challenge: "tls-alpn-01"}},
		{name: "challenge failed", res: acmeResponse(200, nil, ""),
			body: `{"type":"http-01","token":"tok","status":"invalid","error":{"detail":"404 Not Found"}}`,
			want: observation{challenge: "http-01", problem: "404 Not Found"}},
		{name: "order", res: acmeResponse(200, nil, ""), body: `{"status":"valid","certificate":"https://ca/cert/1"}`,
			want: observation{answered: true}, tracked: []string{"https://ca/cert/1"}},
		{name: "invalid order", res: acmeResponse(200, nil, ""), body: `{"status":"invalid"}`,
			want: observation{answered: true, ended: true}},
		{name: "certificate", res: acmeResponse(200, nil, ""), body: "-----BEGIN CERTIFICATE-----\n"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			o := newACMEObserver(nil, &fakeOwner{})
			owner := tracked{domain: "a.test", reservation: "r1"}
			o.track(owner, true, []string{"https://ca/order/0"}) // the order in flight
			want := tt.want
			if want != (observation{}) || tt.name == "bad nonce" {
				want.reservation = "r1"
			}
			if got := o.observe(owner, tt.newOrder, tt.res, []byte(tt.body)); got != want {
				t.Errorf("observe = %+v, want %+v", got, want)
			}
			for _, u := range tt.tracked {
				if got := o.owner(u); got != owner {
					t.Errorf("owner(%s) = %+v, want %+v", u, got, owner)
				}
			}
		})
	}
}

// TestObserverCountsEachFailedAuthorizationOnce: autocert polls an
// invalid authorization again; only the first sight is a failure. forget
// drops what the observer tracked for a domain.
func TestObserverCountsEachFailedAuthorizationOnce(t *testing.T) {
	o := newACMEObserver(nil, &fakeOwner{})
	a, b := tracked{domain: "a.test"}, tracked{domain: "b.test"}
	o.track(a, true, []string{"https://ca/authz/1"})
	o.track(b, true, []string{"https://ca/authz/1", "https://ca/authz/2"}) // the first is a.test's
	if !o.firstFailure("https://ca/authz/1") || o.firstFailure("https://ca/authz/1") {
		t.Error("an authorization's failure was not counted exactly once")
	}
	if o.owner("https://ca/authz/1") != a || o.owner("https://ca/authz/2") != b {
		t.Error("a URL changed its owner")
	}
	o.forget("a.test")
	if o.owner("https://ca/authz/1") != (tracked{}) || o.owner("https://ca/authz/2") != b {
		t.Error("forget dropped the wrong URLs")
	}
	if o.firstFailure("https://ca/authz/1") {
		t.Error("the failure of an ended attempt's authorization is news")
	}
	o.forget("b.test")
	if len(o.urls)+len(o.byName)+len(o.failed) != 0 {
		t.Errorf("the observer still tracks %d entries", len(o.urls)+len(o.byName)+len(o.failed))
	}
}

// roundTripFunc is an http.RoundTripper.
type roundTripFunc func(*http.Request) (*http.Response, error)

func (f roundTripFunc) RoundTrip(r *http.Request) (*http.Response, error) { return f(r) }

// TestObserverRoundTrip: the observer asks admit before every new order
// (refused orders never reach the CA), reports what the CA said about a
// tracked domain, hands the body on intact, and refuses every request
// after Close.
func TestObserverRoundTrip(t *testing.T) {
	var (
		sent     []string
		admitted []string
		reports  []observation
		closed   bool
		answer   = map[string]string{
			"/new-order": `{"status":"pending","authorizations":["https://ca/authz/1"]}`,
			"/authz/1":   `{"status":"invalid","challenges":[{"url":"https://ca/chall/1","error":{"detail":"Connection refused"}}]}`,
		}
	)
	owner := &fakeOwner{}
	o := newACMEObserver(roundTripFunc(func(r *http.Request) (*http.Response, error) {
		body, _ := io.ReadAll(r.Body)
		sent = append(sent, r.URL.Path+" "+string(body))
		return acmeResponse(200, nil, answer[r.URL.Path]), nil
	}), owner)
	o.life = context.Background()
	o.timeout = time.Minute
	owner.closed = func() bool { return closed }
	errRefused := errors.New("refused")
	owner.admit = func(_ *http.Request, domain string) (string, error) {
		admitted = append(admitted, domain)
		if domain == "refused.test" {
			return "", errRefused
		}
		return "r1", nil
	}
	owner.report = func(domain string, ob observation) {
		if domain != "a.test" {
			t.Errorf("report for %q", domain)
		}
		reports = append(reports, ob)
	}
	post := func(path string, body []byte) (*http.Response, error) {
		req, _ := http.NewRequest("POST", "https://ca"+path, strings.NewReader(string(body)))
		return o.RoundTrip(req)
	}

	order := jws(`{"identifiers":[{"type":"dns","value":"a.test"}]}`)
	res, err := post("/new-order", order)
	if err != nil {
		t.Fatal(err)
	}
	if body, _ := io.ReadAll(res.Body); string(body) != answer["/new-order"] {
		t.Errorf("the caller read %q, want the CA's body", body)
	}
	if _, err := post("/new-order", jws(`{"identifiers":[{"type":"dns","value":"refused.test"}]}`)); !errors.Is(err, errRefused) {
		t.Errorf("refused order: %v", err)
	}
	for range 2 { // autocert polls an invalid authorization again
		if _, err := post("/authz/1", jws("")); err != nil {
			t.Fatal(err)
		}
	}
	if strings.Join(admitted, " ") != "a.test refused.test" {
		t.Errorf("admitted %v", admitted)
	}
	if len(sent) != 3 || sent[0] != "/new-order "+string(order) {
		t.Errorf("sent %q, want the order (intact) and the authorization twice", sent)
	}
	want := []observation{{reservation: "r1", order: true}, {reservation: "r1", authzFailed: true, problem: "Connection refused"},
		{reservation: "r1", problem: "Connection refused"}}
	if len(reports) != len(want) {
		t.Fatalf("reports %+v, want %+v", reports, want)
	}
	for i := range want {
		if reports[i] != want[i] {
			t.Errorf("report %d = %+v, want %+v", i, reports[i], want[i])
		}
	}
	closed = true
	if _, err := post("/authz/1", jws("")); !errors.Is(err, errClosed) || len(sent) != 3 {
		t.Errorf("after Close: %v, %d requests sent; want errClosed and none", err, len(sent)-3)
	}
}

// TestObserverFailsAPendingAuthorizationWithAnError: a CA that leaves an
// authorization pending once its challenge failed (step-ca v0.30: an
// error on a pending challenge, or an invalid challenge) has it failed by
// the observer: at once for an invalid challenge, and after the grace for
// an error on a pending one, meanwhile polled every second whatever the
// CA's Retry-After. Only a challenge the client accepted counts. autocert
// is shown it invalid, the CA's detail is the attempt's, and the failure
// counts once. A CA that validates again within the grace fails nothing.
func TestObserverFailsAPendingAuthorizationWithAnError(t *testing.T) {
	const connErr = `"error":{"type":"urn:ietf:params:acme:error:connection","detail":"could not connect"}`
	answer := map[string]string{
		"/authz/1": `{"status":"pending","identifier":{"type":"dns","value":"a.test"},"challenges":[` +
			`{"url":"https://ca/chall/1","type":"tls-alpn-01","status":"pending",` + connErr + `},` +
			`{"url":"https://ca/chall/2","type":"http-01","status":"pending"}]}`,
		// An invalid challenge an earlier order left, and the one accepted.
		"/authz/2": `{"status":"pending","challenges":[{"url":"https://ca/chall/3","status":"invalid","error":{"detail":"left over"}},` +
			`{"url":"https://ca/chall/4","status":"pending"}]}`,
		"/authz/3": `{"status":"pending","challenges":[{"url":"https://ca/chall/5","status":"pending",` + connErr + `}]}`,
	}
	var reports []observation
	o := newACMEObserver(roundTripFunc(func(r *http.Request) (*http.Response, error) {
		switch {
		case r.URL.Path == "/new-order":
			return acmeResponse(201, nil, `{"status":"pending","authorizations":["https://ca/authz/1","https://ca/authz/2","https://ca/authz/3"]}`), nil
		case strings.HasPrefix(r.URL.Path, "/chall/"):
			return acmeResponse(200, nil, `{"type":"tls-alpn-01","token":"t","status":"pending","url":"https://ca`+r.URL.Path+`"}`), nil
		}
		return acmeResponse(200, http.Header{"Retry-After": {"60"}}, answer[r.URL.Path]), nil
	}), &fakeOwner{
		admit:  func(*http.Request, string) (string, error) { return "r1", nil },
		report: func(_ string, ob observation) { reports = append(reports, ob) },
	})
	o.life = context.Background()
	o.timeout = time.Minute
	o.grace = time.Hour
	send := func(path, payload string) (status, retryAfter string) {
		t.Helper()
		res, err := o.RoundTrip(httptest.NewRequest("POST", "https://ca"+path, bytes.NewReader(jws(payload))))
		if err != nil {
			t.Fatal(err)
		}
		var z struct {
			Status     string
			Identifier struct{ Value string }
		}
		body, _ := io.ReadAll(res.Body)
		if err := json.Unmarshal(body, &z); err != nil || path == "/authz/1" && z.Identifier.Value != "a.test" {
			t.Errorf("%s: the caller read %q (%v), want the CA's answer, its status aside", path, body, err)
		}
		if z.Status == "invalid" && res.ContentLength != int64(len(body)) { // rewritten
			t.Errorf("%s: ContentLength %d for a body of %d bytes", path, res.ContentLength, len(body))
		}
		return z.Status, res.Header.Get("Retry-After")
	}
	poll := func(path string) (status, retryAfter string) { t.Helper(); return send(path, "") }
	failures := func() (n int) {
		for _, ob := range reports {
			if ob.authzFailed {
				n++
			}
		}
		return n
	}
	send("/new-order", `{"identifiers":[{"type":"dns","value":"a.test"}]}`)
	for _, z := range []string{"/authz/1", "/authz/2", "/authz/3"} {
		if status, ra := poll(z); status != "pending" || ra != "60" {
			t.Errorf("%s before any challenge is accepted: status %q, Retry-After %q; want as the CA said", z, status, ra)
		}
	}
	if failures() != 0 {
		t.Errorf("reports %+v before any challenge is accepted, want no failure", reports)
	}

	// An error on the accepted challenge: within the grace, pending, and
	// polled again at autocert's own pace; past it, invalid, and failed
	// once however often it is polled.
	send("/chall/1", "{}")
	reports = nil
	if status, ra := poll("/authz/1"); status != "pending" || ra != "" {
		t.Errorf("within the grace: status %q, Retry-After %q; want pending and none", status, ra)
	}
	if len(reports) != 1 || reports[0].authzFailed || reports[0].problem != "could not connect" {
		t.Errorf("within the grace: reports %+v, want the CA's detail and no failure", reports)
	}
	o.grace = 0
	for range 2 {
		if status, _ := poll("/authz/1"); status != "invalid" {
			t.Errorf("past the grace: status %q, want invalid", status)
		}
	}
	if failures() != 1 || !reports[1].authzFailed || reports[1].problem != "could not connect" {
		t.Errorf("past the grace: reports %+v, want one failure, with the CA's detail", reports)
	}

	// An invalid challenge the client accepted fails the authorization
	// at once; one left over from before does not.
	o.grace = time.Hour
	reports = nil
	send("/chall/4", "{}")
	if status, _ := poll("/authz/2"); status != "pending" || failures() != 0 {
		t.Errorf("a left-over invalid challenge: status %q, reports %+v; want pending, no failure", status, reports)
	}
	answer["/authz/2"] = strings.Replace(answer["/authz/2"], `{"url":"https://ca/chall/4","status":"pending"}`,
		`{"url":"https://ca/chall/4","status":"invalid","error":{"detail":"no acme-tls/1"}}`, 1)
	if status, _ := poll("/authz/2"); status != "invalid" || failures() != 1 || reports[len(reports)-1].problem != "no acme-tls/1" {
		t.Errorf("the accepted challenge invalid: status %q, reports %+v; want invalid, failed once with its detail", status, reports)
	}

	// A CA that validates again within the grace: valid, never failed.
	reports = nil
	send("/chall/5", "{}")
	if status, _ := poll("/authz/3"); status != "pending" {
		t.Errorf("an error within the grace: status %q, want pending", status)
	}
	answer["/authz/3"] = `{"status":"valid","challenges":[{"url":"https://ca/chall/5","status":"valid"}]}`
	if status, _ := poll("/authz/3"); status != "valid" {
		t.Errorf("validated again: status %q, want valid", status)
	}
	if failures() != 0 || !reports[len(reports)-1].authzValid {
		t.Errorf("reports %+v, want no failure, and the authorization valid", reports)
	}
}

// TestObserverGrace: a pending authorization whose accepted challenge
// carries an error is stalled once the grace has passed since the first
// answer that carried it, not since the last.
func TestObserverGrace(t *testing.T) {
	o := newACMEObserver(nil, &fakeOwner{})
	o.track(tracked{domain: "a.test"}, true, []string{"https://ca/authz/1"})
	t0 := time.Date(2026, 12, 7, 0, 0, 0, 0, time.UTC)
	for _, tc := range []struct {
		at   time.Duration
		want bool
	}{{0, false}, {5 * time.Second, false}, {challengeGrace - time.Millisecond, false}, {challengeGrace, true}, {challengeGrace + time.Second, true}} {
		if got := o.stalled("https://ca/authz/1", t0.Add(tc.at)); got != tc.want {
			t.Errorf("stalled at %v = %v, want %v", tc.at, got, tc.want)
		}
	}
	if o.stalled("https://ca/authz/untracked", t0) || o.stalled("https://ca/authz/untracked", t0.Add(time.Hour)) {
		t.Error("an authorization of no attempt in flight is stalled")
	}
}

// TestObserverReservesNothingForAnEndedRequest: autocert orders again
// after its context ended (its next challenge type, once the wait for
// the authorization timed out): that order is refused before admission,
// and reserves nothing.
func TestObserverReservesNothingForAnEndedRequest(t *testing.T) {
	admitted, sent := 0, 0
	o := newACMEObserver(roundTripFunc(func(r *http.Request) (*http.Response, error) {
		sent++
		return nil, r.Context().Err()
	}), &fakeOwner{admit: func(*http.Request, string) (string, error) { admitted++; return "r1", nil }})
	o.life = context.Background()
	o.timeout = time.Minute
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	req, _ := http.NewRequestWithContext(ctx, "POST", "https://ca/new-order", bytes.NewReader(jws(`{"identifiers":[{"type":"dns","value":"a.test"}]}`)))
	if _, err := o.RoundTrip(req); !errors.Is(err, context.Canceled) {
		t.Errorf("RoundTrip = %v, want context.Canceled", err)
	}
	if admitted != 0 || sent != 0 {
		t.Errorf("%d orders admitted, %d sent; want none", admitted, sent)
	}
}

// TestOrderIdentifier: a new order is a JWS whose payload names
// identifiers; anything else is not.
func TestOrderIdentifier(t *testing.T) {
	for _, tt := range []struct {
		body []byte
		want string
		ok   bool
	}{
		{jws(`{"identifiers":[{"type":"dns","value":"a.test"},{"type":"dns","value":"b.test"}]}`), "a.test", true},
		{jws(""), "", false}, // POST-as-GET
		{jws(`{"identifiers":[]}`), "", false},
		{jws(`{"status":"deactivated"}`), "", false},
		{jws(`not json`), "", false},
		{[]byte(`{"payload":"!!"}`), "", false},
		{[]byte(`not json`), "", false},
	} {
		if got, ok := orderIdentifier(tt.body); got != tt.want || ok != tt.ok {
			t.Errorf("orderIdentifier(%s) = %q, %v; want %q, %v", tt.body, got, ok, tt.want, tt.ok)
		}
	}
}

// TestParseRetryAfter: the header in seconds or as an HTTP date, else
// Let's Encrypt's "retry after" in the detail; nothing, or a time outside
// years 1 to 9999, is the zero time.
func TestParseRetryAfter(t *testing.T) {
	now := time.Date(2026, 1, 17, 0, 0, 0, 0, time.UTC)
	at := time.Date(2026, 1, 17, 0, 27, 45, 0, time.UTC)
	for _, tt := range []struct {
		header, detail string
		want           time.Time
	}{
		{"120", "", now.Add(120 * time.Second)},
		{" 0 ", "", now},
		{"4294967297", "", now.Add(1 << 32 * time.Second)}, // capped
		{"Sat, 17 Jan 2026 00:27:45 GMT", "", at},
		{"Saturday, 17-Jan-26 00:27:45 GMT", "", at},
		{"Sat Jan 17 00:27:45 2026", "", at},
		{"-5", "retry after 2026-01-17 00:27:45 UTC", at}, // the header is no time: the detail says
		{"", "too many certificates (5) already issued, retry after 2026-01-17 00:27:45 UTC: see https://letsencrypt.org/docs/rate-limits/", at},
		{"", "Retry after 2026-01-17T00:27:45Z: see https://letsencrypt.org/docs/rate-limits/", at},
		{"", "RETRY AFTER 2026-01-17T01:27:45+01:00, please", at},
		{"120", "retry after 2030-01-01 00:00:00 UTC", now.Add(120 * time.Second)}, // the header wins
		{"", "retry after tomorrow", time.Time{}},
		{"soon", "no time here", time.Time{}},
		{"", "", time.Time{}},
		{"Sat, 01 Jan 0000 00:00:00 GMT", "", time.Time{}},
		{"", "retry after 0000-01-01 00:00:00 UTC", time.Time{}},
	} {
		if got := parseRetryAfter(tt.header, tt.detail, now); !got.Equal(tt.want) {
			t.Errorf("parseRetryAfter(%q, %q) = %v, want %v", tt.header, tt.detail, got, tt.want)
		}
	}
}

// TestRetryBackoff: a 429 surfaces at once; badNonce and 5xx are retried
// a few times within seconds, unless the CA asks for a longer wait.
func TestRetryBackoff(t *testing.T) {
	req, _ := http.NewRequest("POST", "https://ca/new-order", nil)
	later := http.Header{"Retry-After": {"10"}}
	soon := http.Header{"Retry-After": {"1"}}
	for _, tt := range []struct {
		n    int
		res  *http.Response
		want time.Duration
	}{
		{1, nil, -1},
		{1, acmeResponse(http.StatusTooManyRequests, nil, ""), -1},
		{1, acmeResponse(http.StatusBadRequest, nil, ""), 200 * time.Millisecond}, // badNonce
		{2, acmeResponse(http.StatusInternalServerError, nil, ""), 400 * time.Millisecond},
		{3, acmeResponse(http.StatusServiceUnavailable, soon, ""), 600 * time.Millisecond},
		{1, acmeResponse(http.StatusServiceUnavailable, later, ""), -1},
		{4, acmeResponse(http.StatusInternalServerError, nil, ""), -1},
	} {
		if got := retryBackoff(tt.n, req, tt.res); got != tt.want {
			status := 0
			if tt.res != nil {
				status = tt.res.StatusCode
			}
			t.Errorf("retryBackoff(%d, %d %v) = %v, want %v", tt.n, status, tt.res != nil && tt.res.Header.Get("Retry-After") != "", got, tt.want)
		}
	}
}

// TestSenderTransportMarksRequests: every request of an autocert.Manager's
// client carries the Manager, for the observer's admit.
func TestSenderTransportMarksRequests(t *testing.T) {
	m := newPureManager(t, newFakeClock(), nil)
	am := m.newAutocert(nil, m.cache)
	var got any
	tr := senderTransport{am: am, next: roundTripFunc(func(r *http.Request) (*http.Response, error) {
		got = sender(r)
		return acmeResponse(200, nil, ""), nil
	})}
	req, _ := http.NewRequest("GET", "https://ca/dir", nil)
	if _, err := tr.RoundTrip(req); err != nil {
		t.Fatal(err)
	}
	if got != am || sender(req) != nil {
		t.Errorf("sender = %v, want the autocert.Manager on the request sent only", got)
	}
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

// TestObserverForgetsEndedAttempts: an answer that arrives after its
// attempt ended (autocert's detached requests, or a poll in flight at
// the end) tracks nothing: the maps hold attempts in flight only, not
// every domain that ever ordered.
func TestObserverForgetsEndedAttempts(t *testing.T) {
	var o *acmeObserver
	o = newACMEObserver(roundTripFunc(func(r *http.Request) (*http.Response, error) {
		if r.URL.Path == "/new-order" {
			return acmeResponse(201, http.Header{"Location": {"https://ca/order/1"}},
				`{"status":"pending","authorizations":["https://ca/authz/1"],"finalize":"https://ca/finalize/1"}`), nil
		}
		o.forget("a.test") // the attempt ends while this request is out
		return acmeResponse(200, nil, `{"status":"pending","challenges":[{"url":"https://ca/chall/1"}]}`), nil
	}), &fakeOwner{admit: func(*http.Request, string) (string, error) { return "r1", nil }})
	o.life = context.Background()
	o.timeout = time.Minute
	post := func(path string, body []byte) {
		req, _ := http.NewRequest("POST", "https://ca"+path, strings.NewReader(string(body)))
		if _, err := o.RoundTrip(req); err != nil {
			t.Fatal(err)
		}
	}
	post("/new-order", jws(`{"identifiers":[{"type":"dns","value":"a.test"}]}`))
	if got := o.owner("https://ca/finalize/1"); got.domain != "a.test" {
		t.Fatalf("the order's finalize URL is not tracked: %+v", got)
	}
	post("/authz/1", jws(""))
	o.urlsMu.Lock()
	left := len(o.urls) + len(o.byName) + len(o.failed) + len(o.erred) + len(o.accepted)
	o.urlsMu.Unlock()
	if left != 0 {
		t.Errorf("%d entries tracked after the attempt ended", left)
	}
}

// TestObserverCountsAFailureOnceWhenTheAttemptEndsMeanwhile: autocert
// polls an authorization until it is invalid, its attempt fails, and its
// detached clean-up reads the authorization again while the attempt ends.
// The failure is reported once, not again with the clean-up's answer.
func TestObserverCountsAFailureOnceWhenTheAttemptEndsMeanwhile(t *testing.T) {
	const invalid = `{"status":"invalid","challenges":[{"type":"tls-alpn-01","url":"https://ca/chall/1","status":"invalid","error":{"detail":"refused"}}]}`
	var (
		o             *acmeObserver
		polls, failed int
	)
	o = newACMEObserver(roundTripFunc(func(r *http.Request) (*http.Response, error) {
		if r.URL.Path == "/new-order" {
			return acmeResponse(201, http.Header{"Location": {"https://ca/order/1"}},
				`{"status":"pending","authorizations":["https://ca/authz/1"],"finalize":"https://ca/finalize/1"}`), nil
		}
		if polls++; polls == 2 {
			o.forget("a.test") // the attempt ends while the clean-up's request is out
		}
		return acmeResponse(200, nil, invalid), nil
	}), &fakeOwner{
		admit: func(*http.Request, string) (string, error) { return "r1", nil },
		report: func(_ string, ob observation) {
			if ob.authzFailed {
				failed++
			}
		},
	})
	o.life = context.Background()
	o.timeout = time.Minute
	for _, path := range []string{"/new-order", "/authz/1", "/authz/1"} { // the order, the poll that sees it invalid, the clean-up
		body := jws("")
		if path == "/new-order" {
			body = jws(`{"identifiers":[{"type":"dns","value":"a.test"}]}`)
		}
		req, _ := http.NewRequest("POST", "https://ca"+path, strings.NewReader(string(body)))
		if _, err := o.RoundTrip(req); err != nil {
			t.Fatal(err)
		}
	}
	if polls != 2 || failed != 1 {
		t.Errorf("%d polls, %d failed authorizations reported; want 2 and 1", polls, failed)
	}
}

// fakeOwner is an acmeOwner made of functions; a nil one does nothing
// (admits with no reservation, never closed).
type fakeOwner struct {
	admit  func(req *http.Request, domain string) (string, error)
	report func(domain string, ob observation)
	closed func() bool
}

func (f *fakeOwner) admitOrder(req *http.Request, domain string) (string, error) {
	if f.admit == nil {
		return "", nil
	}
	return f.admit(req, domain)
}

func (f *fakeOwner) orderHeld(string) error { return nil }

func (f *fakeOwner) observed(domain string, ob observation) {
	if f.report != nil {
		f.report(domain, ob)
	}
}

func (f *fakeOwner) accountSeen(string) {}

func (f *fakeOwner) accountSigner() crypto.Signer { return nil }

func (f *fakeOwner) replacesFor(string) string { return "" }

func (f *fakeOwner) replacesRefused(string) {}

func (f *fakeOwner) profileRefused(_, _ string, _ []string) error { return errProfile }

func (f *fakeOwner) orderRefused(_ string, err error) error { return err }

func (f *fakeOwner) isClosed() bool { return f.closed != nil && f.closed() }
