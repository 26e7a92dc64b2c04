// Command dnscheck tells whether domains are ready for a certificate: whether
// their A and AAAA records point only at the servers that will answer the
// CA's validation, and whether their CAA records let the CA issue.
//
// Usage:
//
//	dnscheck -known-ip 203.0.113.7 [-known-ip ...] [-resolver host:port ...]
//	         [-caa letsencrypt.org ...] [-timeout 2s] example.com [more names]
//
// For each name it lists the records it found, next to what is expected,
// and ends with READY or NOT READY and the reason. The verdict is
// certmgr.CheckDNS's, the same check a Manager makes before every ACME
// attempt. The resolvers are those given with -resolver or, by default,
// the nameservers of /etc/resolv.conf; they must resolve recursively.
//
// The exit status is 0 if every name is ready, 1 if one is not, and 2 if the
// command line is wrong.
package main

import (
	"bytes"
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/miekg/dns"

	"github.com/certmgr/certmgr"
)

func main() {
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
}

// checker holds the command's settings.
type checker struct {
	known     []netip.Addr
	resolvers []string // host:port
	caaIDs    []string
	timeout   time.Duration
}

func run(args []string, stdout, stderr io.Writer) int {
	var c checker
	fs := flag.NewFlagSet("dnscheck", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Func("known-ip", "an address the servers answer on (repeatable, required)", func(s string) error {
		a, err := netip.ParseAddr(s)
		if err != nil {
			return errors.New("not an IP address")
		}
		c.known = append(c.known, a.Unmap())
		return nil
	})
	fs.Func("resolver", "a recursive DNS server as host:port (repeatable; default: /etc/resolv.conf)", func(s string) error {
		// An address alone means port 53.
		host := strings.Trim(s, "[]")
		if _, err := netip.ParseAddr(host); err == nil {
			s = net.JoinHostPort(host, "53")
		}
		if _, _, err := net.SplitHostPort(s); err != nil {
			return errors.New("want host:port")
		}
		c.resolvers = append(c.resolvers, s)
		return nil
	})
	fs.Func("caa", "the CA's CAA identity, e.g. letsencrypt.org (repeatable; default: CAA not checked)", func(s string) error {
		c.caaIDs = append(c.caaIDs, s)
		return nil
	})
	fs.DurationVar(&c.timeout, "timeout", 2*time.Second, "timeout of each DNS query (certmgr's default, DNSCheck.Timeout)")
	fs.Usage = func() {
		fmt.Fprintln(stderr, "usage: dnscheck -known-ip IP [-known-ip IP ...] [-resolver host:port ...] [-caa identity ...] [-timeout 2s] domain [domain ...]")
		fs.PrintDefaults()
	}
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return 0
		}
		return 2
	}
	usage := func(msg string) int {
		fmt.Fprintln(stderr, "dnscheck:", msg)
		fs.Usage()
		return 2
	}
	switch {
	case fs.NArg() == 0:
		return usage("no domain given")
	case len(c.known) == 0:
		return usage("no -known-ip given")
	case c.timeout <= 0:
		return usage("-timeout must be positive")
	}
	for _, name := range fs.Args() {
		if _, err := netip.ParseAddr(name); err == nil {
			return usage(fmt.Sprintf("%q is an address, not a domain name", name))
		}
		if _, ok := dns.IsDomainName(name); !ok {
			return usage(fmt.Sprintf("%q is not a domain name", name))
		}
	}
	if len(c.resolvers) == 0 {
		conf, err := dns.ClientConfigFromFile("/etc/resolv.conf")
		if err != nil || len(conf.Servers) == 0 {
			fmt.Fprintln(stderr, "dnscheck: no resolver in /etc/resolv.conf; give -resolver")
			return 2
		}
		for _, s := range conf.Servers {
			c.resolvers = append(c.resolvers, net.JoinHostPort(s, conf.Port))
		}
	}

	ctx := context.Background()
	status := 0
	for i, name := range fs.Args() {
		if i > 0 {
			fmt.Fprintln(stdout)
		}
		if !c.report(ctx, stdout, name) {
			status = 1
		}
	}
	return status
}

