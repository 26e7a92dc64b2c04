package certmgr

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"log/slog"
	mathrand "math/rand/v2"
	"net"
	"net/http"
	"net/netip"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/crypto/acme"
	"golang.org/x/crypto/acme/autocert"
	"golang.org/x/sync/singleflight"
)

// Errors that callers branch on with errors.Is. Each error certmgr returns
// for one of these reasons wraps the sentinel together with the detail.
var (
	// ErrHostNotAllowed reports that the HostPolicy refused the name.
	ErrHostNotAllowed = errors.New("certmgr: host not allowed")
	// ErrBackoff reports that the domain's next ACME attempt is not yet due.
	ErrBackoff = errors.New("certmgr: backing off")
	// ErrDNSNotReady reports that the domain's DNS does not point at the
	// cluster (or a CAA record forbids the CA).
	ErrDNSNotReady = errors.New("certmgr: DNS not ready")
)

// Config configures a Manager. Only Autocert is required; every other
// field has a usable zero value.
type Config struct {
	// Autocert holds the ACME settings (required). Its Cache, HostPolicy,
	// Client, Email, RenewBefore, Prompt, ExtraExtensions and
	// ExternalAccountBinding are used as they are. certmgr reads them once,
	// in New, and never changes the Manager: it runs autocert.Managers of
	// its own built from them, so do not use Autocert's own
	// GetCertificate, TLSConfig or HTTPHandler next to certmgr's.
	//
	// If Autocert.Client is nil, certmgr's client talks to
	// autocert.DefaultACMEDirectory. If its RetryBackoff is nil, certmgr
	// sets one that surfaces a 429 at once and retries only short faults.
	Autocert *autocert.Manager

	// Logger receives certmgr's structured logs. If nil, slog.Default() is used.
	Logger *slog.Logger

	// OnEvent, if not nil, is called with every event certmgr logs, in
	// order, synchronously, from the goroutine where it happened (a
	// handshake, a Provision, an attempt or a renewal) and with none of
	// certmgr's locks held: it may call Status, Domains and Retry. It must
	// not block for long. Problems New finds reading the Cache are
	// reported while New runs, before there is a Manager to call. A Cache
	// error met inside autocert's own call to the Cache is reported from
	// there, where autocert may hold locks of its own: OnEvent must not
	// call HTTPHandler.
	OnEvent func(Event)

	// HandshakeTimeout is how long a handshake waits for a certificate
	// before it gets a self-signed fallback; the attempt goes on in the
	// background. If zero, DefaultHandshakeTimeout (10 s).
	HandshakeTimeout time.Duration

	// Backoff is the schedule of ACME attempts after consecutive failures.
	// If zero, after Let's Encrypt's integration guide: 1 minute after the
	// first failure, 10 minutes after the second, 100 minutes after the
	// third, then once a day, each with up to 10% jitter added. The CA's
	// Retry-After always wins over it.
	Backoff Backoff

	// AuthzBudget is the most failed authorizations an attempt may risk
	// per domain in any rolling hour; an attempt counts one per challenge
	// type autocert may try (two when HTTPHandler is in use). If zero, 4:
	// one less than Let's Encrypt's limit of 5, so the operator keeps one.
	AuthzBudget int

	// KnownIPs are the addresses the cluster serves on. Before every ACME
	// attempt, the domain's A and AAAA records must all be among them. If
	// empty, DNS is not checked.
	KnownIPs []netip.Addr

	// Resolvers are the DNS servers ("host:port") the pre-check asks. If
	// empty, the nameservers of /etc/resolv.conf.
	Resolvers []string

	// CAAIdentities are the CA's identities in CAA records. If empty,
	// "letsencrypt.org" when the directory is Let's Encrypt's; otherwise
	// CAA is not checked.
	CAAIdentities []string

	// DNSRecheck is the schedule of DNS rechecks after a failed pre-check.
	// If zero, 30 s, 1 min, 2 min, 5 min, then every 10 min, each with up
	// to 10% jitter added.
	DNSRecheck Backoff

	// MaxDomains bounds how many domains certmgr tracks at once. Domains
	// with a certificate, an attempt in flight, or a backoff, Retry-After,
	// DNS recheck or spent authorization still running are kept; the
	// oldest of the others make room. If zero, 10,000.
	MaxDomains int

	// MaxFallbacks bounds how many fallback certificates are kept. If
	// zero, 1,024.
	MaxFallbacks int

	nowFunc         func() time.Time // the clock; if nil, time.Now
	randFunc        func() float64   // jitter source in [0, 1); if nil, math/rand/v2
	cacheRetry      time.Duration    // how often failed cache writes are retried; if zero, 30 s
	dnsTimeout      time.Duration    // per DNS query; if zero, CheckDNS's default
	dnsCheckTimeout time.Duration    // one whole pre-check; if zero, 15 s
	maxInFlight     int              // concurrent attempts; if zero, 64
	renewalMaxAge   time.Duration    // a renewal with no outcome after this failed; if zero, 15 min
	requestTimeout  time.Duration    // bounds one ACME request; if zero, 30 s
}

// Manager obtains, renews and serves certificates through autocert, with
// backoff, a DNS pre-check, a handshake timeout and status reporting. Create
// one with New; its methods are safe for concurrent use.
type Manager struct {
	cfg       Config // defaults applied
	log       *slog.Logger
	onEvent   func(Event)
	now       func() time.Time
	rand      func() float64
	timeout   time.Duration
	cache     *certCache
	client    *acme.Client // the user's client settings, for newAutocert
	obs       *acmeObserver
	dns       *dnsChecker // nil when KnownIPs is empty
	fallbacks *fallbackStore
	base      *autocert.Manager // answers challenges for names with no autocert.Manager of their own
	acmeTLS   *tls.Config       // the config of TLS-ALPN-01 validation handshakes
	loads     singleflight.Group

	accountMu sync.Mutex    // guards key
	key       crypto.Signer // the ACME account key, once known

	servedMu sync.RWMutex
	served   map[certKey]*tls.Certificate // valid certificates, by name and key type

	stateMu   sync.Mutex
	domains   map[string]*domain
	queue     []string // domain names, oldest first: where room is made
	inFlight  int      // attempts running in goroutines
	http01    bool     // HTTPHandler was called
	persistMu sync.Mutex

	ctx    context.Context // ends at Close
	cancel context.CancelFunc
	wg     sync.WaitGroup // attempts and the cache retry loop
	closed atomic.Bool
	once   sync.Once

	refusedOrders atomic.Int64 // orders refused locally (a test hook)
}

