package certmgrtest

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
	"strings"
	"time"
)

// Rule changes how the proxy treats matching requests. A request matches
// when its class is Class (or Class is ClassAny) and, if Identifier is not
// empty, Identifier is one of the request's identifiers. Identifiers are
// known for new-order requests (from the payload) and for requests to an
// order, finalize, authorization, challenge or certificate URL the proxy
// has already seen in an answer; requests to other URLs never match a rule
// with an Identifier. The first matching rule in the order added applies.
//
// A matching request is first held (Hold) or delayed (Delay); then it is
// answered with Status if that is non-zero, or else forwarded to Pebble.
// A held or delayed request whose client goes away, or that is still waiting
// when the proxy closes, has its connection dropped without an answer.
type Rule struct {
	// Class is the class of requests the rule matches; ClassAny matches
	// all.
	Class Class
	// Identifier, if not empty, is an identifier the request must concern,
	// compared case-insensitively.
	Identifier string

	// Delay is how long to wait before acting; with Status zero this makes a
	// slow CA.
	Delay time.Duration
	// Hold keeps the request until Release is called (then it proceeds as
	// below, ignoring Delay), its client goes away, or the proxy closes:
	// a CA that accepts the connection and never answers.
	Hold bool

	// Status, if non-zero, is the HTTP status to answer with instead of
	// forwarding. The answer carries a fresh Replay-Nonce from Pebble, so
	// that an ACME client's nonce pool keeps working, and by default an
	// application/problem+json body with ProblemType and Detail.
	Status int
	// RetryAfter is the Retry-After header value of the answer, if not empty.
	RetryAfter string
	// ProblemType defaults by Status: 400 malformed, 401 and 403
	// unauthorized, 429 rateLimited, otherwise serverInternal (all in the
	// "urn:ietf:params:acme:error:" namespace).
	ProblemType string
	// Detail defaults to a text naming the rule.
	Detail string
	// Body, if not empty, is written verbatim as the answer body with
	// Content-Type application/json instead of a problem document, e.g.
	// Status 200 with a malformed directory.
	Body string

	// Times is how many requests the rule applies to; 0 means no limit.
	Times int
}

type ruleState struct {
	Rule
	left int // applications left; < 0 means no limit
}

// AddRule adds r after the existing rules and returns a function that
// removes it (idempotent; requests already matched are unaffected).
func (p *Proxy) AddRule(r Rule) (remove func()) {
	rs := &ruleState{Rule: r, left: r.Times}
	if r.Times <= 0 {
		rs.left = -1
	}
	p.stateMu.Lock()
	p.rules = append(p.rules, rs)
	p.stateMu.Unlock()
	return func() {
		p.stateMu.Lock()
		defer p.stateMu.Unlock()
		for i, x := range p.rules {
			if x == rs {
				p.rules = append(p.rules[:i:i], p.rules[i+1:]...)
				return
			}
		}
	}
}

// Release lets every request currently held by a Hold rule proceed.
// Requests that arrive later are held again while the rule applies.
func (p *Proxy) Release() {
	p.stateMu.Lock()
	close(p.release)
	p.release = make(chan struct{})
	p.stateMu.Unlock()
}

// matchLocked returns the first rule matching the request, consuming one
// of its applications, and the channel a Release will close. p.stateMu
// must be held.
func (p *Proxy) matchLocked(class Class, idents []string) (*Rule, <-chan struct{}) {
	for i, rs := range p.rules {
		if rs.Class != ClassAny && rs.Class != class {
			continue
		}
		if rs.Identifier != "" && !containsFold(idents, rs.Identifier) {
			continue
		}
		if rs.left > 0 {
			rs.left--
			if rs.left == 0 {
				p.rules = append(p.rules[:i:i], p.rules[i+1:]...)
			}
		}
		r := rs.Rule
		return &r, p.release
	}
	return nil, nil
}

func containsFold(list []string, s string) bool {
	for _, x := range list {
		if strings.EqualFold(x, s) {
			return true
		}
	}
	return false
}

// hold waits as the rule says; it reports false if the request must be
// dropped because its client went away or the proxy closed.
func (p *Proxy) hold(ctx context.Context, r *Rule, release <-chan struct{}) bool {
	if r.Hold {
		select {
		case <-release:
			return true
		case <-ctx.Done():
			return false
		case <-p.closed:
			return false
		}
	}
	if r.Delay > 0 {
		t := time.NewTimer(r.Delay)
		defer t.Stop()
		select {
		case <-t.C:
			return true
		case <-ctx.Done():
			return false
		case <-p.closed:
			return false
		}
	}
	return true
}

// defaultProblemType returns the ACME problem type a Rule uses for status.
func defaultProblemType(status int) string {
	const ns = "urn:ietf:params:acme:error:"
	switch status {
	case http.StatusBadRequest:
		return ns + "malformed"
	case http.StatusUnauthorized, http.StatusForbidden:
		return ns + "unauthorized"
	case http.StatusTooManyRequests:
		return ns + "rateLimited"
	}
	return ns + "serverInternal"
}

// inject answers the request as rule r says.
func (p *Proxy) inject(w http.ResponseWriter, class Class, idents []string, r *Rule) {
	h := w.Header()
	if nonce := p.freshNonce(); nonce != "" {
		h.Set("Replay-Nonce", nonce)
	}
	if r.RetryAfter != "" {
		h.Set("Retry-After", r.RetryAfter)
	}
	h.Set("Cache-Control", "no-store")
	body := []byte(r.Body)
	if r.Body != "" {
		h.Set("Content-Type", "application/json")
	} else {
		prob := Problem{
			Class:       class,
			Identifiers: idents,
			Status:      r.Status,
			Type:        r.ProblemType,
			Detail:      r.Detail,
			Injected:    true,
		}
		if prob.Type == "" {
			prob.Type = defaultProblemType(r.Status)
		}
		if prob.Detail == "" {
			prob.Detail = fmt.Sprintf("certmgrtest: rule for %s requests answered %d", class, r.Status)
		}
		body, _ = json.Marshal(problemDoc{Type: prob.Type, Detail: prob.Detail, Status: prob.Status})
		h.Set("Content-Type", "application/problem+json")
		p.stateMu.Lock()
		p.problems = append(p.problems, prob)
		p.notifyLocked()
		p.stateMu.Unlock()
	}
	w.WriteHeader(r.Status)
	_, _ = w.Write(body)
}

// freshNonce asks the WFE, in-process, for a new nonce.
func (p *Proxy) freshNonce() string {
	req := httptest.NewRequest(http.MethodHead, "https://certmgrtest.invalid/nonce-plz", nil)
	req.Header.Set("User-Agent", "certmgrtest")
	rec := httptest.NewRecorder()
	p.wfe.ServeHTTP(rec, req)
	return rec.Header().Get("Replay-Nonce")
}
