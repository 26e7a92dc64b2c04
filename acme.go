package certmgr

import (
	"bytes"
	"context"
	"crypto"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"
)

// acmeObserver is the HTTP transport of the acme.Client that all of a
// Manager's autocert.Managers share. It sees every ACME request, those of
// autocert's own renewal timers included, so it is where certmgr:
//   - admits or refuses locally every new order (admit), so that no order
//     reaches the CA that the domain's schedule, budget or DNS pre-check
//     does not allow, and each order's authorization is reserved in the
//     budget before it goes out;
//   - reads what the CA answers: orders made, authorizations that failed or
//     are valid (settling their reservations), the CA's problem detail
//     (which autocert drops), rate limits and their Retry-After, and
//     requests that failed at the transport (observed).
type acmeObserver struct {
	next    http.RoundTripper
	life    context.Context // ends at Close: requests in flight are cut
	timeout time.Duration   // bounds each request, its body included
	grace   time.Duration   // how long a pending authorization may carry a challenge's error (see stalled)
	mgr     acmeOwner       // the Manager whose traffic this is

	directory string // the CA's directory URL
	profile   string // Config.Profile: every new order asks for it

	dirMu sync.Mutex
	dir   directoryInfo // what the directory said, once read

	urlsMu   sync.Mutex
	urls     map[string]tracked   // order, authorization, challenge, finalize and certificate URLs of attempts in flight
	byName   map[string][]string  // domain → its URLs in urls
	failed   map[string]bool      // authorizations already seen invalid
	erred    map[string]time.Time // pending authorizations → when one was first seen carrying a challenge's error
	accepted map[string]bool      // challenges the client accepted (a POST with a payload)
}

// directoryInfo is what the transport reads of the CA's directory.
type directoryInfo struct {
	read        bool
	newOrder    string   // the new-order URL
	profiles    []string // the profiles the CA offers, sorted
	renewalInfo bool     // the CA offers renewal information
}

// acmeOwner is what the ACME transport asks and tells the Manager whose
// traffic it carries; *Manager implements it.
type acmeOwner interface {
	// accountSigner returns the ACME account's key, once known, or nil
	// (account.go).
	accountSigner() crypto.Signer
	// replacesFor returns the RFC 9773 identifier of the certificate
	// that the order admitted for domain replaces: one the renewal in
	// flight renews; "" if none (jws.go's rewrite adds it).
	replacesFor(domain string) string
	// replacesRefused tells that the CA refused the order of domain's
	// attempt because of replaces: its next orders go without.
	replacesRefused(domain string)
	// profileRefused returns the error of domain's order that asks for
	// a profile the CA does not offer (logged once), and makes it the
	// error of the attempt in flight.
	profileRefused(domain, profile string, offered []string) error
	// orderRefused makes err, certmgr's own refusal of domain's order,
	// the error of the attempt in flight, and returns it.
	orderRefused(domain string, err error) error
	// admitOrder admits or refuses a new order for domain before it goes
	// out, and returns its reservation (admit.go).
	admitOrder(req *http.Request, domain string) (reservation string, err error)
	// orderHeld returns an error if an order already made for domain
	// may not go on: its attempt lost its cluster lock (cluster.go).
	orderHeld(domain string) error
	// observed tells what one exchange said about domain's order (admit.go).
	observed(domain string, ob observation)
	// accountSeen records the account's URI, from the CA's answer to a
	// new-account request (account.go).
	accountSeen(uri string)
	// isClosed reports whether Close began: no request goes out (certmgr.go).
	isClosed() bool
}

// tracked is what a URL of an order belongs to.
type tracked struct {
	domain      string
	reservation string // the order's reservation in the budget
}

