package certmgr

import (
	"errors"
	"fmt"
	"net/netip"
	"strings"

	"golang.org/x/net/idna"
)

// This file holds the rules of server names: the one normalised form
// under which certmgr, autocert, the Cache and the DNS pre-check know a
// name.

// maxNameLen is the longest DNS name (RFC 1035) in presentation form,
// and maxLabelLen the longest label.
const (
	maxNameLen  = 253
	maxLabelLen = 63
)

// normalize returns the one name under which certmgr, autocert, the
// Cache and the DNS pre-check know a server name: IDNA Lookup to ASCII
// (which also folds case), trailing dot dropped. It refuses what autocert
// refuses (an empty name, a name without an ASCII dot between labels, a
// name with characters IDNA does not allow) and also names autocert would
// take but no certificate can name: an IP address, an empty label, a
// label over 63 bytes, or a name over 253 bytes.
func normalize(name string) (string, error) {
	if name == "" {
		return "", errors.New("certmgr: missing server name")
	}
	if len(name) > 4*maxNameLen {
		return "", errors.New("certmgr: server name too long")
	}
	if !strings.Contains(strings.Trim(name, "."), ".") {
		return "", fmt.Errorf("certmgr: server name %q needs at least two labels", name)
	}
	ascii, err := idna.Lookup.ToASCII(name)
	if err != nil {
		return "", fmt.Errorf("certmgr: server name %q contains an invalid character", name)
	}
	ascii = strings.ToLower(strings.TrimSuffix(ascii, "."))
	if ascii == "" || ascii[0] == '.' || strings.HasSuffix(ascii, ".") || strings.Contains(ascii, "..") {
		return "", fmt.Errorf("certmgr: server name %q has an empty label", name)
	}
	if !strings.Contains(ascii, ".") {
		return "", fmt.Errorf("certmgr: server name %q needs at least two labels", name)
	}
	// What IDNA made of the name must be a name IDNA takes as it is, so
	// that the result names one domain whichever form a client sends.
	if again, err := idna.Lookup.ToASCII(ascii); err != nil || again != ascii {
		return "", fmt.Errorf("certmgr: server name %q contains an invalid character", name)
	}
	if len(ascii) > maxNameLen {
		return "", errors.New("certmgr: server name too long")
	}
	for label := range strings.SplitSeq(ascii, ".") {
		if len(label) > maxLabelLen {
			return "", fmt.Errorf("certmgr: server name %q has a label over %d bytes", name, maxLabelLen)
		}
	}
	if _, err := netip.ParseAddr(ascii); err == nil {
		return "", fmt.Errorf("certmgr: server name %q is an IP address", name)
	}
	return ascii, nil
}
