package certmgr

import (
	"testing"
	"time"
)

// TestRenewalOverdueSaidOnceADay: a certificate not renewed past its due
// time and margin (30 days: due 10 days before it expires, overdue a day
// later) is said overdue once, as an Error event, not per handshake, and
// again a day later, until it is renewed.
func TestRenewalOverdueSaidOnceADay(t *testing.T) {
	clock := newFakeClock()
	events := &eventLog{}
	m := newPureManager(t, clock, func(c *Config) { c.OnEvent = events.add })
	const name = "late.test"
	now := clock.Now()
	if _, err := m.domainFor(name); err != nil {
		t.Fatal(err)
	}
	old := selfSigned(t, name, ecKey(t), "", now, now.Add(30*24*time.Hour))
	m.serve(certKey{domain: name}, old)
	overdue := func() int { return events.count(EventRenewalOverdue) }

	clock.Advance(20*24*time.Hour + 23*time.Hour) // due, within the margin
	m.warnOverdue()
	if st := m.Status(name); st.RenewalOverdue || overdue() != 0 || !st.RenewDue.Equal(now.Add(20*24*time.Hour)) {
		t.Errorf("within the margin: %+v, %d events; want due at 20 days, not overdue", st, overdue())
	}
	clock.Advance(2 * time.Hour)
	for range 3 {
		m.warnOverdue()
		if _, err := m.GetCertificate(helloFor(name)); err != nil {
			t.Fatal(err)
		}
	}
	if st := m.Status(name); !st.RenewalOverdue || overdue() != 1 {
		t.Errorf("past the margin: %+v, %d events; want overdue, said once", st, overdue())
	}
	if ev := events.last(EventRenewalOverdue); ev.Domain != name || !ev.RenewAt.Equal(now.Add(20*24*time.Hour)) || ev.Err == nil || ev.Kind.level().String() != "ERROR" {
		t.Errorf("event %+v, want the domain, the due time and an error, at Error level", ev)
	}
	clock.Advance(23 * time.Hour)
	m.warnOverdue()
	clock.Advance(time.Hour)
	m.warnOverdue()
	if n := overdue(); n != 2 {
		t.Errorf("a day later: %d events, want 2", n)
	}
	renewed := selfSigned(t, name, ecKey(t), "", clock.Now(), clock.Now().Add(30*24*time.Hour))
	m.serve(certKey{domain: name}, renewed)
	clock.Advance(24 * time.Hour)
	m.warnOverdue()
	if st := m.Status(name); st.RenewalOverdue || overdue() != 2 || len(m.overdueSaid) != 0 {
		t.Errorf("renewed: %+v, %d events, %d remembered; want not overdue, no more event, none remembered", st, overdue(), len(m.overdueSaid))
	}
}
