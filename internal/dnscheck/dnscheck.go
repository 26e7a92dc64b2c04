// Package dnscheck is certmgr's DNS pre-check: whether a domain resolves
// only to the cluster's addresses, and whether its CAA records allow the
// CA. certmgr.CheckDNS wraps it, and a Manager runs it before every ACME
// attempt; certmgr.DNSCheck and certmgr.CheckDNS document the rules.
package dnscheck

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/miekg/dns"
	"golang.org/x/sync/singleflight"
)

// ErrNotReady reports that a domain's DNS does not point at the cluster
// (or a CAA record forbids the CA). certmgr exports it as ErrDNSNotReady.
var ErrNotReady = errors.New("certmgr: DNS not ready")

// Config is what a Checker checks. It has the fields of certmgr.DNSCheck,
// which documents them, so that one converts to the other.
type Config struct {
	KnownIPs      []netip.Addr  // the addresses the cluster serves on; not empty
	Resolvers     []string      // as host:port; if empty, those of /etc/resolv.conf
	CAAIdentities []string      // the CA's issuer domain names; if empty, CAA is not checked
	Timeout       time.Duration // of each query to each server; if zero, 2 seconds
}

// Options are a Checker's settings beyond its Config.
type Options struct {
	// MaxCache bounds how long query outcomes are cached: answers for the
	// smaller of their TTL and MaxCache, negative answers without an SOA
	// record and failed queries for MaxCache. If zero, nothing is cached.
	MaxCache time.Duration

	// Now is the checker's clock. If nil, time.Now.
	Now func() time.Time

	// Life ends the queries that callers share when there is a cache
	// (a Manager's Close). If nil, context.Background().
	Life context.Context

	// Methods, if not nil, returns the validation methods the client may
	// use, for CAA's validationmethods; Account, if not nil, returns the
	// client's account URI, for CAA's accounturi, or "" while unknown
	// (RFC 8657). When either is nil or unknown, any value passes.
	Methods func() []string
	Account func() string
}

const (
	// maxCNAMEChain bounds how many CNAME records a lookup follows.
	maxCNAMEChain = 8
	// maxCacheEntries bounds the number of answers a Checker caches.
	maxCacheEntries = 4096
	// defaultTimeout is the query timeout if Config.Timeout is zero.
	defaultTimeout = 2 * time.Second
	// ednsUDPSize is the UDP payload size advertised in queries, the
	// size recommended by DNS Flag Day 2020.
	ednsUDPSize = 1232
)

// notReadyError reports why a domain is not ready. It wraps ErrNotReady.
type notReadyError struct {
	domain string // without the trailing dot
	reason string
}

func (e *notReadyError) Error() string {
	return ErrNotReady.Error() + ": " + e.domain + ": " + e.reason
}

func (e *notReadyError) Unwrap() error { return ErrNotReady }

// answer is the outcome of one query that some server answered with
// NOERROR or NXDOMAIN.
type answer struct {
	rcode  int           // dns.RcodeSuccess or dns.RcodeNameError
	answer []dns.RR      // the answer section
	from   string        // the server that answered
	ttl    time.Duration // how long it may be cached; -1 if unknown
}

// cacheKey identifies a query.
type cacheKey struct {
	name  string // canonical, with the trailing dot
	qtype uint16
}

// cacheEntry is a cached query outcome: an answer, or the error of a
// query no server answered usably.
type cacheEntry struct {
	ans     *answer
	err     error
	added   time.Time
	expires time.Time
}

// Checker checks domains with a cache of query outcomes, so that checking
// a name often costs at most one query per name and record type per cache
// interval. It is safe for concurrent use.
type Checker struct {
	known     []netip.Addr // unmapped
	resolvers []string
	caaIDs    []string
	methods   func() []string // Options.Methods
	account   func() string   // Options.Account
	timeout   time.Duration
	maxCache  time.Duration // zero disables the cache
	now       func() time.Time
	life      context.Context // shared queries end with it (a Manager's Close)

	flight singleflight.Group // de-duplicates concurrent identical queries

	cacheMu sync.Mutex // guards cache; a leaf, held around no other lock or call
	cache   map[cacheKey]*cacheEntry
}

