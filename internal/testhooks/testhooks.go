// Package testhooks lets the tests of this repository's nested modules set
// what the root package's own tests set directly: a Manager's clock.
// Packages outside the repository cannot import it.
package testhooks

import (
	"time"

	"golang.org/x/crypto/acme/autocert"
)

// Cache wraps an autocert.Cache with test settings for the certmgr.Manager
// whose Config.Autocert.Cache it is. It passes everything else through,
// a Coordinator included (see Unwrap).
type Cache struct {
	autocert.Cache
	Now func() time.Time // the Manager's clock; if nil, time.Now
	// RenewalInfoPoll, if not zero, is the interval between two polls of
	// a certificate's renewal information, whatever the CA's Retry-After.
	RenewalInfoPoll time.Duration
}

// Unwrap returns the wrapped Cache.
func (c *Cache) Unwrap() autocert.Cache { return c.Cache }
