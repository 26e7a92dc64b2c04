package certmgr

import (
	"context"
	"time"
)

// Provision obtains (or loads from cache) the certificate for domain now, running the
// HostPolicy, the backoff and the DNS pre-check first. It returns when the certificate is
// ready, ctx is done, or a check refuses; it never starts a second attempt while one is in flight.
//
// The certificate is the ECDSA one that modern clients' handshakes look
// up (TLS 1.3 clients, and TLS 1.2 clients offering ECDSA suites). If ctx
// ends first, Provision returns ctx.Err() at once; the attempt goes on in
// the background and its outcome is recorded as for a handshake. Errors
// wrap ErrHostNotAllowed, ErrBackoff or ErrDNSNotReady when a check
// refuses, and are an *AttemptError when the CA does.
func (m *Manager) Provision(ctx context.Context, domain string) error {
	name, err := normalize(domain)
	if err != nil {
		return err
	}
	if err := m.hostPolicy(ctx, name); err != nil {
		return err
	}
	k := certKey{domain: name}
	if m.servedCert(k) != nil {
		return nil
	}
	_, err = m.obtain(ctx, k, PathProvision)
	return err
}

// Retry is the operator's early retry: it clears domain's backoff so that
// the next handshake or Provision makes a real new attempt at once, even
// within autocert's own one-minute failed state. It keeps the CA's
// Retry-After, the failed-authorization budget, the HostPolicy and the
// DNS pre-check (whose cached answers it drops). If the persisted failure
// records could not be read so far, it reads them again first. With a
// Coordinator, it lifts the cluster's record of the domain, also on a
// replica that has not seen the domain. Retry on a domain that neither
// this Manager nor the cluster's records know does nothing.
func (m *Manager) Retry(domain string) {
	name, err := normalize(domain)
	if err != nil {
		return
	}
	m.rereadState()
	now := m.now()
	// The cluster's record first, also if this replica has not seen the
	// domain: every replica's next attempt may start.
	if m.recordExists(name) {
		m.storeRecord(name, "", nil, nil, func(r *failureRecord) { r.retryNow(now, m.cost(), m.cfg.AuthzBudget) })
	}
	m.stateMu.Lock()
	d := m.domains[name]
	if d == nil {
		m.stateMu.Unlock()
		return
	}
	d.fail.retryNow(now, m.cost(), m.cfg.AuthzBudget)
	d.dnsNext, d.localNext = time.Time{}, time.Time{}
	if d.attempt == nil && (d.notAfter.IsZero() || !now.Before(d.notAfter)) {
		d.am = nil // autocert's failed state goes with it
		d.loadedAt = [2]time.Time{}
	}
	d.logged = false
	ev := Event{Kind: EventRetry, Time: now, Domain: name}
	if now.Before(d.fail.NextAttempt) {
		ev.NextAttempt = d.fail.NextAttempt
	}
	m.stateMu.Unlock()
	if m.dns != nil {
		m.dns.Forget(name)
	}
	m.emit(ev)
	m.saveState()
}
