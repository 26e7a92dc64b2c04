package certmgr

import (
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"sync"
	"sync/atomic"
	"time"
)

// This file holds renewal that follows the CA: ACME Renewal Information
// (RFC 9773). For every certificate it serves, certmgr asks the CA's
// renewalInfo resource when to renew it, again when the CA's Retry-After
// says, and picks a time at random in the window the CA suggests. The
// renewal itself is an attempt like any other (renew.go): the schedule,
// the budget, the DNS pre-check and, in a cluster, the domain's lock. A CA
// whose directory has no renewalInfo is left to autocert's own renewal
// timer.

// The bounds of the interval between two polls of one certificate's
// renewal information, and the interval when the CA gives no Retry-After.
const (
	renewalInfoMinPoll     = time.Minute
	renewalInfoMaxPoll     = 24 * time.Hour
	renewalInfoDefaultPoll = 6 * time.Hour
	// renewalInfoErrorPoll is the interval after an answer that cannot be
	// used and gives no Retry-After.
	renewalInfoErrorPoll = time.Hour
	// renewalInfoGuard bounds how long after a renewal the CA's renewal
	// information cannot start another (a quarter of the lifetime, if
	// less).
	renewalInfoGuard = time.Hour
	// maxRenewalInfoBody bounds what is read of a renewalInfo answer.
	maxRenewalInfoBody = 64 << 10
)

// renewals is what certmgr knows of the CA's renewal information. Its
// mutex is a leaf: nothing is called and no lock taken under it.
type renewals struct {
	wake chan struct{} // wakes the loop: a certificate to track; buffered, 1

	mu    sync.Mutex // guards the fields below
	url   string     // the directory's renewalInfo, once read
	none  bool       // the directory has no renewalInfo: nothing is tracked
	certs map[certKey]*renewalInfo
}

// renewalInfo is the renewal information of one served certificate.
type renewalInfo struct {
	leaf     *x509.Certificate
	certID   string    // RFC 9773, section 4.1
	nextPoll time.Time // when to ask the CA next
	// The window the CA suggested last, and the time picked in it; zero
	// until the CA suggested one that can be used.
	start, end, renewAt time.Time
	noted               bool      // an answer that cannot be used was logged
	renewing            *attempt  // the renewal started at renewAt, while it runs
	retryAt             time.Time // the earliest next start of that renewal, when one could not start
}

// track makes k's served certificate leaf one whose renewal information
// is polled, from now on, unless it is already.
func (r *renewals) track(k certKey, leaf *x509.Certificate, now time.Time) {
	id, ok := certID(leaf)
	if !ok {
		return // no authority key identifier: autocert's timer renews it
	}
	r.mu.Lock()
	if r.none || r.certs[k] != nil && r.certs[k].certID == id {
		r.mu.Unlock()
		return
	}
	r.certs[k] = &renewalInfo{leaf: leaf, certID: id, nextPoll: now}
	r.mu.Unlock()
	select {
	case r.wake <- struct{}{}:
	default:
	}
}

// renewAt returns when name's certificate is to be renewed as the CA
// suggests, the earlier of its key types', or zero.
func (r *renewals) renewAt(name string) time.Time {
	r.mu.Lock()
	defer r.mu.Unlock()
	var at time.Time
	for _, k := range []certKey{{domain: name}, {domain: name, rsa: true}} {
		if ri := r.certs[k]; ri != nil && !ri.renewAt.IsZero() && (at.IsZero() || ri.renewAt.Before(at)) {
			at = ri.renewAt
		}
	}
	return at
}

// certID returns leaf's CertID: the key identifier of its authority key
// identifier and its serial number's DER content octets, each in
// unpadded base64url, joined by a dot.
func certID(leaf *x509.Certificate) (string, bool) {
	if len(leaf.AuthorityKeyId) == 0 || leaf.SerialNumber == nil || leaf.SerialNumber.Sign() < 0 {
		return "", false
	}
	serial := leaf.SerialNumber.Bytes()
	if len(serial) == 0 || serial[0]&0x80 != 0 {
		serial = append([]byte{0}, serial...) // DER: a positive INTEGER's leading sign octet
	}
	return base64.RawURLEncoding.EncodeToString(leaf.AuthorityKeyId) + "." + base64.RawURLEncoding.EncodeToString(serial), true
}

