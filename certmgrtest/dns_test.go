package certmgrtest

import (
	"errors"
	"net"
	"slices"
	"testing"
	"time"

	"github.com/miekg/dns"
)

// startDNS starts a DNSServer whose Close, called twice at the end of
// the test, must succeed both times.
func startDNS(t *testing.T) *DNSServer {
	t.Helper()
	s := StartDNS(t)
	t.Cleanup(func() {
		if err := s.Close(); err != nil {
			t.Errorf("first Close: %v", err)
		}
	})
	return s
}

func query(t *testing.T, network, addr, name string, qtype uint16) *dns.Msg {
	t.Helper()
	r, err := exchange(network, addr, name, qtype)
	if err != nil {
		t.Fatalf("%s %s %s: %v", network, name, dns.TypeToString[qtype], err)
	}
	return r
}

func exchange(network, addr, name string, qtype uint16) (*dns.Msg, error) {
	c := &dns.Client{Net: network, Timeout: 200 * time.Millisecond}
	m := new(dns.Msg)
	m.SetQuestion(dns.Fqdn(name), qtype)
	r, _, err := c.Exchange(m, addr)
	return r, err
}

// answers returns the answer section in presentation format without the
// header, e.g. "127.0.0.1" or "0 issue \"ca.test\"".
func answers(r *dns.Msg) []string {
	var out []string
	for _, rr := range r.Answer {
		h := rr.Header().String()
		out = append(out, rr.Header().Name+" "+rr.String()[len(h):])
	}
	return out
}

func wantAnswer(t *testing.T, r *dns.Msg, rcode int, rrs ...string) {
	t.Helper()
	if r.Rcode != rcode || !slices.Equal(answers(r), rrs) {
		t.Errorf("got %s %q; want %s %q", dns.RcodeToString[r.Rcode], answers(r), dns.RcodeToString[rcode], rrs)
	}
}

func TestAnswers(t *testing.T) {
	s := startDNS(t)
	s.SetA("Example.COM.", "127.0.0.1", "127.0.0.2")
	s.SetAAAA("example.com", "::1")
	s.SetCAA("example.com", CAA{Tag: "issue", Value: "ca.test"}, CAA{Flag: 128, Tag: "tbs", Value: "x"})
	s.SetCNAME("www.example.com", "example.com")
	s.SetCNAME("loop1.example.com", "loop2.example.com")
	s.SetCNAME("loop2.example.com", "loop1.example.com")
	s.SetCNAME("dangling.example.com", "elsewhere.test")
	s.SetTTL(5)

	for _, network := range []string{"udp", "tcp"} {
		a := s.Addr()
		wantAnswer(t, query(t, network, a, "example.com", dns.TypeA), dns.RcodeSuccess,
			"example.com. 127.0.0.1", "example.com. 127.0.0.2")
		wantAnswer(t, query(t, network, a, "EXAMPLE.com", dns.TypeAAAA), dns.RcodeSuccess, "example.com. ::1")
		wantAnswer(t, query(t, network, a, "example.com", dns.TypeCAA), dns.RcodeSuccess,
			`example.com. 0 issue "ca.test"`, `example.com. 128 tbs "x"`)
		wantAnswer(t, query(t, network, a, "www.example.com", dns.TypeAAAA), dns.RcodeSuccess,
			"www.example.com. example.com.", "example.com. ::1")
		wantAnswer(t, query(t, network, a, "www.example.com", dns.TypeCNAME), dns.RcodeSuccess,
			"www.example.com. example.com.")
		wantAnswer(t, query(t, network, a, "dangling.example.com", dns.TypeA), dns.RcodeSuccess,
			"dangling.example.com. elsewhere.test.")
		wantAnswer(t, query(t, network, a, "example.com", dns.TypeTXT), dns.RcodeSuccess) // NODATA
		wantAnswer(t, query(t, network, a, "missing.example.com", dns.TypeA), dns.RcodeNameError)
	}

	r := query(t, "udp", s.Addr(), "loop1.example.com", dns.TypeA)
	if len(r.Answer) != maxCNAMEHops {
		t.Errorf("CNAME loop: got %d records, want %d", len(r.Answer), maxCNAMEHops)
	}
	if ttl := r.Answer[0].Header().Ttl; ttl != 5 {
		t.Errorf("TTL = %d, want 5", ttl)
	}

	s.SetA("example.com")
	wantAnswer(t, query(t, "udp", s.Addr(), "example.com", dns.TypeA), dns.RcodeSuccess)
	s.Remove("example.com")
	wantAnswer(t, query(t, "udp", s.Addr(), "example.com", dns.TypeAAAA), dns.RcodeNameError)
}

