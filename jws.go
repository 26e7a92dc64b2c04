package certmgr

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"encoding/asn1"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"math/big"
)

// This file holds the rewriting of a new-order request: autocert cannot
// ask for a profile or name the certificate an order replaces, so the
// ACME transport adds those fields to the request's payload and signs it
// again with the account key (RFC 8555, section 6.2: a flattened JWS).

// flatJWS is a flattened JWS, as acme.Client sends every request.
type flatJWS struct {
	Protected string `json:"protected"`
	Payload   string `json:"payload"`
	Signature string `json:"signature"`
}

// errNoRewrite is wrapped by rewriteOrder's errors: the request cannot be
// rewritten, and goes out as it is (or not at all, if its field is
// required).
var errNoRewrite = errors.New("certmgr: the new-order request cannot be rewritten")

// rewriteOrder returns body, a JWS new-order request, with the payload's
// fields set to set's values (a field whose value is "" removed), its
// protected header's nonce replaced by nonce if not empty, and signed
// again with key. The protected header is kept byte for byte unless the
// nonce changes. It fails, wrapping errNoRewrite, if body is not a
// flattened JWS with a JSON object as payload, or its algorithm is not
// key's.
func rewriteOrder(body []byte, key crypto.Signer, set map[string]string, nonce string) ([]byte, error) {
	var j flatJWS
	if err := json.Unmarshal(body, &j); err != nil {
		return nil, fmt.Errorf("%w: %v", errNoRewrite, err)
	}
	protected, err := base64.RawURLEncoding.DecodeString(j.Protected)
	if err != nil {
		return nil, fmt.Errorf("%w: protected header: %v", errNoRewrite, err)
	}
	var header map[string]json.RawMessage
	if err := json.Unmarshal(protected, &header); err != nil {
		return nil, fmt.Errorf("%w: protected header: %v", errNoRewrite, err)
	}
	var alg string
	if err := json.Unmarshal(header["alg"], &alg); err != nil {
		return nil, fmt.Errorf("%w: no algorithm", errNoRewrite)
	}
	hash, size, err := signingOf(key, alg)
	if err != nil {
		return nil, err
	}
	payload, err := base64.RawURLEncoding.DecodeString(j.Payload)
	if err != nil {
		return nil, fmt.Errorf("%w: payload: %v", errNoRewrite, err)
	}
	var fields map[string]json.RawMessage
	if err := json.Unmarshal(payload, &fields); err != nil || fields == nil {
		return nil, fmt.Errorf("%w: the payload is not a JSON object", errNoRewrite)
	}
	for k, v := range set {
		if v == "" {
			delete(fields, k)
			continue
		}
		b, err := json.Marshal(v)
		if err != nil {
			return nil, fmt.Errorf("%w: %v", errNoRewrite, err)
		}
		fields[k] = b
	}
	if payload, err = json.Marshal(fields); err != nil {
		return nil, fmt.Errorf("%w: %v", errNoRewrite, err)
	}
	if nonce != "" {
		b, err := json.Marshal(nonce)
		if err != nil {
			return nil, fmt.Errorf("%w: %v", errNoRewrite, err)
		}
		header["nonce"] = b
		if protected, err = json.Marshal(header); err != nil {
			return nil, fmt.Errorf("%w: %v", errNoRewrite, err)
		}
		j.Protected = base64.RawURLEncoding.EncodeToString(protected)
	}
	j.Payload = base64.RawURLEncoding.EncodeToString(payload)
	h := hash.New()
	h.Write([]byte(j.Protected + "." + j.Payload))
	sig, err := key.Sign(rand.Reader, h.Sum(nil), hash)
	if err != nil {
		return nil, fmt.Errorf("%w: signing: %v", errNoRewrite, err)
	}
	if size > 0 {
		// ECDSA: JWS wants r‖s, each of the curve's size (RFC 7518,
		// section 3.4), not the DER that crypto.Signer gives.
		var rs struct{ R, S *big.Int }
		if _, err := asn1.Unmarshal(sig, &rs); err != nil || rs.R == nil || rs.S == nil || rs.R.Sign() < 0 || rs.S.Sign() < 0 ||
			rs.R.BitLen() > 8*size || rs.S.BitLen() > 8*size {
			return nil, fmt.Errorf("%w: the signature is not ECDSA's", errNoRewrite)
		}
		sig = make([]byte, 2*size)
		rs.R.FillBytes(sig[:size])
		rs.S.FillBytes(sig[size:])
	}
	j.Signature = base64.RawURLEncoding.EncodeToString(sig)
	return json.Marshal(j)
}

// signingOf returns the hash alg signs with, and for ECDSA the size of r
// and s, if key signs with alg.
func signingOf(key crypto.Signer, alg string) (hash crypto.Hash, size int, err error) {
	switch pub := key.Public().(type) {
	case *rsa.PublicKey:
		if alg == "RS256" {
			return crypto.SHA256, 0, nil
		}
	case *ecdsa.PublicKey:
		switch {
		case alg == "ES256" && pub.Curve == elliptic.P256():
			return crypto.SHA256, 32, nil
		case alg == "ES384" && pub.Curve == elliptic.P384():
			return crypto.SHA384, 48, nil
		case alg == "ES512" && pub.Curve == elliptic.P521():
			return crypto.SHA512, 66, nil
		}
	}
	return 0, 0, fmt.Errorf("%w: the algorithm %q is not the account key's (%T)", errNoRewrite, alg, key.Public())
}
