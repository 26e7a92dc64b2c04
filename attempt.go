package certmgr

import (
	"context"
	"crypto/rsa"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"slices"
	"time"

	"golang.org/x/crypto/acme"
	"golang.org/x/crypto/acme/autocert"
)

// This file holds the attempt lifecycle: an attempt begins (begin, or
// admitOrder for autocert's own renewals), runs (the DNS pre-check, then
// autocert), hears what the CA said through the ACME transport
// (observed) and the Cache (certStored), and finishes (finish), which
// records the outcome and wakes the handshakes that wait for it.

// attempt is one ACME attempt for a domain: started by a handshake or
// Provision (a goroutine runs it) or by autocert's renewal timer (seen
// only through the ACME traffic).
type attempt struct {
	key   certKey // the certificate sought; zero for a renewal
	path  Path
	start time.Time
	done  chan struct{} // closed when cert and err are set

	cert *tls.Certificate
	err  error

	timer    *time.Timer          // a renewal's deadline; nil for other attempts
	timerEnd time.Time            // when timer fires unless a 5xx moved it closer (time.Now's clock)
	timerAt  time.Time            // when timer fires now: timerEnd, or sooner after a 5xx
	since    [2]*x509.Certificate // a renewal's: the certificates served as it began (ECDSA, RSA)
	am       *autocert.Manager    // a PathRenewalInfo attempt's own autocert.Manager, once made
	fence    string               // the hold of the domain's cluster lock; "" without one
	lost     <-chan struct{}      // closed if the domain's cluster lock is lost; nil without one
	unlock   func()               // releases the domain's cluster lock; nil without one
	token    []byte               // the TLS-ALPN-01 token certificate it wrote last, with a Coordinator

	// replaces is the identifier of the certificate the attempt's last
	// order named as the one it replaces, if any; noReplaces is set once
	// the CA refused that: its next orders go without. Guarded by
	// Manager.stateMu.
	replaces   string
	noReplaces bool
	// refusal is certmgr's own refusal of the attempt's order (a
	// profile the CA does not offer), which finish reports in place of
	// autocert's error; guarded by Manager.stateMu.
	refusal error

	// waitedOut is set once a handshake waited HandshakeTimeout for the
	// attempt: handshakes that come after it get the fallback at once
	// (answerNow). Guarded by Manager.stateMu.
	waitedOut bool

	// What the CA said, from the traffic; guarded by Manager.stateMu.
	// open is the reservation of the attempt's order in flight, if any:
	// from its admission (admitOrder) until the CA failed it, refused it
	// or did not answer (observed), or its certificate was stored
	// (certStored). An attempt has one order in flight at a time.
	open        string
	orders      int
	authzFailed int
	problem     string
	challenge   string
	rateLimited bool
	retryAfter  time.Time
}

// obtain returns a certificate for k: from the cache, or from an ACME
// attempt (started now, or already in flight). It waits for the attempt
// until ctx ends; the attempt goes on without it.
func (m *Manager) obtain(ctx context.Context, k certKey, path Path) (*tls.Certificate, error) {
	d, err := m.domainFor(k.domain)
	if err != nil {
		return nil, err
	}
	if c, err := m.load(ctx, d, k); c != nil || err != nil {
		return c, err
	}
	// An attempt in flight may be for the other key type (or a renewal):
	// once it ends, look again, and start one for k if it is still needed.
	for range 2 {
		a, err := m.begin(d, k, path)
		if err != nil {
			m.warnOrderBudget(err)
			return nil, err
		}
		if path == PathHandshake && m.waitedOut(a) {
			// Another handshake waited its whole timeout for a: this one
			// gets the fallback at once (a handshake of the other key
			// type, or one that read the Cache again).
			return nil, errWaitedOut
		}
		served := m.servedSignal(d)
		if path == PathHandshake {
			m.waitedShakes.Add(1)
		}
		waitStart := time.Now()
		select {
		case <-a.done:
		case <-served:
			// Served meanwhile: another replica's certificate, through the
			// store's watch, while this one's attempt waits for the lock.
			if c := m.servedCert(k); c != nil {
				return c, nil
			}
			select {
			case <-a.done:
			case <-ctx.Done():
				return nil, m.gaveUp(ctx, a, waitStart)
			}
		case <-ctx.Done():
			return nil, m.gaveUp(ctx, a, waitStart)
		}
		if a.err != nil {
			return nil, a.err
		}
		if a.key == k {
			return a.cert, nil
		}
		if c := m.servedCert(k); c != nil {
			return c, nil
		}
	}
	return nil, fmt.Errorf("certmgr: %s: no certificate for this key type yet", k.domain)
}

