package certmgr

import (
	"fmt"
	"time"
)

// overdueRepeat is how often a renewal still overdue is said again.
const overdueRepeat = 24 * time.Hour

// warnOverdue says, as EventRenewalOverdue (an Error line), each domain
// whose certificate's renewal is overdue (Status.RenewalOverdue): once,
// and again at most once every overdueRepeat until it is renewed. The
// sweep calls it every hour.
func (m *Manager) warnOverdue() {
	now := m.now()
	statuses := m.Domains()
	var events []Event
	m.overdueMu.Lock()
	overdue := make(map[string]bool)
	for _, s := range statuses {
		if !s.RenewalOverdue {
			continue
		}
		overdue[s.Domain] = true
		if at, ok := m.overdueSaid[s.Domain]; ok && !now.Before(at) && now.Sub(at) < overdueRepeat {
			continue
		}
		m.overdueSaid[s.Domain] = now
		err := fmt.Errorf("certmgr: %s: the certificate expiring at %s was due for renewal at %s", s.Domain,
			s.NotAfter.UTC().Format(time.RFC3339), s.RenewDue.UTC().Format(time.RFC3339))
		if s.LastError != nil {
			err = fmt.Errorf("%w; the last attempt failed: %w", err, s.LastError)
		}
		events = append(events, Event{Kind: EventRenewalOverdue, Time: now, Domain: s.Domain, NotAfter: s.NotAfter,
			RenewAt: s.RenewDue, NextAttempt: s.NextAttempt, Err: err})
	}
	for name := range m.overdueSaid {
		if !overdue[name] {
			delete(m.overdueSaid, name) // renewed, or no longer known
		}
	}
	m.overdueMu.Unlock()
	m.emit(events...)
}
