package certmgr

import (
	"context"
	"net/netip"
	"time"

	"github.com/certmgr/certmgr/internal/dnscheck"
)

// The check itself is in internal/dnscheck, whose Config has the fields
// of DNSCheck.

// DNSCheck configures CheckDNS.
type DNSCheck struct {
	// KnownIPs lists the addresses the cluster serves on. The domain must
	// have at least one A or AAAA record, and every one of them must be in
	// KnownIPs; IPv4-mapped IPv6 addresses compare equal to their IPv4
	// form. KnownIPs must not be empty.
	KnownIPs []netip.Addr

	// Resolvers lists the DNS servers to ask, as "host:port", in order.
	// A query that times out, fails or is answered with an rcode other
	// than NOERROR or NXDOMAIN (such as SERVFAIL) is retried with the next
	// server. The servers must resolve recursively.
	// If empty, the nameservers of /etc/resolv.conf are used, on port 53.
	Resolvers []string

	// CAAIdentities lists the issuer domain names of the CA, as they
	// appear in CAA "issue" records, such as "letsencrypt.org". The
	// domain's CAA records (RFC 8659) must authorise one of them.
	// If empty, CAA records are not checked.
	CAAIdentities []string

	// Timeout bounds each query to each server.
	// If zero, 2 seconds.
	Timeout time.Duration
}

// CheckDNS reports whether domain is ready for an ACME certificate request:
// whether it resolves only to opts.KnownIPs, and whether its CAA records
// allow the CA.
//
// A and AAAA records are looked up concurrently, following CNAME records
// for at most 8 steps. When opts.CAAIdentities is not empty, the relevant
// CAA record set is the first non-empty one found on domain and then on
// each of its parents up to, and including, the top-level domain; the root
// is not asked. Issuance is allowed if there is no relevant set, if the set
// holds no "issue" record, or if an "issue" record names one of
// opts.CAAIdentities; it is refused if the set holds a record with the
// critical flag and a tag other than issue, issuewild and iodef.
//
// CheckDNS returns nil if domain is ready. If it is not, or its DNS cannot
// be resolved, the error wraps ErrDNSNotReady and describes what was found.
// Invalid arguments and an unusable /etc/resolv.conf yield other errors, as
// does ctx being done, whose error is then wrapped.
func CheckDNS(ctx context.Context, domain string, opts DNSCheck) error {
	c, err := dnscheck.New(dnscheck.Config(opts), dnscheck.Options{Now: time.Now})
	if err != nil {
		return err
	}
	return checkDNS(ctx, c, domain)
}

// checkDNS checks domain with c, once normalised.
func checkDNS(ctx context.Context, c *dnscheck.Checker, domain string) error {
	domain, err := normalize(domain)
	if err != nil {
		return err
	}
	return c.Check(ctx, domain)
}
