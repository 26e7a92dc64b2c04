package certmgr

import (
	"encoding/json"
	"errors"
	"fmt"
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
	// RenewDue is when the certificate served is due for renewal:
	// RenewAt, or autocert's own time if that comes first (NotAfter less
	// RenewBefore, bounded to a third of the lifetime, or less a third of
	// the lifetime); zero if none is served.
	RenewDue time.Time
	// RenewalOverdue reports that the certificate served should have
	// been renewed by now: RenewDue passed more than a twelfth of its
	// lifetime ago (at most a day ago), or less than a sixth of its
	// lifetime is left. EventRenewalOverdue says so, once a day.
	RenewalOverdue bool
}

// overdueMargin is how long after RenewDue a certificate of the given
// lifetime is overdue for renewal.
func overdueMargin(lifetime time.Duration) time.Duration {
	return min(lifetime/12, 24*time.Hour)
}

// settle completes s, computed by statusLocked, with the CA's renewal
// time renewAt and whether the renewal is overdue at now; lifetime is
// that of the certificate served.
func (s *Status) settle(renewAt time.Time, lifetime time.Duration, now time.Time) {
	if s.State != StateValid || lifetime <= 0 {
		return
	}
	s.RenewAt = renewAt
	if !renewAt.IsZero() && renewAt.Before(s.RenewDue) {
		s.RenewDue = renewAt
	}
	s.RenewalOverdue = !now.Before(s.RenewDue.Add(overdueMargin(lifetime))) || !now.Before(s.NotAfter.Add(-lifetime/6))
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
	s, lifetime := m.statusLocked(d, now)
	m.stateMu.Unlock()
	if s.State == StateValid {
		s.settle(m.ari.renewAt(name), lifetime, now)
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
	lifetimes := make([]time.Duration, 0, cap(out))
	for _, d := range m.domains {
		s, lifetime := m.statusLocked(d, now)
		out, lifetimes = append(out, s), append(lifetimes, lifetime)
	}
	for name, f := range m.dormant {
		if m.coord != nil && m.domains[name] == nil {
			d := recordOnly(name, f)
			d.notAfter = maxTime(m.issuedNotAfterLocked(name), f.NotAfter)
			s, lifetime := m.statusLocked(d, now)
			out, lifetimes = append(out, s), append(lifetimes, lifetime)
		}
	}
	m.stateMu.Unlock()
	for i := range out {
		if out[i].State == StateValid {
			out[i].settle(m.ari.renewAt(out[i].Domain), lifetimes[i], now)
		}
	}
	slices.SortFunc(out, func(a, b Status) int { return strings.Compare(a.Domain, b.Domain) })
	return out
}

// statusLocked computes d's status at now, all but what settle adds,
// and returns the lifetime of the certificate served, if known. It
// writes nothing.
func (m *Manager) statusLocked(d *domain, now time.Time) (Status, time.Duration) {
	s := Status{Domain: d.name, Failures: d.fail.Failures, NotAfter: d.notAfter}
	if !now.Before(s.NotAfter) {
		s.NotAfter = time.Time{}
	}
	lifetime := d.lifetime
	if lifetime <= 0 && !d.fail.NotBefore.IsZero() && d.fail.NotAfter.Equal(d.notAfter) {
		lifetime = d.fail.NotAfter.Sub(d.fail.NotBefore) // known from the record alone
	}
	if !s.NotAfter.IsZero() && lifetime > 0 {
		notBefore := s.NotAfter.Add(-lifetime)
		s.RenewDue = maxTime(s.NotAfter.Add(-m.renewBeforeOf(notBefore, s.NotAfter)), notBefore)
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
	return s, lifetime
}

// MarshalText implements encoding.TextMarshaler: the state's name, as
// String gives it. A state without a name is an error.
func (s State) MarshalText() ([]byte, error) {
	if s < 0 || int(s) >= len(stateNames) {
		return nil, fmt.Errorf("certmgr: no such state: %d", int(s))
	}
	return []byte(stateNames[s]), nil
}

// UnmarshalText implements encoding.TextUnmarshaler: it reads a state's
// name, as MarshalText writes it.
func (s *State) UnmarshalText(text []byte) error {
	for i, name := range stateNames {
		if string(text) == name {
			*s = State(i)
			return nil
		}
	}
	return fmt.Errorf("certmgr: no such state: %q", text)
}

// statusJSON is the JSON of a Status: snake-case keys, the state by its
// name, the last error as its text, and no zero time.
type statusJSON struct {
	Domain         string    `json:"domain"`
	State          State     `json:"state"`
	NotAfter       time.Time `json:"not_after,omitzero"`
	Failures       int       `json:"failures"`
	LastError      string    `json:"last_error,omitempty"`
	NextAttempt    time.Time `json:"next_attempt,omitzero"`
	RenewAt        time.Time `json:"renew_at,omitzero"`
	RenewDue       time.Time `json:"renew_due,omitzero"`
	RenewalOverdue bool      `json:"renewal_overdue"`
}

// MarshalJSON implements json.Marshaler. The keys are domain, state (its
// name: "none", "obtaining", "valid", "backoff" or "waiting-dns"),
// not_after, failures, last_error (the error's text), next_attempt,
// renew_at, renew_due and renewal_overdue; a zero time, or no error, is
// left out.
func (s Status) MarshalJSON() ([]byte, error) {
	j := statusJSON{Domain: s.Domain, State: s.State, NotAfter: s.NotAfter, Failures: s.Failures,
		NextAttempt: s.NextAttempt, RenewAt: s.RenewAt, RenewDue: s.RenewDue, RenewalOverdue: s.RenewalOverdue}
	if s.LastError != nil {
		j.LastError = s.LastError.Error()
	}
	return json.Marshal(j)
}

// UnmarshalJSON implements json.Unmarshaler: it reads what MarshalJSON
// writes. The last error comes back as an error with the same text.
func (s *Status) UnmarshalJSON(data []byte) error {
	var j statusJSON
	if err := json.Unmarshal(data, &j); err != nil {
		return err
	}
	*s = Status{Domain: j.Domain, State: j.State, NotAfter: j.NotAfter, Failures: j.Failures,
		NextAttempt: j.NextAttempt, RenewAt: j.RenewAt, RenewDue: j.RenewDue, RenewalOverdue: j.RenewalOverdue}
	if j.LastError != "" {
		s.LastError = errors.New(j.LastError)
	}
	return nil
}