// New returns a checker for cfg with opts. It fails if cfg is invalid, or
// if cfg has no Resolvers and /etc/resolv.conf gives none.
func New(cfg Config, opts Options) (*Checker, error) {
	c := &Checker{
		resolvers: append([]string(nil), cfg.Resolvers...),
		caaIDs:    append([]string(nil), cfg.CAAIdentities...),
		methods:   opts.Methods,
		account:   opts.Account,
		timeout:   cfg.Timeout,
		maxCache:  opts.MaxCache,
		now:       opts.Now,
		life:      opts.Life,
		cache:     make(map[cacheKey]*cacheEntry),
	}
	if c.now == nil {
		c.now = time.Now
	}
	if c.life == nil {
		c.life = context.Background()
	}
	if c.timeout <= 0 {
		c.timeout = defaultTimeout
	}
	var err error // the last problem found
	for _, ip := range cfg.KnownIPs {
		if !ip.IsValid() {
			err = errors.New("certmgr: DNSCheck.KnownIPs holds an invalid address")
		}
		c.known = append(c.known, ip.Unmap())
	}
	if len(c.known) == 0 {
		err = errors.New("certmgr: DNSCheck.KnownIPs is empty")
	}
	for _, r := range c.resolvers {
		if _, _, e := net.SplitHostPort(r); e != nil {
			err = fmt.Errorf("certmgr: resolver %q is not host:port: %w", r, e)
		}
	}
	if err != nil {
		return nil, err
	}
	if len(c.resolvers) == 0 {
		conf, err := dns.ClientConfigFromFile("/etc/resolv.conf")
		switch {
		case err != nil:
			return nil, fmt.Errorf("certmgr: no DNS resolvers: %v", err)
		case len(conf.Servers) == 0:
			return nil, errors.New("certmgr: no DNS resolvers: no nameserver in /etc/resolv.conf")
		}
		for _, s := range conf.Servers {
			c.resolvers = append(c.resolvers, net.JoinHostPort(s, conf.Port))
		}
	}
	return c, nil
}

// Check reports whether domain is ready for an ACME certificate request,
// as certmgr.CheckDNS documents. domain must be normalised as certmgr
// normalises names: lower-case ASCII, without the trailing dot. Check
// returns nil if domain is ready; if it is not, or its DNS cannot be
// resolved, an error that wraps ErrNotReady and describes what was found;
// if ctx is done, another error, which wraps ctx's.
func (c *Checker) Check(ctx context.Context, domain string) error {
	name := domain + "."
	if err := ctx.Err(); err != nil {
		return c.failure(domain, err)
	}

	qtypes := [2]uint16{dns.TypeA, dns.TypeAAAA}
	var rrs [2][]dns.RR
	var errs [2]error
	var wg sync.WaitGroup
	for i, qtype := range qtypes {
		wg.Go(func() { rrs[i], errs[i] = c.resolve(ctx, name, qtype) })
	}
	wg.Wait()
	for _, err := range errs {
		if err != nil {
			return c.failure(domain, err)
		}
	}

	var foreign []string
	for i := range rrs {
		for _, rr := range rrs[i] {
			var ip netip.Addr
			switch rr := rr.(type) {
			case *dns.A:
				ip, _ = netip.AddrFromSlice(rr.A)
			case *dns.AAAA:
				ip, _ = netip.AddrFromSlice(rr.AAAA)
			}
			if ip = ip.Unmap(); !slices.Contains(c.known, ip) {
				foreign = append(foreign, dns.TypeToString[qtypes[i]]+" "+ip.String())
			}
		}
	}
	notReady := func(format string, args ...any) error {
		return &notReadyError{domain: domain, reason: fmt.Sprintf(format, args...)}
	}
	switch {
	case len(rrs[0]) == 0 && len(rrs[1]) == 0:
		return notReady("no A or AAAA record")
	case len(foreign) == 1:
		return notReady("%s is not a known IP (known: %s)", foreign[0], joinAddrs(c.known))
	case len(foreign) > 1:
		return notReady("%s are not known IPs (known: %s)", strings.Join(foreign, ", "), joinAddrs(c.known))
	}
	if len(c.caaIDs) == 0 {
		return nil
	}

	for at := name; at != ""; _, at, _ = strings.Cut(at, ".") {
		rrs, err := c.resolve(ctx, at, dns.TypeCAA)
		var le *lookupError
		switch {
		case errors.As(err, &le) && le.nxdomain:
			// No CAA record here: climb to the parent.
		case err != nil:
			return c.failure(domain, err)
		case len(rrs) > 0:
			return c.checkCAA(domain, strings.TrimSuffix(at, "."), rrs)
		}
	}
	return nil
}

