package certmgr

import (
	"crypto/x509"
	"errors"
	"fmt"
	"strings"
)

// This file holds what the transport asks of the Manager to rewrite a new
// order (see jws.go): the certificate a renewal replaces (RFC 9773,
// section 5), and the profile the CA does not offer.

// replacesFor implements acmeOwner: the identifier of the certificate the
// renewal in flight for name replaces, if the CA offers renewal
// information and follows this certificate's (it issued it), unless the
// CA refused replaces in this attempt already; "" otherwise. Of the
// certificates served as the renewal began, the ECDSA one comes first.
func (m *Manager) replacesFor(name string) string {
	m.stateMu.Lock()
	d := m.domains[name]
	var since [2]*x509.Certificate
	ok := d != nil && d.attempt != nil && (d.attempt.path == PathRenewal || d.attempt.path == PathRenewalInfo) && !d.attempt.noReplaces
	if ok {
		since = d.attempt.since
	}
	m.stateMu.Unlock()
	if !ok || !m.obs.directoryInfo().renewalInfo {
		return ""
	}
	for _, leaf := range since {
		if leaf == nil || !m.ari.follows(leaf) {
			continue
		}
		id, _ := certID(leaf)
		m.stateMu.Lock()
		if d.attempt != nil {
			d.attempt.replaces = id
		}
		m.stateMu.Unlock()
		return id
	}
	return ""
}

// replacesRefused implements acmeOwner: the CA refused replaces in
// name's attempt; its next orders go without.
func (m *Manager) replacesRefused(name string) {
	m.stateMu.Lock()
	defer m.stateMu.Unlock()
	if d := m.domains[name]; d != nil && d.attempt != nil {
		d.attempt.noReplaces, d.attempt.replaces = true, ""
	}
}

// errProfile is wrapped by the error of an order that asks for a profile
// the CA does not offer: certmgr's own failure, which spends nothing.
var errProfile = errors.New("certmgr: the CA does not offer the profile")

// profileRefused implements acmeOwner.
func (m *Manager) profileRefused(name, profile string, offered []string) error {
	err := fmt.Errorf("%w %q (Config.Profile); it offers: %s", errProfile, profile, strings.Join(offered, ", "))
	if len(offered) == 0 {
		err = fmt.Errorf("%w %q (Config.Profile); it offers none", errProfile, profile)
	}
	if m.profileSaid.CompareAndSwap(false, true) {
		m.log.Error("profile not offered", "profile", profile, "err", err.Error())
	}
	return m.orderRefused(name, err)
}

// orderRefused implements acmeOwner: autocert reports an order that did
// not go out in its own words ("missing certificate"), so the attempt
// keeps certmgr's, which finish reports instead.
func (m *Manager) orderRefused(name string, err error) error {
	m.stateMu.Lock()
	defer m.stateMu.Unlock()
	if d := m.domains[name]; d != nil && d.attempt != nil && d.attempt.refusal == nil {
		d.attempt.refusal = fmt.Errorf("certmgr: %s: %w", name, err)
	}
	return err
}
