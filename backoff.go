package certmgr

import "time"

// This file holds the Backoff schedule: how long a domain waits after
// consecutive failures. What it waits for is in its failure record
// (record.go).

// Backoff is a retry schedule: how long to wait after consecutive failures.
// The zero value is usable: it selects the schedule's documented default.
type Backoff struct {
	// Steps are the waits after the 1st, 2nd, 3rd, ... consecutive failure;
	// the last step repeats for every failure after that.
	// If empty, the default of the field that holds the Backoff is used.
	Steps []time.Duration

	// Jitter is the largest fraction of a wait added at random, so that
	// a fleet of servers does not retry in step. It only ever adds:
	// a wait is never shorter than its step.
	// If zero, 0.1 (up to 10% more). If negative, no jitter.
	Jitter float64
}

// defaultBackoff is the ACME retry schedule used when Config.Backoff is
// zero, after Let's Encrypt's integration guide: about a minute after the
// first failure, ten minutes after the second, 100 minutes after the third,
// then once a day.
var defaultBackoff = Backoff{
	Steps:  []time.Duration{time.Minute, 10 * time.Minute, 100 * time.Minute, 24 * time.Hour},
	Jitter: 0.1,
}

// defaultDNSRecheck is the DNS recheck schedule used when Config.DNSRecheck
// is zero: 30 seconds, growing to at most 10 minutes.
var defaultDNSRecheck = Backoff{
	Steps:  []time.Duration{30 * time.Second, time.Minute, 2 * time.Minute, 5 * time.Minute, 10 * time.Minute},
	Jitter: 0.1,
}

// withDefaults returns b with its zero fields taken from def.
func (b Backoff) withDefaults(def Backoff) Backoff {
	if len(b.Steps) == 0 {
		b.Steps = def.Steps
	}
	if b.Jitter == 0 {
		b.Jitter = def.Jitter
	}
	return b
}

// step returns the wait after the n-th consecutive failure (n >= 1),
// without jitter.
func (b Backoff) step(n int) time.Duration {
	if len(b.Steps) == 0 {
		return 0
	}
	n = min(max(n, 1), len(b.Steps))
	return b.Steps[n-1]
}

// longest returns the longest wait the schedule can ask for, jitter
// included.
func (b Backoff) longest() time.Duration {
	return b.delay(len(b.Steps), 1)
}

// delay returns the wait after the n-th consecutive failure, with jitter
// drawn from r in [0, 1).
func (b Backoff) delay(n int, r float64) time.Duration {
	d := b.step(n)
	if b.Jitter > 0 {
		d += time.Duration(float64(d) * b.Jitter * r)
	}
	return d
}
