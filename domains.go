package certmgr

import (
	"context"
	"fmt"
	"time"

	"golang.org/x/crypto/acme/autocert"
)

// This file holds the domain table: what certmgr knows of each name, how
// a domain is created and dropped to make room, when it may start an
// attempt, and how the records of domains not tracked are dropped once
// stale.

// domain is what certmgr knows of one normalised name. Its fields are
// guarded by Manager.stateMu.
type domain struct {
	name      string
	fail      failureRecord
	lastErr   error             // the last failure, as returned (not persisted)
	attempt   *attempt          // in flight, or nil
	am        *autocert.Manager // this domain's autocert; nil until needed
	loading   int               // loads reading the cache through am: no order may start
	loadedAt  [2]time.Time      // when the cache was last read for the ECDSA [0] and RSA [1] key
	notAfter  time.Time         // expiry of the newest certificate served
	lifetime  time.Duration     // of the newest certificate served
	dnsErr    error             // the failed pre-check, nil when it passed
	dnsFails  int               // consecutive failed pre-checks
	dnsNext   time.Time         // next pre-check
	localNext time.Time         // no attempt before this: the Cache could not be read
	logged    bool              // a fallback was logged since the last change
	recRev    int64             // the store's revision of fail, with a Coordinator; 0 if none seen
	// served is closed when a certificate is next served for the domain
	// (by serve), so that handshakes waiting for another replica's
	// attempt get it from the store's watch at once; nil until waited on.
	served chan struct{}
}

// recordOnly returns a domain that holds only the failure record f of
// name, for Status of a name the table does not hold.
func recordOnly(name string, f failureRecord) *domain {
	return &domain{name: name, fail: f}
}

// domainFor returns the domain of name, creating it if needed. When
// MaxDomains are tracked, it makes room by dropping the oldest idle
// domain (see idleLocked), and fails when there is none among the first
// few: that is reported (EventTableFull) at most once a minute.
func (m *Manager) domainFor(name string) (*domain, error) {
	m.stateMu.Lock()
	d := m.domains[name]
	full := d == nil && len(m.domains) >= m.cfg.MaxDomains && !m.makeRoomLocked()
	if d == nil && !full {
		d = &domain{name: name, fail: m.dormant[name], recRev: m.dormantRev[name]}
		d.notAfter = d.fail.NotAfter
		delete(m.dormant, name)
		delete(m.dormantRev, name)
		m.domains[name] = d
		m.queue = append(m.queue, name)
	}
	n := len(m.domains)
	m.stateMu.Unlock()
	if !full {
		return d, nil
	}
	err := fmt.Errorf("certmgr: tracking %d domains already (MaxDomains), none idle; %s not added", n, name)
	if m.limits.allow("table full", m.now()) {
		m.emit(Event{Kind: EventTableFull, Time: m.now(), Domain: name, Err: err})
	}
	return nil, err
}

// makeRoomLocked drops one idle domain, looking at a few of the oldest.
// Those it keeps go to the back of the queue.
func (m *Manager) makeRoomLocked() bool {
	now := m.now()
	for range 16 {
		if len(m.queue) == 0 {
			return false
		}
		name := m.queue[0]
		m.queue = m.queue[1:]
		d := m.domains[name]
		if d == nil {
			continue // already gone
		}
		if m.idleLocked(d, now) {
			delete(m.domains, name)
			m.unserveLocked(name)
			return true
		}
		m.queue = append(m.queue, name)
	}
	return false
}

// idleLocked reports whether d may be dropped to make room: no attempt,
// no Cache read in progress, no certificate, no autocert.Manager, and
// nothing it waits for (its
// backoff, the CA's Retry-After and its spent authorizations are over).
// A name that keeps failing is forgotten then, like one never seen; a
// domain that waits is kept, so that no flood of names can lift its
// backoff.
func (m *Manager) idleLocked(d *domain, now time.Time) bool {
	return d.attempt == nil && d.am == nil && d.loading == 0 && !now.Before(d.notAfter) &&
		!m.waitingLocked(d, now) && d.fail.spentSince(now.Add(-budgetWindow), now) == 0
}

