package main

import (
	"context"
	"os"
	"strings"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
)

// TestServes: the endpoint printed serves etcd until the context ends.
func TestServes(t *testing.T) {
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(t.Context())
	done := make(chan error, 1)
	go func() { done <- run(ctx, w) }()
	buf := make([]byte, 256)
	n, err := r.Read(buf)
	line := strings.TrimSpace(string(buf[:n]))
	endpoint, ok := strings.CutPrefix(line, "endpoint: ")
	if err != nil || !ok {
		t.Fatalf("printed %q (%v), want the endpoint", line, err)
	}
	cli, err := clientv3.New(clientv3.Config{Endpoints: []string{endpoint}, DialTimeout: 5 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	defer cli.Close()
	pctx, pcancel := context.WithTimeout(t.Context(), 10*time.Second)
	defer pcancel()
	if _, err := cli.Put(pctx, "k", "v"); err != nil {
		t.Errorf("Put to %s: %v", endpoint, err)
	}
	cancel()
	if err := <-done; err != nil {
		t.Error(err)
	}
}