// checkCAA reports whether rrs, the relevant CAA record set of domain found
// at the name at, authorise one of c.caaIDs.
func (c *Checker) checkCAA(domain, at string, rrs []dns.RR) error {
	notReady := func(format string, args ...any) error {
		return &notReadyError{domain: domain, reason: fmt.Sprintf(format, args...)}
	}
	var issue []string // the issue records, for the error message
	authorised := false
	for _, rr := range rrs {
		caa, ok := rr.(*dns.CAA)
		if !ok {
			continue
		}
		switch strings.ToLower(caa.Tag) {
		case "issue":
			issue = append(issue, fmt.Sprintf("issue %q", caa.Value))
			authorised = authorised || c.caaAuthorises(caa.Value)
		case "issuewild", "iodef":
			// issuewild only restricts wildcard names, which ACME
			// HTTP-01 and TLS-ALPN-01 challenges cannot validate.
		default:
			if caa.Flag&128 != 0 {
				return notReady("CAA at %s has a critical record with unknown tag %q", at, caa.Tag)
			}
		}
	}
	if len(issue) == 0 || authorised {
		return nil // RFC 8659: a set without issue records does not restrict issuance
	}
	return notReady("CAA at %s does not authorise any of %v (found %s)", at, c.caaIDs, strings.Join(issue, ", "))
}

// caaAuthorises reports whether the value of a CAA issue record authorises
// one of c.caaIDs for this client: its issuer is one of them and its
// parameters (RFC 8657) allow the client's account and one of its
// validation methods, as far as they are known.
func (c *Checker) caaAuthorises(value string) bool {
	issuer, params, _ := strings.Cut(value, ";")
	issuer = strings.TrimSpace(issuer)
	if issuer == "" || !slices.ContainsFunc(c.caaIDs, func(id string) bool { return strings.EqualFold(id, issuer) }) {
		return false
	}
	for p := range strings.SplitSeq(params, ";") {
		key, val, _ := strings.Cut(p, "=")
		key, val = strings.TrimSpace(key), strings.TrimSpace(val)
		switch strings.ToLower(key) {
		case "accounturi":
			if c.account != nil {
				if uri := c.account(); uri != "" && uri != val {
					return false
				}
			}
		case "validationmethods":
			if c.methods != nil && !slices.ContainsFunc(strings.Split(val, ","), func(m string) bool {
				return slices.Contains(c.methods(), strings.TrimSpace(m))
			}) {
				return false
			}
		}
	}
	return true
}

// lookupError reports a query for name and qtype that yielded no usable
// records: NXDOMAIN, a CNAME loop, or failures of every server.
type lookupError struct {
	name     string // canonical
	qtype    uint16
	problem  string // e.g. "SERVFAIL from 127.0.0.1:53"
	nxdomain bool
}

func (e *lookupError) Error() string { return e.problem }

// failure returns the error Check returns for err, a lookupError or the
// error of a done context.
func (c *Checker) failure(domain string, err error) error {
	var le *lookupError
	if !errors.As(err, &le) {
		return fmt.Errorf("certmgr: DNS check of %s: %w", domain, err)
	}
	what := dns.TypeToString[le.qtype] + " lookup"
	if name := strings.TrimSuffix(le.name, "."); name != domain {
		what += " of " + name
	}
	return &notReadyError{domain: domain, reason: what + ": " + le.problem}
}

