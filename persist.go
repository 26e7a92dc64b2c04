package certmgr

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
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

// decodeState decodes what encodeState wrote. An entry that is not a
// valid record is left out and reported in bad; a blob that cannot be read
// at all is an error.
func decodeState(data []byte) (recs map[string]failureRecord, bad []error, err error) {
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
		if p.Failures < 0 || len(p.Spends) > maxSpends || (p.Failures > 0 && p.NextAttempt.IsZero()) {
			bad = append(bad, fmt.Errorf("certmgr: persisted state for %q is inconsistent", name))
			continue
		}
		recs[name] = failureRecord(p)
	}
	return recs, bad, nil
}

// loadState reads the persisted failure cache. A missing entry is no
// state; an unreadable or corrupt one is reported and treated as absent.
func (m *Manager) loadState(ctx context.Context) map[string]failureRecord {
	data, err := m.cache.Get(ctx, stateKey)
	if errors.Is(err, autocert.ErrCacheMiss) {
		return nil
	}
	if err != nil {
		return nil // the cache reported it
	}
	recs, bad, err := decodeState(data)
	if err != nil {
		bad = append(bad, err)
	}
	for _, e := range bad {
		m.emit(Event{Kind: EventCacheError, Time: m.now(), Err: e})
	}
	return recs
}

// loadKnownDomains makes a domain of every name a previous Manager knew,
// with its failure record and the expiry of its cached certificates, so
// that Status is right from New on. The certificates are loaded (and
// autocert's renewal timers started) at first use, as autocert does.
func (m *Manager) loadKnownDomains() {
	ctx, cancel := context.WithTimeout(m.ctx, cacheTimeout)
	defer cancel()
	for name, f := range m.loadState(ctx) {
		if err := m.hostPolicy(ctx, name); err != nil {
			continue
		}
		d, err := m.domainFor(name)
		if err != nil {
			continue
		}
		var notAfter time.Time
		for _, rsa := range []bool{false, true} {
			k := certKey{domain: name, rsa: rsa}
			if data, err := m.cache.Get(ctx, k.cacheKey()); err == nil {
				if c, err := parseCert(k, data, m.now()); err == nil {
					notAfter = maxTime(notAfter, c.Leaf.NotAfter)
				}
			}
		}
		m.stateMu.Lock()
		d.fail = f
		d.notAfter = maxTime(d.notAfter, notAfter)
		m.stateMu.Unlock()
	}
}

// saveState writes the failure records of all domains that have one, and
// an empty record for each domain that holds a certificate, so that a
// restarted Manager knows every domain (Status, Domains) and loads their
// certificates, which autocert then renews, without waiting for traffic.
// Writes are serialised, so the last one written is the newest state; a
// failed write is kept by the cache and retried. Close does not cut a
// write short.
func (m *Manager) saveState() {
	m.persistMu.Lock()
	now := m.now()
	m.stateMu.Lock()
	recs := make(map[string]failureRecord)
	for name, d := range m.domains {
		if !d.fail.empty(now) || now.Before(d.notAfter) {
			f := d.fail
			f.Spends = slices.Clone(f.Spends)
			recs[name] = f
		}
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
