package certmgrtest

import (
	"bytes"
	"context"
	"crypto"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"net/http"
	"net/http/httptest"

	"golang.org/x/crypto/acme"
)

// SetRenewalInfo makes the CA answer body, verbatim, to requests for the
// renewal information (RFC 9773) of leaf, a certificate it issued: a
// well-formed suggestedWindow, or anything else (malformed JSON, an
// inverted window) to test a client's handling of bad answers. Pebble
// answers it with a Retry-After of 6 hours.
func (s *Server) SetRenewalInfo(ctx context.Context, leaf *x509.Certificate, body string) error {
	req, err := json.Marshal(struct{ Certificate, ARIResponse string }{
		Certificate: string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: leaf.Raw})),
		ARIResponse: body,
	})
	if err != nil {
		return err
	}
	r, err := http.NewRequestWithContext(ctx, http.MethodPost, "/set-renewal-info/", bytes.NewReader(req))
	if err != nil {
		return err
	}
	r.Header.Set("User-Agent", "certmgrtest")
	r.Header.Set("Content-Type", "application/json")
	w := httptest.NewRecorder()
	s.management.ServeHTTP(w, r)
	if w.Code != http.StatusOK {
		return fmt.Errorf("certmgrtest: setting the renewal information: %d: %s", w.Code, w.Body)
	}
	return nil
}

// Revoke revokes cert, a certificate the CA issued, through the ACME
// revocation endpoint, signed with the certificate's own key. The CA's
// renewal information then suggests renewing it at once.
func (s *Server) Revoke(ctx context.Context, cert *tls.Certificate) error {
	key, ok := cert.PrivateKey.(crypto.Signer)
	if !ok || len(cert.Certificate) == 0 {
		return errors.New("certmgrtest: Revoke needs a certificate with its private key")
	}
	c := &acme.Client{Key: key, DirectoryURL: s.DirectoryURL, HTTPClient: s.HTTPClient}
	return c.RevokeCert(ctx, nil, cert.Certificate[0], acme.CRLReasonKeyCompromise)
}