// report prints what name's DNS holds and the verdict. It reports whether
// name is ready.
func (c *checker) report(ctx context.Context, out io.Writer, name string) bool {
	expectCAA := "not checked"
	if len(c.caaIDs) > 0 {
		expectCAA = "none, or allowing " + strings.Join(c.caaIDs, " or ")
	}
	fmt.Fprintln(out, strings.TrimSuffix(name, "."))
	known := make([]string, len(c.known))
	for i, a := range c.known {
		known[i] = a.String()
	}
	fmt.Fprintf(out, "  expected: A/AAAA only %s; CAA %s\n", strings.Join(known, ","), expectCAA)

	var table bytes.Buffer
	tw := tabwriter.NewWriter(&table, 0, 8, 2, ' ', 0)
	cnames := make(map[string]bool) // CNAME records listed already
	for _, qtype := range []uint16{dns.TypeA, dns.TypeAAAA} {
		c.listAddrs(ctx, tw, name, qtype, cnames)
	}
	c.listCAA(ctx, tw, name)
	tw.Flush()
	for line := range strings.Lines(table.String()) {
		fmt.Fprintln(out, strings.TrimRight(line, " \n"))
	}

	err := certmgr.CheckDNS(ctx, name, certmgr.DNSCheck{
		KnownIPs:      c.known,
		Resolvers:     c.resolvers,
		CAAIdentities: c.caaIDs,
		Timeout:       c.timeout,
	})
	if err != nil {
		fmt.Fprintf(out, "  NOT READY: %v\n", err)
		return false
	}
	fmt.Fprintln(out, "  READY")
	return true
}

// listAddrs prints name's records of qtype (A or AAAA), and the CNAME
// records leading to them that are not in cnames yet, each marked as known
// or not.
func (c *checker) listAddrs(ctx context.Context, tw io.Writer, name string, qtype uint16, cnames map[string]bool) {
	typ := dns.TypeToString[qtype]
	rrs, nxdomain, err := c.resolve(ctx, name, qtype)
	if err != nil {
		fmt.Fprintf(tw, "  %s\t%v\t\n", typ, err)
		return
	}
	n := 0
	for _, rr := range rrs {
		var ip netip.Addr
		switch rr := rr.(type) {
		case *dns.CNAME:
			if line := fmt.Sprintf("%s → %s", trim(rr.Hdr.Name), trim(rr.Target)); !cnames[line] {
				fmt.Fprintf(tw, "  CNAME\t%s\t\n", line)
				cnames[line] = true
			}
			continue
		case *dns.A:
			ip, _ = netip.AddrFromSlice(rr.A)
		case *dns.AAAA:
			ip, _ = netip.AddrFromSlice(rr.AAAA)
		default:
			continue
		}
		mark := "known"
		if !c.isKnown(ip) {
			mark = "NOT KNOWN"
		}
		fmt.Fprintf(tw, "  %s\t%s\t%s\n", typ, ip, mark)
		n++
	}
	switch {
	case n == 0 && nxdomain:
		fmt.Fprintf(tw, "  %s\t(none: no such name)\t\n", typ)
	case n == 0:
		fmt.Fprintf(tw, "  %s\t(none)\t\n", typ)
	}
}

func (c *checker) isKnown(ip netip.Addr) bool {
	for _, k := range c.known {
		if k == ip.Unmap() {
			return true
		}
	}
	return false
}

// listCAA prints the relevant CAA record set of name: the first one found
// on name or one of its parents, the root excluded.
func (c *checker) listCAA(ctx context.Context, tw io.Writer, name string) {
	for at := dns.Fqdn(name); at != ""; _, at, _ = strings.Cut(at, ".") {
		rrs, _, err := c.resolve(ctx, at, dns.TypeCAA)
		if err != nil {
			fmt.Fprintf(tw, "  CAA\t%v\t\n", err)
			return
		}
		var set []*dns.CAA
		for _, rr := range rrs {
			if caa, ok := rr.(*dns.CAA); ok {
				set = append(set, caa)
			}
		}
		if len(set) == 0 {
			continue
		}
		for _, caa := range set {
			fmt.Fprintf(tw, "  CAA\t%s: %d %s %q\t%s\n", trim(caa.Hdr.Name), caa.Flag, caa.Tag, caa.Value, c.caaMeaning(caa))
		}
		return
	}
	fmt.Fprintf(tw, "  CAA\t(none up to the top-level domain)\t\n")
}