// observation is what one ACME exchange said about a domain.
type observation struct {
	reservation string    // the reservation of the order concerned, if known
	order       bool      // the CA created an order
	orderFailed bool      // a new-order request made no order
	authzFailed bool      // an authorization is invalid
	authzValid  bool      // an authorization is valid
	problem     string    // the CA's problem detail, or the transport's error
	challenge   string    // the type of a challenge the client accepted
	rateLimited bool      // the CA answered rateLimited
	retryAfter  time.Time // the CA's Retry-After, if any
	refused     bool      // a 4xx other than badNonce: the request failed for good
	unavailable bool      // a 5xx or badNonce: acme.Client may send the request again, or give up
	ended       bool      // the order can go no further: it, or an authorization, is invalid, expired, deactivated or revoked
	answered    bool      // any other answer about the order (pending, processing, the certificate)
	transport   bool      // the request got no answer
	erred       bool      // a pending authorization carries a challenge's error, for less than the grace yet
	stalled     bool      // a pending authorization is taken as failed (authzFailed is set): see acmeObserver.stalled
}

// maxACMEBody bounds what the observer reads of a request or response.
const maxACMEBody = 1 << 20

// challengeGrace is how long an authorization may stay pending once the
// CA has put an error on one of its challenges, before certmgr takes it
// as failed (see stalled): a CA that validates again may still turn it
// valid meanwhile.
const challengeGrace = 10 * time.Second

func newACMEObserver(next http.RoundTripper, mgr acmeOwner) *acmeObserver {
	if next == nil {
		next = http.DefaultTransport
	}
	return &acmeObserver{next: next, mgr: mgr, grace: challengeGrace, urls: make(map[string]tracked), byName: make(map[string][]string),
		failed: make(map[string]bool), erred: make(map[string]time.Time), accepted: make(map[string]bool)}
}

