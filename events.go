package certmgr

import (
	"context"
	"fmt"
	"log/slog"
	"sync"
	"time"
)

// EventKind says what an Event reports.
type EventKind int

// The events certmgr reports, with the level it logs each at.
const (
	EventObtained            EventKind = iota + 1 // Info: a new certificate was obtained
	EventRenewed                                  // Info: a certificate was renewed
	EventLoaded                                   // Debug: a certificate was loaded from the cache at first use
	EventFailed                                   // Warn: an ACME attempt failed; Err has the CA's detail
	EventBackoff                                  // Info: no attempt before NextAttempt (once per failure)
	EventRateLimited                              // Warn: the CA rate-limited the domain until NextAttempt
	EventDNSNotReady                              // Info: the DNS pre-check failed (once per change of its result)
	EventDNSReady                                 // Info: the DNS pre-check passes again
	EventFallback                                 // Debug: a handshake got the self-signed fallback (sampled)
	EventCacheError                               // Error: reading or writing the Cache failed
	EventRetry                                    // Info: the operator asked for an early retry
	EventTableFull                                // Warn: a new name was refused: MaxDomains are tracked and none is idle (at most once a minute)
	EventOrderBudget                              // Warn: an order was refused: the account's OrderBudget is spent (at most once a minute)
	EventRenewalScheduled                         // Info: the CA's renewal information suggested WindowStart to WindowEnd; renewal at RenewAt
	EventRenewalSuggested                         // Info: the CA's suggested window is open, before autocert's own schedule: renewal at RenewAt; ExplanationURL says why, if given
	EventRenewalInfoUnusable                      // Warn: the CA's renewal information for a certificate cannot be used (once per certificate); the schedule stays
	EventRenewalOverdue                           // Error: the certificate served is not renewed though it should be (Status.RenewalOverdue); RenewAt is when it was due; once a day
)

var eventMessages = [...]string{
	EventObtained:    "certificate obtained",
	EventRenewed:     "certificate renewed",
	EventLoaded:      "certificate loaded from cache",
	EventFailed:      "certificate attempt failed",
	EventBackoff:     "backing off",
	EventRateLimited: "rate limited by CA",
	EventDNSNotReady: "DNS not ready",
	EventDNSReady:    "DNS ready",
	EventFallback:    "fallback certificate served",
	EventCacheError:  "cache error",
	EventRetry:       "retry requested",
	EventTableFull:   "domain table full",
	EventOrderBudget: "order budget spent",

	EventRenewalScheduled:    "renewal scheduled",
	EventRenewalSuggested:    "renewal suggested by CA",
	EventRenewalInfoUnusable: "renewal information unusable",
	EventRenewalOverdue:      "certificate renewal overdue",
}

// String returns the event's log message, e.g. "certificate obtained".
func (k EventKind) String() string {
	if k > 0 && int(k) < len(eventMessages) {
		return eventMessages[k]
	}
	return fmt.Sprintf("EventKind(%d)", int(k))
}

func (k EventKind) level() slog.Level {
	switch k {
	case EventLoaded, EventFallback:
		return slog.LevelDebug
	case EventFailed, EventRateLimited, EventTableFull, EventOrderBudget, EventRenewalInfoUnusable:
		return slog.LevelWarn
	case EventCacheError, EventRenewalOverdue:
		return slog.LevelError
	}
	return slog.LevelInfo
}

// Path is what started an attempt.
type Path string

// The paths an attempt takes, in Event.Path.
const (
	PathHandshake Path = "handshake" // started by a TLS handshake
	PathProvision Path = "provision" // started by Provision
	PathRenewal   Path = "renewal"   // autocert's own renewal timer
	// PathRenewalInfo is a renewal at the time the CA's renewal
	// information suggested.
	PathRenewalInfo Path = "renewal-info"
)

