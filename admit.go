package certmgr

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"strconv"
	"time"
)

// This file holds order admission: the ACME transport asks admitOrder
// before every new order, which passes the order through the domain's
// gate, its budget of failed authorizations and the account's order
// budget, and reserves one authorization before the order goes out;
// observed settles that reservation when the CA answers.

// admitOrder is asked by the ACME transport before every new order, and
// returns the order's reservation in the domain's budget of failed
// authorizations, stored before the order goes out. An order inside an
// attempt in flight passes if the budget holds one more authorization;
// any other is a renewal by autocert's own timer, which must pass the same
// schedule, budget and DNS pre-check as any attempt. An order of a
// domain certmgr no longer tracks, or of an autocert.Manager it replaced
// (whose renewal timer lives on), is refused.
func (m *Manager) admitOrder(req *http.Request, name string) (string, error) {
	if err := m.waitForOrderInFlight(req, name); err != nil {
		m.refused(err)
		return "", err
	}
	now := m.now()
	id := m.reservationID()
	var renewal *attempt
	m.stateMu.Lock()
	d := m.domains[name]
	err := m.checkOrderLocked(req, d, name, now)
	if err == nil && d.attempt != nil {
		d.attempt.open = id // from here on, the attempt's order in flight
	}
	if err == nil && d.attempt == nil {
		renewal = &attempt{path: PathRenewal, start: now, done: make(chan struct{}), since: m.issuedLocked(name), open: id}
		// Every attempt ends: a renewal that hears nothing more (autocert
		// gave up without another request) ends here, after
		// renewalMaxAge, or renewalQuiet after the CA's last answer was a
		// 5xx (see observed).
		renewal.timerEnd = time.Now().Add(m.hooks.renewalMaxAge) // the timer's clock, not m.now
		renewal.timerAt = renewal.timerEnd
		renewal.timer = time.AfterFunc(m.hooks.renewalMaxAge, func() {
			m.finish(d, renewal, nil, fmt.Errorf("certmgr: %s: the renewal ended without an outcome", name))
		})
		d.attempt = renewal
	}
	m.stateMu.Unlock()
	if err != nil {
		m.refused(err)
		return "", err
	}
	if renewal != nil && m.dns != nil {
		ctx, cancel := context.WithTimeout(req.Context(), m.hooks.dnsCheckTimeout)
		err := m.dnsChecked(d, checkDNS(ctx, m.dns, name))
		cancel()
		if err != nil {
			m.finish(d, renewal, nil, err)
			return "", err
		}
	}
	if renewal != nil && m.coord != nil {
		// A replica that holds the lock renews for all; one that renewed
		// already stored the certificate.
		ctx, cancel := context.WithTimeout(req.Context(), lockTimeoutRenewal)
		err := m.lockDomain(ctx, d, renewal)
		cancel()
		if err == nil && (m.renewedElsewhere(req.Context(), name, renewal.since, false) ||
			m.renewedElsewhere(req.Context(), name, renewal.since, true)) {
			err = fmt.Errorf("%w: %s: another replica renewed it", ErrBackoff, name)
		}
		if err == nil {
			err = m.checkClusterRecord(req.Context(), d) // the cluster's record, as it is now, decides
		}
		if err == nil {
			m.stateMu.Lock()
			err = checkRenewedLocked(d, m.now()) // by another replica meanwhile, as the record says
			m.stateMu.Unlock()
		}
		if err != nil {
			m.refused(err)
			m.finish(d, renewal, nil, err)
			return "", err
		}
	}
	fence, lost := "", (<-chan struct{})(nil)
	m.stateMu.Lock()
	switch {
	case m.closed.Load():
		// Close began after the transport let the request through:
		// the order would be cut, and its reservation is not stored.
		err = errClosed
	case m.domains[name] != d:
		err = fmt.Errorf("certmgr: refusing an order for unknown domain %q", name)
	case d.attempt == nil || d.attempt.open != id:
		err = fmt.Errorf("%w: %s: the order's attempt ended", ErrBackoff, name)
	default:
		if err = m.checkOrderBudgetLocked(d, now); err == nil {
			d.fail.reserve(now, id)
			m.orders = append(m.orders, now)
			fence, lost = d.attempt.fence, d.attempt.lost
		} else {
			d.attempt.open = ""
		}
	}
	m.stateMu.Unlock()
	if err == nil && m.coord != nil {
		// The cluster's budget decides, and holds the reservation before
		// the order goes out; without the store, no order.
		err = m.updateRecord(req.Context(), name, fence, lost, nil, func(r *failureRecord) error {
			if t := r.budgetFree(now, 1, m.cfg.AuthzBudget); t.After(now) {
				return fmt.Errorf("%w: %s: the cluster's failed-authorization budget is spent until %s",
					ErrBackoff, name, t.UTC().Format(time.RFC3339))
			}
			r.reserve(now, id)
			return nil
		})
		if err != nil {
			m.stateMu.Lock()
			d.fail.settle(id, false)
			if d.attempt != nil && d.attempt.open == id {
				d.attempt.open = ""
			}
			m.stateMu.Unlock()
		}
	}
	if err != nil {
		m.refused(err)
		if renewal != nil {
			m.finish(d, renewal, nil, err)
		}
		return "", err
	}
	m.saveState() // the reservation is stored before the order goes out
	return id, nil
}

