// Package cliflag has the repeatable flag.Value types the example
// programs share.
package cliflag

import (
	"errors"
	"net/netip"
	"strings"
)

// Strings is a flag that may be given more than once; each value is kept.
type Strings []string

// String returns the values, comma-separated.
func (l *Strings) String() string { return strings.Join(*l, ",") }

// Set adds s.
func (l *Strings) Set(s string) error {
	*l = append(*l, s)
	return nil
}

// Addrs is a flag of IP addresses that may be given more than once.
// IPv4-mapped IPv6 addresses are kept in their IPv4 form.
type Addrs []netip.Addr

// String returns the addresses, comma-separated.
func (l *Addrs) String() string {
	s := make([]string, len(*l))
	for i, a := range *l {
		s[i] = a.String()
	}
	return strings.Join(s, ",")
}

// Set adds the address s.
func (l *Addrs) Set(s string) error {
	a, err := netip.ParseAddr(s)
	if err != nil {
		return errors.New("not an IP address")
	}
	*l = append(*l, a.Unmap())
	return nil
}
