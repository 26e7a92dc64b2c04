package certmgrtest

import (
	"fmt"
	"strings"
)

// Class is the kind of an ACME request, told from the Pebble URL path it is
// sent to.
type Class int

// The request classes. ClassAny is the zero value: in a Rule it matches
// every request, and Requests(ClassAny) is the number of all requests.
const (
	ClassAny        Class = iota
	ClassDirectory        // GET /dir
	ClassNonce            // HEAD or GET /nonce-plz
	ClassNewAccount       // POST /sign-me-up
	ClassAccount          // POST /my-account/<id> (account update, deactivation)
	ClassNewOrder         // POST /order-plz
	ClassOrder            // POST /my-order/<id> (POST-as-GET of an order)
	ClassAuthz            // POST /authZ/<id> (fetch or deactivate an authorization)
	ClassChallenge        // POST /chalZ/<id> (accept or fetch a challenge)
	ClassFinalize         // POST /finalize-order/<id>
	ClassCert             // POST /certZ/<serial> (certificate download)
	ClassRevoke           // POST /revoke-cert
	ClassOther            // any other path (key change, ARI, order lists, unknown)
)

var classNames = [...]string{
	ClassAny:        "any",
	ClassDirectory:  "directory",
	ClassNonce:      "nonce",
	ClassNewAccount: "new-account",
	ClassAccount:    "account",
	ClassNewOrder:   "new-order",
	ClassOrder:      "order",
	ClassAuthz:      "authz",
	ClassChallenge:  "challenge",
	ClassFinalize:   "finalize",
	ClassCert:       "cert",
	ClassRevoke:     "revoke",
	ClassOther:      "other",
}

// String returns the class's name, such as "new-order".
func (c Class) String() string {
	if c >= 0 && int(c) < len(classNames) {
		return classNames[c]
	}
	return fmt.Sprintf("Class(%d)", int(c))
}

// classify maps a request path to its Class. The paths are those of Pebble's
// WFE (wfe.go); they differ from Let's Encrypt's on purpose.
func classify(path string) Class {
	switch {
	case path == "/dir":
		return ClassDirectory
	case path == "/nonce-plz":
		return ClassNonce
	case path == "/sign-me-up":
		return ClassNewAccount
	case strings.HasPrefix(path, "/my-account/"):
		return ClassAccount
	case path == "/order-plz":
		return ClassNewOrder
	case strings.HasPrefix(path, "/my-order/"):
		return ClassOrder
	case strings.HasPrefix(path, "/authZ/"):
		return ClassAuthz
	case strings.HasPrefix(path, "/chalZ/"):
		return ClassChallenge
	case strings.HasPrefix(path, "/finalize-order/"):
		return ClassFinalize
	case strings.HasPrefix(path, "/certZ/"):
		return ClassCert
	case path == "/revoke-cert":
		return ClassRevoke
	}
	return ClassOther
}
