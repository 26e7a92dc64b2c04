package etcdcache

import (
	"flag"
	"os"
	"testing"
)

// TestMain runs the tests with -test.parallel 4 unless the command line
// sets it: most of them wait on leases, timeouts and the CA rather than
// compute, so on a small machine the default (one per core) leaves it
// idle.
func TestMain(m *testing.M) {
	flag.Parse()
	set := false
	flag.Visit(func(f *flag.Flag) { set = set || f.Name == "test.parallel" })
	if !set {
		flag.Set("test.parallel", "4")
	}
	os.Exit(m.Run())
}