// renewalInfoLoop polls the renewal information of the certificates
// served and starts the renewals it suggests, until Close.
func (m *Manager) renewalInfoLoop() {
	defer m.wg.Done()
	t := time.NewTimer(renewalInfoMaxPoll)
	defer t.Stop()
	for {
		select {
		case <-m.ctx.Done():
			return
		case <-t.C:
		case <-m.ari.wake:
		}
		next := m.renewalInfoStep()
		wait := renewalInfoMaxPoll
		if !next.IsZero() {
			wait = min(max(next.Sub(m.now()), 0), renewalInfoMaxPoll)
		}
		t.Reset(wait)
	}
}

// renewalInfoStep polls what is due and starts the renewals that are, and
// returns when the next of either is due, or zero if none is.
func (m *Manager) renewalInfoStep() time.Time {
	now := m.now()
	var polls, renews []certKey
	m.ari.mu.Lock()
	for k, ri := range m.ari.certs {
		if ri.renewing != nil {
			select {
			case <-ri.renewing.done:
				// It failed (a success replaced ri): try again once the
				// domain's schedule allows; the gate decides.
				ri.renewing, ri.retryAt = nil, now.Add(m.hooks.renewalInfoMinPoll)
			default:
			}
		}
		if !now.Before(ri.nextPoll) {
			polls = append(polls, k)
		}
		if !ri.renewAt.IsZero() && ri.renewing == nil && !now.Before(ri.renewAt) && !now.Before(ri.retryAt) {
			renews = append(renews, k)
		}
	}
	m.ari.mu.Unlock()

	// The renewals first: they start at once, and polls may be slow.
	for _, k := range renews {
		m.renewForCA(k)
	}
	if len(polls) > 0 {
		m.pollAll(polls, now)
		if m.ctx.Err() != nil {
			return time.Time{}
		}
	}

	var next time.Time
	earliest := func(t time.Time) {
		if next.IsZero() || t.Before(next) {
			next = t
		}
	}
	m.ari.mu.Lock()
	defer m.ari.mu.Unlock()
	for _, ri := range m.ari.certs {
		earliest(ri.nextPoll)
		switch {
		case ri.renewing != nil:
			earliest(now.Add(m.hooks.renewalInfoMinPoll)) // to see how it ended
		case !ri.renewAt.IsZero():
			earliest(maxTime(ri.renewAt, ri.retryAt))
		}
	}
	return next
}

// maxRenewalInfoPolls bounds the polls of renewal information in flight
// at once: a CA that answers slowly, when many certificates are due (a
// mass revocation, say), delays each renewal by one answer, not a round.
const maxRenewalInfoPolls = 8

// pollAll polls the renewal information of the certificates polls, at
// most maxRenewalInfoPolls at a time, and starts the renewal a poll finds
// due right after that poll. Once the CA cannot be reached (or its
// directory read), the polls not made yet are asked again later, not one
// timeout each now. It returns when every poll it started has ended.
func (m *Manager) pollAll(polls []certKey, now time.Time) {
	url, err := m.renewalInfoURL()
	if err == nil && url == "" {
		return // the directory has no renewalInfo: nothing is tracked
	}
	var unreachable atomic.Bool
	unreachable.Store(err != nil)
	slots := make(chan struct{}, maxRenewalInfoPolls)
	var wg sync.WaitGroup
	for _, k := range polls {
		select {
		case slots <- struct{}{}:
		case <-m.ctx.Done():
		}
		if m.ctx.Err() != nil {
			break
		}
		wg.Go(func() {
			defer func() { <-slots }()
			if unreachable.Load() || m.pollRenewalInfo(url, k) != nil {
				unreachable.Store(true)
				m.ari.mu.Lock()
				if ri := m.ari.certs[k]; ri != nil {
					ri.nextPoll = maxTime(ri.nextPoll, now.Add(m.hooks.renewalInfoMinPoll))
				}
				m.ari.mu.Unlock()
				return
			}
			if m.renewalDue(k) {
				m.renewForCA(k)
			}
		})
	}
	wg.Wait()
}

