package certmgr

import (
	"cmp"
	"context"
	"crypto"
	"crypto/rand"
	"crypto/tls"
	"encoding/base64"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	mathrand "math/rand/v2"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/crypto/acme"
	"golang.org/x/crypto/acme/autocert"
	"golang.org/x/sync/singleflight"

	"github.com/certmgr/certmgr/internal/dnscheck"
	"github.com/certmgr/certmgr/internal/testhooks"
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
	// If Autocert.Prompt is nil, certmgr accepts the CA's terms
	// (autocert.AcceptTOS), where autocert alone would refuse them.
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
	// background. Once one handshake waited this long for an attempt,
	// those after it get the fallback at once until the attempt ends. If
	// zero, DefaultHandshakeTimeout (10 s).
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
	// Each is counted for 62 minutes, so that replicas whose clocks differ
	// by up to 2 minutes never free the CA's hour early.
	AuthzBudget int

	// DNS configures the pre-check made before every ACME attempt: the
	// domain's A and AAAA records must all be among DNS.KnownIPs, the
	// addresses the cluster serves on, and its CAA records must allow the
	// CA. If DNS.KnownIPs is empty, DNS is not checked. If
	// DNS.CAAIdentities is empty, it is "letsencrypt.org" when the
	// directory is Let's Encrypt's; otherwise CAA is not checked. The
	// other fields' zero values are CheckDNS's.
	DNS DNSCheck

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

	// OrderBudget is the most new orders the ACME account may make in any
	// rolling 3 hours, renewals included; an order beyond it is refused
	// locally and logged. It keeps a flood of names a permissive HostPolicy
	// allows from spending the CA's limit (Let's Encrypt allows 300 per
	// account per 3 hours). If zero, 150.
	OrderBudget int

	// Profile is the ACME certificate profile every order asks for
	// (draft-ietf-acme-profiles), such as Let's Encrypt's "shortlived"
	// (160 hours) or "tlsserver" (45 days). If the CA's directory does
	// not list it, no order is made: the attempt fails with an error
	// naming the profiles it lists, which is logged once. If empty, the
	// CA's default.
	Profile string

	hooks testHooks
}

// testHooks are the settings tests change; New fills in their defaults.
type testHooks struct {
	now             func() time.Time // the clock; if nil, time.Now
	rand            func() float64   // jitter source in [0, 1); if nil, math/rand/v2
	cacheRetry      time.Duration    // how often failed cache writes are retried; if zero, 30 s
	dnsCheckTimeout time.Duration    // one whole pre-check; if zero, 15 s
	maxInFlight     int              // concurrent attempts; if zero, 64
	renewalMaxAge   time.Duration    // a renewal with no outcome after this failed; if zero, 15 min
	renewalQuiet    time.Duration    // a renewal silent this long after a 5xx failed; if zero, requestTimeout and 15 s
	// The bounds of the interval between two polls of a certificate's
	// renewal information; if zero, 1 min and 24 h (RFC 9773).
	renewalInfoMinPoll, renewalInfoMaxPoll time.Duration
	noRenewalInfo                          bool          // renewal information is never polled (benchmarks compare)
	requestTimeout                         time.Duration // bounds one ACME request; if zero, 30 s
	challengeGrace                         time.Duration // see acmeObserver.stalled; if zero, challengeGrace
}

// withDefaults returns h with its zero fields set.
func (h testHooks) withDefaults() testHooks {
	if h.now == nil {
		h.now = time.Now
	}
	if h.rand == nil {
		h.rand = mathrand.Float64
	}
	h.cacheRetry = cmp.Or(h.cacheRetry, 30*time.Second)
	h.dnsCheckTimeout = cmp.Or(h.dnsCheckTimeout, 15*time.Second)
	h.maxInFlight = cmp.Or(h.maxInFlight, 64)
	h.renewalMaxAge = cmp.Or(h.renewalMaxAge, 15*time.Minute)
	h.renewalInfoMinPoll = cmp.Or(h.renewalInfoMinPoll, renewalInfoMinPoll)
	h.renewalInfoMaxPoll = cmp.Or(h.renewalInfoMaxPoll, renewalInfoMaxPoll)
	h.requestTimeout = cmp.Or(h.requestTimeout, 30*time.Second)
	h.challengeGrace = cmp.Or(h.challengeGrace, challengeGrace)
	// Longer than a request acme.Client sends again after a 5xx may take.
	h.renewalQuiet = cmp.Or(h.renewalQuiet, h.requestTimeout+15*time.Second)
	return h
}

