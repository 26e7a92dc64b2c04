package certmgr

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strings"
	"time"

	"golang.org/x/crypto/acme/autocert"
)

// stateKey is the Cache key under which certmgr keeps its failure cache.
// autocert's keys are a domain name, optionally followed by "+rsa",
// "+token" or "+http-01", and "acme_account+key"; no domain name starts
// with "certmgr+", so the key cannot collide with any of them.
const stateKey = "certmgr+state"

// stateVersion is the format of the persisted failure cache.
const stateVersion = 1

type persistedState struct {
	Version int                        `json:"version"`
	Domains map[string]json.RawMessage `json:"domains"`
}

type persistedDomain struct {
	Failures    int       `json:"failures"`
	LastError   string    `json:"last_error,omitempty"`
	LastFailure time.Time `json:"last_failure"`
	NextAttempt time.Time `json:"next_attempt"`
	RetryAfter  time.Time `json:"retry_after,omitzero"`
	Spends      []spend   `json:"spends,omitempty"`
	Renewed     time.Time `json:"renewed,omitzero"`
	NotBefore   time.Time `json:"not_before,omitzero"`
	NotAfter    time.Time `json:"not_after,omitzero"`
}

// encodeState encodes the failure records of the domains that have one.
func encodeState(recs map[string]failureRecord) ([]byte, error) {
	st := persistedState{Version: stateVersion, Domains: make(map[string]json.RawMessage, len(recs))}
	for name, f := range recs {
		b, err := json.Marshal(persistedDomain(f))
		if err != nil {
			return nil, err
		}
		st.Domains[name] = b
	}
	return json.Marshal(st)
}

// maxLastError bounds the persisted error text kept.
const maxLastError = 1024

// maxSpendAuthz bounds the authorizations one persisted spend may hold.
const maxSpendAuthz = 1024

// decodeState decodes what encodeState wrote, defensively: the entry may
// come from a replica with a fast clock, an older version or a hostile
// store. Times are bounded against now (no spend or failure after now, no
// wait beyond maxRetryAfter from now), spends are sorted, and those of no
// or of a huge count are dropped or cut. An entry that is not a valid
// record is left out and reported in bad; a blob that cannot be read at
// all is an error.
func decodeState(data []byte, now time.Time) (recs map[string]failureRecord, bad []error, err error) {
	var st persistedState
	if err := json.Unmarshal(data, &st); err != nil {
		return nil, nil, fmt.Errorf("certmgr: persisted state is corrupt: %w", err)
	}
	if st.Version != stateVersion {
		return nil, nil, fmt.Errorf("certmgr: persisted state has unknown version %d", st.Version)
	}
	recs = make(map[string]failureRecord, len(st.Domains))
	for name, raw := range st.Domains {
		var p persistedDomain
		if err := json.Unmarshal(raw, &p); err != nil {
			bad = append(bad, fmt.Errorf("certmgr: persisted state for %q is corrupt: %w", name, err))
			continue
		}
		if n, err := normalize(name); err != nil || n != name {
			bad = append(bad, fmt.Errorf("certmgr: persisted state names an invalid domain %q", name))
			continue
		}
		if p.Failures < 0 || (p.Failures > 0 && p.NextAttempt.IsZero()) {
			bad = append(bad, fmt.Errorf("certmgr: persisted state for %q is inconsistent", name))
			continue
		}
		recs[name] = boundRecord(failureRecord(p), now)
	}
	return recs, bad, nil
}

// maxCertLifetime bounds the validity a record may tell of: that of a
// publicly trusted certificate (398 days), and some.
const maxCertLifetime = 400 * 24 * time.Hour

// boundRecord returns f with its times bounded against now and its spends
// in order, each of 1 to maxSpendAuthz authorizations.
func boundRecord(f failureRecord, now time.Time) failureRecord {
	if len(f.LastError) > maxLastError {
		f.LastError = strings.ToValidUTF8(f.LastError[:maxLastError], "")
	}
	f.LastFailure = minTime(f.LastFailure, now)
	f.Renewed = minTime(f.Renewed, now)
	f.RetryAfter = minTime(f.RetryAfter, now.Add(maxRetryAfter))
	f.NextAttempt = minTime(f.NextAttempt, now.Add(maxRetryAfter))
	if f.NotBefore.After(now) || f.NotAfter.Sub(f.NotBefore) > maxCertLifetime || f.NotAfter.Before(f.NotBefore) {
		f.NotBefore, f.NotAfter = time.Time{}, time.Time{} // no certificate is so
	}
	spends := make([]spend, 0, len(f.Spends))
	for _, s := range f.Spends {
		if s.Authz > 0 {
			s.Authz = min(s.Authz, maxSpendAuthz)
			s.At = minTime(s.At, now)
			spends = append(spends, s)
		}
	}
	slices.SortStableFunc(spends, func(a, b spend) int { return a.At.Compare(b.At) })
	f.Spends = spends
	f.prune(now)
	return f
}

// readState reads the persisted failure records. A missing entry is no
// records; a corrupt one is reported and taken as none, to be rewritten.
// An error means the Cache could not be read: the records are there, but
// unknown.
func (m *Manager) readState(ctx context.Context) (map[string]failureRecord, error) {
	data, err := m.cache.Get(ctx, stateKey)
	if errors.Is(err, autocert.ErrCacheMiss) {
		return nil, nil
	}
	if err != nil {
		return nil, err // the cache reported it
	}
	recs, bad, err := decodeState(data, m.now())
	if err != nil {
		bad = append(bad, err)
	}
	for _, e := range bad {
		m.emit(Event{Kind: EventCacheError, Time: m.now(), Err: e})
	}
	return recs, nil
}