// renewalDue reports whether the renewal of k's certificate that the CA
// suggested is due now and not running.
func (m *Manager) renewalDue(k certKey) bool {
	now := m.now()
	m.ari.mu.Lock()
	defer m.ari.mu.Unlock()
	ri := m.ari.certs[k]
	return ri != nil && !ri.renewAt.IsZero() && ri.renewing == nil && !now.Before(ri.renewAt) && !now.Before(ri.retryAt)
}

// renewalInfoURL returns the directory's renewalInfo URL, reading the
// directory the first time; "" if it has none. An error is the
// directory's that could not be read, to be read again later.
func (m *Manager) renewalInfoURL() (string, error) {
	m.ari.mu.Lock()
	url, none := m.ari.url, m.ari.none
	m.ari.mu.Unlock()
	if url != "" || none {
		return url, nil
	}
	var dir struct {
		RenewalInfo string `json:"renewalInfo"`
	}
	if _, _, err := m.getJSON(m.client.DirectoryURL, &dir); err != nil {
		return "", err
	}
	m.ari.mu.Lock()
	defer m.ari.mu.Unlock()
	m.ari.url = dir.RenewalInfo
	if dir.RenewalInfo == "" {
		m.ari.none = true
		clear(m.ari.certs)
	}
	return m.ari.url, nil
}

// getJSON GETs url from the CA and decodes its answer into v. It reports
// whether the CA answered and the answer's Retry-After, if any, also with
// an error answer.
func (m *Manager) getJSON(url string, v any) (retryAfter time.Time, answered bool, err error) {
	req, err := http.NewRequestWithContext(m.ctx, http.MethodGet, url, nil)
	if err != nil {
		return time.Time{}, false, err
	}
	res, err := m.ariClient.Do(req)
	if err != nil {
		return time.Time{}, false, err
	}
	defer res.Body.Close()
	body, err := io.ReadAll(io.LimitReader(res.Body, maxRenewalInfoBody))
	retryAfter = parseRetryAfter(res.Header.Get("Retry-After"), "", m.now())
	switch {
	case err != nil:
		return retryAfter, false, err
	case res.StatusCode != http.StatusOK:
		return retryAfter, true, fmt.Errorf("%s answered %s", url, res.Status)
	}
	if err := json.Unmarshal(body, v); err != nil {
		return retryAfter, true, fmt.Errorf("%s answered malformed JSON: %w", url, err)
	}
	return retryAfter, true, nil
}

