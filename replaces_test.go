package certmgr

import (
	"crypto/rand"
	"crypto/rsa"
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/certmgr/certmgr/certmgrtest"
)

// TestProfileAskedForByEveryOrder: with Profile "shortlived" the order
// names it, the certificate served lives 160 hours, and the event says
// the profile; an RSA account key signs the rewritten order too, and a
// badNonce, after which acme.Client signs the order again, changes
// nothing.
func TestProfileAskedForByEveryOrder(t *testing.T) {
	t.Parallel()
	rsaKey, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name     string
		rsa      bool
		badNonce bool
	}{{"ecdsa.profile.test", false, false}, {"rsa.profile.test", true, false}, {"nonce.profile.test", false, true}} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			e := newEnv(t, envOptions{names: []string{tc.name}, pebble: certmgrtest.Options{Profiles: map[string]time.Duration{"shortlived": 160 * time.Hour}}})
			if tc.badNonce {
				e.Proxy.AddRule(certmgrtest.Rule{Class: certmgrtest.ClassNewOrder, Status: 400, ProblemType: "urn:ietf:params:acme:error:badNonce", Times: 1})
			}
			events := &eventLog{}
			e.start(t, func(c *Config) {
				c.Profile = "shortlived"
				c.OnEvent = events.add
				if tc.rsa {
					c.Autocert.Client.Key = rsaKey
				}
			})
			leaf := e.expectIssued(t, tc.name)
			if life := leaf.NotAfter.Sub(leaf.NotBefore); life < 159*time.Hour || life > 161*time.Hour {
				t.Errorf("the certificate lives %v, want 160 hours", life)
			}
			orders := e.Proxy.OrderRequests()
			if n := len(orders); n == 0 || orders[n-1].Profile != "shortlived" || (tc.badNonce && n != 2) {
				t.Errorf("orders %+v, want the profile named (and sent twice with a badNonce)", orders)
			}
			if ev := events.last(EventObtained); ev.Profile != "shortlived" {
				t.Errorf("event %+v, want the profile", ev)
			}
		})
	}
}

// TestUnknownProfileMakesNoOrder: a profile the CA's directory does not
// list makes no order and spends nothing; the error names the profiles
// it lists, and is logged once.
func TestUnknownProfileMakesNoOrder(t *testing.T) {
	t.Parallel()
	const name = "unknown.profile.test"
	e := newEnv(t, envOptions{names: []string{name}})
	m := e.start(t, func(c *Config) { c.Profile = "nosuch" })
	for range 2 {
		err := m.Provision(t.Context(), name)
		if !errors.Is(err, errProfile) || !strings.Contains(err.Error(), `"nosuch"`) || !strings.Contains(err.Error(), "default") {
			t.Errorf("Provision = %v, want errProfile naming the profile and those offered", err)
		}
	}
	if n := e.Proxy.Requests(certmgrtest.ClassNewOrder); n != 0 {
		t.Errorf("%d new-order requests, want none", n)
	}
	if f := failureOf(m, name); len(f.Spends) != 0 || f.Failures != 0 {
		t.Errorf("record %+v, want no failure and nothing spent", f)
	}
	if n := strings.Count(e.logs.String(), "profile not offered"); n != 1 {
		t.Errorf("%d log lines of the profile, want 1", n)
	}
}

// TestRenewalNamesTheCertificateItReplaces: a renewal the CA's renewal
// information asks for names the certificate it replaces (its RFC 9773
// identifier), and Pebble, which checks it against the account's
// certificates, accepts it; a CA that refuses replaces once (409
// alreadyReplaced) gets the order again without it, and the renewal
// still succeeds, with no failed authorization spent.
func TestRenewalNamesTheCertificateItReplaces(t *testing.T) {
	t.Parallel()
	for _, refused := range []bool{false, true} {
		t.Run(fmt.Sprintf("refused=%v", refused), func(t *testing.T) {
			t.Parallel()
			name := "replaces.test"
			if refused {
				name = "refused.replaces.test"
			}
			e, m, events := ariEnv(t, name)
			leaf := e.expectIssued(t, name)
			waitFor(t, 10*time.Second, "the first renewal schedule", func() bool { return events.count(EventRenewalScheduled) == 1 })
			waitFor(t, 5*time.Second, "a second after the issuance", func() bool { return time.Now().After(leaf.NotBefore.Add(2 * time.Second)) })
			if refused {
				e.Proxy.AddRule(certmgrtest.Rule{Class: certmgrtest.ClassNewOrder, Identifier: name, Status: 409,
					ProblemType: "urn:ietf:params:acme:error:alreadyReplaced", Times: 1})
			}
			now := time.Now()
			window := fmt.Sprintf(`{"suggestedWindow": {"start": %q, "end": %q}}`,
				now.Add(-2*time.Hour).Format(time.RFC3339), now.Add(-time.Hour).Format(time.RFC3339))
			if err := e.SetRenewalInfo(t.Context(), leaf, window); err != nil {
				t.Fatal(err)
			}
			waitFor(t, 20*time.Second, "the renewed certificate", func() bool {
				return m.Status(name).NotAfter.After(leaf.NotAfter) && events.count(EventRenewed) == 1
			})
			id, _ := certID(leaf)
			orders := e.Proxy.OrderRequests()
			want := []string{"", id}
			if refused {
				want = []string{"", id, ""}
			}
			var got []string
			for _, o := range orders {
				got = append(got, o.Replaces)
			}
			if strings.Join(got, ",") != strings.Join(want, ",") {
				t.Errorf("orders named the certificates %q, want %q", got, want)
			}
			ev := events.last(EventRenewed)
			if wantEv := map[bool]string{false: id, true: ""}[refused]; ev.Replaces != wantEv {
				t.Errorf("renewal event %+v, want Replaces %q", ev, wantEv)
			}
			if c := e.Proxy.Counts(name); c.FailedAuthzs != 0 {
				t.Errorf("%d failed authorizations, want none", c.FailedAuthzs)
			}
			if f := failureOf(m, name); len(f.Spends) != 0 {
				t.Errorf("spends %+v, want none", f.Spends)
			}
			if got := e.expectIssued(t, name); got.SerialNumber.Cmp(leaf.SerialNumber) == 0 {
				t.Error("the old certificate is still served")
			}
		})
	}
}