// gaveUp returns the error of a wait for attempt a, from since, that
// ctx ended. A handshake that ran out its HandshakeTimeout, most of it
// waiting for a (not for its HostPolicy, say), marks a, so that no other
// handshake waits for it again.
func (m *Manager) gaveUp(ctx context.Context, a *attempt, since time.Time) error {
	if context.Cause(ctx) == errHandshakeTimeout && time.Since(since) >= m.timeout/2 {
		m.stateMu.Lock()
		a.waitedOut = true
		m.stateMu.Unlock()
	}
	return ctx.Err()
}

// waitedOut reports whether a handshake waited its whole timeout for a.
func (m *Manager) waitedOut(a *attempt) bool {
	m.stateMu.Lock()
	defer m.stateMu.Unlock()
	return a.waitedOut
}

// errWaitedOut is the error of a handshake that does not wait for an
// attempt another handshake waited out.
var errWaitedOut = errors.New("certmgr: a handshake waited its whole timeout for this attempt already")

// servedSignal returns a channel closed when a certificate is next served
// for d, with a Coordinator (another replica's, through the watch); nil
// (never ready) without one.
func (m *Manager) servedSignal(d *domain) <-chan struct{} {
	if m.coord == nil {
		return nil
	}
	m.stateMu.Lock()
	defer m.stateMu.Unlock()
	if d.served == nil {
		d.served = make(chan struct{})
	}
	return d.served
}

