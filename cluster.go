package certmgr

import (
	"context"
	"errors"
	"fmt"
	"time"
)

// This file holds what a Manager does when its Cache is a Coordinator
// (see coord.go): replicas on one store take a lock per domain around
// every attempt, so that one of them orders and the others find the
// certificate in the store; every replica serves a certificate another
// one stored as soon as the store's watch reports it; and the ACME
// account key is made once for all.
//
// The failure records (backoff and budget) are not shared yet: each
// replica keeps its own.

// lockTimeoutRenewal bounds how long a renewal by autocert's timer waits
// for its domain's lock: a replica that holds it renews for all.
const lockTimeoutRenewal = 2 * time.Second

// errLockLost refuses an order of an attempt that does not hold its
// domain's cluster lock: it has not taken it yet, or lost it.
var errLockLost = errors.New("certmgr: the domain's cluster lock is not held")

// lockName is the name of the cluster lock of domain name.
func lockName(name string) string { return "domain/" + name }

// lockDomain takes d's cluster lock for attempt a, waiting at most until
// ctx ends, and records it in a; finish releases it. Without a
// Coordinator it does nothing. An error is local: Close, ctx's end
// (another replica held the lock), or the store's failure.
func (m *Manager) lockDomain(ctx context.Context, d *domain, a *attempt) error {
	if m.coord == nil {
		return nil
	}
	_, lost, unlock, err := m.coord.Lock(ctx, lockName(d.name))
	switch {
	case err == nil:
	case m.ctx.Err() != nil:
		return errClosed
	case ctx.Err() != nil:
		return fmt.Errorf("%w: %s: another replica holds its lock", ErrBackoff, d.name)
	default:
		return &cacheError{op: "lock", key: lockName(d.name), err: err}
	}
	m.stateMu.Lock()
	if d.attempt != a {
		m.stateMu.Unlock()
		unlock() // the attempt ended meanwhile
		return errClosed
	}
	a.lost, a.unlock = lost, unlock
	m.stateMu.Unlock()
	return nil
}

// lockLostLocked reports whether attempt a held a cluster lock and lost it.
func lockLostLocked(a *attempt) bool {
	if a.lost == nil {
		return false
	}
	select {
	case <-a.lost:
		return true
	default:
		return false
	}
}

// watchCertificates serves every certificate written to the store from
// the next handshake on, whichever replica wrote it.
func (m *Manager) watchCertificates() error {
	if m.coord == nil {
		return nil
	}
	err := m.coord.Watch(m.ctx, "", 0, func(key string, value []byte, _ int64) {
		if value == nil || !isCertKey(key) {
			return
		}
		k := certKeyOf(key)
		if _, err := normalize(k.domain); err != nil {
			return
		}
		if c, err := parseCert(k, value, m.now()); err == nil {
			m.serve(k, c)
		}
	})
	if err != nil {
		return fmt.Errorf("certmgr: watching the Cache: %w", err)
	}
	return nil
}

// storeAccountKey writes data, a new account key, unless another replica
// stored one first; it returns the key to use.
func (m *Manager) storeAccountKey(ctx context.Context, data []byte) ([]byte, error) {
	if m.coord == nil {
		m.cache.Put(ctx, accountKeyName, data) // a failed write is kept and retried
		return data, nil
	}
	_, ok, err := m.coord.PutIf(ctx, accountKeyName, data, 0, "")
	if err != nil {
		return nil, fmt.Errorf("certmgr: writing the account key: %w", err)
	}
	if ok {
		return data, nil
	}
	theirs, _, err := m.coord.GetRevision(ctx, accountKeyName)
	if err != nil {
		return nil, fmt.Errorf("certmgr: reading the account key another replica made: %w", err)
	}
	return theirs, nil
}
