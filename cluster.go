package certmgr

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"time"

	"golang.org/x/crypto/acme/autocert"
)

// This file holds what a Manager does when its Cache is a Coordinator
// (see coord.go): replicas on one store take a lock per domain around
// every attempt, so that one of them orders and the others find the
// certificate in the store; every replica serves a certificate another
// one stored as soon as the store's watch reports it (watch.go); and the ACME
// account key is made once for all.
//
// Each domain's failure record (backoff, the CA's Retry-After and the
// budget with its reservations) is the cluster's: kept in the store under
// recordPrefix, updated by compare-and-swap on the freshest record, and
// watched, so that every replica gates on the same record.

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
	m.counts.lockWaits.Add(1)
	fence, lost, unlock, err := m.coord.Lock(ctx, lockName(d.name))
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
	a.fence, a.lost, a.unlock = fence, lost, unlock
	m.stateMu.Unlock()
	return nil
}

// storeRecord applies f to name's record in the store, if there is a
// Coordinator, with its own deadline: the outcome of an attempt is
// stored even at Close. With fence (and lost, its hold's channel), the
// write lands only while that hold of the domain's lock is current: a
// replica that lost its lock writes nothing, since another one may hold
// it now. A failure is reported as a Cache error.
//
// base, if not nil, is the record f applies to when the store has none
// yet: the domain's record in memory before f was applied to it too (see
// updateRecord).
func (m *Manager) storeRecord(name, fence string, lost <-chan struct{}, base *failureRecord, f func(*failureRecord)) {
	if m.coord == nil {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), cacheTimeout)
	defer cancel()
	err := m.updateRecord(ctx, name, fence, lost, base, func(r *failureRecord) error { f(r); return nil })
	if err != nil && !errors.Is(err, errLockLost) {
		m.cacheFailed("put", recordPrefix+name, err)
	}
}

// deleteToken deletes name's TLS-ALPN-01 token certificate from the store
// while the attempt that wrote it still holds name's lock (fence): the
// replicas share that one key, and autocert's own delete, which comes
// after the attempt released the lock, is refused (see mayWriteToken).
//
// A delete that fails (etcd electing a leader) is tried again at once,
// as a certificate's write is (putPause); it reports whether the token is
// gone, so that finish leaves one it could not delete to dropLostToken.
func (m *Manager) deleteToken(name, fence string) bool {
	key := name + "+token"
	ctx, cancel := context.WithTimeout(context.Background(), cacheTimeout)
	defer cancel()
	var err error
	for pause := putPause; ; pause *= 2 {
		var rev int64
		_, rev, err = m.coord.GetRevision(ctx, key)
		if err == nil {
			err = m.cache.write(func() error { // none after Close
				_, err := m.coord.DeleteIf(ctx, key, rev, fence)
				return err
			})
		}
		if err == nil || errors.Is(err, autocert.ErrCacheMiss) {
			return true
		}
		if errors.Is(err, errCacheClosed) || pause > putPauseMax || !sleepCtx(ctx, pause) {
			break
		}
	}
	m.cacheFailed("delete", key, err)
	return false
}

// tokenDropFor bounds how long a replica that lost its lock tries to
// delete the TLS-ALPN-01 token it wrote (dropLostToken).
const tokenDropFor = 10 * time.Minute

// tokenWritten records data, name's TLS-ALPN-01 token certificate just
// written, as the token of name's attempt in flight.
func (m *Manager) tokenWritten(name string, data []byte) {
	if m.coord == nil {
		return
	}
	m.stateMu.Lock()
	if d := m.domains[name]; d != nil && d.attempt != nil {
		d.attempt.token = data
	}
	m.stateMu.Unlock()
}

// dropLostToken deletes name's TLS-ALPN-01 token certificate from the
// store if it is still data, the one an attempt of this replica wrote
// before it lost name's lock: no holder wrote its own since (a holder
// deletes its own before it unlocks, and every token certificate autocert
// makes is new), so nobody will delete it. It tries again while the store
// does not answer (the replica may be cut off), for at most tokenDropFor,
// until Close.
func (m *Manager) dropLostToken(name string, data []byte) {
	defer m.wg.Done()
	key := name + "+token"
	deadline := time.Now().Add(tokenDropFor)
	for pause := watchRetryMin; ; pause = min(2*pause, watchRetryMax) {
		ctx, cancel := context.WithTimeout(m.ctx, cacheTimeout)
		value, rev, err := m.coord.GetRevision(ctx, key)
		if err == nil && bytes.Equal(value, data) {
			err = m.cache.write(func() error { // none after Close
				_, err := m.coord.DeleteIf(ctx, key, rev, "")
				return err
			})
		}
		cancel()
		if err == nil || errors.Is(err, autocert.ErrCacheMiss) || errors.Is(err, errCacheClosed) || time.Now().After(deadline) {
			return
		}
		if !m.sleep(pause) {
			return
		}
	}
}

