package certmgrtest

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"sync"
	"time"

	"github.com/letsencrypt/pebble/v2/acme"
	"github.com/letsencrypt/pebble/v2/db"
)

// Counts are protocol events the proxy saw for one identifier (or, from
// Total, for all). Only events Pebble itself produced count: a request
// answered by a Rule's Status is not an order, challenge response, etc.
type Counts struct {
	// Orders is the number of orders Pebble created (201 answers to
	// new-order) that include the identifier.
	Orders int
	// Authzs is the number of distinct authorization URLs listed for the
	// identifier in new-order answers. An authorization Pebble reuses for a
	// later order (see the package documentation) counts once.
	Authzs int
	// ChallengeResponses is the number of challenge POSTs with a non-empty
	// payload (the client accepting a challenge, payload "{}") that Pebble
	// answered with 200.
	ChallengeResponses int
	// FailedAuthzs is the number of distinct authorizations the client was
	// shown with status "invalid" (or, with Options.PendingFailures, that
	// Pebble failed and the client was shown "pending").
	FailedAuthzs int
}

func (c *Counts) add(o Counts) {
	c.Orders += o.Orders
	c.Authzs += o.Authzs
	c.ChallengeResponses += o.ChallengeResponses
	c.FailedAuthzs += o.FailedAuthzs
}

// Problem is an RFC 7807 problem document the proxy passed to the client:
// the body of an error answer from Pebble, the problem a Rule without Body
// answered with, or the error of a challenge inside an authorization shown
// with status "invalid" (recorded once per authorization).
type Problem struct {
	Class       Class    // class of the request answered
	Identifiers []string // identifiers the request concerned, if known (lower case)
	Status      int      // HTTP status of the answer (200 for a challenge error inside an authorization)
	Type        string   // e.g. "urn:ietf:params:acme:error:rateLimited"
	Detail      string   // the problem's detail, in words
	Injected    bool     // written by a Rule, not by Pebble
}

// Proxy is the HTTPS front of Pebble's WFE that every ACME request of a test
// goes through. It counts requests and protocol events per identifier and
// applies Rules. Since it passes the request's Host to the WFE, which builds
// every URL it returns from it, all URLs in answers point back at the proxy.
// It calls the WFE in-process; there is no other server. Unless
// Options.NoSettle, it answers a challenge acceptance only once Pebble's VA
// has decided the challenge, and a finalize request only once the order has
// a certificate or an error (waiting at most 2 s). Its methods are safe for
// concurrent use.
type Proxy struct {
	wfe     http.Handler    // Pebble's WFE, called in-process
	store   *db.MemoryStore // Pebble's state, read to settle challenges and orders
	settle  bool
	pending bool // Options.PendingFailures

	closed    chan struct{}
	closeOnce sync.Once

	// accountsMu serialises new-account requests: Pebble v2.10.3's WFE
	// updates an existing account while answering another request for it
	// (a data race when two clients register one key at once).
	accountsMu sync.Mutex

	stateMu  sync.Mutex // guards the fields below
	rules    []*ruleState
	release  chan struct{} // closed by Release
	changed  chan struct{} // closed on every recorded event
	requests map[Class]int // by class; ClassAny holds the total
	counts   map[string]*Counts
	idents   map[string][]string // URL path -> identifiers it concerns
	authzs   map[string]bool     // authorization paths counted in Authzs
	failed   map[string]bool     // authorization paths counted in FailedAuthzs
	problems []Problem
	orders   []OrderRequest
}

// OrderRequest is what a new-order request the proxy received asked for.
type OrderRequest struct {
	Identifiers []string // lower case
	Profile     string   // the profile it named, if any
	Replaces    string   // the certificate it named as replaced (RFC 9773), if any
}

// OrderRequests returns the new-order requests received so far, in
// order, whatever became of them.
func (p *Proxy) OrderRequests() []OrderRequest {
	p.stateMu.Lock()
	defer p.stateMu.Unlock()
	return append([]OrderRequest(nil), p.orders...)
}

// settleLimit bounds how long an answer is held while settling.
const settleLimit = 2 * time.Second

// settlePoll is how often Pebble's state is read while settling.
const settlePoll = time.Millisecond

// maxRequestBody bounds the request bodies the proxy reads.
const maxRequestBody = 1 << 20

func newProxy(wfe http.Handler, store *db.MemoryStore, settle bool) *Proxy {
	return &Proxy{
		wfe:      wfe,
		store:    store,
		settle:   settle,
		closed:   make(chan struct{}),
		release:  make(chan struct{}),
		changed:  make(chan struct{}),
		requests: make(map[Class]int),
		counts:   make(map[string]*Counts),
		idents:   make(map[string][]string),
		authzs:   make(map[string]bool),
		failed:   make(map[string]bool),
	}
}

