package certmgr

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"time"
)

// This file holds GetCertificate, the table of served certificates it
// answers from, and the answers a handshake gets without waiting: a valid
// certificate, or the fallback of a domain that can start no attempt now.
// A certificate autocert writes to the Cache reaches the table through
// certStored.

// answerNow returns, at once and without allocating, the certificate for
// a handshake that needs k: the valid one served for k, or the fallback of
// a known domain that can start no attempt now (it backs off or waits for
// DNS) or whose attempt in flight already held a handshake for the whole
// HandshakeTimeout (a slow CA: no handshake waits twice). It returns nil when the handshake must take the full path: a name
// that is not a domain's normalised name, or whose Cache was not read yet.
func (m *Manager) answerNow(k certKey) (c *tls.Certificate, fallback bool) {
	if c := m.servedCert(k); c != nil {
		return c, false
	}
	now := m.now()
	m.stateMu.Lock()
	d := m.domains[k.domain]
	waiting := d != nil && m.loadedLocked(d, k, now) &&
		(d.attempt == nil && m.waitingLocked(d, now) || d.attempt != nil && d.attempt.waitedOut)
	m.stateMu.Unlock()
	if !waiting {
		return nil, false
	}
	c, fallback, _ = m.fallbackOrRSA(k)
	return c, fallback
}

// servedCert returns the valid certificate held for k, or nil.
func (m *Manager) servedCert(k certKey) *tls.Certificate {
	m.servedMu.RLock()
	c := m.served[k]
	m.servedMu.RUnlock()
	if c != nil && m.now().Before(c.Leaf.NotAfter) {
		return c
	}
	return nil
}

// serve makes c the certificate served for k, as serveAt does for a
// certificate with no store revision.
func (m *Manager) serve(k certKey, c *tls.Certificate) { m.serveAt(k, c, 0) }

// serveAt makes c the certificate served for k if it replaces the one
// served, and then takes c's expiry and lifetime as its domain's. rev is
// the revision at which c was read from, or written to, a Coordinator's
// store, or 0.
//
// Replicas serve what their store holds last: a certificate with a
// revision replaces one with an earlier revision, or none (one served
// before its write landed, or read without a revision), whatever their
// dates, so that every replica ends on the store's last write even when
// two of them obtained a certificate for one name (one lost its lock);
// and one without a revision never replaces one with a revision. Between
// two certificates with no revision, as always without a Coordinator, the
// later issued is served, whatever its lifetime. Nothing replaces c but
// a valid certificate once c expired.
func (m *Manager) serveAt(k certKey, c *tls.Certificate, rev int64) {
	now := m.now()
	m.servedMu.Lock()
	old, held := m.served[k], m.servedRev[k]
	var newer bool
	switch {
	case old == nil || !now.Before(old.Leaf.NotAfter):
		newer = true
	case rev > 0:
		newer = rev > held
	case held > 0:
		newer = false
	default:
		newer = !c.Leaf.NotBefore.Before(old.Leaf.NotBefore)
	}
	if newer {
		m.served[k] = c
		if rev > 0 {
			m.servedRev[k] = rev
		} else {
			delete(m.servedRev, k)
		}
	}
	m.servedMu.Unlock()
	if !newer && old != c {
		return
	}
	m.stateMu.Lock()
	d := m.domains[k.domain]
	if d != nil {
		d.notAfter = maxTime(d.notAfter, c.Leaf.NotAfter)
		d.lifetime = c.Leaf.NotAfter.Sub(c.Leaf.NotBefore)
		if d.served != nil {
			close(d.served)
			d.served = nil
		}
	}
	m.stateMu.Unlock()
	m.ari.track(k, c.Leaf, now)
	if d == nil {
		m.scheduleLoad(k.domain, c.Leaf.NotBefore, c.Leaf.NotAfter) // served from the store's watch
	}
}

// unserveLocked drops the certificates served for name, whose domain is
// dropped. stateMu must be held; servedMu is taken after it.
func (m *Manager) unserveLocked(name string) {
	m.servedMu.Lock()
	delete(m.served, certKey{domain: name})
	delete(m.served, certKey{domain: name, rsa: true})
	delete(m.servedRev, certKey{domain: name})
	delete(m.servedRev, certKey{domain: name, rsa: true})
	m.servedMu.Unlock()
}

// loadedLocked reports whether the Cache was read for k lately: a domain
// that waits re-reads it every cacheRetry, so that a certificate another
// process (or an operator) put there is found.
func (m *Manager) loadedLocked(d *domain, k certKey, now time.Time) bool {
	at := d.loadedAt[b2i(k.rsa)]
	return !at.IsZero() && !now.Before(at) && now.Sub(at) < m.hooks.cacheRetry
}