// orderHeld returns errLockLost if name's attempt in flight held its
// cluster lock and lost it: the replica then stops its order at once,
// since another one may take over. It is nil otherwise.
func (m *Manager) orderHeld(name string) error {
	if m.coord == nil {
		return nil
	}
	m.stateMu.Lock()
	defer m.stateMu.Unlock()
	if d := m.domains[name]; d != nil && d.attempt != nil && lockLostLocked(d.attempt) {
		d.attempt.open = "" // its order goes no further
		return errLockLost
	}
	return nil
}

// mayWriteToken reports whether name's TLS-ALPN-01 certificate may be
// written or deleted now: always without a Coordinator; with one, while
// an attempt of this replica holds name's cluster lock.
func (m *Manager) mayWriteToken(name string) bool {
	if m.coord == nil {
		return true
	}
	return m.holdsLock(name)
}

// holdsLock reports whether an attempt of this replica holds name's
// cluster lock now.
func (m *Manager) holdsLock(name string) bool {
	m.stateMu.Lock()
	defer m.stateMu.Unlock()
	d := m.domains[name]
	return d != nil && d.attempt != nil && d.attempt.lost != nil && !lockLostLocked(d.attempt)
}

// lockLostLocked reports whether attempt a held a cluster lock and lost it.
func lockLostLocked(a *attempt) bool { return closed(a.lost) }

// closed reports whether c, if not nil, is closed.
func closed(c <-chan struct{}) bool {
	if c == nil {
		return false
	}
	select {
	case <-c:
		return true
	default:
		return false
	}
}

// storeAccountKey writes data, a new account key, unless another replica
// stored one first; it returns the key to use.
func (m *Manager) storeAccountKey(ctx context.Context, data []byte) ([]byte, error) {
	if m.coord == nil {
		m.cache.Put(ctx, accountKeyName, data) // a failed write is kept and retried
		return data, nil
	}
	// The store's failures are certmgr's, not the CA's (see failedLocally).
	var ok bool
	err := m.cache.write(func() (err error) { // none after Close
		_, ok, err = m.coord.PutIf(ctx, accountKeyName, data, 0, "")
		return err
	})
	if err != nil {
		m.cacheFailed("put", accountKeyName, err)
		return nil, &cacheError{op: "put", key: accountKeyName, err: fmt.Errorf("writing the account key: %w", err)}
	}
	if ok {
		return data, nil
	}
	theirs, _, err := m.coord.GetRevision(ctx, accountKeyName)
	if err != nil {
		m.cacheFailed("get", accountKeyName, err)
		return nil, &cacheError{op: "get", key: accountKeyName, err: fmt.Errorf("reading the account key another replica made: %w", err)}
	}
	return theirs, nil
}

// recordPrefix starts the Cache key of a domain's failure record in a
// cluster: "certmgr+record+" and the domain. No autocert key starts so.
const recordPrefix = "certmgr+record+"

// maxRecordRetries bounds the compare-and-swap rounds of one update.
const maxRecordRetries = 16

// errRecordConflict reports an update that lost every round to others.
var errRecordConflict = errors.New("certmgr: the failure record kept changing")

// updateRecord applies f to name's failure record as the store holds it
// now, and writes the result if nobody wrote the record meanwhile (and,
// with fence, only while that hold of the domain's lock is current),
// trying again if somebody did. f may refuse with an error, which is
// returned. On success the domain's record in memory, if there is one,
// becomes the stored one. A store error is returned as it is; a hold
// that is lost (lost closed) ends it with errLockLost; after Close nothing
// is written (errCacheClosed).
//
// When the store has no record yet, f applies to base, if not nil, and
// else to the domain's record in memory (see localRecord): a caller that
// applied f to that record already passes the record as it was before,
// lest the change count twice.
func (m *Manager) updateRecord(ctx context.Context, name, fence string, lost <-chan struct{}, base *failureRecord, f func(*failureRecord) error) error {
	key := recordPrefix + name
	for range maxRecordRetries {
		if closed(lost) {
			return errLockLost
		}
		data, rev, err := m.coord.GetRevision(ctx, key)
		var rec failureRecord
		switch {
		case errors.Is(err, autocert.ErrCacheMiss):
			// The first record of the domain: it starts from what this
			// replica knows, such as the single-process certmgr+state.
			rev, rec = 0, m.localRecord(name)
			if base != nil {
				rec = *base
				rec.Spends = slices.Clone(base.Spends)
			}
		case err != nil:
			return &cacheError{op: "get", key: key, err: err}
		default:
			rec = decodeRecord(data, m.now()) // a corrupt record is replaced
		}
		if err := f(&rec); err != nil {
			return err
		}
		out, err := json.Marshal(persistedDomain(rec))
		if err != nil {
			return err
		}
		if rev != 0 && bytes.Equal(out, data) {
			m.recordSeen(name, rec, rev) // no change: no write, no watch event
			return nil
		}
		var newRev int64
		var ok bool
		err = m.cache.write(func() (err error) {
			newRev, ok, err = m.coord.PutIf(ctx, key, out, rev, fence)
			return err
		})
		switch {
		case errors.Is(err, errCacheClosed):
			return err // after Close: a restarted replica's record stays
		case err != nil:
			return &cacheError{op: "put", key: key, err: err}
		}
		if ok {
			m.recordSeen(name, rec, newRev)
			return nil
		}
		// Somebody wrote it meanwhile, or the hold named by fence ended:
		// read again; a lost hold fails every round.
	}
	return errRecordConflict
}

