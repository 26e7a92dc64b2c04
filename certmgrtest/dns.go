package certmgrtest

import (
	"fmt"
	"net"
	"net/netip"
	"sync"

	"github.com/miekg/dns"
)

// maxCNAMEHops bounds how many CNAME records an answer follows, so that a
// CNAME loop yields the chain so far instead of hanging.
const maxCNAMEHops = 10

// CAA is one CAA record (RFC 8659).
type CAA struct {
	Flag  uint8  // 128 is the issuer-critical flag
	Tag   string // "issue", "issuewild", "iodef", ...
	Value string // e.g. "letsencrypt.org" or ";"
}

// entry is everything programmed for one name.
type entry struct {
	a, aaaa  []netip.Addr
	cname    string // canonical target, "" if none
	caa      []CAA
	rcode    int
	silent   bool
	truncate bool
}

func (e *entry) hasRecords() bool {
	return len(e.a) > 0 || len(e.aaaa) > 0 || e.cname != "" || len(e.caa) > 0
}

func (e *entry) empty() bool {
	return !e.hasRecords() && e.rcode == 0 && !e.silent && !e.truncate
}

type queryKey struct {
	name  string
	qtype uint16
}

// DNSServer is an authoritative-style DNS server on loopback serving two
// views of one data set of records: the library view at Addr and the
// validation-authority view at VAAddr. See the package documentation.
type DNSServer struct {
	addr, vaAddr string
	servers      []*dns.Server
	wg           sync.WaitGroup // the servers' serving goroutines
	closeOnce    sync.Once

	zoneMu sync.Mutex // guards zone and ttl
	zone   map[string]*entry
	ttl    uint32

	queriesMu sync.Mutex // guards queries
	queries   map[queryKey]int
}

// NewDNSServer starts a DNSServer listening on 127.0.0.1 on ephemeral
// ports: UDP and TCP on the same port for the library view (Addr), and TCP
// on another port for the validation-authority view (VAAddr). The caller
// must Close it. Tests may use StartDNS instead.
func NewDNSServer() (*DNSServer, error) {
	s := &DNSServer{
		zone:    make(map[string]*entry),
		ttl:     60,
		queries: make(map[queryKey]int),
	}
	pc, ln, err := listenUDPTCP()
	if err != nil {
		return nil, err
	}
	vaLn, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		pc.Close()
		ln.Close()
		return nil, fmt.Errorf("certmgrtest: %w", err)
	}
	s.addr = ln.Addr().String()
	s.vaAddr = vaLn.Addr().String()

	lib := dns.HandlerFunc(func(w dns.ResponseWriter, r *dns.Msg) { s.serve(w, r, false) })
	va := dns.HandlerFunc(func(w dns.ResponseWriter, r *dns.Msg) { s.serve(w, r, true) })
	s.servers = []*dns.Server{
		{PacketConn: pc, Handler: lib},
		{Listener: ln, Handler: lib},
		{Listener: vaLn, Handler: va},
	}
	var startErr error
	for i, srv := range s.servers {
		started := make(chan struct{})
		done := make(chan error, 1)
		srv.NotifyStartedFunc = func() { close(started) }
		s.wg.Add(1)
		go func() {
			defer s.wg.Done()
			done <- srv.ActivateAndServe()
		}()
		select {
		case <-started:
			continue
		case err := <-done:
			startErr = fmt.Errorf("certmgrtest: %w", err)
		}
		// Close the listeners of the servers that were not started and
		// stop those that were.
		for _, later := range s.servers[i:] {
			if later.PacketConn != nil {
				later.PacketConn.Close()
			}
			if later.Listener != nil {
				later.Listener.Close()
			}
		}
		s.servers = s.servers[:i]
		s.Close()
		return nil, startErr
	}
	return s, nil
}

// listenUDPTCP listens on UDP and TCP on the same loopback port.
func listenUDPTCP() (net.PacketConn, net.Listener, error) {
	var err error
	for range 20 {
		var pc net.PacketConn
		pc, err = net.ListenPacket("udp", "127.0.0.1:0")
		if err != nil {
			break
		}
		var ln net.Listener
		ln, err = net.Listen("tcp", pc.LocalAddr().String())
		if err == nil {
			return pc, ln, nil
		}
		pc.Close() // the TCP port is taken: try another one
	}
	return nil, nil, fmt.Errorf("certmgrtest: %w", err)
}