// checkAttemptLocked returns why no attempt may start for d now, or nil.
func (m *Manager) checkAttemptLocked(d *domain) error {
	now := m.now()
	if m.stateUnread {
		return fmt.Errorf("%w: %s: the persisted failure records could not be read yet", ErrBackoff, d.name)
	}
	if err := m.checkAccountBudgetLocked(now); err != nil {
		return err
	}
	if !m.waitingLocked(d, now) {
		return nil
	}
	if next := d.fail.nextAttempt(now, m.cfg.Backoff); now.Before(next) {
		return fmt.Errorf("%w: %s: next attempt at %s after %d failure(s): %s", ErrBackoff, d.name,
			next.UTC().Format(time.RFC3339), d.fail.Failures, d.fail.LastError)
	}
	if t := d.fail.budgetFree(now, m.cost(), m.cfg.AuthzBudget); t.After(now) {
		return fmt.Errorf("%w: %s: failed-authorization budget spent until %s", ErrBackoff, d.name, t.UTC().Format(time.RFC3339))
	}
	if next := m.localNextLocked(d, now); now.Before(next) {
		return fmt.Errorf("%w: %s: the cache could not be read; next attempt at %s", ErrBackoff, d.name, next.UTC().Format(time.RFC3339))
	}
	return d.dnsErr
}

// waitingLocked reports whether d may start no attempt at now: the
// schedule, the failed-authorization budget, the DNS recheck or the wait
// for the Cache is not due. It does not allocate.
func (m *Manager) waitingLocked(d *domain, now time.Time) bool {
	m.capWaitsLocked(d, now)
	return now.Before(d.fail.nextAttempt(now, m.cfg.Backoff)) ||
		d.fail.budgetFree(now, m.cost(), m.cfg.AuthzBudget).After(now) ||
		(d.dnsErr != nil && now.Before(m.dnsNextLocked(d, now))) ||
		now.Before(m.localNextLocked(d, now))
}

// capWaitsLocked cuts d's waits to what they are when bounded against now
// (see nextAttempt, dnsNextLocked and localNextLocked), so that after the
// clock went back, or for a record from a far future, the bound holds
// from now on and does not move with the clock. Status computes the same
// bounds without writing them.
func (m *Manager) capWaitsLocked(d *domain, now time.Time) {
	d.fail.NextAttempt = d.fail.nextAttempt(now, m.cfg.Backoff)
	d.fail.RetryAfter = minTime(d.fail.RetryAfter, now.Add(maxRetryAfter))
	d.dnsNext = m.dnsNextLocked(d, now)
	d.localNext = m.localNextLocked(d, now)
}

// dnsNextLocked returns d's next DNS pre-check, at most the longest wait
// of the DNSRecheck schedule from now.
func (m *Manager) dnsNextLocked(d *domain, now time.Time) time.Time {
	return minTime(d.dnsNext, now.Add(m.cfg.DNSRecheck.longest()))
}

// localNextLocked returns when d may try the Cache again, at most
// cacheRetry from now.
func (m *Manager) localNextLocked(d *domain, now time.Time) time.Time {
	return minTime(d.localNext, now.Add(m.hooks.cacheRetry))
}

// recordSweep is how often stale records are dropped (sweepRecords).
const recordSweep = time.Hour

// sweepLoop drops stale records every recordSweep, until Close.
func (m *Manager) sweepLoop() {
	defer m.wg.Done()
	for m.sleep(recordSweep) {
		m.sweepRecords()
		m.warnOverdue()
	}
}

// sweepRecords drops the records of domains this replica does not track
// that are stale (see failureRecord.stale): from memory and, with a
// Coordinator, from the store, if nobody wrote them since this replica
// saw them. Records would otherwise be kept for good, on every replica
// and in the store, for every name ever made to fail. A record another
// replica still uses is written again by its next outcome. It also drops
// the expired certificates from the served table, where those the
// store's watch served would otherwise stay, never served again.
func (m *Manager) sweepRecords() {
	now := m.now()
	m.servedMu.Lock()
	for k, c := range m.served {
		if !now.Before(c.Leaf.NotAfter) {
			delete(m.served, k)
			delete(m.servedRev, k)
		}
	}
	m.servedMu.Unlock()
	drop := make(map[string]int64)
	m.stateMu.Lock()
	for name, f := range m.dormant {
		if f.stale(now, m.cfg.Backoff) {
			drop[name] = m.dormantRev[name]
			delete(m.dormant, name)
			delete(m.dormantRev, name)
		}
	}
	m.stateMu.Unlock()
	if m.coord == nil || len(drop) == 0 {
		return
	}
	for name, rev := range drop {
		if rev == 0 || m.ctx.Err() != nil {
			continue
		}
		ctx, cancel := context.WithTimeout(m.ctx, cacheTimeout)
		m.cache.write(func() error { // none after Close
			_, err := m.coord.DeleteIf(ctx, recordPrefix+name, rev, "")
			return err
		})
		cancel()
	}
}