// RoundTrip implements http.RoundTripper.
func (o *acmeObserver) RoundTrip(req *http.Request) (*http.Response, error) {
	if o.mgr.isClosed() {
		return nil, errClosed
	}
	if err := req.Context().Err(); err != nil {
		// autocert orders again after its context ended: an order that
		// cannot go out reserves nothing.
		return nil, err
	}
	// A CA that accepts the connection and never answers must not hold an
	// attempt (and Close) for the five minutes of autocert's context.
	ctx, cancel := context.WithTimeout(req.Context(), o.timeout)
	defer cancel()
	stop := context.AfterFunc(o.life, cancel)
	defer stop()
	domain, newOrder, newAccount, posted := "", false, false, false
	var body []byte
	if req.Method == http.MethodPost && req.Body != nil {
		var err error
		body, err = io.ReadAll(io.LimitReader(req.Body, maxACMEBody))
		req.Body.Close()
		if err != nil {
			return nil, err
		}
		req = withBody(req.Clone(ctx), body)
		domain, newOrder = orderIdentifier(body)
		if dir := o.directoryInfo(); newOrder && dir.newOrder != "" {
			newOrder = headerURL(body) == dir.newOrder // the directory's word, not the path's
		}
		newAccount = !newOrder && signedWithJWK(body)
		posted = hasPayload(body)
		if newOrder && o.profile != "" {
			// Checked before admission: no order, no budget spent.
			if dir := o.directoryInfo(); dir.read && !slices.Contains(dir.profiles, o.profile) {
				return nil, o.mgr.profileRefused(domain, o.profile, dir.profiles)
			}
		}
	}
	if req.Context() != ctx {
		req = req.WithContext(ctx)
	}
	var owner tracked
	replaces := ""
	if newOrder {
		id, err := o.mgr.admitOrder(req, domain)
		if err != nil {
			return nil, err
		}
		owner = tracked{domain: domain, reservation: id}
		if req, replaces, err = o.rewrite(req, body, domain); err != nil {
			// A profile that cannot be asked for: no order goes out, and
			// the reservation is released.
			o.mgr.observed(domain, observation{reservation: id, orderFailed: true})
			return nil, o.mgr.orderRefused(domain, err)
		}
	} else {
		owner = o.owner(req.URL.String())
		if owner.domain != "" {
			// An order's later requests (challenges, finalization) go out
			// only while its attempt may still order.
			if err := o.mgr.orderHeld(owner.domain); err != nil {
				return nil, err
			}
		}
	}
	res, err := o.next.RoundTrip(req)
	if err == nil && replaces != "" {
		res, err = o.withoutReplaces(req, res, domain)
	}
	if err == nil && req.Method == http.MethodGet && req.URL.String() == o.directory && res.StatusCode == http.StatusOK {
		res, err = o.readDirectory(res)
	}
	if err == nil {
		// The body is read here, while ctx lives.
		var body []byte
		body, err = io.ReadAll(io.LimitReader(res.Body, maxACMEBody))
		res.Body.Close()
		res.Body = io.NopCloser(bytes.NewReader(body))
		if loc := res.Header.Get("Location"); err == nil && newAccount && loc != "" && res.StatusCode < 300 {
			o.mgr.accountSeen(loc)
		}
		if err == nil && owner.domain != "" {
			ob := o.observe(owner, newOrder, res, body)
			if ob.challenge != "" && posted {
				o.accept(req.URL.String()) // the client accepted this challenge
			}
			if ob.erred && o.stalled(req.URL.String(), time.Now()) {
				ob.erred, ob.stalled, ob.authzFailed = false, true, true
			}
			switch {
			case ob.stalled:
				// Failed in all but name: autocert is shown it so, and ends
				// the attempt, or tries the next challenge type.
				body = markInvalid(body)
				res.ContentLength = int64(len(body))
				res.Header.Del("Content-Length")
			case ob.erred:
				res.Header.Del("Retry-After") // polled again within a second, within the grace
			}
			res.Body = io.NopCloser(bytes.NewReader(body))
			if ob.authzFailed && !o.firstFailure(req.URL.String()) {
				ob.authzFailed = false // autocert polls an invalid authorization again
			}
			if ob != (observation{}) {
				o.mgr.observed(owner.domain, ob)
			}
		}
	}
	if err != nil {
		if o.life.Err() != nil {
			return nil, errClosed // cut by Close: not the CA's failure; a reservation stays
		}
		if owner.domain != "" {
			// No answer: the attempt learns nothing more from the CA. A new
			// order that never left this machine made no order.
			var op *net.OpError
			notSent := errors.As(err, &op) && op.Op == "dial"
			o.mgr.observed(owner.domain, observation{reservation: owner.reservation, transport: true,
				orderFailed: newOrder && notSent, problem: err.Error()})
		}
		return nil, err
	}
	return res, nil
}

// withBody returns req, a clone, with body as its body.
func withBody(req *http.Request, body []byte) *http.Request {
	req.Body = io.NopCloser(bytes.NewReader(body))
	req.ContentLength = int64(len(body))
	req.GetBody = func() (io.ReadCloser, error) { return io.NopCloser(bytes.NewReader(body)), nil }
	return req
}

// rewrite returns the new-order request req (whose body is body) for
// domain, rewritten to ask for the profile and to name the certificate
// it replaces, if any, and that certificate's identifier. A profile that
// cannot be asked for fails it; a replaces that cannot be added is left
// out.
func (o *acmeObserver) rewrite(req *http.Request, body []byte, domain string) (*http.Request, string, error) {
	replaces := o.mgr.replacesFor(domain)
	if o.profile == "" && replaces == "" {
		return req, "", nil
	}
	set := map[string]string{}
	if o.profile != "" {
		set["profile"] = o.profile
	}
	if replaces != "" {
		set["replaces"] = replaces
	}
	key := o.mgr.accountSigner()
	var out []byte
	err := fmt.Errorf("%w: no account key yet", errNoRewrite)
	if key != nil {
		out, err = rewriteOrder(body, key, set, "")
	}
	switch {
	case err == nil:
		return withBody(req, out), replaces, nil
	case o.profile != "":
		return nil, "", fmt.Errorf("certmgr: %s: the order cannot ask for the profile %q: %w", domain, o.profile, err)
	}
	return req, "", nil // sent as it was, without replaces
}

