package certmgr

import (
	"errors"
	"fmt"
	"net/http"
	"testing"

	"golang.org/x/crypto/acme"
)

// TestAttemptError: an attempt's error says the CA's detail when there is
// one, else autocert's error; it unwraps to autocert's error, so that
// errors.As reaches the CA's *acme.Error through it and through wrapping.
func TestAttemptError(t *testing.T) {
	caErr := &acme.Error{StatusCode: http.StatusForbidden, ProblemType: "urn:ietf:params:acme:error:unauthorized", Detail: "no"}
	for _, tt := range []struct {
		err  *AttemptError
		want string
	}{
		{&AttemptError{Domain: "a.test", Detail: "Connection refused", Err: caErr}, "certmgr: a.test: Connection refused"},
		{&AttemptError{Domain: "a.test", Err: caErr}, "certmgr: a.test: 403 urn:ietf:params:acme:error:unauthorized: no"},
	} {
		if got := tt.err.Error(); got != tt.want {
			t.Errorf("Error() = %q, want %q", got, tt.want)
		}
		if tt.err.Unwrap() != caErr {
			t.Errorf("Unwrap() = %v, want the CA's error", tt.err.Unwrap())
		}
		wrapped := fmt.Errorf("provisioning: %w", tt.err)
		var ae *AttemptError
		var ce *acme.Error
		if !errors.As(wrapped, &ae) || ae != tt.err || !errors.As(wrapped, &ce) || ce != caErr || !errors.Is(wrapped, caErr) {
			t.Errorf("errors.As through %v: %v, %v", wrapped, ae, ce)
		}
	}
}

// TestSentinelsAreDistinct: the errors callers branch on are distinct,
// and certmgr's wrapping of one is only that one.
func TestSentinelsAreDistinct(t *testing.T) {
	sentinels := []error{ErrHostNotAllowed, ErrBackoff, ErrDNSNotReady, errClosed, errLoading}
	for i, a := range sentinels {
		wrapped := fmt.Errorf("%w: a.test: detail", a)
		for j, b := range sentinels {
			if errors.Is(wrapped, b) != (i == j) {
				t.Errorf("errors.Is(%v, %v) = %v", wrapped, b, !(i == j))
			}
		}
	}
}