// pollRenewalInfo asks the CA for k's renewal information and records it.
// An answer that cannot be used keeps the schedule as it is, and is
// logged once per certificate. It returns an error only when no answer
// came (the CA is unreachable).
func (m *Manager) pollRenewalInfo(url string, k certKey) error {
	m.ari.mu.Lock()
	ri := m.ari.certs[k]
	if ri == nil {
		m.ari.mu.Unlock()
		return nil
	}
	leaf, id := ri.leaf, ri.certID
	m.ari.mu.Unlock()
	if c := m.servedCert(k); c == nil || !c.Leaf.Equal(leaf) {
		m.ari.mu.Lock()
		if m.ari.certs[k] == ri {
			delete(m.ari.certs, k) // no longer served
		}
		m.ari.mu.Unlock()
		return nil
	}

	var answer struct {
		SuggestedWindow struct {
			Start time.Time `json:"start"`
			End   time.Time `json:"end"`
		} `json:"suggestedWindow"`
		ExplanationURL string `json:"explanationURL"`
	}
	retryAfter, answered, err := m.getJSON(url+"/"+id, &answer)
	switch {
	case m.ctx.Err() != nil:
		return nil // Close
	case !answered:
		return err
	}
	now := m.now()
	start, end := answer.SuggestedWindow.Start, answer.SuggestedWindow.End
	if err == nil {
		err = checkWindow(start, end, leaf)
	}
	interval := renewalInfoDefaultPoll
	if err != nil {
		interval = renewalInfoErrorPoll
	}
	if retryAfter.After(now) {
		interval = retryAfter.Sub(now)
	}
	interval = min(max(interval, m.hooks.renewalInfoMinPoll), m.hooks.renewalInfoMaxPoll)

	var events []Event
	m.ari.mu.Lock()
	if m.ari.certs[k] != ri {
		m.ari.mu.Unlock()
		return nil // replaced meanwhile
	}
	ri.nextPoll = now.Add(interval)
	switch {
	case err != nil:
		if !ri.noted {
			ri.noted = true
			events = append(events, Event{Kind: EventRenewalInfoUnusable, Time: now, Domain: k.domain, NotAfter: leaf.NotAfter,
				Err: fmt.Errorf("certmgr: renewal information of %s (serial %x): %w", k.domain, leaf.SerialNumber, err)})
		}
	case !start.Equal(ri.start) || !end.Equal(ri.end):
		ri.start, ri.end = start, end
		ri.renewAt, ri.retryAt = pickRenewal(start, end, now, m.hooks.rand()), time.Time{}
		ev := Event{Kind: EventRenewalScheduled, Time: now, Domain: k.domain, NotAfter: leaf.NotAfter,
			WindowStart: start, WindowEnd: end, RenewAt: ri.renewAt}
		events = append(events, ev)
		if !now.Before(start) && now.Before(leaf.NotAfter.Add(-m.renewBefore(leaf))) {
			// The CA asks for a renewal now, long before autocert's own
			// schedule: a revocation, say.
			ev.Kind, ev.ExplanationURL = EventRenewalSuggested, answer.ExplanationURL
			events = append(events, ev)
		}
	}
	m.ari.mu.Unlock()
	m.emit(events...)
	return nil
}

// checkWindow returns why a suggested renewal window of leaf cannot be
// used, or nil: one that is empty or inverted, or that starts only after
// leaf expires, or ended before leaf's lifetime began.
func checkWindow(start, end time.Time, leaf *x509.Certificate) error {
	life := leaf.NotAfter.Sub(leaf.NotBefore)
	switch {
	case start.IsZero() || end.IsZero():
		return errors.New("no suggested window")
	case !start.Before(end):
		return fmt.Errorf("the suggested window ends (%s) before it starts (%s)", end.UTC().Format(time.RFC3339), start.UTC().Format(time.RFC3339))
	case start.After(leaf.NotAfter):
		return fmt.Errorf("the suggested window starts (%s) after the certificate expires", start.UTC().Format(time.RFC3339))
	case end.Before(leaf.NotBefore.Add(-life)):
		return fmt.Errorf("the suggested window ended (%s) long before the certificate was issued", end.UTC().Format(time.RFC3339))
	}
	return nil
}

// pickRenewal returns a time in [start, end) at the uniform random point
// r in [0, 1) (RFC 9773, section 4.2), or now if the window ended.
func pickRenewal(start, end, now time.Time, r float64) time.Time {
	if !now.Before(end) {
		return now
	}
	return start.Add(time.Duration(r * float64(end.Sub(start))))
}

// renewBefore is how long before leaf's expiry autocert renews it by
// itself: RenewBefore, or a third of the lifetime, at most 30 days.
func (m *Manager) renewBefore(leaf *x509.Certificate) time.Duration {
	if rb := m.cfg.Autocert.RenewBefore; rb > 0 {
		return min(rb, 30*24*time.Hour)
	}
	return min(leaf.NotAfter.Sub(leaf.NotBefore)/3, 30*24*time.Hour)
}