// withoutReplaces returns res, the CA's answer to the new order req that
// named the certificate it replaces, or, if the CA refused it because of
// that (409 alreadyReplaced, or a malformed request naming it), its
// answer to the same order sent again without replaces, with the nonce
// the refusal gave. The refusal is not observed: it made no order and
// costs no authorization.
func (o *acmeObserver) withoutReplaces(req *http.Request, res *http.Response, domain string) (*http.Response, error) {
	if !refusesReplaces(res) {
		return res, nil
	}
	nonce := res.Header.Get("Replay-Nonce")
	key := o.mgr.accountSigner()
	if nonce == "" || key == nil || req.GetBody == nil {
		return res, nil
	}
	rc, err := req.GetBody() // what was sent: next read req.Body
	if err != nil {
		return res, nil
	}
	body, err := io.ReadAll(rc)
	if err != nil {
		return res, nil
	}
	out, err := rewriteOrder(body, key, map[string]string{"replaces": ""}, nonce)
	if err != nil {
		return res, nil
	}
	o.mgr.replacesRefused(domain)
	res.Body.Close()
	return o.next.RoundTrip(withBody(req.Clone(req.Context()), out))
}

// refusesReplaces reports whether res refuses a new order because of its
// replaces field: 409 (alreadyReplaced), or 400 malformed naming it (or
// the certificate identifier it carries). It peeks at the body and
// leaves it readable.
func refusesReplaces(res *http.Response) bool {
	if res.StatusCode != http.StatusConflict && res.StatusCode != http.StatusBadRequest {
		return false
	}
	body, _ := io.ReadAll(io.LimitReader(res.Body, maxACMEBody))
	res.Body.Close()
	res.Body = io.NopCloser(bytes.NewReader(body))
	if res.StatusCode == http.StatusConflict {
		return true
	}
	var p struct {
		Type   string `json:"type"`
		Detail string `json:"detail"`
	}
	json.Unmarshal(body, &p)
	return strings.HasSuffix(p.Type, ":malformed") &&
		(indexASCIIFold(p.Detail, "replaces") >= 0 || indexASCIIFold(p.Detail, "certid") >= 0)
}

// readDirectory reads the CA's directory from res, and returns res with
// its body readable again.
func (o *acmeObserver) readDirectory(res *http.Response) (*http.Response, error) {
	body, err := io.ReadAll(io.LimitReader(res.Body, maxACMEBody))
	res.Body.Close()
	res.Body = io.NopCloser(bytes.NewReader(body))
	if err != nil {
		return nil, err
	}
	var d struct {
		NewOrder    string `json:"newOrder"`
		RenewalInfo string `json:"renewalInfo"`
		Meta        struct {
			Profiles map[string]json.RawMessage `json:"profiles"`
		} `json:"meta"`
	}
	if json.Unmarshal(body, &d) != nil {
		return res, nil
	}
	info := directoryInfo{read: true, newOrder: d.NewOrder, renewalInfo: d.RenewalInfo != ""}
	for name := range d.Meta.Profiles {
		info.profiles = append(info.profiles, name)
	}
	slices.Sort(info.profiles)
	o.dirMu.Lock()
	o.dir = info
	o.dirMu.Unlock()
	return res, nil
}

// directoryInfo returns what the transport read of the directory.
func (o *acmeObserver) directoryInfo() directoryInfo {
	o.dirMu.Lock()
	defer o.dirMu.Unlock()
	return o.dir
}

// headerURL returns the url of a JWS request body's protected header.
func headerURL(body []byte) string {
	var j flatJWS
	if json.Unmarshal(body, &j) != nil {
		return ""
	}
	protected, err := base64.RawURLEncoding.DecodeString(j.Protected)
	if err != nil {
		return ""
	}
	var h struct {
		URL string `json:"url"`
	}
	json.Unmarshal(protected, &h)
	return h.URL
}