// caaMeaning explains what one CAA record means for the CA.
func (c *checker) caaMeaning(caa *dns.CAA) string {
	switch strings.ToLower(caa.Tag) {
	case "issue":
		issuer, _, _ := strings.Cut(caa.Value, ";")
		issuer = strings.TrimSpace(issuer)
		if issuer == "" {
			return "forbids issuance unless another record allows it"
		}
		if len(c.caaIDs) == 0 {
			return "allows " + issuer
		}
		for _, id := range c.caaIDs {
			if strings.EqualFold(id, issuer) {
				return "allows " + issuer
			}
		}
		return "allows another CA: " + issuer
	case "issuewild":
		return "wildcards only: ignored"
	case "iodef":
		return "where CAs report: ignored"
	}
	if caa.Flag&128 != 0 {
		return "critical and unknown: forbids issuance"
	}
	return "unknown tag: ignored"
}

// resolve asks for name's records of qtype, following CNAME records (at
// most 8) when the resolver did not. The CNAME records come first. nxdomain
// reports that the name (or the end of its chain) does not exist.
func (c *checker) resolve(ctx context.Context, name string, qtype uint16) (rrs []dns.RR, nxdomain bool, err error) {
	var out []dns.RR
	name = dns.Fqdn(name)
	for range 8 {
		r, err := c.query(ctx, name, qtype)
		if err != nil {
			return nil, false, err
		}
		// Walk the chain the resolver gave, from name.
		next := name
		for changed := true; changed; {
			changed = false
			for _, rr := range r.Answer {
				if cn, ok := rr.(*dns.CNAME); ok && strings.EqualFold(cn.Hdr.Name, next) {
					out = append(out, cn)
					next, changed = dns.Fqdn(cn.Target), true
					break
				}
			}
			if len(out) > 8 {
				return nil, false, errors.New("CNAME chain too long")
			}
		}
		found := false
		for _, rr := range r.Answer {
			if h := rr.Header(); h.Rrtype == qtype && strings.EqualFold(h.Name, next) {
				out = append(out, rr)
				found = true
			}
		}
		if found || next == name || r.Rcode == dns.RcodeNameError {
			return out, r.Rcode == dns.RcodeNameError, nil
		}
		name = next // the chain goes on beyond this answer
	}
	return nil, false, errors.New("CNAME chain too long")
}

// query asks the resolvers in turn, over UDP and then TCP if the answer is
// truncated, and returns the first NOERROR or NXDOMAIN answer.
func (c *checker) query(ctx context.Context, name string, qtype uint16) (*dns.Msg, error) {
	m := new(dns.Msg)
	m.SetQuestion(name, qtype)
	m.SetEdns0(1232, false)
	var problems []string
	for _, addr := range c.resolvers {
		r, _, err := (&dns.Client{Net: "udp", Timeout: c.timeout}).ExchangeContext(ctx, m, addr)
		if err == nil && r.Truncated {
			r, _, err = (&dns.Client{Net: "tcp", Timeout: c.timeout}).ExchangeContext(ctx, m, addr)
		}
		switch {
		case err != nil:
			problems = append(problems, fmt.Sprintf("%s: %v", addr, err))
		case r.Rcode == dns.RcodeSuccess || r.Rcode == dns.RcodeNameError:
			return r, nil
		default:
			rcode, ok := dns.RcodeToString[r.Rcode]
			if !ok {
				rcode = "rcode " + strconv.Itoa(r.Rcode)
			}
			problems = append(problems, addr+": "+rcode)
		}
	}
	return nil, fmt.Errorf("lookup failed (%s)", strings.Join(problems, "; "))
}

// trim returns a DNS name without its trailing dot.
func trim(name string) string { return strings.TrimSuffix(name, ".") }