// Manager obtains, renews and serves certificates through autocert, with
// backoff, a DNS pre-check, a handshake timeout and status reporting. Create
// one with New; its methods are safe for concurrent use.
type Manager struct {
	cfg             Config    // defaults applied
	hooks           testHooks // defaults applied
	log             *slog.Logger
	now             func() time.Time
	timeout         time.Duration
	cache           *certCache
	client          *acme.Client // the user's client settings, for newAutocert
	obs             *acmeObserver
	dns             *dnscheck.Checker // nil when DNS.KnownIPs is empty
	coord           Coordinator       // the Cache's, if it is one: replicas act as one
	fallbacks       *fallbackStore
	base            *autocert.Manager // answers challenges for names with no autocert.Manager of their own
	acmeTLS         *tls.Config       // the config of TLS-ALPN-01 validation handshakes
	loads           singleflight.Group
	http01          atomic.Bool   // HTTPHandler was called: attempts may try http-01
	idPrefix        string        // of reservation IDs: unique to this Manager
	renewBeforeSaid atomic.Bool   // errRenewBefore was logged
	profileSaid     atomic.Bool   // errProfile was logged
	nextID          atomic.Uint64 // of reservation IDs
	limits          limiter       // of repeated warnings
	account         atomic.Value  // the account's URI (a string), once the CA said it
	ari             renewals      // the CA's renewal information (ari.go)
	ariClient       *http.Client  // GETs renewal information through obs

	// Concurrency. A Manager has four mutexes, each declared above what
	// it guards:
	//   - persistMu serialises writes of the persisted state, so that the
	//     last one written is the newest. It is held across that one
	//     Cache Put.
	//   - stateMu guards the domain table (domains, queue, inFlight,
	//     orders, dormant, dormantRev, stateUnread) and every field of every domain
	//     and attempt. A function or method named ...Locked is called
	//     with stateMu held; no other lock is meant.
	//   - servedMu guards served, the certificates handshakes get, and
	//     servedRev, the store's revision of each one from a Coordinator.
	//   - accountMu guards key.
	//   - overdueMu guards overdueSaid.
	//
	// The lock order is persistMu, then stateMu, then servedMu; accountMu
	// and overdueMu are taken alone. Under stateMu, servedMu, accountMu and overdueMu certmgr makes
	// no call out: no OnEvent callback or log line (emit), no HostPolicy,
	// no Cache call and no call into an autocert.Manager. autocert holds
	// locks of its own while it calls the Cache, whose errors go to
	// OnEvent, which may call Status: so autocert's locks come before
	// stateMu, and stateMu is never held around autocert.
	//
	// The Cache wrapper (certCache) holds one lock per key being written
	// across that write, so that the newest write of a key lands last;
	// persistMu comes before the state key's. Every write to the Cache or
	// its Coordinator passes certCache.write, under its key's lock if it
	// has one, so that Close, at its end, refuses all later writes and
	// waits for those in flight (certCache.seal), with no lock held.
	// The helpers' other locks are leaves, never held while another lock
	// is taken or a call goes out: acmeObserver.urlsMu, certCache.pendingMu,
	// writersMu and sealMu, fallbackStore.certsMu, the DNS checker's cache
	// lock, limiter.lastMu and renewals.mu.
	persistMu sync.Mutex // serialises saveState's writes

	stateMu  sync.Mutex
	domains  map[string]*domain
	queue    []string    // domain names, oldest first: where room is made
	inFlight int         // attempts running in goroutines
	orders   []time.Time // the account's new orders in the last orderWindow, oldest first
	// dormant holds persisted records of names not in domains (the
	// HostPolicy refused them, or failed): written back as they are, and
	// taken up if the name comes back.
	dormant    map[string]failureRecord
	dormantRev map[string]int64 // the store's revision of each record in dormant, with a Coordinator
	// stateUnread is set while the persisted records could not be read:
	// no order is made and no record written until they are.
	stateUnread bool

	servedMu sync.RWMutex
	served   map[certKey]*tls.Certificate // valid certificates, by name and key type
	// servedRev holds the store's revision of a served certificate read
	// from, or written to, a Coordinator's store; none for a certificate
	// served before its write landed, or read without a revision (see
	// serveAt).
	servedRev map[certKey]int64

	accountMu sync.Mutex
	key       crypto.Signer // the ACME account key, once known

	overdueMu   sync.Mutex
	overdueSaid map[string]time.Time // domains whose renewal is overdue → when it was last said (warnOverdue)

	ctx    context.Context // ends at Close
	cancel context.CancelFunc
	wg     sync.WaitGroup // attempts and the cache retry loop
	closed atomic.Bool
	once   sync.Once

	refusedOrders atomic.Int64 // orders refused locally (for tests)
	waitedOrders  atomic.Int64 // orders that waited for another order in flight (for tests)
	waitedShakes  atomic.Int64 // handshakes that waited for an attempt in flight (for tests)
	counts        counters     // for monitoring (Counters)
}

