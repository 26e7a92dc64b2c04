package certmgr

import (
	"errors"
	"testing"
	"time"
)

// TestCountersCountWhatHappened: a certificate obtained by a handshake,
// a name whose validation fails by Provision, a handshake refused: the
// counters say so, the CA's validations among the handshakes.
func TestCountersCountWhatHappened(t *testing.T) {
	t.Parallel()
	const good, bad = "good.test", "bad.test"
	e := newEnv(t, envOptions{names: []string{good, bad}})
	e.DNS.SetA(bad, "127.0.0.3") // nothing listens there
	m := e.start(t, nil)
	e.expectIssued(t, good)
	var ae *AttemptError
	if err := m.Provision(t.Context(), bad); !errors.As(err, &ae) {
		t.Fatalf("Provision(%s) = %v, want the CA's failure", bad, err)
	}
	e.expectFallback(t, bad)
	if _, err := e.dial(t, "refused.test", insecure); err == nil {
		t.Error("a handshake for a name the HostPolicy refuses succeeded")
	}
	waitFor(t, 10*time.Second, "the renewal information of the certificate", func() bool { return m.Counters().RenewalInfoAnswered == 1 })
	c := m.Counters()
	if c.HandshakesCertificate != 1 || c.HandshakesFallback != 1 || c.HandshakesRefused != 1 || c.HandshakesChallenge < 1 {
		t.Errorf("handshakes: %d certificate, %d fallback, %d refused, %d challenge; want 1, 1, 1 and the CA's validations",
			c.HandshakesCertificate, c.HandshakesFallback, c.HandshakesRefused, c.HandshakesChallenge)
	}
	if c.Orders != 2 || c.FailedAuthorizations != 1 || c.LockWaits != 0 {
		t.Errorf("%d orders, %d failed authorizations, %d lock waits; want 2, 1 and 0", c.Orders, c.FailedAuthorizations, c.LockWaits)
	}
	if a := c.Attempts[PathHandshake]; a != (AttemptCounts{Succeeded: 1}) {
		t.Errorf("handshake attempts %+v, want 1 succeeded", a)
	}
	if a := c.Attempts[PathProvision]; a != (AttemptCounts{Failed: 1}) {
		t.Errorf("Provision attempts %+v, want 1 failed", a)
	}
	if len(c.Attempts) != 4 {
		t.Errorf("attempts of %d paths, want all 4", len(c.Attempts))
	}
}
