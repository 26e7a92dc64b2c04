// Package certmgrtest runs a complete ACME CA for tests, in process and on
// loopback only, in the manner of net/http/httptest: Pebble's CA, VA and
// WFE (github.com/letsencrypt/pebble/v2), a counting, fault-injecting HTTPS
// proxy in front of the WFE, a loopback DNS server that is the VA's only
// resolver, and the listeners the VA sends its challenges to. It needs no
// binary, no files and no network.
//
// Typical use, with golang.org/x/crypto/acme/autocert:
//
//	srv := certmgrtest.Start(t, certmgrtest.Options{}) // or NewServer and Close
//	m := srv.Autocert("a.test")                        // a.test resolves to 127.0.0.1 in srv.DNS
//	srv.ServeTLS(m.TLSConfig(), nil)                   // TLS-ALPN-01 and the site
//	cs, err := srv.Handshake(ctx, "a.test")            // issues, then verifies against srv.Roots
//	c := srv.Proxy.Counts("a.test")                    // 1 order, 1 authz, 1 challenge response
//
// The Manager that Autocert returns is a template: it may be used as it is,
// or handed to code that builds its own autocert.Managers from it.
//
// # What the VA does
//
// For a challenge on name N, Pebble's VA asks Server.DNS (its VAAddr view,
// over TCP) for AAAA and then A records of N and connects to the first
// address found: TLS-ALPN-01 at the port of TLSListener, HTTP-01 at the
// port of HTTPListener (never 443 or 80). It validates from three
// connections at once. The VA view drops A and AAAA records outside
// 127.0.0.0/8 and ::1, so the VA cannot reach off the machine. Without
// Options.IPv6 nothing listens on ::1, so a test must not give N an AAAA
// record ::1 unless it wants the challenge to fail. For HTTP-01 the VA
// sends "Host: N:port"; autocert's HTTPHandler passes that to the
// HostPolicy, and HostWhitelist rejects it, so ServePlain removes the port
// as a real port-80 request would have none. The VA follows HTTP-01
// redirects, resolving names through Server.DNS, but dials an IP literal
// (in a redirect, or an IP identifier) as it is: tests must use only
// loopback addresses there.
//
// # Pebble's behaviour as configured here
//
//   - The VA does not sleep before validating (PEBBLE_VA_NOSLEEP=1) and the
//     WFE never rejects a good nonce (PEBBLE_WFE_NONCEREJECT=0).
//   - A valid authorization is always reused for a later order of the same
//     account and identifier within its lifetime of one hour
//     (PEBBLE_AUTHZREUSE=100), so such an order needs no challenge. A test
//     that wants a fresh one uses another account, deactivates the
//     authorization (acme.Client.RevokeAuthorization) or calls
//     Proxy.ExpireAuthorizations.
//   - There is one certificate profile ("default"), with validity
//     Options.CertValidity; the CA's keys are ECDSA P-256, chain root ->
//     intermediate -> leaf; Server.Roots holds the root.
//   - Pebble does no CAA checking at all: the identities in
//     Options.CAAIdentities only appear in the directory's meta.
//
// These environment variables are set in the process (they are read when
// the WFE and VA are made) and stay set. NewServer refuses to start if
// PEBBLE_VA_ALWAYS_VALID is set, since that would skip validation.
//
// # The proxy
//
// Server.DirectoryURL is the proxy's; all URLs Pebble returns point at the
// proxy too, so every ACME request passes it. See Proxy for counters, Rule
// for fault injection and Proxy.WaitFor for waiting on them. By default
// the proxy holds its answer to a challenge acceptance until the VA has
// decided and its answer to a finalize until the certificate is issued, so
// that x/crypto/acme sees the result on its first poll instead of after
// its default one-second poll interval; an issuance by autocert then takes
// about 50 ms (with -race) rather than 1.05 s (Options.NoSettle turns this
// off). Note that x/crypto/acme retries answers with status 429 or 5xx
// (and badNonce errors) until its context ends, unless Client.RetryBackoff
// returns 0; tests injecting such answers usually set it.
//
// # The DNS server
//
// A DNSServer holds one data set of records that tests program per name,
// and answers from it through two views:
//
//   - the library view, at Addr over UDP and TCP, answers exactly as
//     programmed; it is the resolver the code under test is pointed at;
//   - the validation-authority view, at VAAddr over TCP only, answers the
//     same except that A and AAAA records outside 127.0.0.0/8 and ::1 are
//     dropped; it is the VA's resolver.
//
// Names are compared case-insensitively and may be given with or without
// the trailing dot. The server never forwards queries anywhere. A
// DNSServer of its own, from NewDNSServer or StartDNS, serves tests of DNS
// checks that need no CA.
//
// # Cleaning up
//
// Close stops the proxy, the listeners, the servers started by ServeTLS
// and ServePlain, and the DNS server, and waits for the goroutines serving
// them. Pebble's VA keeps a goroutine per Server (va.processTasks) that
// cannot be stopped, and validations in progress finish on their own;
// goroutine leak checks must ignore goroutines in Pebble's packages.
//
// # Replicas on one store
//
// CoordinatorConformance checks any implementation of certmgr's
// Coordinator, the interface through which replicas on one shared store
// coordinate, against its contract. MemoryStore is such a store in
// memory, with replicas that can be lost or cut off and a history that
// can be compacted, for tests of code that coordinates replicas; the
// etcd implementation is in the module
// github.com/certmgr/certmgr/etcdcache.
//
// # Test helpers
//
// Start and StartDNS are NewServer and NewDNSServer for tests: they fail
// the test if the server cannot start and close it when the test ends.
// They take a TB, which *testing.T, *testing.B and *testing.F satisfy, so
// that this package does not import package testing.
package certmgrtest