// resolve returns name's records of type qtype, following CNAME records.
func (c *Checker) resolve(ctx context.Context, name string, qtype uint16) ([]dns.RR, error) {
	seen := map[string]bool{name: true}
	for {
		ans, err := c.query(ctx, name, qtype)
		if err != nil {
			return nil, err
		}
		end := name // the end of the CNAME chain in the answer
		for {
			target := ""
			for _, rr := range ans.answer {
				if cname, ok := rr.(*dns.CNAME); ok && dns.CanonicalName(cname.Hdr.Name) == end {
					target = dns.CanonicalName(cname.Target)
					break
				}
			}
			if target == "" {
				break
			}
			if seen[target] {
				return nil, &lookupError{name: name, qtype: qtype, problem: "CNAME loop at " + strings.TrimSuffix(target, ".")}
			}
			if len(seen) > maxCNAMEChain {
				return nil, &lookupError{name: name, qtype: qtype, problem: fmt.Sprintf("CNAME chain longer than %d", maxCNAMEChain)}
			}
			seen[target] = true
			end = target
		}
		if ans.rcode == dns.RcodeNameError {
			return nil, &lookupError{name: end, qtype: qtype, problem: "NXDOMAIN from " + ans.from, nxdomain: true}
		}
		var rrs []dns.RR
		for _, rr := range ans.answer {
			if h := rr.Header(); h.Rrtype == qtype && dns.CanonicalName(h.Name) == end {
				rrs = append(rrs, rr)
			}
		}
		if len(rrs) > 0 || end == name {
			return rrs, nil
		}
		name = end // the server did not follow the chain to its end
	}
}

// query returns the outcome of the query for name and qtype, from the cache
// or from the servers. Without a cache, it asks the servers with ctx.
// With one, concurrent identical queries share one exchange, which runs to
// completion even if the callers' contexts are done, so that its outcome is
// cached; it is bounded by the timeout and ends with c.life.
func (c *Checker) query(ctx context.Context, name string, qtype uint16) (*answer, error) {
	if c.maxCache <= 0 {
		return c.exchange(ctx, name, qtype)
	}
	key := cacheKey{name, qtype}
	if e := c.cached(key); e != nil {
		return e.ans, e.err
	}
	ch := c.flight.DoChan(strconv.Itoa(int(qtype))+" "+name, func() (any, error) {
		if e := c.cached(key); e != nil {
			return e, nil // stored since this caller looked
		}
		e := new(cacheEntry)
		e.ans, e.err = c.exchange(c.life, name, qtype)
		c.store(key, e)
		return e, nil
	})
	select {
	case <-ctx.Done():
		return nil, ctx.Err()
	case r := <-ch:
		e := r.Val.(*cacheEntry)
		return e.ans, e.err
	}
}

// exchange asks c.resolvers in turn for name and qtype, over UDP and then,
// if the answer is truncated, over TCP. It returns the first answer with
// rcode NOERROR or NXDOMAIN, or a lookupError listing every server's
// failure.
func (c *Checker) exchange(ctx context.Context, name string, qtype uint16) (*answer, error) {
	m := new(dns.Msg)
	m.SetQuestion(name, qtype)
	m.SetEdns0(ednsUDPSize, false)
	var problems []string
	for _, addr := range c.resolvers {
		r, err := c.exchangeWith(ctx, "udp", addr, m)
		if err == nil && r.Truncated {
			r, err = c.exchangeWith(ctx, "tcp", addr, m)
		}
		switch {
		case err != nil:
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				problems = append(problems, "query to "+addr+" timed out")
			} else {
				problems = append(problems, fmt.Sprintf("query to %s failed: %v", addr, err))
			}
		case r.Rcode == dns.RcodeSuccess || r.Rcode == dns.RcodeNameError:
			return &answer{rcode: r.Rcode, answer: r.Answer, from: addr, ttl: answerTTL(r)}, nil
		default:
			rcode, ok := dns.RcodeToString[r.Rcode]
			if !ok {
				rcode = "rcode " + strconv.Itoa(r.Rcode)
			}
			problems = append(problems, rcode+" from "+addr)
		}
	}
	return nil, &lookupError{name: name, qtype: qtype, problem: strings.Join(problems, "; ")}
}

