package certmgrprom_test

import (
	"log"
	"net/http"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"golang.org/x/crypto/acme/autocert"

	"github.com/certmgr/certmgr"
	"github.com/certmgr/certmgr/certmgrprom"
)

// A Manager's metrics at /metrics: the README's snippet. (Compiled, not
// run.)
func ExampleNewCollector() {
	m, err := certmgr.New(certmgr.Config{Autocert: &autocert.Manager{Cache: autocert.DirCache("/var/lib/certs")}})
	if err != nil {
		log.Fatal(err)
	}
	defer m.Close()
	reg := prometheus.NewRegistry()
	reg.MustRegister(certmgrprom.NewCollector(m))
	http.Handle("/metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{}))
}
