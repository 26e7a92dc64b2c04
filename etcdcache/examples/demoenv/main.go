// Command demoenv runs what replicas of examples/server share in its demo
// mode (-demo N), all on loopback: one etcd, one Pebble CA with its DNS
// server, and a load balancer that hands the CA's validation connections
// to the replicas in turn, skipping any not running. It writes the demo's
// description to -file (certmgr-demo.json in the user's cache directory,
// where the server's -demo looks by default), prints the commands that
// start the replicas, and then, as they order certificates, the CA's
// order count per name and how many of its validation connections each
// replica answered. Run it, from the etcdcache module, with:
//
//	go run ./examples/demoenv [-replicas 2] [-file FILE]
//
// It stops at SIGINT or SIGTERM, and removes its files and etcd's data.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/certmgr/certmgr/etcdcache/etcdtest"
	"github.com/certmgr/certmgr/examples/demoserver"
)

// reportEvery is how often the order counts are looked at.
const reportEvery = time.Second

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	code := run(ctx, os.Args[1:], os.Stdout, os.Stderr)
	stop()
	os.Exit(code)
}

// run runs the demo until ctx is done, and returns the exit status.
func run(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("demoenv", flag.ContinueOnError)
	fs.SetOutput(stderr)
	file := fs.String("file", demoserver.DefaultDemoFile(), "where to write the demo's description, which the server's -demo-file reads")
	replicas := fs.Int("replicas", 2, "how many replicas the demo has room for")
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return 0
		}
		return 2
	}
	if fs.NArg() > 0 || *replicas < 1 {
		fmt.Fprintln(stderr, "usage: demoenv [-replicas N] [-file FILE]")
		return 2
	}
	if err := serve(ctx, *file, *replicas, stdout); err != nil {
		fmt.Fprintln(stderr, "demoenv:", err)
		return 1
	}
	return 0
}

// serve runs the demo until ctx is done.
func serve(ctx context.Context, file string, replicas int, stdout io.Writer) error {
	etcd, err := etcdtest.NewServer()
	if err != nil {
		return err
	}
	defer etcd.Close()
	demo, err := demoserver.StartDemo(file, etcd.Endpoint, replicas)
	if err != nil {
		return err
	}
	defer demo.Close()

	fmt.Fprintf(stdout, "etcd: %s\ndirectory: %s\nfile: %s\n", etcd.Endpoint, demo.Demo.Directory, file)
	flagFile := ""
	if file != demoserver.DefaultDemoFile() {
		flagFile = " -demo-file " + file
	}
	for i := range replicas {
		fmt.Fprintf(stdout, "replica %d: go run ./examples/server -demo %d%s\n", i+1, i+1, flagFile)
	}

	// The CA's order counts, as they change: one order per name, however
	// many replicas; and the validations, which reach every replica.
	last := ""
	tick := time.NewTicker(reportEvery)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-tick.C:
		}
		var orders, validations []string
		for _, d := range demo.Demo.Domains {
			orders = append(orders, fmt.Sprintf("%s %d", d, demo.CA.Proxy.Counts(d).Orders))
		}
		for i, n := range demo.Validations() {
			validations = append(validations, fmt.Sprintf("replica %d %d", i+1, n))
		}
		if now := strings.Join(orders, ", ") + "; validation connections: " + strings.Join(validations, ", "); now != last {
			fmt.Fprintf(stdout, "orders: %s\n", now)
			last = now
		}
	}
}
