package certmgr

import (
	"net"
	"net/http"
	"strings"

	"golang.org/x/crypto/acme/autocert"
)

// HTTPHandler returns a handler that answers ACME http-01 challenges and
// passes every other request to fallback; it must serve port 80. If
// fallback is nil, the handler redirects GET and HEAD to https and
// refuses other methods, as autocert's does. Calling HTTPHandler lets
// attempts use http-01 after tls-alpn-01, as autocert does; every attempt
// then risks two failed authorizations instead of one.
func (m *Manager) HTTPHandler(fallback http.Handler) http.Handler {
	// Managers made from here on try http-01 (newAutocert); those made
	// before are told here, outside stateMu: autocert takes its own lock.
	m.http01.Store(true)
	m.stateMu.Lock()
	ams := make([]*autocert.Manager, 0, len(m.domains))
	for _, d := range m.domains {
		if d.am != nil {
			ams = append(ams, d.am)
		}
	}
	m.stateMu.Unlock()
	for _, am := range ams {
		am.HTTPHandler(nil)
	}
	base := m.base.HTTPHandler(fallback)
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		token, ok := strings.CutPrefix(r.URL.Path, "/.well-known/acme-challenge/")
		if !ok {
			base.ServeHTTP(w, r)
			return
		}
		if !validToken(token) {
			// Checked before any Cache call: a remote client can send any path.
			http.Error(w, "certmgr: not an ACME token", http.StatusNotFound)
			return
		}
		// A validation on another port than 80 carries it in Host; the
		// HostPolicy is asked about the name alone.
		host := r.Host
		if h, _, err := net.SplitHostPort(host); err == nil {
			host = h
		}
		name, err := normalize(host)
		if err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		r = r.Clone(r.Context())
		r.Host = name
		m.challengeAutocert(name).HTTPHandler(fallback).ServeHTTP(w, r)
	})
}

// validToken reports whether token can be an ACME challenge token:
// base64url without padding, of at least 128 bits (RFC 8555, section 8.1)
// and at most 128 characters (Let's Encrypt's and Pebble's have 43).
func validToken(token string) bool {
	if len(token) < 22 || len(token) > 128 {
		return false
	}
	for i := 0; i < len(token); i++ {
		c := token[i]
		if !('a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || '0' <= c && c <= '9' || c == '-' || c == '_') {
			return false
		}
	}
	return true
}
