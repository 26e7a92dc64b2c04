package certmgr

import "sync/atomic"

// This file holds the Manager's counters, for monitoring: atomic counts
// that the handshake path adds to without a lock or an allocation, and
// the snapshot Counters returns.

// Counters is a snapshot of what a Manager did since New. Every count
// only grows. A handshake is counted once, by what GetCertificate
// answered.
type Counters struct {
	HandshakesCertificate uint64 // a certificate the CA issued
	HandshakesFallback    uint64 // the self-signed fallback
	HandshakesChallenge   uint64 // a TLS-ALPN-01 validation: its token certificate, or none
	HandshakesRefused     uint64 // an error: a name the HostPolicy refuses, an invalid one, a full table

	// Attempts that ended, by what started them (handshake, provision,
	// renewal, renewal-info) and how they ended.
	Attempts map[Path]AttemptCounts

	Orders               uint64 // orders the CA made
	FailedAuthorizations uint64 // authorizations the CA failed, or certmgr took as failed (see the README's "Tested against"), seen while their attempt ran

	RenewalInfoAnswered    uint64 // polls of renewal information the CA answered usably
	RenewalInfoUnusable    uint64 // ... answered with something that cannot be used
	RenewalInfoUnreachable uint64 // ... that got no answer

	LockWaits uint64 // with a Coordinator: attempts that asked for their domain's cluster lock
}

// AttemptCounts counts the attempts of one Path by how they ended.
type AttemptCounts struct {
	Succeeded uint64 // with a certificate (obtained, renewed, or found in the Cache)
	Failed    uint64 // the CA failed or refused it
	Local     uint64 // failed for certmgr's own reasons (Close, DNS, backoff, the Cache, a lost lock)
}

// handshake answers, as indexes of counters.handshakes.
const (
	answerCertificate = iota
	answerFallback
	answerChallenge
	answerRefused
)

// paths are the Paths in the order of counters.attempts.
var paths = [...]Path{PathHandshake, PathProvision, PathRenewal, PathRenewalInfo}

// attempt results, as indexes of counters.attempts[path].
const (
	resultSucceeded = iota
	resultFailed
	resultLocal
)

// counters are a Manager's counts (see Counters).
type counters struct {
	handshakes  [4]atomic.Uint64
	attempts    [len(paths)][3]atomic.Uint64
	orders      atomic.Uint64
	failedAuthz atomic.Uint64
	polls       [3]atomic.Uint64 // answered, unusable, unreachable
	lockWaits   atomic.Uint64
}

// attempt counts an attempt of path that ended with result.
func (c *counters) attempt(path Path, result int) {
	for i, p := range paths {
		if p == path {
			c.attempts[i][result].Add(1)
			return
		}
	}
}

// Counters returns a snapshot of the Manager's counters.
func (m *Manager) Counters() Counters {
	c := &m.counts
	out := Counters{
		HandshakesCertificate:  c.handshakes[answerCertificate].Load(),
		HandshakesFallback:     c.handshakes[answerFallback].Load(),
		HandshakesChallenge:    c.handshakes[answerChallenge].Load(),
		HandshakesRefused:      c.handshakes[answerRefused].Load(),
		Attempts:               make(map[Path]AttemptCounts, len(paths)),
		Orders:                 c.orders.Load(),
		FailedAuthorizations:   c.failedAuthz.Load(),
		RenewalInfoAnswered:    c.polls[0].Load(),
		RenewalInfoUnusable:    c.polls[1].Load(),
		RenewalInfoUnreachable: c.polls[2].Load(),
		LockWaits:              c.lockWaits.Load(),
	}
	for i, p := range paths {
		out.Attempts[p] = AttemptCounts{
			Succeeded: c.attempts[i][resultSucceeded].Load(),
			Failed:    c.attempts[i][resultFailed].Load(),
			Local:     c.attempts[i][resultLocal].Load(),
		}
	}
	return out
}
