package certmgr

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"sync/atomic"
	"time"

	"golang.org/x/crypto/acme/autocert"
)

// This file holds renewals: the renewal the CA's renewal information asks
// for (renewForCA, fetchRenewal; the polling itself is in ari.go), the
// checks that keep renewals from looping or being made twice in a cluster
// (renewedElsewhere, checkRenewedLocked), and the end of renewals made by
// autocert's own timers (endRenewals; certStored ends one that succeeded).

// issuedLocked returns the leaves of the certificates served for name
// (ECDSA, RSA), nil where none is. stateMu is held; servedMu is taken
// after it.
func (m *Manager) issuedLocked(name string) (leaves [2]*x509.Certificate) {
	m.servedMu.RLock()
	defer m.servedMu.RUnlock()
	for i, k := range []certKey{{domain: name}, {domain: name, rsa: true}} {
		if c := m.served[k]; c != nil {
			leaves[i] = c.Leaf
		}
	}
	return leaves
}

// replaces reports whether leaf is another certificate than old, the one
// served when a renewal began, and not an older one.
func replaces(leaf, old *x509.Certificate) bool {
	return !leaf.Equal(old) && !leaf.NotBefore.Before(old.NotBefore)
}

// renewedElsewhere reports whether a certificate of name's of the key
// type rsa that replaces that of since (the certificates served as a
// renewal began: see issuedLocked) is served now, through the store's
// watch, or is in the store; it serves the latter.
func (m *Manager) renewedElsewhere(ctx context.Context, name string, since [2]*x509.Certificate, rsa bool) bool {
	k := certKey{domain: name, rsa: rsa}
	old := since[b2i(rsa)]
	if old == nil {
		return false // none was served: the renewal is not of this key type
	}
	if c := m.servedCert(k); c != nil && replaces(c.Leaf, old) {
		return true
	}
	ctx, cancel := context.WithTimeout(ctx, cacheTimeout)
	var data []byte
	var rev int64
	var err error
	if m.coord != nil {
		data, rev, err = m.coord.GetRevision(ctx, k.cacheKey()) // served by its revision
	} else {
		data, err = m.cache.Get(ctx, k.cacheKey())
	}
	cancel()
	if err != nil {
		if m.coord != nil && !errors.Is(err, autocert.ErrCacheMiss) {
			m.cacheFailed("get", k.cacheKey(), err) // m.cache.Get reports its own
		}
		return false
	}
	c, err := parseCert(k, data, m.now())
	if err != nil || !replaces(c.Leaf, old) {
		return false
	}
	m.serveAt(k, c, rev)
	return true
}

// checkRenewedLocked returns why d may not be renewed again now: a renewal
// succeeded a moment ago (within a quarter of the certificate's life), in
// this process or, in a cluster, on any replica. autocert renews again at
// once when RenewBefore exceeds the certificate's lifetime, every
// replica's autocert renews the certificate it loaded, and a CA's renewal
// information may keep asking: this keeps all of them from looping, and
// from spending the CA's limits on duplicate certificates.
func checkRenewedLocked(d *domain, now time.Time) error {
	if !renewedUntilLocked(d, now, 0).IsZero() {
		return fmt.Errorf("%w: %s: renewed at %s already", ErrBackoff, d.name, d.fail.Renewed.UTC().Format(time.RFC3339))
	}
	return nil
}

// errRenewBefore is wrapped by the error of a renewal that
// checkRenewBeforeLocked refuses.
var errRenewBefore = errors.New("certmgr: Autocert.RenewBefore exceeds a third of the certificate's lifetime")

// renewRetryMax is the longest autocert waits before it tries a refused
// or failed renewal again.
const renewRetryMax = time.Hour

// checkRenewBeforeLocked returns why autocert's renewal timer may not
// renew d now: a RenewBefore is set, and every certificate served for d
// has lived less than two thirds of its lifetime. autocert renews once
// NotAfter-RenewBefore has passed: a RenewBefore longer than a third of
// the lifetime (720 h with a CA that issues 24-hour certificates, say)
// would renew each new certificate at once, again and again. Bounded so,
// each certificate is renewed once. A certificate whose last third is
// shorter than renewRetryMax is not bounded (autocert's next try could
// come after it expired): checkRenewedLocked alone keeps its renewals
// apart. The CA's renewal information is not bounded by it.
func (m *Manager) checkRenewBeforeLocked(d *domain, now time.Time) error {
	if m.cfg.Autocert.RenewBefore <= 0 {
		return nil // autocert's own threshold is a third of the lifetime
	}
	var due time.Time // when the first of them has lived two thirds
	for _, leaf := range m.issuedLocked(d.name) {
		if leaf == nil {
			continue
		}
		third := leaf.NotAfter.Sub(leaf.NotBefore) / 3
		at := leaf.NotAfter.Add(-third)
		if !now.Before(at) || third < renewRetryMax {
			return nil
		}
		if due.IsZero() || at.Before(due) {
			due = at
		}
	}
	if due.IsZero() {
		return nil // none served: nothing to bound
	}
	return fmt.Errorf("%w: %w: %s is renewed from %s", ErrBackoff, errRenewBefore, d.name, due.UTC().Format(time.RFC3339))
}

