// Package certmgr makes automatic HTTPS certificates from
// golang.org/x/crypto/acme/autocert safe to run in production.
//
// # The doom loop it prevents
//
// A server whose hand-built tls.Config lacks acme.ALPNProto ("acme-tls/1")
// fails every TLS-ALPN-01 validation at the handshake. autocert then opens
// another order for http-01, so one attempt spends two of the five failed
// authorizations Let's Encrypt allows per domain per hour. autocert forgets
// a failure after a minute, keeps nothing across restarts, and starts a new
// ACME flow on every handshake for a domain without a certificate, blocking
// that handshake for up to five minutes: with steady traffic the rate limit
// is spent within minutes and the domain stays locked out. Nothing checks
// DNS first, and nothing logs a success.
//
// certmgr wraps autocert and fixes each link of that chain:
//
//   - TLSConfig always negotiates acme.ALPNProto for validations;
//   - a per-domain failure cache allows one attempt in flight per domain,
//     backs off exponentially (1 min, 10 min, 100 min, then daily), keeps
//     within a budget of failed authorizations per hour, obeys the CA's
//     Retry-After, gates autocert's own renewals the same way, and is
//     persisted in the autocert.Cache so that it survives restarts;
//   - a DNS pre-check refuses to start an attempt until the domain's A,
//     AAAA and CAA records say the CA can validate it;
//   - a handshake waits at most HandshakeTimeout (10 s) and then gets a
//     self-signed fallback certificate, at once while the domain backs off;
//   - every outcome is one structured log line (log/slog) and an Event, and
//     Status and Domains tell an operator what state each domain is in and
//     when its next attempt will be.
//
// # Use
//
// Where a server built a tls.Config, it asks the Manager for one:
//
//	m, err := certmgr.New(certmgr.Config{
//		Autocert: &autocert.Manager{
//			Cache:      autocert.DirCache("/var/lib/certmgr"),
//			HostPolicy: autocert.HostWhitelist("example.com"),
//			Email:      "ops@example.com",
//		},
//		DNS: certmgr.DNSCheck{KnownIPs: []netip.Addr{netip.MustParseAddr("203.0.113.7")}},
//	})
//	if err != nil {
//		log.Fatal(err)
//	}
//	defer m.Close()
//	go http.ListenAndServe(":80", m.HTTPHandler(nil))
//	srv := &http.Server{Addr: ":443", TLSConfig: m.TLSConfig()}
//	log.Fatal(srv.ListenAndServeTLS("", ""))
//
// A server that builds its own tls.Config around GetCertificate must add
// acme.ALPNProto to NextProtos itself.
//
// # Replicas
//
// Replicas whose Cache is a Coordinator (such as the one of the module
// github.com/certmgr/certmgr/etcdcache) take a lock per domain around
// every attempt, so that one of them orders and the others find the
// certificate in the store, share one failure record per domain (backoff,
// the CA's Retry-After and the failed-authorization budget), and serve
// each other's certificates as soon as the store reports them.
//
// # Renewal
//
// When the CA's directory offers renewalInfo (ACME Renewal Information,
// RFC 9773), certmgr polls it for every certificate it serves and renews
// at a time picked in the window the CA suggests, through an attempt like
// any other (schedule, budget, DNS pre-check and, with a Coordinator, the
// lock): a certificate the CA revokes is replaced after the next poll.
// autocert's own timer (RenewBefore) renews too, whichever comes first.
//
// # Reading the code: one handshake
//
// A handshake for a name without a certificate crosses six files, through
// direct calls and two small interfaces that *Manager implements
// (acmeOwner for the ACME transport, cacheOwner for the Cache wrapper):
//
//  1. handshake.go: GetCertificate answers from memory with answerNow (a
//     valid certificate, or the fallback at once while the domain waits);
//     otherwise it normalises the name (normalize, names.go) and asks
//     hostPolicy.
//  2. attempt.go: obtain finds the domain (domainFor, domains.go), reads
//     the Cache once (load), and joins or starts the domain's attempt
//     (begin, which asks checkAttemptLocked in domains.go). The attempt's
//     goroutine, run, makes the DNS pre-check (dnsChecked), takes the
//     domain's cluster lock with a Coordinator (lockDomain, cluster.go),
//     and asks autocert (fetch).
//  3. autocert.go: domainAutocert gives the domain's autocert.Manager,
//     made by newAutocert with the account key (accountKey, account.go);
//     its GetCertificate runs the ACME flow.
//  4. acme.go: every ACME request goes through acmeObserver.RoundTrip,
//     which asks before a new order and reports what the CA answered.
//  5. admit.go: admitOrder admits the order and reserves its
//     authorization in the budget (saveState, persist.go, stores it
//     before the order goes out); observed settles the reservation and
//     tells the attempt what the CA said.
//  6. cache.go: autocert writes the certificate through certCache.Put,
//     which calls certStored (handshake.go): serve makes it the one
//     handshakes get.
//
// Back in attempt.go, finish records the outcome: one change to the
// domain's failure record (and the cluster's, storeRecord in cluster.go),
// saveState, and the event (emit, events.go); then it wakes the
// handshakes that wait.
//
// # Tests
//
// Package certmgrtest runs Let's Encrypt's test CA and a DNS server in
// process, on loopback, for a user's own tests.
package certmgr
