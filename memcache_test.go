package certmgr

import (
	"context"
	"testing"

	"golang.org/x/crypto/acme/autocert"
)

// TestMemCache: the Cache of a Manager whose autocert.Manager has none.
func TestMemCache(t *testing.T) {
	ctx := context.Background()
	c := &memCache{m: make(map[string][]byte)}
	if _, err := c.Get(ctx, "k"); err != autocert.ErrCacheMiss {
		t.Errorf("Get of nothing = %v, want autocert.ErrCacheMiss", err)
	}
	c.Put(ctx, "k", []byte("v"))
	if v, err := c.Get(ctx, "k"); err != nil || string(v) != "v" {
		t.Errorf("Get = %q, %v", v, err)
	}
	c.Delete(ctx, "k")
	if _, err := c.Get(ctx, "k"); err != autocert.ErrCacheMiss {
		t.Errorf("Get after Delete = %v", err)
	}
}
