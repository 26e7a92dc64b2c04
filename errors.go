package certmgr

import (
	"errors"

	"github.com/certmgr/certmgr/internal/dnscheck"
)

// Errors that callers branch on with errors.Is. Each error certmgr returns
// for one of these reasons wraps the sentinel together with the detail.
var (
	// ErrHostNotAllowed reports that the HostPolicy refused the name.
	ErrHostNotAllowed = errors.New("certmgr: host not allowed")
	// ErrBackoff reports that the domain's next ACME attempt is not yet due.
	ErrBackoff = errors.New("certmgr: backing off")
	// ErrDNSNotReady reports that the domain's DNS does not point at the
	// cluster (or a CAA record forbids the CA). Its text is
	// "certmgr: DNS not ready".
	ErrDNSNotReady = dnscheck.ErrNotReady
)

// errClosed is returned for ACME requests and attempts after Close.
var errClosed = errors.New("certmgr: manager closed")

// errLoading refuses an order while a domain's autocert reads the Cache.
var errLoading = errors.New("certmgr: no ACME order while loading from cache")

// errOrderBudget refuses an order beyond Config.OrderBudget.
var errOrderBudget = errors.New("certmgr: the account's order budget is spent")

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
