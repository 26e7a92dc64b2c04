package main

import (
	"bytes"
	"context"
	"io"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/certmgr/certmgr/examples/demoserver"
	"github.com/certmgr/certmgr/internal/testsupport"
)

// TestDemoEnv: the command writes the demo's description, which names
// its etcd and CA, prints each replica's command, and removes its files
// when it stops.
func TestDemoEnv(t *testing.T) {
	file := filepath.Join(t.TempDir(), "demo.json")
	srv := testsupport.StartServer(t, "run", func(ctx context.Context, stdout, stderr io.Writer) int {
		return run(ctx, []string{"-file", file, "-replicas", "3"}, stdout, stderr)
	})
	got := testsupport.WaitLines(t, srv.Lines, "etcd: ", "directory: ", "replica 3: ", "orders: ")
	d, err := demoserver.ReadDemo(file)
	if err != nil {
		t.Fatal(err)
	}
	if d.Etcd != got["etcd: "] || d.Directory != got["directory: "] || len(d.Replicas) != 3 {
		t.Errorf("printed %v, wrote %+v", got, d)
	}
	if want := "go run ./examples/server -demo 3 -demo-file " + file; got["replica 3: "] != want {
		t.Errorf("replica 3: %q, want %q", got["replica 3: "], want)
	}
	if want := "a.pebble.test 0, b.pebble.test 0; validation connections: replica 1 0, replica 2 0, replica 3 0"; got["orders: "] != want {
		t.Errorf("orders: %q, want %q", got["orders: "], want)
	}
	srv.Stop(t, 10*time.Second)
	for _, f := range []string{file, d.Roots} {
		if _, err := os.Stat(f); !os.IsNotExist(err) {
			t.Errorf("%s left after the command stopped (%v)", f, err)
		}
	}
}

// TestUsage: a wrong command line is refused before anything starts.
func TestUsage(t *testing.T) {
	for _, args := range [][]string{{"-replicas", "0"}, {"extra"}, {"-no-such-flag"}} {
		var stderr bytes.Buffer
		if code := run(context.Background(), args, io.Discard, &stderr); code != 2 || stderr.Len() == 0 {
			t.Errorf("demoenv %q: exit status %d, stderr %q; want 2 and why", args, code, stderr.String())
		}
	}
}