// observe reads one response about owner's order.
func (o *acmeObserver) observe(owner tracked, newOrder bool, res *http.Response, body []byte) observation {
	ob := observation{reservation: owner.reservation}
	if res.StatusCode >= 400 {
		var p struct {
			Type   string `json:"type"`
			Detail string `json:"detail"`
		}
		json.Unmarshal(body, &p)
		ob.orderFailed = newOrder // an error answer to a new order made none
		ob.problem = p.Detail
		if ob.problem == "" {
			ob.problem = http.StatusText(res.StatusCode)
		}
		ob.retryAfter = parseRetryAfter(res.Header.Get("Retry-After"), p.Detail, time.Now())
		switch {
		case strings.HasSuffix(strings.ToLower(p.Type), ":ratelimited"):
			ob.rateLimited = true
		case strings.HasSuffix(strings.ToLower(p.Type), ":badnonce"):
			// acme.Client sends the request again: nothing failed yet.
			return observation{reservation: owner.reservation, orderFailed: newOrder, unavailable: true}
		case res.StatusCode < 500:
			ob.refused = true
		default:
			ob.unavailable = true
		}
		return ob
	}
	var r struct {
		Status         string   `json:"status"`
		Type           string   `json:"type"`  // a challenge's
		Token          string   `json:"token"` // a challenge's
		Authorizations []string `json:"authorizations"`
		Finalize       string   `json:"finalize"`    // an order's
		Certificate    string   `json:"certificate"` // a valid order's
		Challenges     []struct {
			URL    string `json:"url"`
			Status string `json:"status"`
			Error  *struct {
				Detail string `json:"detail"`
			} `json:"error"`
		} `json:"challenges"`
		Error *struct {
			Detail string `json:"detail"`
		} `json:"error"`
	}
	if json.Unmarshal(body, &r) != nil {
		return observation{}
	}
	switch {
	case newOrder:
		ob.order = true
		o.track(owner, true, append(r.Authorizations, r.Finalize, res.Header.Get("Location")))
		return ob
	case r.Token != "" && r.Type != "":
		// A challenge: the client accepting it, or polling it.
		ob.challenge = r.Type
		if r.Status == "invalid" && r.Error != nil {
			ob.problem = r.Error.Detail
		}
		return ob
	case r.Challenges == nil:
		o.track(owner, false, []string{r.Certificate}) // an order: its certificate, once issued
		return observation{reservation: owner.reservation, answered: true, ended: r.Status == "invalid"}
	}
	// An authorization.
	urls := make([]string, 0, len(r.Challenges))
	for _, c := range r.Challenges {
		urls = append(urls, c.URL)
	}
	o.track(owner, false, urls)
	switch r.Status {
	case "valid":
		ob.authzValid = true
	case "invalid":
		ob.authzFailed = true
		for _, c := range r.Challenges {
			if c.Error != nil && c.Error.Detail != "" {
				ob.problem = c.Error.Detail
			}
		}
	case "expired", "deactivated", "revoked":
		ob.ended = true
	case "pending", "processing":
		// RFC 8555 (section 7.1.6) fails the authorization with its
		// challenge; a CA that leaves it pending (step-ca v0.30 does) would
		// hold autocert's attempt, and every handshake waiting for it, for
		// five minutes.
		// An invalid challenge fails it at once; an error on a pending
		// one, after the grace (see stalled). Only a challenge the client
		// accepted counts: another may carry what an earlier order left.
		for _, c := range r.Challenges {
			if !o.isAccepted(c.URL) {
				continue
			}
			ob.stalled = ob.stalled || c.Status == "invalid"
			ob.erred = ob.erred || c.Error != nil
			if c.Error != nil && c.Error.Detail != "" {
				ob.problem = c.Error.Detail
			}
		}
		if ob.stalled {
			ob.erred, ob.authzFailed = false, true
		} else {
			ob.answered = true
		}
	default:
		ob.answered = true
	}
	return ob
}

