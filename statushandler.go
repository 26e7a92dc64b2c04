package certmgr

import (
	"encoding/json"
	"net/http"
)

// StatusHandler returns a handler of the domains' status as JSON (see
// Status.MarshalJSON). A GET of it gives every domain certmgr knows, as
// Domains does, in an array; with ?domain=name, that domain's status, or
// 404 if certmgr knows nothing of it. Other methods get 405.
//
// It does no access control of its own: mount it behind the server's
// own, as net/http/pprof is, since it names every domain the server
// serves or was asked for.
func (m *Manager) StatusHandler() http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method != http.MethodGet && r.Method != http.MethodHead {
			w.Header().Set("Allow", "GET, HEAD")
			http.Error(w, "certmgr: status: GET only", http.StatusMethodNotAllowed)
			return
		}
		var v any
		if q := r.URL.Query(); q.Has("domain") {
			s := m.Status(q.Get("domain"))
			if s.State == StateNone && s.Failures == 0 && s.LastError == nil && s.NextAttempt.IsZero() {
				http.Error(w, "certmgr: status: no such domain", http.StatusNotFound)
				return
			}
			v = s
		} else {
			v = m.Domains()
		}
		body, err := json.Marshal(v)
		if err != nil {
			http.Error(w, "certmgr: status: "+err.Error(), http.StatusInternalServerError)
			return
		}
		w.Header().Set("Content-Type", "application/json")
		w.Header().Set("Cache-Control", "no-store")
		w.Write(append(body, '\n'))
	})
}
