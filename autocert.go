package certmgr

import (
	"context"
	"crypto"
	"net/http"

	"golang.org/x/crypto/acme"
	"golang.org/x/crypto/acme/autocert"
)

// This file holds the factory of the autocert.Managers certmgr runs: one
// per domain (domainAutocert), one for renewals the CA asks for, and a base
// one that answers challenges of names without their own. Each talks to the
// CA through certmgr's ACME transport (acme.go), which can tell them apart
// by their requests' sender.

// domainAutocert returns d's autocert.Manager, creating it if needed.
func (m *Manager) domainAutocert(ctx context.Context, d *domain) (*autocert.Manager, error) {
	m.stateMu.Lock()
	am := d.am
	m.stateMu.Unlock()
	if am != nil {
		return am, nil
	}
	key, err := m.accountKey(ctx)
	if err != nil {
		return nil, err
	}
	http01 := m.http01.Load()
	am = m.newAutocert(key, m.cache) // outside stateMu: it calls into autocert
	m.stateMu.Lock()
	if d.am == nil {
		d.am = am
	}
	am = d.am
	m.stateMu.Unlock()
	if !http01 && m.http01.Load() {
		am.HTTPHandler(nil) // HTTPHandler was called meanwhile and may have missed it
	}
	return am, nil
}

// challengeAutocert returns the autocert.Manager of name, or the base one.
func (m *Manager) challengeAutocert(name string) *autocert.Manager {
	m.stateMu.Lock()
	defer m.stateMu.Unlock()
	if d := m.domains[name]; d != nil && d.am != nil {
		return d.am
	}
	return m.base
}

// newAutocert returns an autocert.Manager with the user's settings that
// writes through certmgr's cache and talks to the CA with account key
// through certmgr's observer. Each gets a client of its own whose
// requests carry the Manager, so that the observer refuses orders from
// one that is no longer its domain's (its renewal timers cannot be
// stopped).
func (m *Manager) newAutocert(key crypto.Signer, cache autocert.Cache) *autocert.Manager {
	u := m.cfg.Autocert
	am := &autocert.Manager{
		Prompt:                 u.Prompt,
		Cache:                  cache,
		HostPolicy:             u.HostPolicy,
		RenewBefore:            u.RenewBefore,
		Email:                  u.Email,
		ExtraExtensions:        u.ExtraExtensions,
		ExternalAccountBinding: u.ExternalAccountBinding,
	}
	httpClient := &http.Client{Transport: senderTransport{am: am, next: m.obs}}
	if t := m.client.HTTPClient; t != nil {
		httpClient.Timeout = t.Timeout
		httpClient.CheckRedirect = t.CheckRedirect
		httpClient.Jar = t.Jar
	}
	am.Client = &acme.Client{
		Key:          key,
		HTTPClient:   httpClient,
		DirectoryURL: m.client.DirectoryURL,
		RetryBackoff: m.client.RetryBackoff,
		UserAgent:    m.client.UserAgent,
		KID:          m.client.KID,
	}
	if am.Prompt == nil {
		am.Prompt = autocert.AcceptTOS
	}
	if m.http01.Load() {
		am.HTTPHandler(nil) // let autocert try http-01 too
	}
	return am
}

// senderTransport marks each request with the autocert.Manager whose
// client sends it, for the observer's admit.
type senderTransport struct {
	am   *autocert.Manager
	next http.RoundTripper
}

type senderKey struct{}

// RoundTrip implements http.RoundTripper.
func (t senderTransport) RoundTrip(req *http.Request) (*http.Response, error) {
	return t.next.RoundTrip(req.WithContext(context.WithValue(req.Context(), senderKey{}, t.am)))
}

// sender returns the autocert.Manager that sent req, or nil.
func sender(req *http.Request) *autocert.Manager {
	am, _ := req.Context().Value(senderKey{}).(*autocert.Manager)
	return am
}