// domain is what certmgr knows of one normalised name. Its fields are
// guarded by Manager.stateMu.
type domain struct {
	name      string
	fail      failureRecord
	lastErr   error             // the last failure, as returned (not persisted)
	attempt   *attempt          // in flight, or nil
	am        *autocert.Manager // this domain's autocert; nil until needed
	loading   int               // loads reading the cache through am: no order may start
	loadedAt  [2]time.Time      // when the cache was last read for the ECDSA [0] and RSA [1] key
	notAfter  time.Time         // expiry of the newest certificate served
	lifetime  time.Duration     // of the newest certificate served
	renewed   time.Time         // when a renewal last succeeded in this process
	dnsErr    error             // the failed pre-check, nil when it passed
	dnsFails  int               // consecutive failed pre-checks
	dnsNext   time.Time         // next pre-check
	localNext time.Time         // no attempt before this: the Cache could not be read
	logged    bool              // a fallback was logged since the last change
}

// attempt is one ACME attempt for a domain: started by a handshake or
// Provision (a goroutine runs it) or by autocert's renewal timer (seen
// only through the ACME traffic).
type attempt struct {
	key   certKey // the certificate sought; zero for a renewal
	path  string
	start time.Time
	done  chan struct{} // closed when cert and err are set

	cert *tls.Certificate
	err  error

	// What the CA said, from the traffic; guarded by Manager.stateMu.
	orders      int
	authzFailed int
	problem     string
	challenge   string
	rateLimited bool
	retryAfter  time.Time
}

// New returns a Manager for cfg. It reads the persisted failure cache, so
// that Status reports every domain's state at once; it starts no ACME
// request.
func New(cfg Config) (*Manager, error) {
	if cfg.Autocert == nil {
		return nil, errors.New("certmgr: Config.Autocert is nil; it is required")
	}
	if cfg.HandshakeTimeout < 0 || cfg.AuthzBudget < 0 || cfg.MaxDomains < 0 || cfg.MaxFallbacks < 0 {
		return nil, errors.New("certmgr: negative HandshakeTimeout, AuthzBudget, MaxDomains or MaxFallbacks")
	}
	if cfg.AuthzBudget == 1 {
		// An attempt may fail two authorizations (tls-alpn-01, then http-01).
		return nil, errors.New("certmgr: AuthzBudget must be at least 2, the most one attempt can spend")
	}
	for _, r := range cfg.Resolvers {
		if _, _, err := net.SplitHostPort(r); err != nil {
			return nil, fmt.Errorf("certmgr: resolver %q is not host:port: %w", r, err)
		}
	}
	m := &Manager{
		cfg:     cfg,
		log:     cfg.Logger,
		onEvent: cfg.OnEvent,
		now:     cfg.nowFunc,
		rand:    cfg.randFunc,
		timeout: cfg.HandshakeTimeout,
		served:  make(map[certKey]*tls.Certificate),
		domains: make(map[string]*domain),
	}
	if m.log == nil {
		m.log = slog.Default()
	}
	if m.now == nil {
		m.now = time.Now
	}
	if m.rand == nil {
		m.rand = mathrand.Float64
	}
	if m.timeout == 0 {
		m.timeout = DefaultHandshakeTimeout
	}
	m.cfg.Backoff = cfg.Backoff.withDefaults(defaultBackoff)
	m.cfg.DNSRecheck = cfg.DNSRecheck.withDefaults(defaultDNSRecheck)
	m.cfg.AuthzBudget = cmpOr(cfg.AuthzBudget, 4)
	m.cfg.MaxDomains = cmpOr(cfg.MaxDomains, 10000)
	m.cfg.MaxFallbacks = cmpOr(cfg.MaxFallbacks, 1024)
	m.cfg.cacheRetry = cmpOr(cfg.cacheRetry, 30*time.Second)
	m.cfg.maxInFlight = cmpOr(cfg.maxInFlight, 64)
	m.cfg.renewalMaxAge = cmpOr(cfg.renewalMaxAge, 15*time.Minute)
	m.cfg.requestTimeout = cmpOr(cfg.requestTimeout, 30*time.Second)
	m.cfg.dnsCheckTimeout = cmpOr(cfg.dnsCheckTimeout, 15*time.Second)

	fb, err := newFallbackStore(m.cfg.MaxFallbacks, m.now)
	if err != nil {
		return nil, fmt.Errorf("certmgr: fallback key: %w", err)
	}
	m.fallbacks = fb
	m.ctx, m.cancel = context.WithCancel(context.Background())
	m.cache = newCertCache(cfg.Autocert.Cache)
	m.cache.onPut = m.certStored
	m.cache.onError = func(op, key string, err error) {
		if m.closed.Load() {
			return // autocert's renewal timers outlive Close; they are not news
		}
		ev := Event{Kind: EventCacheError, Time: m.now(), Err: fmt.Errorf("certmgr: cache %s %q: %w", op, key, err)}
		if isCertKey(key) {
			ev.Domain = certKeyOf(key).domain
		}
		m.emit(ev)
	}

	user := cfg.Autocert.Client
	if user == nil {
		user = &acme.Client{DirectoryURL: autocert.DefaultACMEDirectory}
	}
	var next http.RoundTripper
	if user.HTTPClient != nil {
		next = user.HTTPClient.Transport
	}
	m.obs = newACMEObserver(next)
	m.obs.life = m.ctx
	m.obs.timeout = m.cfg.requestTimeout
	m.obs.admit = m.admitOrder
	m.obs.report = m.observed
	m.obs.closed = m.closed.Load
	m.client = &acme.Client{ // a template: see newAutocert
		Key:          user.Key,
		HTTPClient:   user.HTTPClient,
		DirectoryURL: cmpOr(user.DirectoryURL, autocert.DefaultACMEDirectory),
		RetryBackoff: user.RetryBackoff,
		UserAgent:    cmpOr(user.UserAgent, "certmgr"),
		KID:          user.KID,
	}
	if m.client.RetryBackoff == nil {
		m.client.RetryBackoff = retryBackoff
	}

	if len(cfg.KnownIPs) > 0 {
		caa := cfg.CAAIdentities
		if len(caa) == 0 && isLetsEncrypt(m.client.DirectoryURL) {
			caa = []string{"letsencrypt.org"}
		}
		opts := DNSCheck{KnownIPs: cfg.KnownIPs, Resolvers: cfg.Resolvers, CAAIdentities: caa, Timeout: cfg.dnsTimeout}
		m.dns = newDNSChecker(opts, m.cfg.DNSRecheck.step(1), m.now)
		if m.dns.err != nil {
			m.cancel()
			return nil, m.dns.err
		}
		m.dns.life = m.ctx
	}
	m.base = m.newAutocert(nil)
	m.acmeTLS = &tls.Config{
		GetCertificate: m.GetCertificate,
		MinVersion:     tls.VersionTLS12,
		NextProtos:     []string{acme.ALPNProto},
	}

	// The domains a previous Manager knew, with their failure records and
	// the expiry of their cached certificates, so that Status is right
	// from here on. The certificates are loaded (and autocert's renewal
	// timers started) at first use, as autocert does.
	ctx, cancel := context.WithTimeout(m.ctx, cacheTimeout)
	for name, f := range m.loadState(ctx) {
		if err := m.hostPolicy(ctx, name); err != nil {
			continue
		}
		d, err := m.domainFor(name)
		if err != nil {
			continue
		}
		d.fail = f
		for _, rsa := range []bool{false, true} {
			k := certKey{domain: name, rsa: rsa}
			if data, err := m.cache.Get(ctx, k.cacheKey()); err == nil {
				if c, err := parseCert(k, data, m.now()); err == nil {
					d.notAfter = maxTime(d.notAfter, c.Leaf.NotAfter)
				}
			}
		}
	}
	cancel()

	m.wg.Add(1)
	go func() {
		defer m.wg.Done()
		m.cache.retryLoop(m.ctx, m.cfg.cacheRetry)
	}()
	return m, nil
}