func TestRcodeAndSilent(t *testing.T) {
	s := startDNS(t)
	s.SetA("example.com", "127.0.0.1")
	s.SetRcode("example.com", dns.RcodeServerFailure)
	s.SetRcode("gone.example.com", dns.RcodeNameError)
	s.SetA("quiet.example.com", "127.0.0.1")
	s.SetSilent("quiet.example.com", true)
	for _, addr := range []string{s.Addr(), s.VAAddr()} {
		wantAnswer(t, query(t, "tcp", addr, "example.com", dns.TypeA), dns.RcodeServerFailure)
		wantAnswer(t, query(t, "tcp", addr, "gone.example.com", dns.TypeA), dns.RcodeNameError)
		var ne net.Error
		if _, err := exchange("tcp", addr, "quiet.example.com", dns.TypeA); !errors.As(err, &ne) || !ne.Timeout() {
			t.Errorf("silent name: got %v, want a timeout", err)
		}
	}
	s.SetRcode("example.com", 0)
	s.SetSilent("quiet.example.com", false)
	wantAnswer(t, query(t, "udp", s.Addr(), "example.com", dns.TypeA), dns.RcodeSuccess, "example.com. 127.0.0.1")
	wantAnswer(t, query(t, "udp", s.Addr(), "quiet.example.com", dns.TypeA), dns.RcodeSuccess, "quiet.example.com. 127.0.0.1")
}

func TestTruncate(t *testing.T) {
	s := startDNS(t)
	s.SetA("example.com", "127.0.0.1")
	s.SetTruncate("example.com", true)
	r := query(t, "udp", s.Addr(), "example.com", dns.TypeA)
	if !r.Truncated || len(r.Answer) != 0 {
		t.Errorf("UDP: got TC=%v %q; want TC and no answers", r.Truncated, answers(r))
	}
	r = query(t, "tcp", s.Addr(), "example.com", dns.TypeA)
	wantAnswer(t, r, dns.RcodeSuccess, "example.com. 127.0.0.1")
	if r.Truncated {
		t.Error("TCP answer truncated")
	}
	if n := s.Queries("EXAMPLE.com.", dns.TypeA); n != 2 {
		t.Errorf("Queries = %d, want 2 (UDP+TCP)", n)
	}
}

func TestVAView(t *testing.T) {
	s := startDNS(t)
	s.SetA("example.com", "127.0.0.2", "192.0.2.1")
	s.SetAAAA("example.com", "2001:db8::1", "::1")
	s.SetCNAME("www.example.com", "example.com")
	wantAnswer(t, query(t, "tcp", s.VAAddr(), "example.com", dns.TypeA), dns.RcodeSuccess, "example.com. 127.0.0.2")
	wantAnswer(t, query(t, "tcp", s.VAAddr(), "example.com", dns.TypeAAAA), dns.RcodeSuccess, "example.com. ::1")
	wantAnswer(t, query(t, "tcp", s.VAAddr(), "www.example.com", dns.TypeAAAA), dns.RcodeSuccess,
		"www.example.com. example.com.", "example.com. ::1")
	s.SetAAAA("example.com", "2001:db8::1")
	wantAnswer(t, query(t, "tcp", s.VAAddr(), "example.com", dns.TypeAAAA), dns.RcodeSuccess)
	wantAnswer(t, query(t, "tcp", s.Addr(), "example.com", dns.TypeAAAA), dns.RcodeSuccess, "example.com. 2001:db8::1")

	if n := s.Queries("example.com", dns.TypeAAAA); n != 1 {
		t.Errorf("Queries(AAAA) = %d, want 1 (VA view not counted)", n)
	}
	s.ResetQueries()
	if n := s.Queries("example.com", dns.TypeAAAA); n != 0 {
		t.Errorf("after ResetQueries: Queries = %d", n)
	}
}
