package certmgr

import (
	"crypto/tls"
	"fmt"
	"testing"
	"time"

	"github.com/certmgr/certmgr/certmgrtest"
)

// TestFallbackStoreIsBounded: the store keeps at most its bound of
// certificates, dropping the oldest first; a name keeps its certificate
// while it is held and valid, and gets a new one once it expired.
func TestFallbackStoreIsBounded(t *testing.T) {
	clock := newFakeClock()
	s, err := newFallbackStore(3, clock.Now)
	if err != nil {
		t.Fatal(err)
	}
	get := func(name string) *tls.Certificate {
		t.Helper()
		c, err := s.get(name)
		if err != nil {
			t.Fatal(err)
		}
		return c
	}
	first := get("n0.test")
	if again := get("n0.test"); again != first {
		t.Error("a name got a second fallback while its first was held and valid")
	}
	for i := 1; i < 5; i++ {
		get(fmt.Sprintf("n%d.test", i))
	}
	if n := s.len(); n != 3 {
		t.Errorf("the store holds %d, want its bound 3", n)
	}
	if c := get("n4.test"); c.Leaf.Subject.CommonName != "n4.test" || c.Leaf.VerifyHostname("n4.test") != nil {
		t.Errorf("fallback for n4.test names %v", c.Leaf.DNSNames)
	}
	if again := get("n0.test"); again == first {
		t.Error("the oldest fallback was kept beyond the bound")
	}
	if n := s.len(); n != 3 {
		t.Errorf("the store holds %d, want 3", n)
	}
	c := get("n4.test")
	if !c.Leaf.NotAfter.Equal(clock.Now().Add(fallbackLifetime)) {
		t.Errorf("fallback valid until %v, want %v from now", c.Leaf.NotAfter, fallbackLifetime)
	}
	clock.Advance(fallbackLifetime)
	if again := get("n4.test"); again == c || !clock.Now().Before(again.Leaf.NotAfter) {
		t.Error("an expired fallback was served again")
	}
}

// TestIsFallback: certmgr's self-signed fallbacks, and nothing else.
func TestIsFallback(t *testing.T) {
	now := time.Now()
	s, err := newFallbackStore(1, time.Now)
	if err != nil {
		t.Fatal(err)
	}
	fb, err := s.get("a.test")
	if err != nil {
		t.Fatal(err)
	}
	if !IsFallback(fb) {
		t.Error("IsFallback(fallback) = false")
	}
	noLeaf := &tls.Certificate{Certificate: fb.Certificate, PrivateKey: fb.PrivateKey}
	other := selfSigned(t, "a.test", ecKey(t), "someone else", now.Add(-time.Hour), now.Add(time.Hour))
	lookalike := selfSigned(t, "a.test", ecKey(t), "certmgr fallback", now.Add(-time.Hour), now.Add(time.Hour))
	lookalike.Leaf.Issuer.CommonName = "another issuer"
	for name, c := range map[string]*tls.Certificate{"nil": nil, "no leaf": noLeaf, "another's": other, "issued by another": lookalike} {
		if IsFallback(c) {
			t.Errorf("IsFallback(%s) = true", name)
		}
	}
}

// TestHandshakeTimeoutDefault: a zero HandshakeTimeout is
// DefaultHandshakeTimeout, 10 s; another is kept. A handshake whose
// attempt outlives it gets the fallback while the attempt goes on (the
// CA holds the validation until the handshake returned), and the
// certificate once the attempt ended.
func TestHandshakeTimeoutDefault(t *testing.T) {
	t.Parallel()
	if DefaultHandshakeTimeout != 10*time.Second {
		t.Errorf("DefaultHandshakeTimeout = %v, want 10s", DefaultHandshakeTimeout)
	}
	if m := newPureManager(t, newFakeClock(), nil); m.timeout != DefaultHandshakeTimeout {
		t.Errorf("timeout %v, want the default", m.timeout)
	}
	const name = "slow.test"
	e := newEnv(t, envOptions{names: []string{name}})
	unhold := e.Proxy.AddRule(certmgrtest.Rule{Class: certmgrtest.ClassChallenge, Identifier: name, Hold: true})
	m := e.start(t, func(c *Config) { c.HandshakeTimeout = 200 * time.Millisecond })
	if m.timeout != 200*time.Millisecond {
		t.Errorf("timeout %v, want 200ms", m.timeout)
	}
	e.expectFallback(t, name)
	if st := m.Status(name); st.State != StateObtaining {
		t.Errorf("after the handshake: %v, want the attempt still obtaining", st.State)
	}
	// Release only what is held: the challenge may not have come yet.
	waitFor(t, 10*time.Second, "the CA to hold the challenge", func() bool { return e.Proxy.Requests(certmgrtest.ClassChallenge) >= 1 })
	unhold()
	e.Proxy.Release()
	waitFor(t, 10*time.Second, "the attempt to end", func() bool { return m.Status(name).State == StateValid })
	e.expectIssued(t, name)
}

// TestFallbacksAreBoundedByMaxFallbacks: a Manager's fallbacks for
// domains that back off stay within MaxFallbacks.
func TestFallbacksAreBoundedByMaxFallbacks(t *testing.T) {
	clock := newFakeClock()
	m := newPureManager(t, clock, func(c *Config) { c.MaxFallbacks = 2 })
	for i := range 5 {
		name := fmt.Sprintf("n%d.test", i)
		if _, err := m.domainFor(name); err != nil {
			t.Fatal(err)
		}
		if c, err := m.fallback(certKey{domain: name}); err != nil || !IsFallback(c) {
			t.Fatalf("fallback(%s) = %v, %v", name, c, err)
		}
	}
	if n := m.fallbacks.len(); n != 2 {
		t.Errorf("%d fallbacks kept, want MaxFallbacks 2", n)
	}
}