// localRecord returns a copy of name's record in memory, if it was never
// the store's, or an empty one.
func (m *Manager) localRecord(name string) failureRecord {
	m.stateMu.Lock()
	defer m.stateMu.Unlock()
	if d := m.domains[name]; d != nil && d.recRev == 0 {
		f := d.fail
		f.Spends = slices.Clone(f.Spends)
		return f
	}
	return failureRecord{}
}

// decodeRecord decodes one stored failure record, bounded against now; a
// record that cannot be decoded is an empty one.
func decodeRecord(data []byte, now time.Time) failureRecord {
	var p persistedDomain
	if json.Unmarshal(data, &p) != nil || p.Failures < 0 {
		return failureRecord{}
	}
	return boundRecord(failureRecord(p), now)
}

// recordSeen makes rec, at revision rev, name's record in memory, unless
// a later one is there already. A name the table does not hold keeps its
// record aside (dormant) until it is used.
//
// The records aside are at most MaxDomains: beyond that a record is not
// kept (the store still holds it, and a domain's lock reads it again:
// refreshRecord), and that is reported, at most once a minute.
func (m *Manager) recordSeen(name string, rec failureRecord, rev int64) {
	m.stateMu.Lock()
	d := m.domains[name]
	full := false
	switch {
	case d != nil:
		if rev > d.recRev {
			d.fail, d.recRev = rec, rev
			d.notAfter = maxTime(d.notAfter, rec.NotAfter)
		}
	case rev != 0 && rev <= m.dormantRev[name]:
		// An older write than the one kept: the replay of the records
		// at New (replayRecords) and the watch may both report it.
	case rec.empty(m.now()):
		delete(m.dormant, name) // nothing to keep: a success long expired, say
		delete(m.dormantRev, name)
	default:
		_, kept := m.dormant[name]
		if full = !kept && len(m.dormant) >= m.cfg.MaxDomains; !full {
			m.dormant[name], m.dormantRev[name] = rec, rev
		}
	}
	n := len(m.dormant)
	m.stateMu.Unlock()
	if d == nil && !full {
		m.scheduleLoad(name, rec.NotBefore, rec.NotAfter) // another replica's certificate
	}
	if full && m.limits.allow("records full", m.now()) {
		m.emit(Event{Kind: EventTableFull, Time: m.now(), Domain: name,
			Err: fmt.Errorf("certmgr: keeping %d failure records of domains not tracked already (MaxDomains); %s's stays in the store alone", n, name)})
	}
}

// recordExists reports whether the store holds a record for name, or this
// replica knows name (its record is then the first), so that a Retry of a
// name nobody tried writes nothing. A store that cannot be read counts as
// holding one: the update then fails and is reported.
func (m *Manager) recordExists(name string) bool {
	if m.coord == nil {
		return false
	}
	m.stateMu.Lock()
	_, known := m.domains[name]
	m.stateMu.Unlock()
	if known {
		return true
	}
	ctx, cancel := context.WithTimeout(context.Background(), cacheTimeout)
	defer cancel()
	_, _, err := m.coord.GetRevision(ctx, recordPrefix+name)
	return !errors.Is(err, autocert.ErrCacheMiss)
}

// refreshRecord reads d's record from the store, once its lock is held.
func (m *Manager) refreshRecord(ctx context.Context, d *domain) error {
	data, rev, err := m.coord.GetRevision(ctx, recordPrefix+d.name)
	switch {
	case errors.Is(err, autocert.ErrCacheMiss):
		return nil
	case err != nil:
		return &cacheError{op: "get", key: recordPrefix + d.name, err: err}
	}
	m.recordSeen(d.name, decodeRecord(data, m.now()), rev)
	return nil
}

// checkClusterRecord reads d's record from the store, once its lock is held,
// and returns why no attempt may start by it, or nil.
func (m *Manager) checkClusterRecord(ctx context.Context, d *domain) error {
	if err := m.refreshRecord(ctx, d); err != nil {
		return err
	}
	m.stateMu.Lock()
	defer m.stateMu.Unlock()
	return m.checkAttemptLocked(d)
}