// Addr returns the library view's address, "127.0.0.1:port", served over
// both UDP and TCP.
func (s *DNSServer) Addr() string { return s.addr }

// VAAddr returns the validation-authority view's address, "127.0.0.1:port",
// served over TCP only.
func (s *DNSServer) VAAddr() string { return s.vaAddr }

// Close stops both views and waits for the server goroutines to exit.
// Calling Close again does nothing and returns nil.
func (s *DNSServer) Close() error {
	var err error
	s.closeOnce.Do(func() {
		for _, srv := range s.servers {
			if e := srv.Shutdown(); e != nil && err == nil {
				err = fmt.Errorf("certmgrtest: %w", e)
			}
		}
		s.wg.Wait()
	})
	return err
}

// canonical returns name in lower case with a trailing dot.
func canonical(name string) string {
	return dns.CanonicalName(name)
}

// update applies f to name's entry, creating it if needed and forgetting it
// if f leaves it empty.
func (s *DNSServer) update(name string, f func(e *entry)) {
	name = canonical(name)
	s.zoneMu.Lock()
	defer s.zoneMu.Unlock()
	e := s.zone[name]
	if e == nil {
		e = new(entry)
		s.zone[name] = e
	}
	f(e)
	if e.empty() {
		delete(s.zone, name)
	}
}

func parseAddrs(kind string, addrs []string, is4 bool) []netip.Addr {
	var out []netip.Addr
	for _, a := range addrs {
		ip, err := netip.ParseAddr(a)
		if err != nil || ip.Is4() != is4 || ip.Zone() != "" {
			panic(fmt.Sprintf("certmgrtest: invalid %s address %q", kind, a))
		}
		out = append(out, ip)
	}
	return out
}

// SetA replaces name's A records with addrs, which must be IPv4 addresses
// (SetA panics otherwise). If addrs is empty, name's A records are removed.
func (s *DNSServer) SetA(name string, addrs ...string) {
	ips := parseAddrs("A", addrs, true)
	s.update(name, func(e *entry) { e.a = ips })
}

// SetAAAA replaces name's AAAA records with addrs, which must be IPv6
// addresses (SetAAAA panics otherwise). If addrs is empty, name's AAAA
// records are removed.
func (s *DNSServer) SetAAAA(name string, addrs ...string) {
	ips := parseAddrs("AAAA", addrs, false)
	s.update(name, func(e *entry) { e.aaaa = ips })
}

// SetCNAME makes name an alias of target. If target is empty, name's CNAME
// record is removed.
//
// A query for name of any type other than CNAME is answered with the CNAME
// record followed, as a recursive resolver would, by the target's answer if
// the target is in the data set. At most 10 CNAME records are followed.
// The rcode, silence and truncation settings of a target are not applied;
// only those of the queried name are.
func (s *DNSServer) SetCNAME(name, target string) {
	if target != "" {
		target = canonical(target)
	}
	s.update(name, func(e *entry) { e.cname = target })
}

// SetCAA replaces name's CAA records with records. If records is empty,
// name's CAA records are removed.
func (s *DNSServer) SetCAA(name string, records ...CAA) {
	records = append([]CAA(nil), records...)
	s.update(name, func(e *entry) { e.caa = records })
}

// SetRcode makes both views answer every query for name with rcode and no
// records, such as dns.RcodeNameError or dns.RcodeServerFailure. A zero
// rcode restores normal answers.
func (s *DNSServer) SetRcode(name string, rcode int) {
	s.update(name, func(e *entry) { e.rcode = rcode })
}

// SetSilent makes both views ignore queries for name when silent is true,
// so that clients time out, and answer them again when it is false.
func (s *DNSServer) SetSilent(name string, silent bool) {
	s.update(name, func(e *entry) { e.silent = silent })
}

// SetTruncate makes the library view answer UDP queries for name with the
// TC bit set and no records when on is true, so that a client must retry
// over TCP. TCP answers are unaffected.
func (s *DNSServer) SetTruncate(name string, on bool) {
	s.update(name, func(e *entry) { e.truncate = on })
}

// SetTTL sets the TTL of all answered records. The default is 60 seconds.
func (s *DNSServer) SetTTL(ttl uint32) {
	s.zoneMu.Lock()
	s.ttl = ttl
	s.zoneMu.Unlock()
}

