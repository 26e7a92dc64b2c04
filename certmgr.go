// Package certmgr makes automatic HTTPS certificates from
// golang.org/x/crypto/acme/autocert safe to run in production.
package certmgr

import "errors"

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