// New returns a Manager for cfg. It reads the persisted failure cache, so
// that Status reports every domain's state at once; it starts no ACME
// request.
func New(cfg Config) (*Manager, error) {
	if cfg.Autocert == nil {
		return nil, errors.New("certmgr: Config.Autocert is nil; it is required")
	}
	if cfg.HandshakeTimeout < 0 || cfg.AuthzBudget < 0 || cfg.MaxDomains < 0 || cfg.MaxFallbacks < 0 || cfg.OrderBudget < 0 {
		return nil, errors.New("certmgr: negative HandshakeTimeout, AuthzBudget, MaxDomains, MaxFallbacks or OrderBudget")
	}
	if cfg.AuthzBudget == 1 {
		// An attempt may fail two authorizations (tls-alpn-01, then http-01).
		return nil, errors.New("certmgr: AuthzBudget must be at least 2, the most one attempt can spend")
	}
	if h, ok := cfg.Autocert.Cache.(*testhooks.Cache); ok { // a nested module's test
		if cfg.hooks.now == nil {
			cfg.hooks.now = h.Now
		}
		cfg.hooks.renewalInfoMinPoll = cmp.Or(cfg.hooks.renewalInfoMinPoll, h.RenewalInfoPoll)
		cfg.hooks.renewalInfoMaxPoll = cmp.Or(cfg.hooks.renewalInfoMaxPoll, h.RenewalInfoPoll)
	}
	m := &Manager{
		cfg:        cfg,
		hooks:      cfg.hooks.withDefaults(),
		log:        cmp.Or(cfg.Logger, slog.Default()),
		timeout:    cmp.Or(cfg.HandshakeTimeout, DefaultHandshakeTimeout),
		served:     make(map[certKey]*tls.Certificate),
		servedRev:  make(map[certKey]int64),
		domains:    make(map[string]*domain),
		dormant:    make(map[string]failureRecord),
		dormantRev: make(map[string]int64),
	}
	m.now = m.hooks.now
	m.cfg.Backoff = cfg.Backoff.withDefaults(defaultBackoff)
	m.cfg.DNSRecheck = cfg.DNSRecheck.withDefaults(defaultDNSRecheck)
	m.cfg.AuthzBudget = cmp.Or(cfg.AuthzBudget, 4)
	m.cfg.MaxDomains = cmp.Or(cfg.MaxDomains, 10000)
	m.cfg.MaxFallbacks = cmp.Or(cfg.MaxFallbacks, 1024)
	m.cfg.OrderBudget = cmp.Or(cfg.OrderBudget, 150)
	var nonce [6]byte
	rand.Read(nonce[:])
	m.idPrefix = base64.RawURLEncoding.EncodeToString(nonce[:]) + "-"

	user := cfg.Autocert.Client
	if user == nil {
		user = &acme.Client{DirectoryURL: autocert.DefaultACMEDirectory}
	}
	m.client = &acme.Client{ // a template: see newAutocert
		Key:          user.Key,
		HTTPClient:   user.HTTPClient,
		DirectoryURL: cmp.Or(user.DirectoryURL, autocert.DefaultACMEDirectory),
		RetryBackoff: user.RetryBackoff,
		UserAgent:    cmp.Or(user.UserAgent, "certmgr"),
		KID:          user.KID,
	}
	if m.client.RetryBackoff == nil {
		m.client.RetryBackoff = retryBackoff
	}
	m.ctx, m.cancel = context.WithCancel(context.Background())
	if len(cfg.DNS.KnownIPs) == 0 && (len(cfg.DNS.Resolvers) > 0 || len(cfg.DNS.CAAIdentities) > 0) {
		m.cancel()
		return nil, errors.New("certmgr: Config.DNS has resolvers or CAA identities but no KnownIPs; the pre-check needs them")
	}
	if len(cfg.DNS.KnownIPs) > 0 {
		opts := cfg.DNS
		if len(opts.CAAIdentities) == 0 && isLetsEncrypt(m.client.DirectoryURL) {
			opts.CAAIdentities = []string{"letsencrypt.org"}
		}
		dc, err := dnscheck.New(dnscheck.Config(opts), dnscheck.Options{
			MaxCache: m.cfg.DNSRecheck.step(1),
			Now:      m.now,
			Life:     m.ctx,
			Methods:  m.challengeTypes,
			Account:  m.accountURI,
		})
		if err != nil {
			m.cancel()
			return nil, err
		}
		m.dns = dc
	}
	fb, err := newFallbackStore(m.cfg.MaxFallbacks, m.now)
	if err != nil {
		m.cancel()
		return nil, fmt.Errorf("certmgr: fallback key: %w", err)
	}
	m.fallbacks = fb
	m.cache = newCertCache(cfg.Autocert.Cache, m)
	m.coord = coordinatorOf(cfg.Autocert.Cache)

	var next http.RoundTripper
	if user.HTTPClient != nil {
		next = user.HTTPClient.Transport
	}
	m.obs = newACMEObserver(next, m)
	m.obs.life = m.ctx
	m.obs.timeout = m.hooks.requestTimeout
	m.obs.grace = m.hooks.challengeGrace
	m.obs.directory = m.client.DirectoryURL
	m.obs.profile = cfg.Profile
	m.base = m.newAutocert(nil, m.cache)
	m.ariClient = &http.Client{Transport: m.obs}
	m.overdueSaid = make(map[string]time.Time)
	m.ari.wake = make(chan struct{}, 1)
	m.ari.certs = make(map[certKey]*renewalInfo)
	m.ari.loads = make(map[string]time.Time)
	m.ari.none = m.hooks.noRenewalInfo
	m.acmeTLS = &tls.Config{
		GetCertificate: m.GetCertificate,
		MinVersion:     tls.VersionTLS12,
		NextProtos:     []string{acme.ALPNProto},
	}
	// With a Coordinator, the store's watch opens first, so that the
	// records read next miss no later write. If it does not open within
	// storeWait, the store is taken as unreachable: New returns, the
	// records are read once it answers, and meanwhile no order is made.
	stateBy := time.Now().Add(cacheTimeout)
	if m.coord != nil {
		m.log.Info("attempts coordinated", "by", "the Cache, a Coordinator: one replica orders for all")
		if by := time.Now().Add(storeWait); !m.watchStore(by) {
			stateBy = by
		}
	} else {
		m.log.Info("attempts not coordinated", "why", "the Cache is no Coordinator: replicas on it decide alone")
	}
	m.loadKnownDomains(stateBy)

	m.wg.Add(3)
	go func() {
		defer m.wg.Done()
		m.cache.retryLoop(m.ctx, m.hooks.cacheRetry)
	}()
	go m.renewalInfoLoop()
	go m.sweepLoop()
	return m, nil
}

