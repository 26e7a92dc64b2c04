package certmgr

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"time"

	"golang.org/x/crypto/acme/autocert"
)

// This file holds the store's watch, with a Coordinator: how a replica
// opens it (at New, or in the background while the store is down), how it
// catches up on what it may have missed, the replay of every failure
// record at New, and what each write the watch reports does
// (storeChanged).

// storeWait bounds how long New waits for the store's watch to open: a
// replica started while the store is unreachable returns from New, serves
// the fallback, and opens the watch in the background. Once the watch is
// open, New waits for the replay of the records too (replayRecords),
// which its own deadline bounds: the store answers, and Status is right
// from New on.
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
	opened := make(chan struct{}) // closed when the first try's watch opened
	gaveUp := make(chan struct{}) // closed when New waits no more
	m.wg.Add(1)
	go func() {
		defer m.wg.Done()
		m.keepWatching(first, opened, gaveUp)
	}()
	t := time.NewTimer(time.Until(by))
	defer t.Stop()
	select {
	case err := <-first:
		return err == nil // keepWatching reports an error
	case <-opened:
		// The store answers: the replay of the records follows, within
		// its own deadline.
		return <-first == nil
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
// it, and opened is closed once the first try's watch is open; gaveUp is
// closed once New waits no more (and reported the outage).
func (m *Manager) keepWatching(first chan<- error, opened chan<- struct{}, gaveUp <-chan struct{}) {
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
			if watching && try == 0 {
				close(opened)
			}
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
func (m *Manager) sleep(d time.Duration) bool { return sleepCtx(m.ctx, d) }

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
		m.serveAt(k, c, rev) // tracked once renewal information asks for a renewal, if the HostPolicy allows
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
