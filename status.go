package certmgr

import (
	"errors"
	"slices"
	"strconv"
	"strings"
	"time"
)

// State is where a domain stands.
type State int

// The states of a domain, as Status reports them.
const (
	StateNone       State = iota // no certificate, nothing attempted
	StateObtaining               // an attempt is in flight
	StateValid                   // a valid certificate is served
	StateBackoff                 // the last attempt failed; waiting for NextAttempt
	StateWaitingDNS              // the DNS pre-check failed; rechecked at NextAttempt
)

var stateNames = [...]string{"none", "obtaining", "valid", "backoff", "waiting-dns"}

// String returns the state's name in lower case: "none", "obtaining",
// "valid", "backoff" or "waiting-dns".
func (s State) String() string {
	if s >= 0 && int(s) < len(stateNames) {
		return stateNames[s]
	}
	return "State(" + strconv.Itoa(int(s)) + ")"
}

// Status is an operator's view of one domain.
type Status struct {
	Domain      string    // normalised name
	State       State     // where the domain stands
	NotAfter    time.Time // expiry of the certificate being served; zero if none
	Failures    int       // consecutive failed attempts
	LastError   error     // last failure, nil if none
	NextAttempt time.Time // earliest start of the next ACME attempt; zero means now
	// RenewAt is when the certificate served is to be renewed, at the
	// time the CA's renewal information suggested; zero if it suggested
	// none (autocert's timer then renews it).
	RenewAt time.Time
}

// Status returns the status of domain. A name certmgr does not track
// (never seen, refused by the HostPolicy, or not a valid name) is
// StateNone, unless certmgr keeps a failure record of it (persisted, or
// another replica's) or serves a certificate another replica stored for
// it: then Status reports those.
func (m *Manager) Status(domain string) Status {
	name, err := normalize(domain)
	if err != nil {
		return Status{Domain: strings.ToLower(domain)}
	}
	now := m.now()
	m.stateMu.Lock()
	d := m.domains[name]
	if d == nil {
		// Not tracked: its record, if certmgr keeps one, and the
		// certificate served for it, if another replica stored one.
		f, ok := m.dormant[name]
		d = recordOnly(name, f)
		d.notAfter = maxTime(m.issuedNotAfterLocked(name), f.NotAfter)
		if !ok && d.notAfter.IsZero() {
			m.stateMu.Unlock()
			return Status{Domain: name}
		}
	}
	s := m.statusLocked(d, now)
	m.stateMu.Unlock()
	if s.State == StateValid {
		s.RenewAt = m.ari.renewAt(name)
	}
	return s
}

// issuedNotAfterLocked returns the latest expiry of the certificates
// served for name, or zero. stateMu is held; servedMu is taken after it.
func (m *Manager) issuedNotAfterLocked(name string) time.Time {
	var at time.Time
	for _, leaf := range m.issuedLocked(name) {
		if leaf != nil {
			at = maxTime(at, leaf.NotAfter)
		}
	}
	return at
}

// Domains returns the status of every domain certmgr knows, sorted by
// Domain: those it tracks and, with a Coordinator, those the cluster
// keeps a record of (at most MaxDomains of them), as Status tells of
// them.
func (m *Manager) Domains() []Status {
	now := m.now()
	m.stateMu.Lock()
	out := make([]Status, 0, len(m.domains)+len(m.dormant))
	for _, d := range m.domains {
		out = append(out, m.statusLocked(d, now))
	}
	for name, f := range m.dormant {
		if m.coord != nil && m.domains[name] == nil {
			d := recordOnly(name, f)
			d.notAfter = maxTime(m.issuedNotAfterLocked(name), f.NotAfter)
			out = append(out, m.statusLocked(d, now))
		}
	}
	m.stateMu.Unlock()
	for i := range out {
		if out[i].State == StateValid {
			out[i].RenewAt = m.ari.renewAt(out[i].Domain)
		}
	}
	slices.SortFunc(out, func(a, b Status) int { return strings.Compare(a.Domain, b.Domain) })
	return out
}

// statusLocked computes d's status at now. It writes nothing.
func (m *Manager) statusLocked(d *domain, now time.Time) Status {
	s := Status{Domain: d.name, Failures: d.fail.Failures, NotAfter: d.notAfter}
	if !now.Before(s.NotAfter) {
		s.NotAfter = time.Time{}
	}
	if d.fail.Failures > 0 {
		s.LastError = d.lastErr
		if s.LastError == nil {
			// Persisted by an earlier Manager: the CA's words, kept.
			detail := strings.TrimPrefix(d.fail.LastError, "certmgr: "+d.name+": ")
			s.LastError = &AttemptError{Domain: d.name, Detail: detail, Err: errors.New(detail)}
		}
	}
	if next := d.fail.nextAttempt(now, m.cfg.Backoff); now.Before(next) {
		s.NextAttempt = next
	}
	if d.dnsErr != nil {
		// A renewal the pre-check holds back shows here too.
		if s.LastError == nil {
			s.LastError = d.dnsErr
		}
		if next := m.dnsNextLocked(d, now); now.Before(next) {
			s.NextAttempt = maxTime(s.NextAttempt, next)
		}
	}
	switch {
	case !s.NotAfter.IsZero():
		s.State = StateValid
	case d.attempt != nil:
		s.State = StateObtaining
	case d.dnsErr != nil:
		s.State = StateWaitingDNS
		s.LastError = d.dnsErr
	case d.fail.Failures > 0:
		s.State = StateBackoff
	}
	return s
}