// isLetsEncrypt reports whether dir is one of Let's Encrypt's directories.
func isLetsEncrypt(dir string) bool {
	return strings.Contains(dir, ".api.letsencrypt.org/")
}

// Close stops certmgr's background work: attempts in flight end (their
// ACME requests are refused from now on) and Close waits for their
// goroutines. Certificates already obtained are still served. Close is
// idempotent and returns nil.
//
// Close makes the Manager's last writes to the Cache: the outcomes of the
// attempts it ends, and one more try at the writes that failed. Then it
// seals the Cache: a write in flight, whoever made it, ends before Close
// returns, and no other begins. Once Close returned, nothing the Manager
// does writes to the Cache, so that a process started after it keeps what
// it writes: neither the Manager's own writes (a failure record, in the
// store or in its state entry) nor those of autocert's goroutines and
// timers that outlive Close (withdrawing an order's authorizations,
// deleting a challenge token, a renewal). Such a write is refused with an
// error wrapping errClosed where autocert uses the outcome (the Put of a
// certificate or of the account key), and dropped, with a nil error,
// where it ignores it (a token's Put, every Delete); none is reported.
// Releasing a domain's lock in a Coordinator is no write: it still
// happens.
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
		m.endRenewals()
		// A last try at the writes that failed: what was obtained must
		// not be lost at a graceful restart.
		ctx, cancel := context.WithTimeout(context.Background(), cacheTimeout)
		m.cache.flush(ctx)
		cancel()
		// autocert's detached goroutines are not in m.wg: a request of
		// theirs answered before m.cancel may still settle a
		// reservation, and their clean-up deletes tokens. What they
		// write from here on is refused (certCache.write).
		m.cache.seal()
	})
	return nil
}

