package demoserver

import (
	"context"
	"html/template"
	"log/slog"
	"mime"
	"net/http"
	"net/netip"
	"strings"
	"sync"
	"time"

	"github.com/certmgr/certmgr"
)

// provisionTimeout bounds the first attempt for each domain.
const provisionTimeout = 2 * time.Minute

// Provision calls provision (a certmgr.Manager's Provision) for each of
// domains in parallel, each with a context ending after 2 minutes at
// most, and logs the outcomes: a failure at Warn level, unless ctx ended
// (the server is shutting down).
func Provision(ctx context.Context, domains []string, provision func(ctx context.Context, domain string) error, log *slog.Logger) {
	var wg sync.WaitGroup
	for _, d := range domains {
		wg.Go(func() {
			pctx, cancel := context.WithTimeout(ctx, provisionTimeout)
			defer cancel()
			start := time.Now()
			if err := provision(pctx, d); err != nil {
				if ctx.Err() != nil { // shutting down
					log.Debug("provisioning stopped", "domain", d, "error", err)
					return
				}
				log.Warn("provisioning failed; handshakes will retry as backoff allows", "domain", d, "error", err)
				return
			}
			log.Info("provisioned", "domain", d, "took", time.Since(start).Round(time.Millisecond))
		})
	}
	wg.Wait()
}

// domainStatus is one domain's row of the status page.
type domainStatus struct {
	Domain      string
	State       string
	NotAfter    time.Time
	Failures    int
	LastError   string
	NextAttempt time.Time
}

var statusPage = template.Must(template.New("status").Funcs(template.FuncMap{
	"when": func(t time.Time) string {
		if t.IsZero() {
			return "—"
		}
		return t.UTC().Format("2006-01-02 15:04:05 UTC")
	},
}).Parse(`<!DOCTYPE html>
<html lang="en">
<head><meta charset="utf-8"><title>Certificates</title>
<style>body{font-family:sans-serif}th,td{padding:.2em .8em;text-align:left;vertical-align:top}</style>
</head>
<body>
<h1>Certificates</h1>
<table>
<tr><th>Domain</th><th>State</th><th>Not after</th><th>Failures</th><th>Last error</th><th>Next attempt</th></tr>
{{range .}}<tr><td>{{.Domain}}</td><td>{{.State}}</td><td>{{when .NotAfter}}</td><td>{{.Failures}}</td><td>{{.LastError}}</td><td>{{when .NextAttempt}}</td></tr>
{{else}}<tr><td colspan="6">No domain yet.</td></tr>
{{end}}</table>
</body>
</html>
`))

// StatusPage serves the domains' status (a certmgr.Manager's Domains) as
// an HTML table or, when the request asks for JSON (by ?format=json or by
// naming application/json in Accept), as statusJSON (the Manager's
// StatusHandler) does.
func StatusPage(domains func() []certmgr.Status, statusJSON http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method != http.MethodGet && r.Method != http.MethodHead {
			w.Header().Set("Allow", "GET, HEAD")
			http.Error(w, "method not allowed", http.StatusMethodNotAllowed)
			return
		}
		w.Header().Add("Vary", "Accept")
		if wantsJSON(r) {
			statusJSON.ServeHTTP(w, r)
			return
		}
		rows := []domainStatus{}
		for _, s := range domains() {
			row := domainStatus{
				Domain:      s.Domain,
				State:       s.State.String(),
				NotAfter:    s.NotAfter,
				Failures:    s.Failures,
				NextAttempt: s.NextAttempt,
			}
			if s.LastError != nil {
				row.LastError = s.LastError.Error()
			}
			rows = append(rows, row)
		}
		w.Header().Set("Cache-Control", "no-store")
		w.Header().Set("Content-Type", "text/html; charset=utf-8")
		statusPage.Execute(w, rows)
	})
}

// wantsJSON reports whether r asks for JSON, by ?format=json or by
// naming application/json in Accept.
func wantsJSON(r *http.Request) bool {
	if r.URL.Query().Get("format") == "json" {
		return true
	}
	for _, accept := range r.Header.Values("Accept") {
		for part := range strings.SplitSeq(accept, ",") {
			if t, _, err := mime.ParseMediaType(part); err == nil && t == "application/json" {
				return true
			}
		}
	}
	return false
}

// loopbackOnly answers 404 to clients not on a loopback address.
func loopbackOnly(h http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		ap, err := netip.ParseAddrPort(r.RemoteAddr)
		if err != nil || !ap.Addr().Unmap().IsLoopback() {
			http.NotFound(w, r)
			return
		}
		h.ServeHTTP(w, r)
	})
}