func cmpOr[T comparable](v, def T) T {
	var zero T
	if v == zero {
		return def
	}
	return v
}

// isLetsEncrypt reports whether dir is one of Let's Encrypt's directories.
func isLetsEncrypt(dir string) bool {
	return strings.Contains(dir, ".api.letsencrypt.org/")
}

// newAutocert returns an autocert.Manager with the user's settings that
// writes through certmgr's cache and talks to the CA with account key
// through certmgr's observer. Each gets a client of its own whose
// requests carry the Manager, so that the observer refuses orders from
// one that is no longer its domain's (its renewal timers cannot be
// stopped).
func (m *Manager) newAutocert(key crypto.Signer) *autocert.Manager {
	u := m.cfg.Autocert
	am := &autocert.Manager{
		Prompt:                 u.Prompt,
		Cache:                  m.cache,
		HostPolicy:             u.HostPolicy,
		RenewBefore:            u.RenewBefore,
		Email:                  u.Email,
		ExtraExtensions:        u.ExtraExtensions,
		ExternalAccountBinding: u.ExternalAccountBinding,
	}
	httpClient := &http.Client{Transport: senderTransport{am: am, next: m.obs}}
	if t := m.client.HTTPClient; t != nil {
		httpClient.Timeout = t.Timeout
		httpClient.CheckRedirect = t.CheckRedirect
		httpClient.Jar = t.Jar
	}
	am.Client = &acme.Client{
		Key:          key,
		HTTPClient:   httpClient,
		DirectoryURL: m.client.DirectoryURL,
		RetryBackoff: m.client.RetryBackoff,
		UserAgent:    m.client.UserAgent,
		KID:          m.client.KID,
	}
	if am.Prompt == nil {
		am.Prompt = autocert.AcceptTOS
	}
	if m.http01 {
		am.HTTPHandler(nil) // let autocert try http-01 too
	}
	return am
}

// Close stops certmgr's background work: attempts in flight end (their
// ACME requests are refused from now on) and Close waits for their
// goroutines. Certificates already obtained are still served. Close is
// idempotent and returns nil.
//
// autocert's renewal timers cannot be stopped; after Close, a renewal that
// fires makes no ACME request.
func (m *Manager) Close() error {
	m.once.Do(func() {
		m.stateMu.Lock() // begin adds to m.wg under it: none after this
		m.closed.Store(true)
		m.stateMu.Unlock()
		m.cancel()
		m.wg.Wait()
		// A last try at the writes that failed: what was obtained must
		// not be lost at a graceful restart.
		ctx, cancel := context.WithTimeout(context.Background(), cacheTimeout)
		m.cache.flush(ctx)
		cancel()
	})
	return nil
}

// hostPolicy runs the user's HostPolicy, if any.
func (m *Manager) hostPolicy(ctx context.Context, name string) error {
	if p := m.cfg.Autocert.HostPolicy; p != nil {
		if err := p(ctx, name); err != nil {
			return fmt.Errorf("%w: %s: %w", ErrHostNotAllowed, name, err)
		}
	}
	return nil
}

