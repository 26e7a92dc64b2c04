package certmgr

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"strings"

	"golang.org/x/crypto/acme/autocert"
)

// accountKeyName is the Cache key of the ACME account key, as autocert
// names it.
const accountKeyName = "acme_account+key"

// oldAccountKeyName is the name autocert used before accountKeyName; it
// still reads it.
const oldAccountKeyName = "acme_account.key"

// accountKey returns the ACME account key: the user's Client's, the one
// in the Cache (where autocert keeps it), or a new one written there.
// Concurrent callers share one read of the Cache, made with the
// Manager's lifetime rather than any caller's.
func (m *Manager) accountKey(ctx context.Context) (crypto.Signer, error) {
	m.accountMu.Lock()
	key := m.key
	m.accountMu.Unlock()
	if key != nil {
		return key, nil
	}
	if m.client.Key != nil {
		return m.client.Key, nil
	}
	ch := m.loads.DoChan(accountKeyName, func() (any, error) {
		ctx, cancel := context.WithTimeout(m.ctx, cacheTimeout)
		defer cancel()
		key, err := m.readAccountKey(ctx)
		if err != nil {
			return nil, err
		}
		m.accountMu.Lock()
		m.key = key
		m.accountMu.Unlock()
		return key, nil
	})
	select {
	case r := <-ch:
		if r.Err != nil {
			return nil, r.Err
		}
		return r.Val.(crypto.Signer), nil
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}

// readAccountKey reads the account key from the Cache, or makes one and
// writes it there. A failed write is kept, served and retried by the
// cache: the account is not lost, so it is no error here.
func (m *Manager) readAccountKey(ctx context.Context) (crypto.Signer, error) {
	data, err := m.cache.Get(ctx, accountKeyName)
	if errors.Is(err, autocert.ErrCacheMiss) {
		data, err = m.cache.Get(ctx, oldAccountKeyName)
	}
	switch {
	case err == nil:
		block, _ := pem.Decode(data)
		if block == nil || !strings.Contains(block.Type, "PRIVATE") {
			return nil, errors.New("certmgr: invalid account key in cache")
		}
		return parsePrivateKey(block.Bytes)
	case !errors.Is(err, autocert.ErrCacheMiss):
		return nil, fmt.Errorf("certmgr: reading account key: %w", err)
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	der, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		return nil, err
	}
	data, err = m.storeAccountKey(ctx, pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: der}))
	if err != nil {
		return nil, err
	}
	block, _ := pem.Decode(data)
	if block == nil || !strings.Contains(block.Type, "PRIVATE") {
		return nil, errors.New("certmgr: invalid account key in cache")
	}
	return parsePrivateKey(block.Bytes)
}

// accountSeen records the account's URI, which the CA gave in its answer
// to a new-account request.
func (m *Manager) accountSeen(uri string) { m.account.Store(uri) }

// accountSigner implements acmeOwner: the account key, once known.
func (m *Manager) accountSigner() crypto.Signer {
	m.accountMu.Lock()
	defer m.accountMu.Unlock()
	if m.key != nil {
		return m.key
	}
	return m.client.Key
}
