package main

import (
	"encoding/json"
	"fmt"
	"net/http"
	httppprof "net/http/pprof"
	"time"

	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/meshca/meshca/sds"
)

// adminMux serves /metrics, /healthz, /readyz, /proxies (the open SDS
// streams as JSON, soonest expiry first) and, with --pprof, Go's profiles.
func (s *server) adminMux() *http.ServeMux {
	mux := http.NewServeMux()
	mux.Handle("/metrics", promhttp.HandlerFor(s.reg, promhttp.HandlerOpts{}))
	if s.pprof {
		mux.HandleFunc("/debug/pprof/", httppprof.Index)
		mux.HandleFunc("/debug/pprof/profile", httppprof.Profile)
		mux.HandleFunc("/debug/pprof/symbol", httppprof.Symbol)
		mux.HandleFunc("/debug/pprof/trace", httppprof.Trace)
	}
	mux.HandleFunc("/proxies", func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		proxies := []sds.Proxy{}
		if s.sds != nil {
			proxies = s.sds.Proxies()
		}
		_ = json.NewEncoder(w).Encode(proxies)
	})
	mux.HandleFunc("/healthz", func(w http.ResponseWriter, _ *http.Request) {
		fmt.Fprintln(w, "ok")
	})
	mux.HandleFunc("/readyz", s.ready.handler(func() []string {
		var problems []string
		if leaf := s.serving.Leaf(); time.Now().After(leaf.NotAfter) {
			problems = append(problems, "serving certificate expired")
		}
		if st := s.ca.State(); st.Signing != nil && !time.Now().Before(st.Signing.NotAfter()) {
			problems = append(problems, "signing CA expired")
		}
		return problems
	}, func() []string {
		// Causes (hosts, Vault's messages) go to the log, not here.
		var notes []string
		if h := s.ca.Health(); h.Degraded {
			notes = append(notes, fmt.Sprintf("degraded: the upstream CA has been failing since %s (see meshca_backend_degraded and the log)", h.Since.UTC().Format(time.RFC3339)))
		}
		if s.backendStatus != nil && s.backendStatus() != nil {
			notes = append(notes, "degraded: meshca is not logged in to the upstream CA (see the log)")
		}
		return notes
	}))
	return mux
}
