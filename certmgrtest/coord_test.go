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
	_, lost, _, err := a.Lock(ctx, "l")
	if err != nil {
		t.Fatal(err)
	}
	got := make(chan event, 10)
	if err := a.Watch(ctx, "k", 0, func(key string, value []byte, rev int64) { got <- event{key, string(value), value == nil, rev} }); err != nil {
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
	if _, _, unlock, err := b.Lock(ctx, "l"); err != nil {
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
		if e != (event{"k", "v", false, 2}) { // the store's first write is revision 2, as etcd's
			t.Fatalf("watch reported %v, want k=v@2", e)
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
	_, _, unlock, err := a.Lock(ctx, "l")
	if err != nil {
		t.Fatal(err)
	}
	unlock()
}

// TestMemoryStoreCompact: a Watch from a revision that Compact dropped
// reports the current value of each key written since, not the deletes,
// and goes on with the later writes.
func TestMemoryStoreCompact(t *testing.T) {
	ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
	defer cancel()
	s := NewMemoryStore()
	r := s.Open()
	put := func(key, value string) {
		t.Helper()
		if err := r.Put(ctx, key, []byte(value)); err != nil {
			t.Fatal(err)
		}
	}
	put("w/a", "1")                                 // 2: the store's first write, as etcd's
	put("w/old", "1")                               // 3
	put("w/a", "2")                                 // 4
	put("w/gone", "1")                              // 5
	put("x", "1")                                   // 6
	put("w/b", "1")                                 // 7
	if err := r.Delete(ctx, "w/gone"); err != nil { // 8
		t.Fatal(err)
	}
	put("w/a", "3") // 9
	s.Compact()
	got := make(chan event, 10)
	f := func(key string, value []byte, rev int64) { got <- event{key, string(value), value == nil, rev} }
	if err := r.Watch(ctx, "w/", 3, f); err != nil {
		t.Fatal(err)
	}
	put("w/later", "1") // 10
	want := []event{{"w/b", "1", false, 7}, {"w/a", "3", false, 9}, {"w/later", "1", false, 10}}
	for _, w := range want {
		select {
		case e := <-got:
			if e != w {
				t.Fatalf("watch reported %v, want %v", e, w)
			}
		case <-ctx.Done():
			t.Fatalf("watch did not report %v", w)
		}
	}
	if err := r.Watch(ctx, "w/", -1, f); err == nil {
		t.Fatal("Watch from revision -1 succeeded")
	}
}
