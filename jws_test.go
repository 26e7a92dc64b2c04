package certmgr

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"encoding/base64"
	"encoding/json"
	"errors"
	"math/big"
	"testing"
)

// signJWS returns a flattened JWS of payload, signed with key, as
// acme.Client sends one.
func signJWS(t testing.TB, key crypto.Signer, alg, nonce, url, payload string) []byte {
	t.Helper()
	protected, _ := json.Marshal(map[string]string{"alg": alg, "kid": "https://ca/acct/1", "nonce": nonce, "url": url})
	j := flatJWS{Protected: base64.RawURLEncoding.EncodeToString(protected), Payload: base64.RawURLEncoding.EncodeToString([]byte(payload))}
	digest := sha256.Sum256([]byte(j.Protected + "." + j.Payload))
	sig, err := key.Sign(rand.Reader, digest[:], crypto.SHA256)
	if err != nil {
		t.Fatal(err)
	}
	if ec, ok := key.(*ecdsa.PrivateKey); ok {
		r, s, err := ecdsa.Sign(rand.Reader, ec, digest[:])
		if err != nil {
			t.Fatal(err)
		}
		sig = make([]byte, 64)
		r.FillBytes(sig[:32])
		s.FillBytes(sig[32:])
	}
	j.Signature = base64.RawURLEncoding.EncodeToString(sig)
	b, _ := json.Marshal(j)
	return b
}

// verifyJWS checks body's signature with pub (ES256 or RS256) and
// returns its protected header and payload.
func verifyJWS(body []byte, pub crypto.PublicKey) (header map[string]any, payload map[string]any, err error) {
	var j flatJWS
	if err := json.Unmarshal(body, &j); err != nil {
		return nil, nil, err
	}
	sig, err := base64.RawURLEncoding.DecodeString(j.Signature)
	if err != nil {
		return nil, nil, err
	}
	digest := sha256.Sum256([]byte(j.Protected + "." + j.Payload))
	switch pub := pub.(type) {
	case *ecdsa.PublicKey:
		if len(sig) != 64 || !ecdsa.Verify(pub, digest[:], new(big.Int).SetBytes(sig[:32]), new(big.Int).SetBytes(sig[32:])) {
			return nil, nil, errors.New("bad ECDSA signature")
		}
	case *rsa.PublicKey:
		if err := rsa.VerifyPKCS1v15(pub, crypto.SHA256, digest[:], sig); err != nil {
			return nil, nil, err
		}
	}
	p, _ := base64.RawURLEncoding.DecodeString(j.Protected)
	if err := json.Unmarshal(p, &header); err != nil {
		return nil, nil, err
	}
	q, _ := base64.RawURLEncoding.DecodeString(j.Payload)
	if err := json.Unmarshal(q, &payload); err != nil {
		return nil, nil, err
	}
	return header, payload, nil
}

// TestRewriteOrder: a new-order request gets profile and replaces, keeps
// its identifiers and its protected header byte for byte, and verifies
// with the account key, ECDSA or RSA; a new nonce replaces the old one;
// a field set to "" goes; what cannot be rewritten is refused.
func TestRewriteOrder(t *testing.T) {
	ec, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	rs, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	const order = `{"identifiers":[{"type":"dns","value":"a.test"}]}`
	for _, tc := range []struct {
		key crypto.Signer
		alg string
	}{{ec, "ES256"}, {rs, "RS256"}} {
		body := signJWS(t, tc.key, tc.alg, "n1", "https://ca/new-order", order)
		out, err := rewriteOrder(body, tc.key, map[string]string{"profile": "shortlived", "replaces": "aYhba4dGQEHhs3uEe6CuLN4ByNQ.AIdlQyE"}, "")
		if err != nil {
			t.Fatalf("%s: %v", tc.alg, err)
		}
		header, payload, err := verifyJWS(out, tc.key.Public())
		if err != nil {
			t.Fatalf("%s: the rewritten request does not verify: %v", tc.alg, err)
		}
		var in, got flatJWS
		json.Unmarshal(body, &in)
		json.Unmarshal(out, &got)
		if got.Protected != in.Protected || header["nonce"] != "n1" {
			t.Errorf("%s: protected header %q, want %q as it was", tc.alg, got.Protected, in.Protected)
		}
		ids, _ := json.Marshal(payload["identifiers"])
		if payload["profile"] != "shortlived" || payload["replaces"] != "aYhba4dGQEHhs3uEe6CuLN4ByNQ.AIdlQyE" || string(ids) != `[{"type":"dns","value":"a.test"}]` {
			t.Errorf("%s: payload %v", tc.alg, payload)
		}
		// After a badNonce, or to send it again without replaces.
		again, err := rewriteOrder(out, tc.key, map[string]string{"replaces": ""}, "n2")
		if err != nil {
			t.Fatal(err)
		}
		header, payload, err = verifyJWS(again, tc.key.Public())
		if err != nil || header["nonce"] != "n2" || header["url"] != "https://ca/new-order" || payload["replaces"] != nil || payload["profile"] != "shortlived" {
			t.Errorf("%s: sent again: %v, header %v, payload %v", tc.alg, err, header, payload)
		}
	}
	for name, body := range map[string][]byte{
		"not JSON":          []byte("hello"),
		"payload a list":    signJWS(t, ec, "ES256", "n", "u", `[1,2]`),
		"payload empty":     signJWS(t, ec, "ES256", "n", "u", ``),
		"another key's":     signJWS(t, rs, "RS256", "n", "u", order),
		"unknown alg":       signJWS(t, ec, "EdDSA", "n", "u", order),
		"protected not b64": []byte(`{"protected":"!!","payload":"e30","signature":""}`),
	} {
		if _, err := rewriteOrder(body, ec, map[string]string{"profile": "x"}, ""); !errors.Is(err, errNoRewrite) {
			t.Errorf("%s: %v, want errNoRewrite", name, err)
		}
	}
}

// FuzzRewriteOrder: whatever the body, rewriteOrder refuses it or emits a
// request that verifies with the account key and carries the profile.
func FuzzRewriteOrder(f *testing.F) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		f.Fatal(err)
	}
	f.Add(signJWS(f, key, "ES256", "n", "https://ca/new-order", `{"identifiers":[{"type":"dns","value":"a.test"}]}`))
	f.Add(signJWS(f, key, "ES256", "n", "u", `{"profile":7,"replaces":null}`))
	f.Add([]byte(`{"protected":"e30","payload":"e30","signature":""}`))
	f.Add([]byte(`{}`))
	f.Fuzz(func(t *testing.T, body []byte) {
		out, err := rewriteOrder(body, key, map[string]string{"profile": "p"}, "")
		if err != nil {
			if !errors.Is(err, errNoRewrite) {
				t.Fatalf("error %v does not wrap errNoRewrite", err)
			}
			return
		}
		_, payload, err := verifyJWS(out, key.Public())
		if err != nil || payload["profile"] != "p" {
			t.Fatalf("rewritten %q: %v, payload %v", out, err, payload)
		}
	})
}