// Requests returns how many requests of class c the proxy has received,
// whatever became of them; Requests(ClassAny) counts all.
func (p *Proxy) Requests(c Class) int {
	p.stateMu.Lock()
	defer p.stateMu.Unlock()
	return p.requests[c]
}

// Counts returns the events seen for identifier (case-insensitive; a
// wildcard identifier is counted as "*.name").
func (p *Proxy) Counts(identifier string) Counts {
	p.stateMu.Lock()
	defer p.stateMu.Unlock()
	if c := p.counts[strings.ToLower(identifier)]; c != nil {
		return *c
	}
	return Counts{}
}

// Total returns the events seen for all identifiers added up.
func (p *Proxy) Total() Counts {
	p.stateMu.Lock()
	defer p.stateMu.Unlock()
	var t Counts
	for _, c := range p.counts {
		t.add(*c)
	}
	return t
}

// Problems returns the problem documents passed to the client so far, in
// order.
func (p *Proxy) Problems() []Problem {
	p.stateMu.Lock()
	defer p.stateMu.Unlock()
	return append([]Problem(nil), p.problems...)
}

// WaitFor blocks until cond returns true, and then returns nil, or until
// ctx ends, and then returns ctx.Err(). cond is called once at first and again after each request or
// event the proxy records, never with the proxy's lock held, so it may call
// the proxy's methods; conditions on state outside the proxy are only
// re-checked when the proxy records something.
func (p *Proxy) WaitFor(ctx context.Context, cond func() bool) error {
	for {
		p.stateMu.Lock()
		ch := p.changed
		p.stateMu.Unlock()
		if cond() {
			return nil
		}
		select {
		case <-ch:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

// close drops every held or delayed request and stops settling.
func (p *Proxy) close() {
	p.closeOnce.Do(func() { close(p.closed) })
}

// notifyLocked wakes WaitFor callers; p.stateMu must be held.
func (p *Proxy) notifyLocked() {
	close(p.changed)
	p.changed = make(chan struct{})
}

// ServeHTTP implements http.Handler: it applies the rules, forwards the
// request to Pebble's WFE and records what the answer shows.
func (p *Proxy) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	class := classify(r.URL.Path)
	body, err := io.ReadAll(io.LimitReader(r.Body, maxRequestBody))
	if err != nil {
		http.Error(w, "certmgrtest: reading request: "+err.Error(), http.StatusBadRequest)
		return
	}
	r.Body = io.NopCloser(bytes.NewReader(body))
	payload := jwsPayload(body)

	idents, rule, release := p.arrive(class, r.URL.Path, payload)
	if rule != nil {
		if !p.hold(r.Context(), rule, release) {
			// Drop the connection without an answer; net/http recovers
			// this panic silently.
			panic(http.ErrAbortHandler)
		}
		if rule.Status != 0 {
			p.inject(w, class, idents, rule)
			return
		}
	}

	rec := httptest.NewRecorder()
	if class == ClassNewAccount {
		p.accountsMu.Lock()
	}
	p.wfe.ServeHTTP(rec, r)
	if class == ClassNewAccount {
		p.accountsMu.Unlock()
	}
	p.observe(class, r.URL.Path, idents, len(payload) > 0, rec)

	if p.settle && r.Method == http.MethodPost && rec.Code == http.StatusOK {
		switch {
		case class == ClassChallenge && len(payload) > 0:
			p.settleUntil(r.Context(), p.challengeDone(strings.TrimPrefix(r.URL.Path, "/chalZ/")))
		case class == ClassFinalize:
			p.settleUntil(r.Context(), p.orderDone(strings.TrimPrefix(r.URL.Path, "/finalize-order/")))
		}
	}

	out := rec.Body.Bytes()
	if p.pending && rec.Code < 300 {
		out = keepPending(class, out)
		rec.Header().Del("Content-Length")
	}
	for k, v := range rec.Header() {
		w.Header()[k] = v
	}
	w.WriteHeader(rec.Code)
	_, _ = w.Write(out)
}

// keepPending returns Pebble's answer body to a request of class as
// step-ca v0.30 would give it (see Options.PendingFailures): an invalid
// authorization or order is pending, and so is a challenge that could not
// connect.
func keepPending(class Class, body []byte) []byte {
	var doc map[string]json.RawMessage
	if json.Unmarshal(body, &doc) != nil {
		return body
	}
	switch class {
	case ClassOrder, ClassAuthz:
		if string(doc["status"]) != `"invalid"` {
			return body
		}
		doc["status"] = json.RawMessage(`"pending"`)
		if class == ClassAuthz {
			var chals []map[string]json.RawMessage
			if json.Unmarshal(doc["challenges"], &chals) != nil {
				return body
			}
			for _, c := range chals {
				pendingChallenge(c)
			}
			b, err := json.Marshal(chals)
			if err != nil {
				return body
			}
			doc["challenges"] = b
		}
	case ClassChallenge:
		if !pendingChallenge(doc) {
			return body
		}
	default:
		return body
	}
	b, err := json.Marshal(doc)
	if err != nil {
		return body
	}
	return b
}

// pendingChallenge sets the status of the invalid challenge c to
// "pending" if its validation could not connect (Pebble says so with a
// connection problem for http-01, and in words for tls-alpn-01), and
// reports whether it did.
func pendingChallenge(c map[string]json.RawMessage) bool {
	var e problemDoc
	if string(c["status"]) != `"invalid"` || json.Unmarshal(c["error"], &e) != nil ||
		!strings.HasSuffix(e.Type, ":connection") && !strings.HasPrefix(e.Detail, "Failed to connect to ") {
		return false
	}
	c["status"] = json.RawMessage(`"pending"`)
	return true
}

// jwsPayload returns the decoded payload of a flattened JWS JSON body, or
// nil if there is none (a POST-as-GET, a GET, or not a JWS).
func jwsPayload(body []byte) []byte {
	var jws struct {
		Payload string `json:"payload"`
	}
	if len(body) == 0 || json.Unmarshal(body, &jws) != nil {
		return nil
	}
	b, err := base64.RawURLEncoding.DecodeString(jws.Payload)
	if err != nil {
		return nil
	}
	return b
}

// arrive counts the request and returns the identifiers it concerns, the
// rule that applies to it and the channel a Release will close.
func (p *Proxy) arrive(class Class, path string, payload []byte) ([]string, *Rule, <-chan struct{}) {
	var idents []string
	var order *OrderRequest
	if class == ClassNewOrder {
		var o struct {
			Identifiers []struct{ Value string } `json:"identifiers"`
			Profile     string                   `json:"profile"`
			Replaces    string                   `json:"replaces"`
		}
		if json.Unmarshal(payload, &o) == nil {
			for _, id := range o.Identifiers {
				idents = append(idents, strings.ToLower(id.Value))
			}
			order = &OrderRequest{Identifiers: idents, Profile: o.Profile, Replaces: o.Replaces}
		}
	}
	p.stateMu.Lock()
	defer p.stateMu.Unlock()
	if order != nil {
		p.orders = append(p.orders, *order)
	}
	if idents == nil {
		idents = p.idents[path]
	}
	p.requests[class]++
	p.requests[ClassAny]++
	p.notifyLocked()
	// Matched in the same critical section as counted, so that a test
	// that saw the request counted and calls Release does release it.
	rule, release := p.matchLocked(class, idents)
	return idents, rule, release
}

type problemDoc struct {
	Type   string `json:"type"`
	Detail string `json:"detail,omitempty"`
	Status int    `json:"status,omitempty"`
}

// orderDoc and authzDoc are the parts of Pebble's answers the proxy reads.
type orderDoc struct {
	Identifiers    []struct{ Value string } `json:"identifiers"`
	Authorizations []string                 `json:"authorizations"`
	Finalize       string                   `json:"finalize"`
	Certificate    string                   `json:"certificate"`
}

type authzDoc struct {
	Status     string `json:"status"`
	Identifier struct {
		Value string `json:"value"`
	} `json:"identifier"`
	Wildcard   bool `json:"wildcard"`
	Challenges []struct {
		URL   string      `json:"url"`
		Error *problemDoc `json:"error"`
	} `json:"challenges"`
}

// pathOf returns the path of an absolute URL from an answer ("" if none).
func pathOf(u string) string {
	if u == "" {
		return ""
	}
	pu, err := url.Parse(u)
	if err != nil {
		return ""
	}
	return pu.Path
}

// countLocked returns the counts of identifier id; p.stateMu must be held.
func (p *Proxy) countLocked(id string) *Counts {
	c := p.counts[id]
	if c == nil {
		c = new(Counts)
		p.counts[id] = c
	}
	return c
}

// mapLocked records that the URL u concerns idents; p.stateMu must be held.
func (p *Proxy) mapLocked(u string, idents []string) {
	if path := pathOf(u); path != "" && len(idents) > 0 {
		p.idents[path] = idents
	}
}

// observe records what Pebble's answer rec to a request shows.
func (p *Proxy) observe(class Class, path string, idents []string, accepted bool, rec *httptest.ResponseRecorder) {
	body := rec.Body.Bytes()
	p.stateMu.Lock()
	defer p.stateMu.Unlock()
	defer p.notifyLocked()

	if rec.Code >= 400 {
		var d problemDoc
		if json.Unmarshal(body, &d) == nil {
			p.problems = append(p.problems, Problem{
				Class: class, Identifiers: idents, Status: rec.Code, Type: d.Type, Detail: d.Detail,
			})
		}
		return
	}

	switch class {
	case ClassNewOrder:
		var o orderDoc
		if rec.Code != http.StatusCreated || json.Unmarshal(body, &o) != nil {
			return
		}
		ids := make([]string, len(o.Identifiers))
		for i, id := range o.Identifiers {
			ids[i] = strings.ToLower(id.Value)
			p.countLocked(ids[i]).Orders++
		}
		p.mapLocked(rec.Header().Get("Location"), ids)
		p.mapLocked(o.Finalize, ids)
		p.mapLocked(o.Certificate, ids)
		for i, a := range o.Authorizations {
			ap := pathOf(a)
			if ap == "" {
				continue
			}
			// Pebble lists one authorization per identifier, in the
			// order of "identifiers".
			if len(o.Authorizations) == len(ids) {
				p.idents[ap] = ids[i : i+1]
				if !p.authzs[ap] {
					p.authzs[ap] = true
					p.countLocked(ids[i]).Authzs++
				}
			}
		}

	case ClassOrder, ClassFinalize:
		var o orderDoc
		if json.Unmarshal(body, &o) == nil {
			p.mapLocked(o.Certificate, idents)
		}

	case ClassAuthz:
		var a authzDoc
		if json.Unmarshal(body, &a) != nil {
			return
		}
		if len(idents) == 0 && a.Identifier.Value != "" {
			v := strings.ToLower(a.Identifier.Value)
			if a.Wildcard {
				v = "*." + v
			}
			idents = []string{v}
			p.idents[path] = idents
		}
		for _, ch := range a.Challenges {
			p.mapLocked(ch.URL, idents)
		}
		if a.Status == "invalid" && !p.failed[path] {
			p.failed[path] = true
			for _, id := range idents {
				p.countLocked(id).FailedAuthzs++
			}
			for _, ch := range a.Challenges {
				if ch.Error != nil {
					p.problems = append(p.problems, Problem{
						Class: class, Identifiers: idents, Status: rec.Code,
						Type: ch.Error.Type, Detail: ch.Error.Detail,
					})
				}
			}
		}

	case ClassChallenge:
		if accepted && rec.Code == http.StatusOK {
			for _, id := range idents {
				p.countLocked(id).ChallengeResponses++
			}
		}
	}
}

// challengeDone reports whether Pebble's VA has finished the challenge id.
func (p *Proxy) challengeDone(id string) func() bool {
	return func() bool {
		ch := p.store.GetChallengeByID(id)
		if ch == nil {
			return true
		}
		ch.RLock()
		defer ch.RUnlock()
		return ch.Status != "processing"
	}
}

// orderDone reports whether Pebble's CA has finished the order id, with a
// certificate or an error.
func (p *Proxy) orderDone(id string) func() bool {
	return func() bool {
		o := p.store.GetOrderByID(id)
		if o == nil {
			return true
		}
		o.RLock()
		defer o.RUnlock()
		return o.CertificateObject != nil || o.Error != nil
	}
}

// settleUntil waits, at most settleLimit, until done returns true, the
// client goes away or the proxy closes. Pebble offers no notification, so
// it reads Pebble's state every settlePoll.
func (p *Proxy) settleUntil(ctx context.Context, done func() bool) {
	limit := time.NewTimer(settleLimit)
	defer limit.Stop()
	tick := time.NewTicker(settlePoll)
	defer tick.Stop()
	for !done() {
		select {
		case <-tick.C:
		case <-limit.C:
			return
		case <-ctx.Done():
			return
		case <-p.closed:
			return
		}
	}
}

// ExpireAuthorizations marks every valid authorization Pebble holds for
// identifier as deactivated, as a CA does when an authorization's lifetime
// ends. The next order for identifier then needs a new validation instead
// of reusing the old one (see the package documentation on reuse): this is
// how a test makes a renewal validate. Only authorizations the proxy has
// seen in an answer are known to it. ExpireAuthorizations returns how many
// it deactivated.
func (p *Proxy) ExpireAuthorizations(identifier string) int {
	identifier = strings.ToLower(identifier)
	p.stateMu.Lock()
	var ids []string
	for path, idents := range p.idents {
		if id, ok := strings.CutPrefix(path, "/authZ/"); ok && len(idents) == 1 && idents[0] == identifier {
			ids = append(ids, id)
		}
	}
	p.stateMu.Unlock()
	n := 0
	for _, id := range ids {
		a := p.store.GetAuthorizationByID(id)
		if a == nil {
			continue
		}
		a.Lock()
		if a.Status == acme.StatusValid {
			a.Status = acme.StatusDeactivated
			n++
		}
		a.Unlock()
	}
	return n
}