// loadSlack is how long before autocert's renewal time a domain that
// this replica does not track is taken up, so that autocert's timer is
// set by then.
const loadSlack = time.Minute

// scheduleLoad schedules name, a domain this replica does not track, to
// be taken up in time for autocert to renew its certificate valid from
// notBefore to notAfter, with a Coordinator (another replica's
// certificate: that replica may be gone).
func (m *Manager) scheduleLoad(name string, notBefore, notAfter time.Time) {
	if m.coord == nil || notAfter.IsZero() {
		return
	}
	m.ari.loadAt(name, notAfter.Add(-m.renewBeforeOf(notBefore, notAfter)-loadSlack))
}

// loadForRenewal takes name up, if the HostPolicy allows it, as a
// handshake would: its autocert.Manager reads its certificates from the
// Cache and renews them on its timer, in a cluster once for all (see
// admitOrder). A full table or a HostPolicy that fails is tried again
// later; a name the HostPolicy refuses is left.
func (m *Manager) loadForRenewal(name string) {
	m.stateMu.Lock()
	_, tracked := m.domains[name]
	m.stateMu.Unlock()
	if tracked {
		return // its autocert.Manager renews it already
	}
	ctx, cancel := context.WithTimeout(m.ctx, m.hooks.requestTimeout)
	defer cancel()
	err := m.hostPolicy(ctx, name)
	var d *domain
	if err == nil {
		d, err = m.domainFor(name)
	}
	if err == nil {
		for _, rsa := range []bool{false, true} {
			if _, err = m.load(ctx, d, certKey{domain: name, rsa: rsa}); err != nil {
				break
			}
		}
	}
	if err != nil && !errors.Is(err, ErrHostNotAllowed) {
		m.ari.loadAt(name, m.now().Add(m.hooks.renewalInfoMinPoll))
	}
}

// checkRenewalInfoGuard returns why the renewal the CA's renewal
// information asked for may not start now: a renewal a moment ago (see
// renewedUntilLocked, at most renewalInfoGuard), in this process or, as
// the cluster's record says, on any replica.
func (m *Manager) checkRenewalInfoGuard(d *domain) error {
	m.stateMu.Lock()
	defer m.stateMu.Unlock()
	if until := renewedUntilLocked(d, m.now(), renewalInfoGuard); !until.IsZero() {
		return fmt.Errorf("%w: %s: renewed at %s already; no renewal the CA asks for until %s", ErrBackoff, d.name,
			d.fail.Renewed.UTC().Format(time.RFC3339), until.UTC().Format(time.RFC3339))
	}
	return nil
}

// renewedUntilLocked returns until when d's last renewal bars another, if
// it does at now: a quarter of the certificate's life after it, and at
// most limit after it if limit is not zero. It is zero otherwise.
func renewedUntilLocked(d *domain, now time.Time, limit time.Duration) time.Time {
	at, bar := d.fail.Renewed, d.lifetime/4
	if limit > 0 {
		bar = min(bar, limit)
	}
	until := at.Add(bar)
	if at.IsZero() || now.Before(at) || !now.Before(until) {
		return time.Time{}
	}
	return until
}

