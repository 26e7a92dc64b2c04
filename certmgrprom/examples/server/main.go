// Command server is examples/server with Prometheus metrics: the same
// flags and status page, and the Manager's metrics (certmgrprom) at
// /metrics, to loopback clients only unless -status-public.
//
//	go run ./certmgrprom/examples/server -pebble
package main

import (
	"context"
	"io"
	"net/http"
	"os"
	"os/signal"
	"syscall"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/certmgr/certmgr"
	"github.com/certmgr/certmgr/certmgrprom"
	"github.com/certmgr/certmgr/examples/demoserver"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	code := run(ctx, os.Args[1:], os.Stdout, os.Stderr)
	stop()
	os.Exit(code)
}

func run(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	return demoserver.Run(ctx, args, stdout, stderr, demoserver.Hooks{
		Metrics: func(m *certmgr.Manager) http.Handler {
			reg := prometheus.NewRegistry()
			reg.MustRegister(certmgrprom.NewCollector(m))
			return promhttp.HandlerFor(reg, promhttp.HandlerOpts{})
		},
	})
}
