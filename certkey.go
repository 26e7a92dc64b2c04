package certmgr

import (
	"crypto"
	"crypto/rsa"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"strings"
	"time"
)

// This file holds the keys under which autocert stores a domain's
// certificates in the Cache, and the codec of those entries (PEM: the
// private key, then the chain).

// isCertKey reports whether key is one under which autocert stores a
// domain's certificate: "example.com" (ECDSA) or "example.com+rsa".
// Its other keys have other suffixes ("+token", "+http-01",
// "acme_account+key"), or are autocert's former account key name
// ("acme_account.key"), and certmgr's own start with "certmgr+".
func isCertKey(key string) bool {
	if key == oldAccountKeyName {
		return false
	}
	i := strings.IndexByte(key, '+')
	return i < 0 || key[i:] == "+rsa"
}

// certKey names one of a domain's certificates.
type certKey struct {
	domain string
	rsa    bool
}

// cacheKey returns the autocert.Cache key of k.
func (k certKey) cacheKey() string {
	if k.rsa {
		return k.domain + "+rsa"
	}
	return k.domain
}

func certKeyOf(cacheKey string) certKey {
	if d, ok := strings.CutSuffix(cacheKey, "+rsa"); ok {
		return certKey{domain: d, rsa: true}
	}
	return certKey{domain: cacheKey}
}

// parseCert decodes a certificate as autocert stores it and checks that
// it is usable for k at now.
func parseCert(k certKey, data []byte, now time.Time) (*tls.Certificate, error) {
	c, err := decodeCert(data)
	if err != nil {
		return nil, err
	}
	leaf := c.Leaf
	if now.Before(leaf.NotBefore) || !now.Before(leaf.NotAfter) {
		return nil, errors.New("certmgr: cached certificate is not valid now")
	}
	if err := leaf.VerifyHostname(k.domain); err != nil {
		return nil, err
	}
	if _, isRSA := leaf.PublicKey.(*rsa.PublicKey); isRSA != k.rsa {
		return nil, errors.New("certmgr: cached certificate has the wrong key type")
	}
	return c, nil
}

// decodeCert decodes a certificate as autocert stores it: the private key
// then the chain, in PEM. The leaf must match the key.
func decodeCert(data []byte) (*tls.Certificate, error) {
	keyBlock, rest := pem.Decode(data)
	if keyBlock == nil || !strings.Contains(keyBlock.Type, "PRIVATE") {
		return nil, errors.New("certmgr: cached certificate has no private key")
	}
	var chain [][]byte
	for len(rest) > 0 {
		var b *pem.Block
		b, rest = pem.Decode(rest)
		if b == nil {
			break
		}
		chain = append(chain, b.Bytes)
	}
	if len(chain) == 0 || len(strings.TrimSpace(string(rest))) > 0 {
		return nil, errors.New("certmgr: cached certificate is malformed")
	}
	key, err := parsePrivateKey(keyBlock.Bytes)
	if err != nil {
		return nil, err
	}
	leaf, err := x509.ParseCertificate(chain[0])
	if err != nil {
		return nil, err
	}
	if pub, ok := leaf.PublicKey.(interface{ Equal(crypto.PublicKey) bool }); !ok || !pub.Equal(key.Public()) {
		return nil, errors.New("certmgr: cached certificate does not match its key")
	}
	return &tls.Certificate{Certificate: chain, PrivateKey: key, Leaf: leaf}, nil
}

func parsePrivateKey(der []byte) (crypto.Signer, error) {
	if k, err := x509.ParsePKCS1PrivateKey(der); err == nil {
		return k, nil
	}
	if k, err := x509.ParseECPrivateKey(der); err == nil {
		return k, nil
	}
	k, err := x509.ParsePKCS8PrivateKey(der)
	if err != nil {
		return nil, errors.New("certmgr: cannot parse private key")
	}
	s, ok := k.(crypto.Signer)
	if !ok {
		return nil, errors.New("certmgr: private key cannot sign")
	}
	return s, nil
}