// Event is one thing that happened to a domain's certificate. Each is
// logged as one line and passed to Config.OnEvent. Fields that do not
// apply to the Kind are zero.
type Event struct {
	Kind        EventKind     // what happened
	Time        time.Time     // when, by the Manager's clock
	Domain      string        // normalised name
	Path        Path          // what started the attempt
	Challenge   string        // challenge type that was used, where known
	Profile     string        // the profile the attempt's orders asked for (Config.Profile)
	Replaces    string        // the identifier of the certificate the attempt's last order replaced (RFC 9773), if it named one
	Attempt     int           // the attempt's number: 1 for the first after a success
	Duration    time.Duration // how long the attempt took
	NotAfter    time.Time     // expiry of the certificate obtained or loaded
	NextAttempt time.Time     // earliest next attempt (backoff, rate limit, DNS recheck)
	Err         error         // what failed

	WindowStart    time.Time // start of the renewal window the CA suggested
	WindowEnd      time.Time // end of that window
	RenewAt        time.Time // the time picked in it to renew
	ExplanationURL string    // the CA's explanation of an early renewal, if it gave one
}

// String returns the event as one line: its message and its set fields.
func (e Event) String() string {
	s := e.Kind.String() + " domain=" + e.Domain
	for _, a := range e.attrs() {
		if a.Key != "domain" {
			s += " " + a.String()
		}
	}
	return s
}

// attrs returns the event's set fields as log attributes.
func (e Event) attrs() []slog.Attr {
	attrs := make([]slog.Attr, 0, 8)
	attrs = append(attrs, slog.String("domain", e.Domain))
	if e.Path != "" {
		attrs = append(attrs, slog.String("path", string(e.Path)))
	}
	if e.Challenge != "" {
		attrs = append(attrs, slog.String("challenge", e.Challenge))
	}
	if e.Profile != "" {
		attrs = append(attrs, slog.String("profile", e.Profile))
	}
	if e.Replaces != "" {
		attrs = append(attrs, slog.String("replaces", e.Replaces))
	}
	if e.Attempt != 0 {
		attrs = append(attrs, slog.Int("attempt", e.Attempt))
	}
	if e.Duration != 0 {
		attrs = append(attrs, slog.Duration("duration", e.Duration))
	}
	if !e.NotAfter.IsZero() {
		attrs = append(attrs, slog.Time("not_after", e.NotAfter))
	}
	if !e.NextAttempt.IsZero() {
		attrs = append(attrs, slog.Time("next_attempt", e.NextAttempt))
	}
	if !e.WindowStart.IsZero() {
		attrs = append(attrs, slog.Time("window_start", e.WindowStart), slog.Time("window_end", e.WindowEnd))
	}
	if !e.RenewAt.IsZero() {
		attrs = append(attrs, slog.Time("renew_at", e.RenewAt))
	}
	if e.ExplanationURL != "" {
		attrs = append(attrs, slog.String("explanation_url", e.ExplanationURL))
	}
	if e.Err != nil {
		attrs = append(attrs, slog.String("error", e.Err.Error()))
	}
	return attrs
}

// emit logs each event and hands it to Config.OnEvent. It must be called
// with no lock held: OnEvent may call Status or Domains.
func (m *Manager) emit(events ...Event) {
	for _, e := range events {
		m.log.LogAttrs(context.Background(), e.Kind.level(), e.Kind.String(), e.attrs()...)
		if m.cfg.OnEvent != nil {
			m.cfg.OnEvent(e)
		}
	}
}

// limitInterval is how often a repeated warning is reported.
const limitInterval = time.Minute

// maxLimitCauses bounds the causes a limiter remembers.
const maxLimitCauses = 64

// limiter lets one report per cause through per limitInterval, so that
// what a remote client can repeat at will does not flood the log. Its zero
// value is ready to use.
type limiter struct {
	lastMu sync.Mutex
	last   map[string]time.Time // when each cause was last let through
}

// allow reports whether a report of cause may go out at now, and if so
// counts it.
func (l *limiter) allow(cause string, now time.Time) bool {
	l.lastMu.Lock()
	defer l.lastMu.Unlock()
	if t, ok := l.last[cause]; ok && !now.Before(t) && now.Sub(t) < limitInterval {
		return false
	}
	if l.last == nil || len(l.last) >= maxLimitCauses {
		for c, t := range l.last {
			if now.Before(t) || now.Sub(t) >= limitInterval {
				delete(l.last, c)
			}
		}
		if l.last == nil {
			l.last = make(map[string]time.Time)
		} else if len(l.last) >= maxLimitCauses {
			return false // as many causes as it holds reported within the minute
		}
	}
	l.last[cause] = now
	return true
}