// GetCertificate implements tls.Config.GetCertificate. It returns:
//   - for a TLS-ALPN-01 validation hello (acme.ALPNProto its only
//     protocol), autocert's answer, with no other check;
//   - for a name the HostPolicy refuses, an error wrapping ErrHostNotAllowed;
//   - a valid certificate from memory or the Cache, if there is one;
//   - otherwise the certificate of an ACME attempt, if one ends within
//     HandshakeTimeout, and else a self-signed fallback certificate:
//     at once while the domain backs off or waits for DNS.
//
// A domain certmgr already holds a certificate for, or already backs off
// for, is answered from memory without asking the HostPolicy again: the
// policy was asked when the domain was first seen.
//
// Anyone who builds their own tls.Config with this GetCertificate,
// instead of using TLSConfig, must add acme.ALPNProto to its NextProtos,
// or every TLS-ALPN-01 validation fails at the handshake.
func (m *Manager) GetCertificate(hello *tls.ClientHelloInfo) (*tls.Certificate, error) {
	if wantsTokenCert(hello) {
		return m.tokenCert(hello)
	}
	k := certKey{domain: hello.ServerName, rsa: !supportsECDSA(hello)}
	if c := m.servedCert(k); c != nil {
		return c, nil
	}
	if c := m.waitingFallback(k); c != nil {
		return c, nil
	}
	name, err := normalize(hello.ServerName)
	if err != nil {
		return nil, err
	}
	if k.domain != name {
		k.domain = name
		if c := m.servedCert(k); c != nil {
			return c, nil
		}
		if c := m.waitingFallback(k); c != nil {
			return c, nil
		}
	}
	parent := hello.Context()
	if parent == nil {
		parent = context.Background()
	}
	ctx, cancel := context.WithTimeout(parent, m.timeout)
	defer cancel()
	if err := m.hostPolicy(ctx, name); err != nil {
		return nil, err
	}
	cert, err := m.obtain(ctx, k, PathHandshake)
	if err == nil {
		return cert, nil
	}
	return m.fallback(k)
}

// waitingFallback returns, at once and without allocating, the fallback
// for a known domain that can start no attempt now (it backs off or waits
// for DNS), or nil. A name that is not a domain's (normalised) name, or
// whose Cache was not read yet, takes the full path.
func (m *Manager) waitingFallback(k certKey) *tls.Certificate {
	now := m.now()
	m.stateMu.Lock()
	d := m.domains[k.domain]
	waiting := d != nil && m.loadedLocked(d, k, now) && d.attempt == nil && m.waitingLocked(d, now)
	m.stateMu.Unlock()
	if !waiting {
		return nil
	}
	c, _ := m.fallback(k)
	return c
}

// loadedLocked reports whether the Cache was read for k lately: a domain
// that waits re-reads it every cacheRetry, so that a certificate another
// process (or an operator) put there is found. m.stateMu must be held.
func (m *Manager) loadedLocked(d *domain, k certKey, now time.Time) bool {
	at := d.loadedAt[b2i(k.rsa)]
	return !at.IsZero() && !now.Before(at) && now.Sub(at) < m.cfg.cacheRetry
}

// servedInstead returns, for a client that asked for the ECDSA
// certificate, the valid RSA one if there is one: every client takes it,
// and it beats a fallback.
func (m *Manager) servedInstead(k certKey) *tls.Certificate {
	if k.rsa {
		return nil
	}
	return m.servedCert(certKey{domain: k.domain, rsa: true})
}

// fallback returns the certificate for a handshake that cannot have k's:
// the valid RSA one if k is ECDSA and there is one, else the fallback,
// logged once per change of the domain's state.
func (m *Manager) fallback(k certKey) (*tls.Certificate, error) {
	if c := m.servedInstead(k); c != nil {
		return c, nil
	}
	name := k.domain
	m.stateMu.Lock()
	d := m.domains[name]
	first := d != nil && !d.logged
	if first {
		d.logged = true
	}
	m.stateMu.Unlock()
	if first {
		m.emit(Event{Kind: EventFallback, Time: m.now(), Domain: name})
	}
	return m.fallbacks.get(name)
}

// tokenCert answers a TLS-ALPN-01 validation hello.
func (m *Manager) tokenCert(hello *tls.ClientHelloInfo) (*tls.Certificate, error) {
	am := m.base
	if name, err := normalize(hello.ServerName); err == nil {
		am = m.autocertOf(name)
	}
	c, err := am.GetCertificate(hello)
	if err != nil {
		return nil, fmt.Errorf("certmgr: TLS-ALPN-01 validation of %q: %w", hello.ServerName, err)
	}
	return c, nil
}

// autocertOf returns the autocert.Manager of name, or the base one.
func (m *Manager) autocertOf(name string) *autocert.Manager {
	m.stateMu.Lock()
	defer m.stateMu.Unlock()
	if d := m.domains[name]; d != nil && d.am != nil {
		return d.am
	}
	return m.base
}

// HTTPHandler returns a handler that answers ACME http-01 challenges and
// passes every other request to fallback; it must serve port 80. If
// fallback is nil, the handler redirects GET and HEAD to https and
// refuses other methods, as autocert's does. Calling HTTPHandler lets
// attempts use http-01 after tls-alpn-01, as autocert does; every attempt
// then risks two failed authorizations instead of one.
func (m *Manager) HTTPHandler(fallback http.Handler) http.Handler {
	m.stateMu.Lock()
	m.http01 = true
	for _, d := range m.domains {
		if d.am != nil {
			d.am.HTTPHandler(nil)
		}
	}
	m.stateMu.Unlock()
	base := m.base.HTTPHandler(fallback)
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if !strings.HasPrefix(r.URL.Path, "/.well-known/acme-challenge/") {
			base.ServeHTTP(w, r)
			return
		}
		// A validation on another port than 80 carries it in Host; the
		// HostPolicy is asked about the name alone.
		host := r.Host
		if h, _, err := net.SplitHostPort(host); err == nil {
			host = h
		}
		name, err := normalize(host)
		if err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		r = r.Clone(r.Context())
		r.Host = name
		m.autocertOf(name).HTTPHandler(fallback).ServeHTTP(w, r)
	})
}

