package certmgrtest

import (
	"context"
	"errors"
	"testing"
	"time"

	"golang.org/x/crypto/acme/autocert"
)

func TestMemoryStoreConformance(t *testing.T) {
	s := NewMemoryStore()
	CoordinatorConformance(t, func() Coordinator { return s.Open() }, func(c Coordinator) { c.(*MemoryReplica).Lose() })
}

func TestMemoryStoreDisconnect(t *testing.T) {
	ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
	defer cancel()
	s := NewMemoryStore()
	a, b := s.Open(), s.Open()
	lost, _, err := a.Lock(ctx, "l")
	if err != nil {
		t.Fatal(err)
	}
	got := make(chan event, 10)
	if err := a.Watch(ctx, "k", func(key string, value []byte) { got <- event{key, string(value), value == nil} }); err != nil {
		t.Fatal(err)
	}
	a.Disconnect()
	select {
	case <-lost:
	default:
		t.Fatal("Disconnect did not close lost")
	}
	short, cancelShort := context.WithTimeout(ctx, 50*time.Millisecond)
	defer cancelShort()
	if _, err := a.Get(short, "k"); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Get while disconnected: %v, want context.DeadlineExceeded", err)
	}
	if _, unlock, err := b.Lock(ctx, "l"); err != nil {
		t.Fatal(err)
	} else {
		unlock()
	}
	if err := b.Put(ctx, "k", []byte("v")); err != nil {
		t.Fatal(err)
	}
	select {
	case e := <-got:
		t.Fatalf("watch reported %v while disconnected", e)
	default:
	}
	a.Reconnect()
	select {
	case e := <-got:
		if e != (event{"k", "v", false}) {
			t.Fatalf("watch reported %v, want k=v", e)
		}
	case <-ctx.Done():
		t.Fatal("watch reported nothing after Reconnect")
	}
	if v, err := a.Get(ctx, "k"); err != nil || string(v) != "v" {
		t.Fatalf("Get after Reconnect = %q, %v", v, err)
	}
	if _, err := a.Get(ctx, "missing"); !errors.Is(err, autocert.ErrCacheMiss) {
		t.Fatalf("Get of a missing key: %v", err)
	}
	_, unlock, err := a.Lock(ctx, "l")
	if err != nil {
		t.Fatal(err)
	}
	unlock()
}
