// Command etcd runs a one-member etcd server on a loopback address, with
// its data in a temporary directory removed at exit, for trying the
// etcdcache module's examples/server on a laptop:
//
//	go run ./examples/etcd    # prints "endpoint: http://127.x.y.z:PORT"
//
// It stops at SIGINT or SIGTERM.
package main

import (
	"context"
	"fmt"
	"os"
	"os/signal"
	"syscall"

	"github.com/certmgr/certmgr/etcdcache/etcdtest"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := run(ctx, os.Stdout); err != nil {
		fmt.Fprintln(os.Stderr, "etcd:", err)
		os.Exit(1)
	}
}

// run serves etcd until ctx ends, and says where on w.
func run(ctx context.Context, w *os.File) error {
	s, err := etcdtest.NewServer()
	if err != nil {
		return err
	}
	defer s.Close()
	fmt.Fprintf(w, "endpoint: %s\n", s.Endpoint)
	<-ctx.Done()
	return nil
}