// servedCert returns the valid certificate held for k, or nil.
func (m *Manager) servedCert(k certKey) *tls.Certificate {
	m.servedMu.RLock()
	c := m.served[k]
	m.servedMu.RUnlock()
	if c != nil && m.now().Before(c.Leaf.NotAfter) {
		return c
	}
	return nil
}

// serve makes c the certificate served for k, unless one issued later is.
func (m *Manager) serve(k certKey, c *tls.Certificate) {
	m.servedMu.Lock()
	old := m.served[k]
	newer := old == nil || !c.Leaf.NotBefore.Before(old.Leaf.NotBefore) // the later issued, whatever its lifetime
	if newer {
		m.served[k] = c
	}
	m.servedMu.Unlock()
	if newer {
		m.stateMu.Lock()
		if d := m.domains[k.domain]; d != nil {
			d.notAfter = maxTime(d.notAfter, c.Leaf.NotAfter)
			d.lifetime = c.Leaf.NotAfter.Sub(c.Leaf.NotBefore)
		}
		m.stateMu.Unlock()
	}
}

// obtain returns a certificate for k: from the cache, or from an ACME
// attempt (started now, or already in flight). It waits for the attempt
// until ctx ends; the attempt goes on without it.
func (m *Manager) obtain(ctx context.Context, k certKey, path string) (*tls.Certificate, error) {
	d, err := m.domainFor(k.domain)
	if err != nil {
		return nil, err
	}
	if c, err := m.load(ctx, d, k); c != nil || err != nil {
		return c, err
	}
	// An attempt in flight may be for the other key type (or a renewal):
	// once it ends, look again, and start one for k if it is still needed.
	for range 2 {
		a, err := m.begin(d, k, path)
		if err != nil {
			return nil, err
		}
		select {
		case <-a.done:
		case <-ctx.Done():
			return nil, ctx.Err()
		}
		if a.err != nil {
			return nil, a.err
		}
		if a.key == k {
			return a.cert, nil
		}
		if c := m.servedCert(k); c != nil {
			return c, nil
		}
	}
	return nil, fmt.Errorf("certmgr: %s: no certificate for this key type yet", k.domain)
}

// domainFor returns the domain of name, creating it if needed. When
// MaxDomains are tracked, it makes room by dropping the oldest idle
// domain (see idleLocked), and fails when there is none among the first
// few.
func (m *Manager) domainFor(name string) (*domain, error) {
	m.stateMu.Lock()
	defer m.stateMu.Unlock()
	if d := m.domains[name]; d != nil {
		return d, nil
	}
	if len(m.domains) >= m.cfg.MaxDomains && !m.makeRoomLocked() {
		return nil, fmt.Errorf("certmgr: tracking %d domains already; %s not added", len(m.domains), name)
	}
	d := &domain{name: name}
	m.domains[name] = d
	m.queue = append(m.queue, name)
	return d, nil
}

// makeRoomLocked drops one idle domain, looking at a few of the oldest.
// Those it keeps go to the back of the queue.
func (m *Manager) makeRoomLocked() bool {
	now := m.now()
	for range 16 {
		if len(m.queue) == 0 {
			return false
		}
		name := m.queue[0]
		m.queue = m.queue[1:]
		d := m.domains[name]
		if d == nil {
			continue // already gone
		}
		if m.idleLocked(d, now) {
			delete(m.domains, name)
			m.servedMu.Lock() // lock order: stateMu, then servedMu
			delete(m.served, certKey{domain: name})
			delete(m.served, certKey{domain: name, rsa: true})
			m.servedMu.Unlock()
			return true
		}
		m.queue = append(m.queue, name)
	}
	return false
}

// idleLocked reports whether d may be dropped to make room: no attempt,
// no certificate, no autocert.Manager, and nothing it waits for (its
// backoff, the CA's Retry-After and its spent authorizations are over).
// A name that keeps failing is forgotten then, like one never seen; a
// domain that waits is kept, so that no flood of names can lift its
// backoff. m.stateMu must be held.
func (m *Manager) idleLocked(d *domain, now time.Time) bool {
	return d.attempt == nil && d.am == nil && !now.Before(d.notAfter) &&
		!m.waitingLocked(d, now) && d.fail.spentSince(now.Add(-budgetWindow)) == 0
}