// challengeTypes returns the validation methods attempts may use.
func (m *Manager) challengeTypes() []string {
	if m.http01.Load() {
		return []string{"tls-alpn-01", "http-01"}
	}
	return []string{"tls-alpn-01"}
}

// isClosed reports whether Close began.
func (m *Manager) isClosed() bool { return m.closed.Load() }

// accountURI returns the ACME account's URI, or "" until the CA said it.
func (m *Manager) accountURI() string {
	uri, _ := m.account.Load().(string)
	return uri
}

// cacheFailed reports a Cache failure of op on key as an event, at most
// once a minute for each cause: a remote client can make autocert look up
// keys of its choosing.
func (m *Manager) cacheFailed(op, key string, err error) {
	if m.closed.Load() {
		return // autocert's renewal timers outlive Close; they are not news
	}
	cause := err.Error()
	var pe *fs.PathError
	if errors.As(err, &pe) {
		cause = pe.Op + ": " + pe.Err.Error() // the same failure whatever the key
	}
	if !m.limits.allow("cache "+op+": "+cause, m.now()) {
		return
	}
	ev := Event{Kind: EventCacheError, Time: m.now(), Err: fmt.Errorf("certmgr: cache %s %q: %w", op, key, err)}
	if isCertKey(key) {
		ev.Domain = certKeyOf(key).domain
	}
	m.emit(ev)
}

// DefaultHandshakeTimeout is how long a handshake waits for a certificate
// when Config.HandshakeTimeout is zero.
const DefaultHandshakeTimeout = 10 * time.Second

// The Manager is the owner of its ACME transport and its Cache wrapper.
var (
	_ acmeOwner  = (*Manager)(nil)
	_ cacheOwner = (*Manager)(nil)
)