func b2i(b bool) int {
	if b {
		return 1
	}
	return 0
}

// GetCertificate implements tls.Config.GetCertificate. It returns:
//   - for a TLS-ALPN-01 validation hello (acme.ALPNProto its only
//     protocol), autocert's answer, with no other check;
//   - for a name the HostPolicy refuses, an error wrapping ErrHostNotAllowed;
//   - a valid certificate from memory or the Cache, if there is one;
//   - otherwise the certificate of an ACME attempt, if one ends within
//     HandshakeTimeout, and else a self-signed fallback certificate:
//     at once while the domain backs off or waits for DNS.
//
// A domain certmgr already holds a certificate for, or already backs off
// for, is answered from memory without asking the HostPolicy again: the
// policy was asked when the domain was first seen.
//
// Anyone who builds their own tls.Config with this GetCertificate,
// instead of using TLSConfig, must add acme.ALPNProto to its NextProtos,
// or every TLS-ALPN-01 validation fails at the handshake.
func (m *Manager) GetCertificate(hello *tls.ClientHelloInfo) (*tls.Certificate, error) {
	if wantsTokenCert(hello) {
		m.counts.handshakes[answerChallenge].Add(1)
		return m.tokenCert(hello)
	}
	// The hot path: the raw name, as most clients send it normalised.
	k := certKey{domain: hello.ServerName, rsa: !supportsECDSA(hello)}
	if c, fallback := m.answerNow(k); c != nil {
		m.countAnswer(fallback)
		return c, nil
	}
	c, fallback, err := m.getCertificate(hello, k)
	switch {
	case err != nil:
		m.counts.handshakes[answerRefused].Add(1)
	default:
		m.countAnswer(fallback)
	}
	return c, err
}

// countAnswer counts a handshake answered with a certificate, or with
// the fallback.
func (m *Manager) countAnswer(fallback bool) {
	if fallback {
		m.counts.handshakes[answerFallback].Add(1)
	} else {
		m.counts.handshakes[answerCertificate].Add(1)
	}
}

// getCertificate is GetCertificate past the hot path: for k, a name as
// the client sent it.
func (m *Manager) getCertificate(hello *tls.ClientHelloInfo, k certKey) (c *tls.Certificate, fallback bool, err error) {
	name, err := normalize(hello.ServerName)
	if err != nil {
		return nil, false, err
	}
	if k.domain != name {
		k.domain = name
		if c, fallback := m.answerNow(k); c != nil {
			return c, fallback, nil
		}
	}
	ctx, cancel := m.handshakeContext(hello)
	defer cancel()
	if err := m.hostPolicy(ctx, name); err != nil {
		return nil, false, err
	}
	if cert, err := m.obtain(ctx, k, PathHandshake); err == nil {
		return cert, false, nil
	}
	return m.fallbackOrRSA(k)
}

// handshakeContext returns the context of hello's handshake, ended after
// HandshakeTimeout with the cause errHandshakeTimeout.
func (m *Manager) handshakeContext(hello *tls.ClientHelloInfo) (context.Context, context.CancelFunc) {
	parent := hello.Context()
	if parent == nil {
		parent = context.Background()
	}
	return context.WithTimeoutCause(parent, m.timeout, errHandshakeTimeout)
}

// errHandshakeTimeout is the cause of a handshake's context that ended
// after HandshakeTimeout.
var errHandshakeTimeout = errors.New("certmgr: HandshakeTimeout passed")

// hostPolicy runs the user's HostPolicy, if any.
func (m *Manager) hostPolicy(ctx context.Context, name string) error {
	if p := m.cfg.Autocert.HostPolicy; p != nil {
		if err := p(ctx, name); err != nil {
			return fmt.Errorf("%w: %s: %w", ErrHostNotAllowed, name, err)
		}
	}
	return nil
}

// certStored is called for every certificate written to the Cache:
// autocert's first issuance and its renewals. rev is the write's revision
// in a Coordinator's store, or 0 (no Coordinator, or the write failed and
// is kept for a retry). The new certificate is served from the next
// handshake on (see serveAt); a renewal in flight ends with it.
func (m *Manager) certStored(key string, data []byte, rev int64) {
	k := certKeyOf(key)
	c, err := parseCert(k, data, m.now())
	if err != nil {
		return
	}
	m.serveAt(k, c, rev)
	m.stateMu.Lock()
	d := m.domains[k.domain]
	var a *attempt
	if d != nil && d.attempt != nil {
		d.attempt.open = "" // its order ended with this certificate
		if d.attempt.path == PathRenewal {
			a = d.attempt
		}
	}
	m.stateMu.Unlock()
	if a != nil {
		m.finish(d, a, c, nil)
	}
}