// load returns k's certificate from the Cache the first time the domain
// is used in this process, or nil. A certificate found is handed to the
// domain's autocert.Manager, which then renews it.
func (m *Manager) load(ctx context.Context, d *domain, k certKey) (*tls.Certificate, error) {
	m.stateMu.Lock()
	done := m.loadedLocked(d, k, m.now())
	m.stateMu.Unlock()
	if done {
		return nil, nil
	}
	// The read is the flight's, not the first caller's: a handshake that
	// gives up does not fail the others that joined it.
	ch := m.loads.DoChan(k.cacheKey(), func() (any, error) {
		ctx, cancel := context.WithTimeout(m.ctx, cacheTimeout)
		defer cancel()
		data, err := m.cache.Get(ctx, k.cacheKey())
		if err != nil && !errors.Is(err, autocert.ErrCacheMiss) {
			// Unreadable: a valid certificate may be there. Read again next
			// time rather than order a new one.
			return nil, err
		}
		m.stateMu.Lock()
		d.loadedAt[b2i(k.rsa)] = m.now()
		m.stateMu.Unlock()
		if err != nil {
			return nil, nil // a miss
		}
		if _, err := parseCert(k, data, m.now()); err != nil {
			return nil, nil // expired or unusable: an attempt replaces it
		}
		m.stateMu.Lock()
		d.loading++ // the autocert.Manager reads the cache; it must not order
		m.stateMu.Unlock()
		c, err := m.fetch(d, k)
		m.stateMu.Lock()
		d.loading--
		m.stateMu.Unlock()
		if err != nil {
			return nil, nil
		}
		m.serve(k, c)
		m.emit(Event{Kind: EventLoaded, Time: m.now(), Domain: k.domain, NotAfter: c.Leaf.NotAfter})
		return c, nil
	})
	select {
	case r := <-ch:
		c, _ := r.Val.(*tls.Certificate)
		return c, r.Err
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}

func b2i(b bool) int {
	if b {
		return 1
	}
	return 0
}

// autocertFor returns d's autocert.Manager, creating it if needed.
func (m *Manager) autocertFor(ctx context.Context, d *domain) (*autocert.Manager, error) {
	key, err := m.accountKey(ctx)
	if err != nil {
		return nil, err
	}
	m.stateMu.Lock()
	defer m.stateMu.Unlock()
	if d.am == nil {
		d.am = m.newAutocert(key)
	}
	return d.am, nil
}

// accountKey returns the ACME account key: the user's Client's, the one
// in the Cache (where autocert keeps it), or a new one written there.
func (m *Manager) accountKey(ctx context.Context) (crypto.Signer, error) {
	m.accountMu.Lock()
	key, op, err := m.accountKeyLocked(ctx)
	m.accountMu.Unlock()
	if op != "" {
		m.cache.report(op, accountKeyName, err) // no lock held: OnEvent may run
	}
	if err != nil && op == "get" {
		err = fmt.Errorf("certmgr: reading account key: %w", err)
	} else if op == "put" {
		err = nil // kept, served and retried by the cache: the account is not lost
	}
	return key, err
}

// accountKeyLocked is accountKey with m.accountMu held. op names the
// Cache operation that failed with err, if one did.
func (m *Manager) accountKeyLocked(ctx context.Context) (key crypto.Signer, op string, err error) {
	if m.key != nil {
		return m.key, "", nil
	}
	if m.client.Key != nil {
		m.key = m.client.Key
		return m.key, "", nil
	}
	data, err := m.cache.get(ctx, accountKeyName)
	if errors.Is(err, autocert.ErrCacheMiss) {
		data, err = m.cache.get(ctx, "acme_account.key") // autocert's former name
	}
	switch {
	case err == nil:
		block, _ := pem.Decode(data)
		if block == nil || !strings.Contains(block.Type, "PRIVATE") {
			return nil, "", errors.New("certmgr: invalid account key in cache")
		}
		if m.key, err = parsePrivateKey(block.Bytes); err != nil {
			return nil, "", err
		}
		return m.key, "", nil
	case !errors.Is(err, autocert.ErrCacheMiss):
		return nil, "get", err
	}
	ecKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, "", err
	}
	der, err := x509.MarshalECPrivateKey(ecKey)
	if err != nil {
		return nil, "", err
	}
	m.key = ecKey
	if err := m.cache.put(ctx, accountKeyName, pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: der})); err != nil {
		return m.key, "put", err
	}
	return m.key, "", nil
}

// begin returns d's attempt in flight, or starts one for k if the
// domain's schedule, budget and DNS allow it.
func (m *Manager) begin(d *domain, k certKey, path string) (*attempt, error) {
	m.stateMu.Lock()
	defer m.stateMu.Unlock()
	if d.attempt != nil {
		return d.attempt, nil
	}
	if m.closed.Load() {
		return nil, errClosed
	}
	if err := m.gateLocked(d); err != nil {
		return nil, err
	}
	if m.inFlight >= m.cfg.maxInFlight {
		return nil, fmt.Errorf("certmgr: %d attempts in flight already; %s waits", m.inFlight, d.name)
	}
	a := &attempt{key: k, path: path, start: m.now(), done: make(chan struct{})}
	d.attempt = a
	m.inFlight++
	m.wg.Add(1)
	go m.run(d, a, k)
	return a, nil
}

// gateLocked returns why no attempt may start for d now, or nil.
func (m *Manager) gateLocked(d *domain) error {
	now := m.now()
	if !m.waitingLocked(d, now) {
		return nil
	}
	if !d.fail.due(now) {
		return fmt.Errorf("%w: %s: next attempt at %s after %d failure(s): %s", ErrBackoff, d.name,
			d.fail.NextAttempt.UTC().Format(time.RFC3339), d.fail.Failures, d.fail.LastError)
	}
	if t := d.fail.budgetFree(now, m.cost(), m.cfg.AuthzBudget); t.After(now) {
		return fmt.Errorf("%w: %s: failed-authorization budget spent until %s", ErrBackoff, d.name, t.UTC().Format(time.RFC3339))
	}
	if now.Before(d.localNext) {
		return fmt.Errorf("%w: %s: the cache could not be read; next attempt at %s", ErrBackoff, d.name, d.localNext.UTC().Format(time.RFC3339))
	}
	return d.dnsErr
}

// waitingLocked reports whether d may start no attempt at now: the
// schedule, the failed-authorization budget or the DNS recheck is not due.
// It does not allocate. m.stateMu must be held.
func (m *Manager) waitingLocked(d *domain, now time.Time) bool {
	m.capWaitsLocked(d, now)
	return !d.fail.due(now) ||
		d.fail.budgetFree(now, m.cost(), m.cfg.AuthzBudget).After(now) ||
		(d.dnsErr != nil && now.Before(d.dnsNext)) ||
		now.Before(d.localNext)
}

// capWaitsLocked cuts d's waits to the longest its schedules can ask for
// (the CA's Retry-After aside): after the clock went back, or for a
// persisted entry from a far future, a domain is not locked out for longer.
// m.stateMu must be held.
func (m *Manager) capWaitsLocked(d *domain, now time.Time) {
	d.fail.capNext(now, m.cfg.Backoff)
	if limit := now.Add(m.cfg.DNSRecheck.delay(len(m.cfg.DNSRecheck.Steps), 1)); d.dnsNext.After(limit) {
		d.dnsNext = limit
	}
	if limit := now.Add(m.cfg.cacheRetry); d.localNext.After(limit) {
		d.localNext = limit
	}
}