// Remove forgets everything programmed for name. It does not reset the
// query counts.
func (s *DNSServer) Remove(name string) {
	name = canonical(name)
	s.zoneMu.Lock()
	delete(s.zone, name)
	s.zoneMu.Unlock()
}

// Queries reports how many queries for (name, qtype) the library view has
// received, over UDP and TCP, since NewDNSServer or the last ResetQueries.
// Queries to the validation-authority view are not counted.
func (s *DNSServer) Queries(name string, qtype uint16) int {
	s.queriesMu.Lock()
	defer s.queriesMu.Unlock()
	return s.queries[queryKey{canonical(name), qtype}]
}

// ResetQueries sets all query counts to zero.
func (s *DNSServer) ResetQueries() {
	s.queriesMu.Lock()
	clear(s.queries)
	s.queriesMu.Unlock()
}

// serve answers r on behalf of the library view, or of the
// validation-authority view if va is true.
func (s *DNSServer) serve(w dns.ResponseWriter, r *dns.Msg, va bool) {
	m := new(dns.Msg)
	if len(r.Question) != 1 || r.Opcode != dns.OpcodeQuery {
		m.SetRcode(r, dns.RcodeFormatError)
		w.WriteMsg(m)
		return
	}
	q := r.Question[0]
	name := canonical(q.Name)
	_, udp := w.RemoteAddr().(*net.UDPAddr)
	if !va {
		s.queriesMu.Lock()
		s.queries[queryKey{name, q.Qtype}]++
		s.queriesMu.Unlock()
	}

	m.SetReply(r)
	m.Authoritative = true
	if !s.answer(m, name, q.Qtype, va, udp) {
		return // silent
	}
	if udp {
		size := dns.MinMsgSize
		if opt := r.IsEdns0(); opt != nil {
			size = int(opt.UDPSize())
		}
		m.Truncate(size)
	}
	w.WriteMsg(m)
}

// answer fills m's rcode and answer section for (name, qtype). It reports
// false if the query must not be answered.
func (s *DNSServer) answer(m *dns.Msg, name string, qtype uint16, va, udp bool) bool {
	s.zoneMu.Lock()
	defer s.zoneMu.Unlock()
	e := s.zone[name]
	switch {
	case e == nil:
		m.Rcode = dns.RcodeNameError
		return true
	case e.silent:
		return false
	case e.rcode != 0:
		m.Rcode = e.rcode
		return true
	case e.truncate && udp && !va:
		m.Truncated = true
		return true
	case !e.hasRecords():
		m.Rcode = dns.RcodeNameError
		return true
	}
	hdr := func(owner string, t uint16) dns.RR_Header {
		return dns.RR_Header{Name: owner, Rrtype: t, Class: dns.ClassINET, Ttl: s.ttl}
	}
	for hops := 0; e != nil && e.cname != "" && qtype != dns.TypeCNAME; hops++ {
		if hops == maxCNAMEHops {
			return true
		}
		m.Answer = append(m.Answer, &dns.CNAME{Hdr: hdr(name, dns.TypeCNAME), Target: e.cname})
		name = e.cname
		e = s.zone[name]
	}
	if e == nil {
		return true // the target is not in the data set
	}
	switch qtype {
	case dns.TypeA:
		for _, ip := range e.a {
			if !va || ip.IsLoopback() {
				m.Answer = append(m.Answer, &dns.A{Hdr: hdr(name, qtype), A: ip.AsSlice()})
			}
		}
	case dns.TypeAAAA:
		for _, ip := range e.aaaa {
			if !va || ip.Unmap().IsLoopback() {
				m.Answer = append(m.Answer, &dns.AAAA{Hdr: hdr(name, qtype), AAAA: ip.AsSlice()})
			}
		}
	case dns.TypeCNAME:
		if e.cname != "" {
			m.Answer = append(m.Answer, &dns.CNAME{Hdr: hdr(name, qtype), Target: e.cname})
		}
	case dns.TypeCAA:
		for _, c := range e.caa {
			m.Answer = append(m.Answer, &dns.CAA{Hdr: hdr(name, qtype), Flag: c.Flag, Tag: c.Tag, Value: c.Value})
		}
	}
	return true
}
