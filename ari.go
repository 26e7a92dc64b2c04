package certmgr

import (
	"context"
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

	"golang.org/x/crypto/acme/autocert"
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
	// loads holds, for domains this replica does not track but whose
	// certificate the cluster holds (another replica's, from the store's
	// record or watch), when to take the domain up (loadForRenewal), so
	// that autocert's own timer renews its certificate on time with no
	// traffic at all. Bounded by the records and certificates kept.
	loads map[string]time.Time
}

// loadAt schedules name to be taken up at, unless it is sooner already.
func (r *renewals) loadAt(name string, at time.Time) {
	r.mu.Lock()
	if old, ok := r.loads[name]; !ok || at.Before(old) {
		r.loads[name] = at
	}
	r.mu.Unlock()
	select {
	case r.wake <- struct{}{}:
	default:
	}
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
	var loads []string
	m.ari.mu.Lock()
	for name, at := range m.ari.loads {
		if !now.Before(at) {
			loads = append(loads, name)
			delete(m.ari.loads, name)
		}
	}
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
	for _, name := range loads {
		if m.ctx.Err() != nil {
			return time.Time{}
		}
		m.loadForRenewal(name)
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
	for _, at := range m.ari.loads {
		earliest(at)
	}
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
	first := m.ari.url == "" && !m.ari.none
	m.ari.url = dir.RenewalInfo
	if dir.RenewalInfo == "" {
		m.ari.none = true
		clear(m.ari.certs)
	}
	m.ari.mu.Unlock()
	if first && dir.RenewalInfo == "" {
		m.log.Info("renewal information not offered", "directory", m.client.DirectoryURL,
			"so", "certificates are renewed on autocert's schedule alone (RenewBefore, or a third of their lifetime)")
	}
	return dir.RenewalInfo, nil
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

	// In a cluster, one replica polls for all: the others take its
	// answer from the store (see sharedPoll).
	share, claimed, wait := m.sharedPoll(k, id)
	switch {
	case share != nil:
		return m.applyRenewalInfo(k, ri, leaf, share.Start, share.End, "", share.NextPoll, nil)
	case !wait.IsZero():
		m.ari.mu.Lock()
		if m.ari.certs[k] == ri {
			ri.nextPoll = wait
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
		m.counts.polls[2].Add(1)
		return err
	}
	now := m.now()
	start, end := answer.SuggestedWindow.Start, answer.SuggestedWindow.End
	if err == nil {
		err = checkWindow(start, end, leaf)
	}
	if err == nil {
		m.counts.polls[0].Add(1)
	} else {
		m.counts.polls[1].Add(1)
	}
	interval := renewalInfoDefaultPoll
	if err != nil {
		interval = renewalInfoErrorPoll
	}
	if retryAfter.After(now) {
		interval = retryAfter.Sub(now)
	}
	interval = min(max(interval, m.hooks.renewalInfoMinPoll), m.hooks.renewalInfoMaxPoll)
	next := now.Add(interval)
	if claimed != 0 && err == nil {
		m.putPollShare(k, claimed, pollShare{CertID: id, NextPoll: next, Start: start, End: end})
	}
	return m.applyRenewalInfo(k, ri, leaf, start, end, answer.ExplanationURL, next, err)
}

// pollSharePrefix starts the Cache key under which replicas share the
// renewal information of a domain's certificate (pollShare), followed by
// the certificate's Cache key: one key per certificate a domain has.
const pollSharePrefix = "certmgr+ari+"

// pollShare is a poll of a certificate's renewal information, as one
// replica shares it with the others: the CA's answer until NextPoll, or
// the claim of a replica that polls until ClaimUntil.
type pollShare struct {
	CertID     string    `json:"cert_id"`
	NextPoll   time.Time `json:"next_poll,omitzero"`
	Start      time.Time `json:"start,omitzero"`
	End        time.Time `json:"end,omitzero"`
	ClaimUntil time.Time `json:"claim_until,omitzero"`
}

// sharedPoll decides, with a Coordinator, who polls the renewal
// information of k's certificate (id) now: it returns the answer another
// replica shared, still current; or a time to look again while another
// replica polls; or, when this replica claimed the poll, the claim's
// revision, for putPollShare. Without a Coordinator, or when the store
// cannot be read or written, this replica polls alone (all zero).
func (m *Manager) sharedPoll(k certKey, id string) (share *pollShare, claimed int64, wait time.Time) {
	if m.coord == nil {
		return nil, 0, time.Time{}
	}
	key := pollSharePrefix + k.cacheKey()
	ctx, cancel := context.WithTimeout(m.ctx, cacheTimeout)
	defer cancel()
	now := m.now()
	// A claim lasts as long as a poll may, but no longer than the
	// shortest interval between polls: a claimer that is gone (closed,
	// crashed) delays the others' poll by that much at most.
	claimFor := min(m.hooks.requestTimeout, m.hooks.renewalInfoMinPoll)
	data, rev, err := m.coord.GetRevision(ctx, key)
	var p pollShare
	switch {
	case errors.Is(err, autocert.ErrCacheMiss):
		rev = 0
	case err != nil:
		return nil, 0, time.Time{}
	case json.Unmarshal(data, &p) != nil || p.CertID != id:
		p = pollShare{} // another certificate's, or unreadable: replaced
	case now.Before(p.NextPoll) && !p.NextPoll.After(now.Add(m.hooks.renewalInfoMaxPoll)):
		return &p, 0, time.Time{}
	case now.Before(p.ClaimUntil) && !p.ClaimUntil.After(now.Add(claimFor)):
		return nil, 0, p.ClaimUntil
	}
	out, err := json.Marshal(pollShare{CertID: id, ClaimUntil: now.Add(claimFor)})
	if err != nil {
		return nil, 0, time.Time{}
	}
	var newRev int64
	var ok bool
	err = m.cache.write(func() (err error) {
		newRev, ok, err = m.coord.PutIf(ctx, key, out, rev, "")
		return err
	})
	switch {
	case err != nil:
		return nil, 0, time.Time{}
	case !ok:
		return nil, 0, now.Add(time.Second) // another replica claimed it a moment ago
	}
	return nil, newRev, time.Time{}
}

// putPollShare shares p, the answer this replica got for k's certificate,
// over its claim at revision claimed.
func (m *Manager) putPollShare(k certKey, claimed int64, p pollShare) {
	out, err := json.Marshal(p)
	if err != nil {
		return
	}
	ctx, cancel := context.WithTimeout(m.ctx, cacheTimeout)
	defer cancel()
	m.cache.write(func() error {
		_, _, err := m.coord.PutIf(ctx, pollSharePrefix+k.cacheKey(), out, claimed, "")
		return err
	})
}

// applyRenewalInfo records the answer about k's certificate leaf (ri): the
// window from start to end, or err if it cannot be used, and the next
// poll at next.
func (m *Manager) applyRenewalInfo(k certKey, ri *renewalInfo, leaf *x509.Certificate, start, end time.Time, explanation string, next time.Time, err error) error {
	now := m.now()
	var events []Event
	m.ari.mu.Lock()
	if m.ari.certs[k] != ri {
		m.ari.mu.Unlock()
		return nil // replaced meanwhile
	}
	ri.nextPoll = next
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
			ev.Kind, ev.ExplanationURL = EventRenewalSuggested, explanation
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
	return m.renewBeforeOf(leaf.NotBefore, leaf.NotAfter)
}

// renewBeforeOf is renewBefore of a certificate valid from notBefore to
// notAfter.
func (m *Manager) renewBeforeOf(notBefore, notAfter time.Time) time.Duration {
	if rb := m.cfg.Autocert.RenewBefore; rb > 0 {
		if third := notAfter.Sub(notBefore) / 3; rb > third && third >= renewRetryMax {
			return third // bounded: see checkRenewBeforeLocked
		}
		return min(rb, 30*24*time.Hour)
	}
	return min(notAfter.Sub(notBefore)/3, 30*24*time.Hour)
}

// follows reports whether the renewal information of leaf is followed:
// the CA offers it, and leaf is the certificate tracked for its key.
func (r *renewals) follows(leaf *x509.Certificate) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, ri := range r.certs {
		if ri.leaf.Equal(leaf) {
			return true
		}
	}
	return false
}