// orderWait bounds how long an order waits for the attempt whose order
// is in flight to end (see waitForOrderInFlight).
const orderWait = 30 * time.Second

// waitForOrderInFlight waits while an attempt of name has an order in
// flight, for at most orderWait. autocert orders one certificate after
// another within an attempt: an order that comes meanwhile is the other
// key type's, or one that autocert's renewal timer made as the attempt
// obtained the certificate, by the same autocert.Manager. Were it
// admitted into the attempt, it would outlive it, and go on after the
// attempt released the domain's lock, while another replica may order.
// Once the attempt ended, the order is admitted as any other (a renewal,
// with the lock of its own). It returns an error wrapping ErrBackoff if
// the attempt did not end in time; autocert then tries again later.
func (m *Manager) waitForOrderInFlight(req *http.Request, name string) error {
	var deadline <-chan time.Time
	for {
		m.stateMu.Lock()
		d := m.domains[name]
		var done chan struct{}
		if d != nil && d.attempt != nil && d.attempt.open != "" && !lockLostLocked(d.attempt) {
			done = d.attempt.done // an attempt that lost its lock orders nothing more: checkOrderLocked says so
		}
		m.stateMu.Unlock()
		if done == nil {
			return nil
		}
		if deadline == nil {
			m.waitedOrders.Add(1)
			t := time.NewTimer(orderWait)
			defer t.Stop()
			deadline = t.C
		}
		select {
		case <-done:
		case <-deadline:
			return fmt.Errorf("%w: %s: another order of the domain is in flight", ErrBackoff, name)
		case <-req.Context().Done():
			return req.Context().Err()
		case <-m.ctx.Done():
			return errClosed
		}
	}
}

// checkOrderLocked returns why d (the domain of name, or nil) may not
// order now, or nil.
func (m *Manager) checkOrderLocked(req *http.Request, d *domain, name string, now time.Time) error {
	switch {
	case d == nil:
		return fmt.Errorf("certmgr: refusing an order for unknown domain %q", name)
	case sender(req) != d.am && (d.attempt == nil || sender(req) != d.attempt.am):
		return fmt.Errorf("certmgr: refusing an order for %s from a retired autocert.Manager", name)
	case d.loading > 0:
		return errLoading
	case d.attempt != nil && (lockLostLocked(d.attempt) || m.coord != nil && d.attempt.lost == nil):
		// With a Coordinator, an attempt orders only while it holds its
		// domain's lock: an order while it waits for the lock is a renewal
		// by autocert's timer, and another replica may be ordering.
		return errLockLost
	case d.attempt != nil && d.attempt.path == PathRenewalInfo && sender(req) != d.attempt.am:
		// autocert's timer, while the renewal the CA asked for runs: it
		// finds the new certificate in the Cache when it tries again.
		return fmt.Errorf("%w: %s: a renewal is in flight", ErrBackoff, name)
	case d.attempt != nil && d.attempt.authzFailed >= m.cost():
		// autocert orders once more after every challenge type failed, and
		// finds none left to try: that order would only reserve the
		// budget and count against the CA's order limit.
		return fmt.Errorf("certmgr: %s: every challenge type failed in this attempt", name)
	case d.attempt != nil && d.attempt.open != "":
		// Another order began since waitForOrderInFlight looked.
		return fmt.Errorf("%w: %s: another order of the domain is in flight", ErrBackoff, name)
	case d.attempt != nil:
		return nil // an order of the attempt in flight; checkOrderBudgetLocked decides
	}
	if err := m.checkAttemptLocked(d); err != nil {
		return err
	}
	if err := m.checkRenewBeforeLocked(d, now); err != nil {
		return err
	}
	return checkRenewedLocked(d, now)
}

// checkOrderBudgetLocked returns why one more order, that may fail one
// authorization, does not fit d's budget of failed authorizations or the
// account's budget of new orders, or nil.
func (m *Manager) checkOrderBudgetLocked(d *domain, now time.Time) error {
	if t := d.fail.budgetFree(now, 1, m.cfg.AuthzBudget); t.After(now) {
		return fmt.Errorf("%w: %s: failed-authorization budget spent until %s", ErrBackoff, d.name, t.UTC().Format(time.RFC3339))
	}
	return m.checkAccountBudgetLocked(now)
}

// reservationID returns a new reservation's ID, unique to this Manager.
func (m *Manager) reservationID() string {
	return m.idPrefix + strconv.FormatUint(m.nextID.Add(1), 36)
}