// cost is how many authorizations one attempt can fail: one per
// challenge type autocert tries. m.stateMu must be held.
func (m *Manager) cost() int {
	if m.http01 {
		return 2
	}
	return 1
}

// run is the goroutine of an attempt started by begin.
func (m *Manager) run(d *domain, a *attempt, k certKey) {
	defer m.wg.Done()
	if m.dns != nil {
		ctx, cancel := context.WithTimeout(m.ctx, m.cfg.dnsCheckTimeout)
		err := m.dnsChecked(d, m.dns.check(ctx, d.name))
		cancel()
		if err != nil {
			m.finish(d, a, nil, err)
			return
		}
	}
	c, err := m.fetch(d, k)
	m.finish(d, a, c, err)
}

// fetch asks d's autocert.Manager for the certificate k. autocert keeps
// serving the certificate in its memory after it expired (its renewals
// kept failing) without asking the CA: then a new autocert.Manager for
// the domain is asked, which reads the Cache and orders if need be.
func (m *Manager) fetch(d *domain, k certKey) (*tls.Certificate, error) {
	for range 2 {
		am, err := m.autocertFor(m.ctx, d)
		if err != nil {
			return nil, err
		}
		c, err := am.GetCertificate(syntheticHello(k))
		if err != nil || m.now().Before(c.Leaf.NotAfter) {
			return c, err
		}
		m.stateMu.Lock()
		if d.am == am {
			d.am = nil
		}
		m.stateMu.Unlock()
	}
	return nil, fmt.Errorf("certmgr: %s: autocert holds an expired certificate", k.domain)
}

// dnsChecked records the outcome of d's DNS pre-check and returns its
// error, wrapping ErrDNSNotReady, or nil. Only changes are logged.
func (m *Manager) dnsChecked(d *domain, err error) error {
	now := m.now()
	var ev []Event
	m.stateMu.Lock()
	if err == nil {
		if d.dnsErr != nil {
			ev = append(ev, Event{Kind: EventDNSReady, Time: now, Domain: d.name})
			d.logged = false
		}
		d.dnsErr, d.dnsFails, d.dnsNext = nil, 0, time.Time{}
	} else {
		if !errors.Is(err, ErrDNSNotReady) {
			err = fmt.Errorf("%w: %s: %w", ErrDNSNotReady, d.name, err)
		}
		d.dnsFails++
		d.dnsNext = now.Add(m.cfg.DNSRecheck.delay(d.dnsFails, m.rand()))
		if d.dnsErr == nil || d.dnsErr.Error() != err.Error() {
			ev = append(ev, Event{Kind: EventDNSNotReady, Time: now, Domain: d.name, NextAttempt: d.dnsNext, Err: err})
			d.logged = false
		}
		d.dnsErr = err
	}
	m.stateMu.Unlock()
	m.emit(ev...)
	return err
}

// finish records the outcome of attempt a of d and wakes its waiters.
// An attempt that failed for certmgr's own reasons (Close, DNS, a local
// refusal) spends nothing and does not move the schedule.
func (m *Manager) finish(d *domain, a *attempt, cert *tls.Certificate, err error) {
	now := m.now()
	var events []Event
	m.stateMu.Lock()
	if d.attempt != a {
		m.stateMu.Unlock()
		return // already finished
	}
	d.attempt = nil
	if a.path != PathRenewal {
		m.inFlight--
	}
	attemptNo := d.fail.Failures + 1
	var cacheErr *cacheError
	local := m.closed.Load() || errors.Is(err, errClosed) || errors.Is(err, ErrDNSNotReady) ||
		errors.Is(err, ErrBackoff) || errors.Is(err, errLoading) || errors.As(err, &cacheErr)
	switch {
	case err == nil:
		kind := EventObtained
		if a.path == PathRenewal {
			kind = EventRenewed
		}
		d.fail.succeed(now)
		d.lastErr = nil
		d.notAfter = maxTime(d.notAfter, cert.Leaf.NotAfter) // Status is valid from here on
		if a.path == PathRenewal {
			d.renewed = now
		}
		d.logged = false
		events = append(events, Event{Kind: kind, Time: now, Domain: d.name, Path: a.path, Challenge: a.challenge,
			Attempt: attemptNo, Duration: now.Sub(a.start), NotAfter: cert.Leaf.NotAfter})
	case local:
		if cacheErr != nil {
			// The Cache cannot be read: no attempt until it may work again,
			// lest a certificate that is there be ordered anew.
			d.localNext = now.Add(m.cfg.cacheRetry)
		}
	default:
		if a.problem != "" {
			err = &AttemptError{Domain: d.name, Detail: a.problem, Err: err}
		} else {
			err = &AttemptError{Domain: d.name, Err: err}
		}
		retryAfter := a.retryAfter
		var ae *acme.Error
		if errors.As(err, &ae) {
			// The CA's Retry-After, whatever request carried it (a 503 on
			// the account, say, which the observer cannot tie to a domain).
			if ae.Header != nil {
				retryAfter = maxTime(retryAfter, parseRetryAfter(ae.Header.Get("Retry-After"), ae.Detail, now))
			}
			if _, ok := acme.RateLimit(ae); ok {
				a.rateLimited = true
			}
		}
		spent := 0
		if a.orders > 0 || a.authzFailed > 0 {
			spent = max(m.cost(), a.authzFailed)
		}
		d.fail.fail(now, err.Error(), spent, m.cost(), m.cfg.AuthzBudget, m.cfg.Backoff, retryAfter, m.rand())
		d.lastErr = err
		d.logged = false
		if d.notAfter.IsZero() || !now.Before(d.notAfter) {
			d.am = nil // drop autocert's failed state with it; the next attempt starts afresh
			d.loadedAt = [2]time.Time{}
		}
		events = append(events, Event{Kind: EventFailed, Time: now, Domain: d.name, Path: a.path, Challenge: a.challenge,
			Attempt: attemptNo, Duration: now.Sub(a.start), Err: err})
		if a.rateLimited {
			events = append(events, Event{Kind: EventRateLimited, Time: now, Domain: d.name, Path: a.path, NextAttempt: d.fail.NextAttempt, Err: err})
		} else {
			events = append(events, Event{Kind: EventBackoff, Time: now, Domain: d.name, Path: a.path, Attempt: attemptNo, NextAttempt: d.fail.NextAttempt})
		}
	}
	a.cert, a.err = cert, err
	persist := err == nil || !local
	m.stateMu.Unlock()
	m.obs.forget(d.name)
	if cert != nil {
		m.serve(certKey{domain: d.name, rsa: isRSA(cert)}, cert)
	}
	if persist {
		m.saveState() // before waking the waiters: what they see is stored
	}
	m.emit(events...) // and logged
	close(a.done)
}