// markInvalid returns the authorization in body with its status
// "invalid", or body if it cannot be read.
func markInvalid(body []byte) []byte {
	var z map[string]json.RawMessage
	if json.Unmarshal(body, &z) != nil {
		return body
	}
	z["status"] = json.RawMessage(`"invalid"`)
	b, err := json.Marshal(z)
	if err != nil {
		return body
	}
	return b
}

// track remembers URLs of owner's order: those of a new order, and more
// of an order it tracks already. An answer that comes after its attempt
// ended (forget) tracks nothing.
func (o *acmeObserver) track(owner tracked, newOrder bool, urls []string) {
	o.urlsMu.Lock()
	defer o.urlsMu.Unlock()
	if !newOrder && len(o.byName[owner.domain]) == 0 {
		return
	}
	for _, u := range urls {
		if _, ok := o.urls[u]; !ok && u != "" {
			o.urls[u] = owner
			o.byName[owner.domain] = append(o.byName[owner.domain], u)
		}
	}
}

// owner returns what url belongs to, or the zero tracked.
func (o *acmeObserver) owner(url string) tracked {
	o.urlsMu.Lock()
	defer o.urlsMu.Unlock()
	return o.urls[url]
}

// firstFailure reports whether the authorization at url is seen invalid
// for the first time by the attempt in flight. A URL no longer tracked
// belongs to an attempt that ended while the request was out: autocert's
// detached clean-up reads the authorizations of an attempt that failed,
// so its answer is news to nobody.
func (o *acmeObserver) firstFailure(url string) bool {
	o.urlsMu.Lock()
	defer o.urlsMu.Unlock()
	if _, ok := o.urls[url]; !ok || o.failed[url] {
		return false
	}
	o.failed[url] = true
	return true
}

// accept records that the client accepted the challenge at url, of an
// attempt in flight.
func (o *acmeObserver) accept(url string) {
	o.urlsMu.Lock()
	defer o.urlsMu.Unlock()
	if _, ok := o.urls[url]; ok {
		o.accepted[url] = true
	}
}

// isAccepted reports whether the client accepted the challenge at url.
func (o *acmeObserver) isAccepted(url string) bool {
	o.urlsMu.Lock()
	defer o.urlsMu.Unlock()
	return o.accepted[url]
}

// stalled reports whether the pending authorization at url, whose
// challenge carries an error, has carried one for the observer's grace by
// now: the CA did not validate it again meanwhile, and certmgr takes it
// as failed. The first such answer starts the grace.
func (o *acmeObserver) stalled(url string, now time.Time) bool {
	o.urlsMu.Lock()
	defer o.urlsMu.Unlock()
	if _, ok := o.urls[url]; !ok {
		return false // its attempt ended
	}
	first, ok := o.erred[url]
	if !ok {
		o.erred[url] = now
		first = now
	}
	return now.Sub(first) >= o.grace
}

// forget drops what track remembered for domain; called when its attempt
// ends, so the maps hold only attempts in flight.
func (o *acmeObserver) forget(domain string) {
	o.urlsMu.Lock()
	defer o.urlsMu.Unlock()
	for _, u := range o.byName[domain] {
		delete(o.urls, u)
		delete(o.failed, u)
		delete(o.erred, u)
		delete(o.accepted, u)
	}
	delete(o.byName, domain)
}

// signedWithJWK reports whether a JWS request body carries its key (as a
// new-account request does) rather than an account's key ID.
func signedWithJWK(body []byte) bool {
	var jws struct {
		Protected string `json:"protected"`
	}
	if json.Unmarshal(body, &jws) != nil {
		return false
	}
	protected, err := base64.RawURLEncoding.DecodeString(jws.Protected)
	if err != nil {
		return false
	}
	var h struct {
		JWK json.RawMessage `json:"jwk"`
	}
	return json.Unmarshal(protected, &h) == nil && len(h.JWK) > 0
}

// hasPayload reports whether a JWS request body has a payload: a
// POST-as-GET has none.
func hasPayload(body []byte) bool {
	var jws struct {
		Payload string `json:"payload"`
	}
	return json.Unmarshal(body, &jws) == nil && jws.Payload != ""
}

