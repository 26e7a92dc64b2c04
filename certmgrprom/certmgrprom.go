// Package certmgrprom exports a certmgr.Manager's domains and counters as
// Prometheus metrics. It is a module of its own, so that certmgr itself
// needs no Prometheus client.
//
//	reg := prometheus.NewRegistry()
//	reg.MustRegister(certmgrprom.NewCollector(m))
//	http.Handle("/metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{}))
//
// Per domain, for every domain the Manager knows (Manager.Domains: at
// most Config.MaxDomains of them, and, with a Coordinator, those the
// cluster keeps a record of):
//
//   - certmgr_certificate_expiration_timestamp_seconds{domain}: NotAfter
//     of the certificate served, if any;
//   - certmgr_certificate_renewal_timestamp_seconds{domain}: when it is
//     due for renewal (Status.RenewDue), if a certificate is served;
//   - certmgr_renewal_overdue{domain}: 1 while its renewal is overdue
//     (Status.RenewalOverdue), else 0, if a certificate is served;
//   - certmgr_domain_state{domain,state}: 1 for the domain's state
//     (none, obtaining, valid, backoff, waiting-dns), 0 for the others;
//   - certmgr_domain_failures{domain}: its consecutive failed attempts;
//   - certmgr_domain_next_attempt_timestamp_seconds{domain}: the earliest
//     next attempt, while it waits.
//
// And the Manager's counters (Manager.Counters), since it started:
//
//   - certmgr_handshakes_total{answer}: certificate, fallback, challenge
//     or refused;
//   - certmgr_attempts_total{path,result}: attempts ended, by what
//     started them and how they ended (succeeded, failed, local);
//   - certmgr_orders_total, certmgr_failed_authorizations_total;
//   - certmgr_renewal_info_polls_total{result}: answered, unusable or
//     unreachable;
//   - certmgr_lock_waits_total: attempts that asked for their domain's
//     cluster lock.
//
// In a cluster each replica reports the cluster's view of every domain
// it knows; aggregate the per-domain series with max by (domain) and sum
// the counters.
package certmgrprom

import (
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/certmgr/certmgr"
)

var (
	expirationDesc = prometheus.NewDesc("certmgr_certificate_expiration_timestamp_seconds",
		"The time the certificate served for a domain expires, in seconds since the epoch.", []string{"domain"}, nil)
	renewalDesc = prometheus.NewDesc("certmgr_certificate_renewal_timestamp_seconds",
		"The time the certificate served for a domain is due for renewal, in seconds since the epoch.", []string{"domain"}, nil)
	overdueDesc = prometheus.NewDesc("certmgr_renewal_overdue",
		"1 while the certificate served for a domain should have been renewed and is not, else 0.", []string{"domain"}, nil)
	stateDesc = prometheus.NewDesc("certmgr_domain_state",
		"1 for the state a domain is in, 0 for the others.", []string{"domain", "state"}, nil)
	failuresDesc = prometheus.NewDesc("certmgr_domain_failures",
		"The consecutive failed ACME attempts of a domain.", []string{"domain"}, nil)
	nextAttemptDesc = prometheus.NewDesc("certmgr_domain_next_attempt_timestamp_seconds",
		"The earliest next ACME attempt of a domain that waits, in seconds since the epoch.", []string{"domain"}, nil)

	handshakesDesc = prometheus.NewDesc("certmgr_handshakes_total",
		"TLS handshakes, by what the Manager answered.", []string{"answer"}, nil)
	attemptsDesc = prometheus.NewDesc("certmgr_attempts_total",
		"ACME attempts that ended, by what started them and how they ended.", []string{"path", "result"}, nil)
	ordersDesc = prometheus.NewDesc("certmgr_orders_total",
		"ACME orders the CA made.", nil, nil)
	failedAuthzDesc = prometheus.NewDesc("certmgr_failed_authorizations_total",
		"ACME authorizations the CA failed.", nil, nil)
	pollsDesc = prometheus.NewDesc("certmgr_renewal_info_polls_total",
		"Polls of the CA's renewal information, by result.", []string{"result"}, nil)
	lockWaitsDesc = prometheus.NewDesc("certmgr_lock_waits_total",
		"ACME attempts that asked for their domain's cluster lock.", nil, nil)
)

// paths are the attempt paths, in the order the metrics list them.
var paths = []certmgr.Path{certmgr.PathHandshake, certmgr.PathProvision, certmgr.PathRenewal, certmgr.PathRenewalInfo}

// NewCollector returns a collector of m's domains and counters. It reads
// them at every scrape: Manager.Domains and Manager.Counters.
func NewCollector(m *certmgr.Manager) prometheus.Collector {
	return &collector{m: m}
}

type collector struct {
	m *certmgr.Manager
}

// Describe implements prometheus.Collector.
func (c *collector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{expirationDesc, renewalDesc, overdueDesc, stateDesc, failuresDesc, nextAttemptDesc,
		handshakesDesc, attemptsDesc, ordersDesc, failedAuthzDesc, pollsDesc, lockWaitsDesc} {
		ch <- d
	}
}

// Collect implements prometheus.Collector.
func (c *collector) Collect(ch chan<- prometheus.Metric) {
	gauge := func(d *prometheus.Desc, v float64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.GaugeValue, v, labels...)
	}
	counter := func(d *prometheus.Desc, v uint64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.CounterValue, float64(v), labels...)
	}
	for _, s := range c.m.Domains() {
		for st := certmgr.StateNone; st <= certmgr.StateWaitingDNS; st++ {
			gauge(stateDesc, b2f(s.State == st), s.Domain, st.String())
		}
		gauge(failuresDesc, float64(s.Failures), s.Domain)
		if !s.NextAttempt.IsZero() {
			gauge(nextAttemptDesc, seconds(s.NextAttempt), s.Domain)
		}
		if s.NotAfter.IsZero() {
			continue
		}
		gauge(expirationDesc, seconds(s.NotAfter), s.Domain)
		if !s.RenewDue.IsZero() {
			gauge(renewalDesc, seconds(s.RenewDue), s.Domain)
		}
		gauge(overdueDesc, b2f(s.RenewalOverdue), s.Domain)
	}

	n := c.m.Counters()
	counter(handshakesDesc, n.HandshakesCertificate, "certificate")
	counter(handshakesDesc, n.HandshakesFallback, "fallback")
	counter(handshakesDesc, n.HandshakesChallenge, "challenge")
	counter(handshakesDesc, n.HandshakesRefused, "refused")
	for _, p := range paths {
		a := n.Attempts[p]
		counter(attemptsDesc, a.Succeeded, string(p), "succeeded")
		counter(attemptsDesc, a.Failed, string(p), "failed")
		counter(attemptsDesc, a.Local, string(p), "local")
	}
	counter(ordersDesc, n.Orders)
	counter(failedAuthzDesc, n.FailedAuthorizations)
	counter(pollsDesc, n.RenewalInfoAnswered, "answered")
	counter(pollsDesc, n.RenewalInfoUnusable, "unusable")
	counter(pollsDesc, n.RenewalInfoUnreachable, "unreachable")
	counter(lockWaitsDesc, n.LockWaits)
}

func b2f(b bool) float64 {
	if b {
		return 1
	}
	return 0
}

// seconds returns t as seconds since the epoch.
func seconds(t time.Time) float64 {
	return float64(t.Unix()) + float64(t.Nanosecond())/1e9
}