func isRSA(c *tls.Certificate) bool {
	_, ok := c.PrivateKey.(*rsa.PrivateKey)
	return ok
}

// errLoading refuses an order while a domain's autocert reads the cache.
var errLoading = errors.New("certmgr: no ACME order while loading from cache")

// admitOrder is asked by the ACME transport before every new order. An
// order inside an attempt certmgr started passes; any other is a renewal
// by autocert's own timer, which must pass the same schedule, budget and
// DNS pre-check as any attempt.
func (m *Manager) admitOrder(req *http.Request, name string) error {
	m.stateMu.Lock()
	d := m.domains[name]
	var err error
	switch {
	case d == nil:
		err = fmt.Errorf("certmgr: refusing an order for unknown domain %q", name)
	case sender(req) != d.am:
		// An autocert.Manager certmgr replaced: its renewal timer lives on.
		err = fmt.Errorf("certmgr: refusing an order for %s from a retired autocert.Manager", name)
	case d.loading > 0:
		err = errLoading
	}
	for err == nil && d.attempt != nil {
		a := d.attempt
		if a.path != PathRenewal || m.now().Sub(a.start) < m.cfg.renewalMaxAge {
			m.stateMu.Unlock()
			return nil // an order of the attempt in flight
		}
		m.stateMu.Unlock()
		m.finish(d, a, nil, errors.New("certmgr: renewal gave no outcome"))
		m.stateMu.Lock() // and look again: another attempt may have begun
	}
	if err == nil {
		err = m.gateLocked(d)
	}
	if age := m.now().Sub(d.renewed); err == nil && !d.renewed.IsZero() && age >= 0 && age < d.lifetime/4 {
		// autocert renews again at once when RenewBefore exceeds the
		// certificate's lifetime; this keeps that from looping, and from
		// spending the CA's limit on duplicate certificates.
		err = fmt.Errorf("%w: %s: renewed at %s already", ErrBackoff, name, d.renewed.UTC().Format(time.RFC3339))
	}
	if err != nil {
		m.stateMu.Unlock()
		m.refusedOrders.Add(1)
		return err
	}
	a := &attempt{path: PathRenewal, start: m.now(), done: make(chan struct{})}
	d.attempt = a
	m.stateMu.Unlock()
	if m.dns != nil {
		ctx, cancel := context.WithTimeout(req.Context(), m.cfg.dnsCheckTimeout)
		err := m.dnsChecked(d, m.dns.check(ctx, name))
		cancel()
		if err != nil {
			m.finish(d, a, nil, err)
			return err
		}
	}
	return nil
}

// observed records what the CA said about name's attempt in flight. A
// renewal ends here when the CA refused it or every challenge type failed.
func (m *Manager) observed(name string, ob observation) {
	m.stateMu.Lock()
	d := m.domains[name]
	if d == nil || d.attempt == nil {
		m.stateMu.Unlock()
		return
	}
	a := d.attempt
	if ob.order {
		a.orders++
	}
	if ob.authzFailed {
		a.authzFailed++
	}
	if ob.problem != "" {
		a.problem = ob.problem
	}
	if ob.challenge != "" {
		a.challenge = ob.challenge
	}
	a.rateLimited = a.rateLimited || ob.rateLimited
	a.retryAfter = maxTime(a.retryAfter, ob.retryAfter)
	end := a.path == PathRenewal && (ob.rateLimited || ob.refused || a.authzFailed >= m.cost())
	problem := a.problem
	m.stateMu.Unlock()
	if end {
		m.finish(d, a, nil, errors.New(problem))
	}
}

// certStored is called for every certificate written to the Cache:
// autocert's first issuance and its renewals. The new certificate is
// served from the next handshake on; a renewal in flight ends with it.
func (m *Manager) certStored(key string, data []byte) {
	k := certKeyOf(key)
	c, err := parseCert(k, data, m.now())
	if err != nil {
		return
	}
	m.serve(k, c)
	m.stateMu.Lock()
	d := m.domains[k.domain]
	var a *attempt
	if d != nil && d.attempt != nil && d.attempt.path == PathRenewal {
		a = d.attempt
	}
	m.stateMu.Unlock()
	if a != nil {
		m.finish(d, a, c, nil)
	}
}

// AttemptError is the error of a failed ACME attempt. Detail is what the
// CA said (autocert itself only reports "missing certificate" or the last
// step that failed); Err is what autocert returned, for errors.As.
type AttemptError struct {
	Domain string // the normalised domain
	Detail string // the CA's problem detail; empty if it gave none
	Err    error  // what autocert returned
}

// Error returns the CA's detail when there is one, else autocert's error.
func (e *AttemptError) Error() string {
	if e.Detail != "" {
		return "certmgr: " + e.Domain + ": " + e.Detail
	}
	return "certmgr: " + e.Domain + ": " + e.Err.Error()
}

// Unwrap returns the error autocert returned.
func (e *AttemptError) Unwrap() error { return e.Err }