func (c *Checker) exchangeWith(ctx context.Context, network, addr string, m *dns.Msg) (*dns.Msg, error) {
	client := &dns.Client{Net: network, Timeout: c.timeout}
	conn, err := client.DialContext(ctx, addr)
	if err != nil {
		return nil, err
	}
	defer conn.Close()
	// miekg/dns obeys only ctx's deadline; closing the connection makes it
	// obey cancellation too.
	stop := context.AfterFunc(ctx, func() { conn.Close() })
	defer stop()
	r, _, err := client.ExchangeWithConnContext(ctx, m, conn)
	if err != nil && ctx.Err() != nil {
		return nil, ctx.Err()
	}
	return r, err
}

// answerTTL returns how long r may be cached: the smallest TTL of its
// answer records or, for a negative answer, the negative caching TTL of its
// SOA record (RFC 2308). It returns -1 if r holds neither.
func answerTTL(r *dns.Msg) time.Duration {
	ttl := int64(-1)
	for _, rr := range r.Answer {
		if t := int64(rr.Header().Ttl); ttl < 0 || t < ttl {
			ttl = t
		}
	}
	if len(r.Answer) == 0 {
		for _, rr := range r.Ns {
			if soa, ok := rr.(*dns.SOA); ok {
				ttl = int64(min(soa.Hdr.Ttl, soa.Minttl))
			}
		}
	}
	if ttl < 0 {
		return -1
	}
	return time.Duration(ttl) * time.Second
}

// cached returns the unexpired cache entry for key, or nil.
func (c *Checker) cached(key cacheKey) *cacheEntry {
	c.cacheMu.Lock()
	defer c.cacheMu.Unlock()
	// An entry added "in the future" is stale: the clock went back.
	if e := c.cache[key]; e != nil && !c.now().Before(e.added) && c.now().Before(e.expires) {
		return e
	}
	return nil
}

// store caches e for key, for the smaller of its answer's TTL and
// c.maxCache. When the cache is full it evicts the expired entries or, if
// there are none, the oldest one.
func (c *Checker) store(key cacheKey, e *cacheEntry) {
	lifetime := c.maxCache
	if e.ans != nil && e.ans.ttl >= 0 {
		lifetime = min(lifetime, e.ans.ttl)
	}
	if lifetime <= 0 {
		return
	}
	c.cacheMu.Lock()
	defer c.cacheMu.Unlock()
	now := c.now()
	e.added, e.expires = now, now.Add(lifetime)
	if _, ok := c.cache[key]; !ok && len(c.cache) >= maxCacheEntries {
		var oldest cacheKey
		for k, old := range c.cache {
			if !now.Before(old.expires) {
				delete(c.cache, k)
			} else if c.cache[oldest] == nil || old.added.Before(c.cache[oldest].added) {
				oldest = k
			}
		}
		if len(c.cache) >= maxCacheEntries {
			delete(c.cache, oldest)
		}
	}
	c.cache[key] = e
}

func joinAddrs(addrs []netip.Addr) string {
	s := make([]string, len(addrs))
	for i, a := range addrs {
		s[i] = a.String()
	}
	return strings.Join(s, ", ")
}

// Forget drops the cached answers for name and the names it climbs to for
// CAA, so that the next Check asks again.
func (c *Checker) Forget(name string) {
	name = dns.Fqdn(strings.ToLower(name))
	c.cacheMu.Lock()
	defer c.cacheMu.Unlock()
	for k := range c.cache {
		if dns.IsSubDomain(k.name, name) {
			delete(c.cache, k)
		}
	}
}