// errStoreUnanswered is why New did not read the persisted records: the
// store's watch did not open in time.
var errStoreUnanswered = errors.New("certmgr: the store did not answer")

// loadKnownDomains makes a domain of every name a previous Manager knew,
// with its failure record and the expiry of its cached certificates, so
// that Status is right from New on. The certificates are loaded (and
// autocert's renewal timers started) at first use, as autocert does.
//
// If the records cannot be read by the deadline by (not read at all if
// it passed), they are read again every cacheRetry until they are;
// meanwhile no order is made and no record written, so that none is lost
// (see stateUnread).
func (m *Manager) loadKnownDomains(by time.Time) {
	err := errStoreUnanswered
	var recs map[string]failureRecord
	if time.Now().Before(by) {
		ctx, cancel := context.WithDeadline(m.ctx, by)
		recs, err = m.readState(ctx)
		cancel()
	}
	if err == nil {
		m.adoptRecords(recs, true)
		return
	}
	m.stateMu.Lock()
	m.stateUnread = true
	m.stateMu.Unlock()
	m.wg.Add(1)
	go func() {
		defer m.wg.Done()
		t := time.NewTicker(m.hooks.cacheRetry)
		defer t.Stop()
		for !m.rereadState() {
			select {
			case <-m.ctx.Done():
				return
			case <-t.C:
			}
		}
	}()
}

// rereadState reads the persisted records again if they could not be read
// so far, and reports whether they have been read. Concurrent callers
// share one read.
func (m *Manager) rereadState() bool {
	m.stateMu.Lock()
	unread := m.stateUnread
	m.stateMu.Unlock()
	if !unread {
		return true
	}
	_, err, _ := m.loads.Do(stateKey, func() (any, error) {
		ctx, cancel := context.WithTimeout(m.ctx, cacheTimeout)
		recs, err := m.readState(ctx)
		cancel()
		if err == nil {
			m.adoptRecords(recs, false)
		}
		return nil, err
	})
	return err == nil
}

// adoptRecords puts the persisted records recs in the domain table: into
// the domains the HostPolicy allows, merged with what they hold, and the
// others aside (dormant), kept and written back as they are, since a
// policy's error may pass. With expiry, it reads the expiry of each
// domain's cached certificates, each read with its own deadline, until
// one fails.
func (m *Manager) adoptRecords(recs map[string]failureRecord, expiry bool) {
	readCerts := expiry
	for name, f := range recs {
		ctx, cancel := context.WithTimeout(m.ctx, cacheTimeout)
		err := m.hostPolicy(ctx, name)
		cancel()
		var d *domain
		if err == nil {
			d, err = m.domainFor(name)
		}
		if err != nil {
			m.stateMu.Lock()
			m.dormant[name] = f
			m.stateMu.Unlock()
			continue
		}
		var notAfter time.Time
		for _, rsa := range []bool{false, true} {
			if !readCerts {
				break
			}
			k := certKey{domain: name, rsa: rsa}
			ctx, cancel := context.WithTimeout(m.ctx, cacheTimeout)
			data, err := m.cache.Get(ctx, k.cacheKey())
			cancel()
			switch {
			case err == nil:
				if c, err := parseCert(k, data, m.now()); err == nil {
					notAfter = maxTime(notAfter, c.Leaf.NotAfter)
				}
			case !errors.Is(err, autocert.ErrCacheMiss):
				readCerts = false // the rest are read at first use
			}
		}
		m.stateMu.Lock()
		d.fail.merge(f)
		d.fail.prune(m.now())
		d.notAfter = maxTime(d.notAfter, notAfter)
		m.stateMu.Unlock()
	}
	m.stateMu.Lock()
	wasUnread := m.stateUnread
	m.stateUnread = false
	m.stateMu.Unlock()
	if wasUnread {
		m.saveState() // what this Manager learnt meanwhile, with what was read
	}
}

// saveState writes the failure records of all domains that have one, and
// an empty record for each domain that holds a certificate, so that a
// restarted Manager knows every domain (Status, Domains) and loads their
// certificates, which autocert then renews, without waiting for traffic.
// Writes are serialised, so the last one written is the newest state; a
// failed write is kept by the cache and retried. Close does not cut a
// write short.
//
// With a Coordinator, nothing is written: each domain's record is a key of
// its own in the store (cluster.go), and one entry holding every domain,
// rewritten by every replica at every change, would outgrow the store's
// limit on one value (etcd's 1.5 MiB, at about 13,700 domains). A
// replica then knows a domain from its first handshake, or from a change
// of its record; a certmgr+state entry already there is still read once.
func (m *Manager) saveState() {
	if m.coord != nil {
		return
	}
	m.persistMu.Lock()
	now := m.now()
	m.stateMu.Lock()
	if m.stateUnread {
		// The records in the Cache are unknown: writing would erase them.
		m.stateMu.Unlock()
		m.persistMu.Unlock()
		return
	}
	recs := make(map[string]failureRecord, len(m.domains)+len(m.dormant))
	for name, f := range m.dormant {
		if f.empty(now) {
			delete(m.dormant, name)
		} else {
			m.dormant[name] = f
			recs[name] = f
		}
	}
	for name, d := range m.domains {
		if !d.fail.empty(now) || now.Before(d.notAfter) {
			recs[name] = d.fail
		}
	}
	for name, f := range recs {
		f.Spends = slices.Clone(f.Spends)
		recs[name] = f
	}
	m.stateMu.Unlock()
	data, err := encodeState(recs)
	if err == nil {
		ctx, cancel := context.WithTimeout(context.Background(), cacheTimeout)
		err = m.cache.put(ctx, stateKey, data) // a failed write is kept and retried
		cancel()
	}
	m.persistMu.Unlock() // OnEvent may call what saves the state again
	m.cache.report("put", stateKey, err)
}