// renewForCA starts the renewal of k's certificate that the CA's renewal
// information asked for, unless an attempt is in flight, the domain's
// schedule or budget holds it (it is then tried again later), or the
// certificate was renewed a moment ago (no renewal loop, whatever the CA
// says).
func (m *Manager) renewForCA(k certKey) {
	// The list of renewals due was made before this round's polls: the
	// certificate may have been replaced or dropped meanwhile.
	m.ari.mu.Lock()
	ri := m.ari.certs[k]
	m.ari.mu.Unlock()
	if ri == nil {
		return
	}
	if c := m.servedCert(k); c == nil || !c.Leaf.Equal(ri.leaf) {
		m.ari.mu.Lock()
		if m.ari.certs[k] == ri {
			delete(m.ari.certs, k) // replaced, or no longer valid
		}
		m.ari.mu.Unlock()
		return
	}
	now := m.now()
	m.stateMu.Lock()
	d := m.domains[k.domain]
	m.stateMu.Unlock()
	if d == nil {
		// A certificate this replica serves from the store's watch: the
		// domain is tracked from now on, if the HostPolicy allows it.
		ctx, cancel := context.WithTimeout(m.ctx, m.hooks.requestTimeout)
		err := m.hostPolicy(ctx, k.domain)
		cancel()
		if err == nil {
			d, _ = m.domainFor(k.domain) // nil if the table is full: tried again later
			if c := m.servedCert(k); d != nil && c != nil {
				m.serve(k, c) // the domain's expiry and lifetime
			}
		} else if errors.Is(err, ErrHostNotAllowed) {
			m.ari.mu.Lock()
			delete(m.ari.certs, k)
			m.ari.mu.Unlock()
			return
		}
	}
	m.stateMu.Lock()
	// A renewal a moment ago forbids another yet, lest a CA that keeps
	// asking drive a loop; for at most an hour, so that a revocation of
	// the certificate just renewed is not left served for long.
	var recent time.Time
	if d != nil {
		recent = renewedUntilLocked(d, now, renewalInfoGuard)
	}
	m.stateMu.Unlock()
	retryAt := now.Add(m.hooks.renewalInfoMinPoll)
	var a *attempt
	switch {
	case d == nil:
	case !recent.IsZero():
		retryAt = recent
	default:
		var err error
		a, err = m.begin(d, k, PathRenewalInfo)
		switch {
		case err != nil:
			retryAt = maxTime(retryAt, m.Status(k.domain).NextAttempt)
			a = nil
		case a.path != PathRenewalInfo || a.key != k:
			a = nil // another attempt is in flight: after it, again
		}
	}
	m.ari.mu.Lock()
	defer m.ari.mu.Unlock()
	if ri := m.ari.certs[k]; ri != nil {
		if a != nil {
			ri.renewing = a
		} else {
			ri.retryAt = retryAt
		}
	}
}

// fetchRenewal orders a new certificate for k, for attempt a, although a
// valid one is in the Cache, which autocert would just load: through an
// autocert.Manager of the attempt's own that does not see k's entry until
// it wrote a new one. Until then, the valid certificate is served. The
// domain's autocert.Manager stays, with the renewal timers of both key
// types; when they fire, it finds the new certificate in the Cache and
// takes it up. So does the attempt's, whose timer cannot be stopped
// either: it lives on, reading the Cache once per certificate lifetime
// (see the README's limits).
func (m *Manager) fetchRenewal(d *domain, a *attempt, k certKey) (*tls.Certificate, error) {
	key, err := m.accountKey(m.ctx)
	if err != nil {
		return nil, err
	}
	am := m.newAutocert(key, &renewalCache{certCache: m.cache, key: k.cacheKey()})
	m.stateMu.Lock()
	a.am = am // its orders are the attempt's; any other is refused while it runs
	m.stateMu.Unlock()
	return am.GetCertificate(syntheticHello(k))
}

// renewalCache is certmgr's Cache as a renewal sees it: key is missing
// until the renewal writes it.
type renewalCache struct {
	*certCache
	key     string
	written atomic.Bool
}

// Get implements autocert.Cache.
func (c *renewalCache) Get(ctx context.Context, key string) ([]byte, error) {
	if key == c.key && !c.written.Load() {
		return nil, autocert.ErrCacheMiss
	}
	return c.certCache.Get(ctx, key)
}

// Put implements autocert.Cache.
func (c *renewalCache) Put(ctx context.Context, key string, data []byte) error {
	err := c.certCache.Put(ctx, key, data)
	if key == c.key {
		c.written.Store(true)
	}
	return err
}

// endRenewals ends the renewals in flight, which run in autocert's own
// goroutines: their requests were refused since Close began.
func (m *Manager) endRenewals() {
	type pair struct {
		d *domain
		a *attempt
	}
	var renewals []pair
	m.stateMu.Lock()
	for _, d := range m.domains {
		if d.attempt != nil && d.attempt.path == PathRenewal {
			renewals = append(renewals, pair{d, d.attempt})
		}
	}
	m.stateMu.Unlock()
	for _, r := range renewals {
		m.finish(r.d, r.a, nil, errClosed)
	}
}
