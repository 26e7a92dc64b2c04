package certmgr

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"time"

	"golang.org/x/crypto/acme/autocert"
)

// This file holds what a Manager does when its Cache is a Coordinator
// (see coord.go): replicas on one store take a lock per domain around
// every attempt, so that one of them orders and the others find the
// certificate in the store; every replica serves a certificate another
// one stored as soon as the store's watch reports it; and the ACME
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
func (m *Manager) deleteToken(name, fence string) {
	key := name + "+token"
	ctx, cancel := context.WithTimeout(context.Background(), cacheTimeout)
	defer cancel()
	_, rev, err := m.coord.GetRevision(ctx, key)
	if err == nil {
		err = m.cache.write(func() error { // none after Close
			_, err := m.coord.DeleteIf(ctx, key, rev, fence)
			return err
		})
	}
	if err != nil && !errors.Is(err, autocert.ErrCacheMiss) {
		m.cacheFailed("delete", key, err)
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

// storeWait bounds how long New waits for the store's watch to open: a
// replica started while the store is unreachable returns from New, serves
// the fallback, and opens the watch in the background.
const storeWait = time.Second

// The pause between two tries of the store's watch (or of catchUp) grows
// from watchRetryMin to watchRetryMax.
const (
	watchRetryMin = 500 * time.Millisecond
	watchRetryMax = 5 * time.Second
)

// watchStore keeps this replica up to date with the store, through one
// watch of all its keys: every certificate written, whichever replica
// wrote it, is served from the next handshake on; and every domain's
// record in memory becomes the cluster's, from New on (a record written
// before is read when its domain's lock is taken: refreshRecord).
//
// It waits for the watch until by at most, and reports whether it is
// open. Otherwise the watch is tried again in the background (keepWatching)
// until it opens or Close, and the outage is reported once: here if the
// watch is still not open at by.
func (m *Manager) watchStore(by time.Time) bool {
	if m.coord == nil {
		return false
	}
	first := make(chan error)     // the first try's outcome, while New waits for it
	gaveUp := make(chan struct{}) // closed when New waits no more
	m.wg.Add(1)
	go func() {
		defer m.wg.Done()
		m.keepWatching(first, gaveUp)
	}()
	t := time.NewTimer(time.Until(by))
	defer t.Stop()
	select {
	case err := <-first:
		return err == nil // keepWatching reports an error
	case <-t.C:
		close(gaveUp)
		m.cacheFailed("watch", "", fmt.Errorf("certmgr: watching the Cache: not open within %v; tried again in the background", storeWait))
		return false
	}
}

// keepWatching opens the store's watch, trying again after a pause while
// it fails, until it opens or Close; the outage is reported once. A watch
// that opens only after New returned (late) reports the writes that follow
// its opening alone: catchUp then reads again what this replica may have
// read before. first gets the first try's outcome if New still waits for
// it; gaveUp is closed once New waits no more (and reported the outage).
func (m *Manager) keepWatching(first chan<- error, gaveUp <-chan struct{}) {
	late, reported := false, false
	report := func(err error) {
		if !reported {
			reported = true
			m.cacheFailed("watch", "", fmt.Errorf("certmgr: watching the Cache: %w; tried again in the background", err))
		}
	}
	pause := watchRetryMin
	watching := false
	for try := 0; ; try++ {
		var err error
		if !watching {
			err = m.coord.Watch(m.ctx, "", 0, m.storeChanged)
			watching = err == nil
		}
		if watching {
			err = m.replayRecords() // what was written before the watch opened
		}
		if try == 0 {
			select {
			case first <- err:
			case <-gaveUp:
				late, reported = true, true
			}
		}
		if err == nil {
			break
		}
		if m.ctx.Err() != nil {
			return // Close
		}
		late = true
		report(err)
		if !m.sleep(pause) {
			return
		}
		pause = min(2*pause, watchRetryMax)
	}
	if !late {
		return
	}
	for {
		err := m.catchUp()
		if err == nil {
			break
		}
		if m.ctx.Err() != nil {
			return
		}
		report(err)
		if !m.sleep(pause) {
			return
		}
		pause = min(2*pause, watchRetryMax)
	}
	if reported {
		m.log.Info("store watched", "after", "the watch could not open for a while; what may have been missed was read again")
	}
}

// sleep waits for d, and reports whether the Manager is still open.
func (m *Manager) sleep(d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return true
	case <-m.ctx.Done():
		return false
	}
}

// catchUp brings this replica up to date with the store once its watch
// opened late (after New returned, or after a failure): the watch reports
// the writes that follow its opening, and this replica may have read keys
// before, written again meanwhile. catchUp reads the persisted records if
// they could not be read so far, and again the certificates this replica
// serves and the records of the domains it knows, which it takes as the
// watch would (the newer certificate, the later revision). Keys it never
// read are read at their first use, as after New. It stops at the first
// failure, and is then tried again.
func (m *Manager) catchUp() error {
	if !m.rereadState() {
		return errors.New("certmgr: the persisted failure records cannot be read")
	}
	m.servedMu.RLock()
	keys := make([]string, 0, len(m.served))
	for k := range m.served {
		keys = append(keys, k.cacheKey())
	}
	m.servedMu.RUnlock()
	m.stateMu.Lock()
	for name := range m.domains {
		keys = append(keys, recordPrefix+name)
	}
	for name := range m.dormant {
		keys = append(keys, recordPrefix+name)
	}
	m.stateMu.Unlock()
	for _, key := range keys {
		ctx, cancel := context.WithTimeout(m.ctx, cacheTimeout)
		value, rev, err := m.coord.GetRevision(ctx, key)
		cancel()
		switch {
		case err == nil:
			m.storeChanged(key, value, rev)
		case !errors.Is(err, autocert.ErrCacheMiss):
			return fmt.Errorf("certmgr: reading %q again: %w", key, err)
		}
	}
	return nil
}

// storeChanged takes a write that the store's watch reports (or that
// catchUp reads), key's new value at revision rev: a certificate is
// served, a record becomes its domain's; a delete (nil value) and other
// keys are ignored. It may be called concurrently.
func (m *Manager) storeChanged(key string, value []byte, rev int64) {
	if name, ok := strings.CutPrefix(key, recordPrefix); ok {
		if n, err := normalize(name); err == nil && n == name {
			m.recordSeen(name, decodeRecord(value, m.now()), rev)
		}
		return
	}
	if value == nil || !isCertKey(key) {
		return
	}
	k := certKeyOf(key)
	if _, err := normalize(k.domain); err != nil {
		return
	}
	if c, err := parseCert(k, value, m.now()); err == nil {
		m.serve(k, c) // tracked once renewal information asks for a renewal, if the HostPolicy allows
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

// recordSweep is how often stale records are dropped (sweepRecords).
const recordSweep = time.Hour

// sweepLoop drops stale records every recordSweep, until Close.
func (m *Manager) sweepLoop() {
	defer m.wg.Done()
	for m.sleep(recordSweep) {
		m.sweepRecords()
	}
}

// sweepRecords drops the records of domains this replica does not track
// that are stale (see failureRecord.stale): from memory and, with a
// Coordinator, from the store, if nobody wrote them since this replica
// saw them. Records would otherwise be kept for good, on every replica
// and in the store, for every name ever made to fail. A record another
// replica still uses is written again by its next outcome.
func (m *Manager) sweepRecords() {
	now := m.now()
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

// replayRecords takes every failure record in the store as the watch
// would (recordSeen), so that Status and Domains tell of every domain the
// cluster knows from New on: it watches the records from the store's
// first revision until it has seen a marker of its own, written after
// the watch of the store opened, and then deletes the marker.
func (m *Manager) replayRecords() error {
	ctx, cancel := context.WithTimeout(m.ctx, cacheTimeout)
	defer cancel()
	marker := recordPrefix + "~" + m.idPrefix // no name: storeChanged ignores it
	var rev int64
	var ok bool
	err := m.cache.write(func() (err error) { // none after Close
		rev, ok, err = m.coord.PutIf(ctx, marker, []byte("{}"), 0, "")
		return err
	})
	switch {
	case err != nil:
		return fmt.Errorf("certmgr: replaying the failure records: %w", err)
	case !ok:
		return fmt.Errorf("certmgr: replaying the failure records: the marker %q exists", marker)
	}
	defer func() {
		ctx, cancel := context.WithTimeout(context.Background(), cacheTimeout)
		defer cancel()
		m.cache.write(func() error {
			_, err := m.coord.DeleteIf(ctx, marker, rev, "")
			return err
		})
	}()
	seen := make(chan struct{})
	var once sync.Once
	wctx, stop := context.WithCancel(ctx)
	defer stop()
	err = m.coord.Watch(wctx, recordPrefix, 1, func(key string, value []byte, r int64) {
		if key == marker {
			once.Do(func() { close(seen) })
			return
		}
		m.storeChanged(key, value, r)
	})
	if err != nil {
		return fmt.Errorf("certmgr: replaying the failure records: %w", err)
	}
	select {
	case <-seen:
		return nil
	case <-ctx.Done():
		return fmt.Errorf("certmgr: replaying the failure records: %w", ctx.Err())
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