// refused counts and logs an order refused locally.
func (m *Manager) refused(err error) {
	m.refusedOrders.Add(1)
	m.log.Debug("order refused", "err", err.Error())
	m.warnOrderBudget(err)
	if errors.Is(err, errRenewBefore) && m.renewBeforeSaid.CompareAndSwap(false, true) {
		m.log.Warn("RenewBefore bounded", "renew_before", m.cfg.Autocert.RenewBefore.String(), "err", err.Error(),
			"so", "each certificate is renewed once, past two thirds of its lifetime; said once")
	}
}

// warnOrderBudget reports an attempt or order that the account's order
// budget refused, at most once a minute.
func (m *Manager) warnOrderBudget(err error) {
	if errors.Is(err, errOrderBudget) && m.limits.allow("order budget", m.now()) {
		m.emit(Event{Kind: EventOrderBudget, Time: m.now(), Err: err})
	}
}

// observed records what the CA said about name's order: it settles the
// order's reservation, and tells the attempt in flight. A renewal ends
// here when the CA refused it, every challenge type failed, or a request
// got no answer.
func (m *Manager) observed(name string, ob observation) {
	m.stateMu.Lock()
	d := m.domains[name]
	if d == nil {
		m.stateMu.Unlock()
		return
	}
	settled := ob.reservation != "" && (ob.authzFailed || ob.authzValid || ob.orderFailed) &&
		d.fail.settle(ob.reservation, ob.authzFailed)
	a := d.attempt
	end := false
	if ob.order {
		m.counts.orders.Add(1)
	}
	if ob.authzFailed {
		m.counts.failedAuthz.Add(1)
	}
	if a != nil {
		if ob.order {
			a.orders++
		}
		if ob.authzFailed {
			a.authzFailed++
		}
		if ob.problem != "" {
			a.problem = ob.problem
		}
		if ob.challenge != "" {
			a.challenge = ob.challenge
		}
		a.rateLimited = a.rateLimited || ob.rateLimited
		a.retryAfter = maxTime(a.retryAfter, ob.retryAfter)
		if ob.reservation != "" && ob.reservation == a.open &&
			(ob.orderFailed || ob.authzFailed || ob.refused || ob.transport || ob.rateLimited || ob.unavailable || ob.ended) {
			// The order failed, or may have: autocert may order again. (A
			// 5xx or badNonce that acme.Client then sends again leaves a
			// moment when an order of another flow is admitted.)
			a.open = ""
		}
		end = a.path == PathRenewal && (ob.rateLimited || ob.refused || ob.transport || a.authzFailed >= m.cost())
		if a.path == PathRenewal && a.timer != nil && !end {
			// After a 5xx, acme.Client tries the request again within
			// seconds, or autocert gives up and says nothing more: the
			// renewal (and the domain's cluster lock) is not held for
			// renewalMaxAge then. Any other answer restores that bound.
			a.timerAt = a.timerEnd
			if ob.unavailable {
				a.timerAt = minTime(time.Now().Add(m.hooks.renewalQuiet), a.timerEnd)
			}
			a.timer.Reset(time.Until(a.timerAt))
		}
	}
	problem, fence, lost := "", "", (<-chan struct{})(nil)
	if a != nil {
		problem, fence, lost = a.problem, a.fence, a.lost
	}
	m.stateMu.Unlock()
	if settled {
		// Under the attempt's lock, if it holds one; an answer that came
		// after its attempt ended settles the reservation it names, which
		// no other replica's update overwrites.
		m.storeRecord(name, fence, lost, nil, func(r *failureRecord) { r.settle(ob.reservation, ob.authzFailed) })
	}
	if end {
		m.finish(d, a, nil, errors.New(problem))
	} else if settled {
		m.saveState()
	}
}

// orderWindow is the window of the account's order budget: that of Let's
// Encrypt's limit of new orders per account.
const orderWindow = 3 * time.Hour

// checkAccountBudgetLocked returns an error wrapping ErrBackoff and
// errOrderBudget if the account made OrderBudget orders in the last
// orderWindow, or nil.
func (m *Manager) checkAccountBudgetLocked(now time.Time) error {
	i := 0
	for i < len(m.orders) && !m.orders[i].After(now.Add(-orderWindow)) {
		i++
	}
	m.orders = m.orders[i:]
	if len(m.orders) < m.cfg.OrderBudget {
		return nil
	}
	return fmt.Errorf("%w: %w: %d new orders in the last %v (Config.OrderBudget); the next at %s", ErrBackoff, errOrderBudget,
		len(m.orders), orderWindow, m.orders[0].Add(orderWindow).UTC().Format(time.RFC3339))
}

// cost is how many authorizations one attempt can fail: one per
// challenge type autocert tries.
func (m *Manager) cost() int {
	if m.http01.Load() {
		return 2
	}
	return 1
}