// load returns k's certificate from the Cache the first time the domain
// is used in this process, or nil. A certificate found is handed to the
// domain's autocert.Manager, which then renews it.
func (m *Manager) load(ctx context.Context, d *domain, k certKey) (*tls.Certificate, error) {
	m.stateMu.Lock()
	done := m.loadedLocked(d, k, m.now())
	m.stateMu.Unlock()
	if done {
		return nil, nil
	}
	// The read is the flight's, not the first caller's: a handshake that
	// gives up does not fail the others that joined it.
	ch := m.loads.DoChan(k.cacheKey(), func() (any, error) {
		ctx, cancel := context.WithTimeout(m.ctx, cacheTimeout)
		defer cancel()
		data, err := m.cache.Get(ctx, k.cacheKey())
		if err != nil && !errors.Is(err, autocert.ErrCacheMiss) {
			// Unreadable: a valid certificate may be there. Read again next
			// time rather than order a new one.
			return nil, err
		}
		m.stateMu.Lock()
		d.loadedAt[b2i(k.rsa)] = m.now()
		m.stateMu.Unlock()
		if err != nil {
			return nil, nil // a miss
		}
		if _, err := parseCert(k, data, m.now()); err != nil {
			return nil, nil // expired or unusable: an attempt replaces it
		}
		m.stateMu.Lock()
		d.loading++ // the autocert.Manager reads the cache; it must not order
		m.stateMu.Unlock()
		c, err := m.fetch(d, k)
		m.stateMu.Lock()
		d.loading--
		m.stateMu.Unlock()
		if err != nil {
			return nil, nil
		}
		m.serve(k, c)
		m.emit(Event{Kind: EventLoaded, Time: m.now(), Domain: k.domain, NotAfter: c.Leaf.NotAfter})
		return c, nil
	})
	select {
	case r := <-ch:
		c, _ := r.Val.(*tls.Certificate)
		return c, r.Err
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}

// begin returns d's attempt in flight, or starts one for k if the
// domain's schedule, budget and DNS allow it.
func (m *Manager) begin(d *domain, k certKey, path Path) (*attempt, error) {
	m.stateMu.Lock()
	defer m.stateMu.Unlock()
	if d.attempt != nil {
		return d.attempt, nil
	}
	if m.closed.Load() {
		return nil, errClosed
	}
	if err := m.checkAttemptLocked(d); err != nil {
		return nil, err
	}
	if m.inFlight >= m.hooks.maxInFlight {
		return nil, fmt.Errorf("certmgr: %d attempts in flight already; %s waits", m.inFlight, d.name)
	}
	a := &attempt{key: k, path: path, start: m.now(), done: make(chan struct{})}
	if path == PathRenewalInfo {
		a.since = m.issuedLocked(d.name)
	}
	d.attempt = a
	m.inFlight++
	m.wg.Add(1)
	go m.run(d, a, k)
	return a, nil
}

// run is the goroutine of an attempt started by begin.
func (m *Manager) run(d *domain, a *attempt, k certKey) {
	defer m.wg.Done()
	if m.dns != nil {
		ctx, cancel := context.WithTimeout(m.ctx, m.hooks.dnsCheckTimeout)
		err := m.dnsChecked(d, checkDNS(ctx, m.dns, d.name))
		cancel()
		if err != nil {
			m.finish(d, a, nil, err)
			return
		}
	}
	// One replica at a time: the others wait here, and then find the
	// certificate in the store.
	if err := m.lockDomain(m.ctx, d, a); err != nil {
		m.finish(d, a, nil, err)
		return
	}
	if m.coord != nil {
		// The replica before may have failed: its record binds here too.
		if err := m.checkClusterRecord(m.ctx, d); err != nil {
			m.finish(d, a, nil, err)
			return
		}
	}
	if a.path == PathRenewalInfo {
		// The cluster's record, read under the lock, may tell of a
		// renewal this replica did not see (it started after it): the
		// guard against renewal loops holds for the cluster.
		if err := m.checkRenewalInfoGuard(d); err != nil {
			m.finish(d, a, nil, err)
			return
		}
		if m.coord != nil && m.renewedElsewhere(m.ctx, d.name, a.since, k.rsa) {
			if c := m.servedCert(k); c != nil {
				m.finish(d, a, c, nil) // another replica renewed it for all
				return
			}
		}
		c, err := m.fetchRenewal(d, a, k)
		m.finish(d, a, c, err)
		return
	}
	c, err := m.fetch(d, k)
	m.finish(d, a, c, err)
}

// fetch asks d's autocert.Manager for the certificate k. autocert keeps
// serving the certificate in its memory after it expired (its renewals
// kept failing) without asking the CA: then a new autocert.Manager for
// the domain is asked, which reads the Cache and orders if need be.
func (m *Manager) fetch(d *domain, k certKey) (*tls.Certificate, error) {
	for range 2 {
		am, err := m.domainAutocert(m.ctx, d)
		if err != nil {
			return nil, err
		}
		c, err := am.GetCertificate(syntheticHello(k))
		if err != nil || m.now().Before(c.Leaf.NotAfter) {
			return c, err
		}
		m.stateMu.Lock()
		if d.am == am {
			d.am = nil
		}
		m.stateMu.Unlock()
	}
	return nil, fmt.Errorf("certmgr: %s: autocert holds an expired certificate", k.domain)
}

// dnsChecked records the outcome of d's DNS pre-check and returns its
// error, wrapping ErrDNSNotReady, or nil. Only changes are logged.
func (m *Manager) dnsChecked(d *domain, err error) error {
	now := m.now()
	var ev []Event
	m.stateMu.Lock()
	if err == nil {
		if d.dnsErr != nil {
			ev = append(ev, Event{Kind: EventDNSReady, Time: now, Domain: d.name})
			d.logged = false
		}
		d.dnsErr, d.dnsFails, d.dnsNext = nil, 0, time.Time{}
	} else {
		if !errors.Is(err, ErrDNSNotReady) {
			err = fmt.Errorf("%w: %s: %w", ErrDNSNotReady, d.name, err)
		}
		d.dnsFails++
		d.dnsNext = now.Add(m.cfg.DNSRecheck.delay(d.dnsFails, m.hooks.rand()))
		if d.dnsErr == nil || d.dnsErr.Error() != err.Error() {
			ev = append(ev, Event{Kind: EventDNSNotReady, Time: now, Domain: d.name, NextAttempt: d.dnsNext, Err: err})
			d.logged = false
		}
		d.dnsErr = err
	}
	m.stateMu.Unlock()
	m.emit(ev...)
	return err
}

// finish records the outcome of attempt a of d and wakes its waiters.
// An attempt that failed for certmgr's own reasons (Close, DNS, a local
// refusal) spends nothing and does not move the schedule.
func (m *Manager) finish(d *domain, a *attempt, cert *tls.Certificate, err error) {
	now := m.now()
	var events []Event
	m.stateMu.Lock()
	if d.attempt != a {
		m.stateMu.Unlock()
		return // already finished
	}
	d.attempt = nil
	// From here an answer to one of a's requests still out (autocert's
	// detached clean-up) is no news to the attempt that may follow.
	m.obs.forget(d.name)
	if a.path != PathRenewal {
		m.inFlight--
	}
	attemptNo := d.fail.Failures + 1
	if a.timer != nil {
		a.timer.Stop()
	}
	unlock, fence, lost, token := a.unlock, a.fence, a.lost, a.token
	if err != nil && a.refusal != nil && a.orders == 0 {
		err = a.refusal
	}
	local := failedLocally(err, m.closed.Load(), a.authzFailed, a.rateLimited, lockLostLocked(a))
	// change is the outcome's one change to the domain's failure record,
	// made here and, in a cluster, to the cluster's record; before is the
	// record before it, for a cluster whose store has none yet.
	var change func(*failureRecord)
	var before *failureRecord
	if d.recRev == 0 {
		b := d.fail
		b.Spends = slices.Clone(b.Spends)
		before = &b
	}
	switch {
	case err == nil:
		m.counts.attempt(a.path, resultSucceeded)
	case local:
		m.counts.attempt(a.path, resultLocal)
	default:
		m.counts.attempt(a.path, resultFailed)
	}
	switch {
	case err == nil:
		kind := EventObtained
		renewed := a.path == PathRenewal || a.path == PathRenewalInfo && a.orders > 0
		switch {
		case renewed:
			kind = EventRenewed
		case a.orders == 0:
			kind = EventLoaded // autocert found it in the Cache: another replica's, say
		}
		leaf := cert.Leaf
		change = func(r *failureRecord) {
			r.succeed(now)
			r.obtained(leaf)
			if renewed {
				r.Renewed = now
			}
		}
		change(&d.fail)
		d.lastErr = nil
		d.notAfter = maxTime(d.notAfter, cert.Leaf.NotAfter) // Status is valid from here on
		d.logged = false
		events = append(events, Event{Kind: kind, Time: now, Domain: d.name, Path: a.path, Challenge: a.challenge,
			Attempt: attemptNo, Duration: now.Sub(a.start), NotAfter: cert.Leaf.NotAfter, Profile: m.cfg.Profile, Replaces: a.replaces})
	case local:
		if ce := (*cacheError)(nil); errors.As(err, &ce) {
			// The Cache cannot be read: no attempt until it may work again,
			// lest a certificate that is there be ordered anew.
			d.localNext = now.Add(m.hooks.cacheRetry)
		}
		if a.refusal != nil && (d.notAfter.IsZero() || !now.Before(d.notAfter)) {
			// autocert keeps its failed state for a minute and answers
			// "missing certificate" meanwhile: the next attempt starts
			// afresh, and meets certmgr's refusal again.
			d.am = nil
			d.loadedAt = [2]time.Time{}
		}
	default:
		if a.problem != "" {
			err = &AttemptError{Domain: d.name, Detail: a.problem, Err: err}
		} else {
			err = &AttemptError{Domain: d.name, Err: err}
		}
		retryAfter := a.retryAfter
		var ae *acme.Error
		if errors.As(err, &ae) {
			// The CA's Retry-After, whatever request carried it (a 503 on
			// the account, say, which the observer cannot tie to a domain).
			if ae.Header != nil {
				retryAfter = maxTime(retryAfter, parseRetryAfter(ae.Header.Get("Retry-After"), ae.Detail, now))
			}
			if _, ok := acme.RateLimit(ae); ok {
				a.rateLimited = true
			}
		}
		msg, rnd, cost, budget, backoff := err.Error(), m.hooks.rand(), m.cost(), m.cfg.AuthzBudget, m.cfg.Backoff
		change = func(r *failureRecord) { r.fail(now, msg, cost, budget, backoff, retryAfter, rnd) }
		change(&d.fail)
		d.lastErr = err
		d.logged = false
		if d.notAfter.IsZero() || !now.Before(d.notAfter) {
			d.am = nil // drop autocert's failed state with it; the next attempt starts afresh
			d.loadedAt = [2]time.Time{}
		}
		events = append(events, Event{Kind: EventFailed, Time: now, Domain: d.name, Path: a.path, Challenge: a.challenge,
			Attempt: attemptNo, Duration: now.Sub(a.start), Err: err, Profile: m.cfg.Profile, Replaces: a.replaces})
		if a.rateLimited {
			events = append(events, Event{Kind: EventRateLimited, Time: now, Domain: d.name, Path: a.path, NextAttempt: d.fail.NextAttempt, Err: err})
		} else {
			events = append(events, Event{Kind: EventBackoff, Time: now, Domain: d.name, Path: a.path, Attempt: attemptNo, NextAttempt: d.fail.NextAttempt})
		}
	}
	a.cert, a.err = cert, err
	m.stateMu.Unlock()
	if change != nil {
		m.storeRecord(d.name, fence, lost, before, change) // under the lock, if the attempt held it
	}
	if unlock != nil {
		// The token of this attempt's challenge, or one a holder before
		// it left when it lost the lock (an order that reuses the valid
		// authorization then writes none again). A hold already lost
		// deletes nothing fenced, and must not wait for a store it may
		// have lost: its own token, if no holder after it wrote another,
		// is deleted in the background (dropLostToken).
		if (closed(lost) || !m.deleteToken(d.name, fence)) && token != nil {
			m.wg.Add(1)
			go m.dropLostToken(d.name, token)
		}
		unlock()
	}
	if cert != nil {
		m.serve(certKey{domain: d.name, rsa: isRSA(cert)}, cert)
	}
	if change != nil {
		m.saveState() // before waking the waiters: what they see is stored
	}
	m.emit(events...) // and logged
	close(a.done)
}

// failedLocally reports whether an attempt that ended with err failed for
// certmgr's own reasons, which leave the domain's failure record as it is:
// Close (closing), the DNS pre-check, a local refusal (ErrBackoff,
// errLoading) or a Cache that cannot be read, if the CA failed no
// authorization (authzFailed) and did not rate-limit it; an authorization
// the CA failed, or its rate limit, is the CA's, even at Close. Any
// failure of an attempt that lost its cluster lock (lockLost) is local
// too: it leaves the record to the replica that took the lock over, where
// the authorizations it spent stay reserved. A success is not local.
func failedLocally(err error, closing bool, authzFailed int, rateLimited, lockLost bool) bool {
	switch {
	case err == nil:
		return false
	case lockLost:
		return true
	case authzFailed > 0 || rateLimited:
		return false
	}
	var ce *cacheError
	return closing || errors.Is(err, errClosed) || errors.Is(err, ErrDNSNotReady) ||
		errors.Is(err, ErrBackoff) || errors.Is(err, errLoading) || errors.As(err, &ce) ||
		errors.Is(err, errProfile) || errors.Is(err, errNoRewrite)
}

// isRSA reports whether c's key is an RSA key.
func isRSA(c *tls.Certificate) bool {
	_, ok := c.PrivateKey.(*rsa.PrivateKey)
	return ok
}
