package certmgr

import (
	"crypto/tls"
	"time"
)

// This file holds the table of served certificates and the answers a
// handshake gets without waiting: a valid certificate, or the fallback
// of a domain that can start no attempt now.

// answerNow returns, at once and without allocating, the certificate for
// a handshake that needs k: the valid one served for k, or the fallback of
// a known domain that can start no attempt now (it backs off or waits for
// DNS). It returns nil when the handshake must take the full path: a name
// that is not a domain's normalised name, or whose Cache was not read yet.
func (m *Manager) answerNow(k certKey) *tls.Certificate {
	if c := m.servedCert(k); c != nil {
		return c
	}
	now := m.now()
	m.stateMu.Lock()
	d := m.domains[k.domain]
	waiting := d != nil && m.loadedLocked(d, k, now) && d.attempt == nil && m.waitingLocked(d, now)
	m.stateMu.Unlock()
	if !waiting {
		return nil
	}
	c, _ := m.fallback(k)
	return c
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

// serve makes c the certificate served for k, unless one issued later is.
func (m *Manager) serve(k certKey, c *tls.Certificate) {
	m.servedMu.Lock()
	old := m.served[k]
	newer := old == nil || !c.Leaf.NotBefore.Before(old.Leaf.NotBefore) // the later issued, whatever its lifetime
	if newer {
		m.served[k] = c
	}
	m.servedMu.Unlock()
	if newer {
		m.stateMu.Lock()
		if d := m.domains[k.domain]; d != nil {
			d.notAfter = maxTime(d.notAfter, c.Leaf.NotAfter)
			d.lifetime = c.Leaf.NotAfter.Sub(c.Leaf.NotBefore)
			if d.served != nil {
				close(d.served)
				d.served = nil
			}
		}
		m.stateMu.Unlock()
		m.ari.track(k, c.Leaf, m.now())
	}
}

// unserveLocked drops the certificates served for name, whose domain is
// dropped. stateMu must be held; servedMu is taken after it.
func (m *Manager) unserveLocked(name string) {
	m.servedMu.Lock()
	delete(m.served, certKey{domain: name})
	delete(m.served, certKey{domain: name, rsa: true})
	m.servedMu.Unlock()
}

// fallback returns the certificate for a handshake that cannot have k's:
// the valid RSA one if k is ECDSA and there is one (every client takes
// it, and it beats a fallback), else the self-signed fallback, logged
// once per change of the domain's state.
func (m *Manager) fallback(k certKey) (*tls.Certificate, error) {
	if !k.rsa {
		if c := m.servedCert(certKey{domain: k.domain, rsa: true}); c != nil {
			return c, nil
		}
	}
	name := k.domain
	m.stateMu.Lock()
	d := m.domains[name]
	first := d != nil && !d.logged
	if first {
		d.logged = true
	}
	m.stateMu.Unlock()
	if first {
		m.emit(Event{Kind: EventFallback, Time: m.now(), Domain: name})
	}
	return m.fallbacks.get(name)
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
