package certmgrtest

// TB is the part of testing.TB that Start and StartDNS use. *testing.T,
// *testing.B and *testing.F satisfy it.
type TB interface {
	Helper()
	Fatal(args ...any)
	Cleanup(func())
}

// Start is NewServer for tests: it fails tb if the Server cannot start,
// and closes the Server, failing tb if that fails, in tb's cleanup.
func Start(tb TB, opts Options) *Server {
	tb.Helper()
	s, err := NewServer(opts)
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() {
		if err := s.Close(); err != nil {
			tb.Fatal(err)
		}
	})
	return s
}

// StartDNS is NewDNSServer for tests: it fails tb if the DNSServer cannot
// start, and closes the DNSServer, failing tb if that fails, in tb's
// cleanup.
func StartDNS(tb TB) *DNSServer {
	tb.Helper()
	s, err := NewDNSServer()
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() {
		if err := s.Close(); err != nil {
			tb.Fatal(err)
		}
	})
	return s
}