// orderIdentifier reads a JWS request body and reports whether it asks
// for a new order, and for which DNS identifier.
func orderIdentifier(body []byte) (domain string, ok bool) {
	var jws struct {
		Payload string `json:"payload"`
	}
	if json.Unmarshal(body, &jws) != nil || jws.Payload == "" {
		return "", false
	}
	payload, err := base64.RawURLEncoding.DecodeString(jws.Payload)
	if err != nil {
		return "", false
	}
	var order struct {
		Identifiers []struct {
			Type  string `json:"type"`
			Value string `json:"value"`
		} `json:"identifiers"`
	}
	if json.Unmarshal(payload, &order) != nil || len(order.Identifiers) == 0 {
		return "", false
	}
	return order.Identifiers[0].Value, true
}

// parseRetryAfter returns the time the CA asks to wait for: the
// Retry-After header (seconds or an HTTP date) or, without one, the
// "retry after <time>" that Let's Encrypt writes in its problem detail.
// It returns the zero time when neither says, or when the time is outside
// the years 1 to 9999.
func parseRetryAfter(header, detail string, now time.Time) time.Time {
	t := retryAfterTime(header, detail, now)
	if y := t.Year(); y < 1 || y > 9999 {
		return time.Time{}
	}
	return t
}

func retryAfterTime(header, detail string, now time.Time) time.Time {
	if header = strings.TrimSpace(header); header != "" {
		if s, err := strconv.ParseInt(header, 10, 64); err == nil && s >= 0 {
			return now.Add(time.Duration(min(s, 1<<32)) * time.Second)
		}
		if t, err := http.ParseTime(header); err == nil {
			return t.UTC()
		}
	}
	const phrase = "retry after "
	i := indexASCIIFold(detail, phrase)
	if i < 0 {
		return time.Time{}
	}
	rest := detail[i+len(phrase):]
	// "2026-01-17 00:27:45 UTC", as Let's Encrypt writes it.
	if len(rest) >= 23 && rest[19:23] == " UTC" {
		if t, err := time.Parse(time.DateTime, rest[:19]); err == nil {
			return t
		}
	}
	// "2023-08-04T12:00:00Z:", an RFC 3339 time ending a phrase.
	if n := strings.IndexAny(rest, " ,;"); n >= 0 {
		rest = rest[:n]
	}
	if t, err := time.Parse(time.RFC3339, strings.TrimSuffix(rest, ":")); err == nil {
		return t.UTC()
	}
	return time.Time{}
}

// indexASCIIFold returns the index of the first instance of the lower-case
// ASCII word in s, ignoring ASCII case, or -1. Unlike strings.ToLower, it
// keeps s's byte offsets whatever else s holds.
func indexASCIIFold(s, word string) int {
	for i := 0; i+len(word) <= len(s); i++ {
		j := 0
		for j < len(word) {
			c := s[i+j]
			if 'A' <= c && c <= 'Z' {
				c += 'a' - 'A'
			}
			if c != word[j] {
				break
			}
			j++
		}
		if j == len(word) {
			return i
		}
	}
	return -1
}

// retryBackoff is the acme.Client RetryBackoff certmgr installs when the
// user set none. acme.Client's own default retries a 429 until the
// context ends (five minutes inside autocert): this one surfaces a 429 at
// once, so the CA's Retry-After reaches certmgr's schedule, and retries
// only short-lived faults (badNonce, 5xx without a long Retry-After) a few
// times within seconds.
func retryBackoff(n int, _ *http.Request, res *http.Response) time.Duration {
	if res == nil || res.StatusCode == http.StatusTooManyRequests || n > 3 {
		return -1
	}
	if ra := parseRetryAfter(res.Header.Get("Retry-After"), "", time.Now()); !ra.IsZero() {
		if d := time.Until(ra); d > 3*time.Second {
			return -1
		}
	}
	return time.Duration(n) * 200 * time.Millisecond
}
