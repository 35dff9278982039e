package main

import (
	"context"
	"fmt"
	"log/slog"
	"net/http"
	"strings"
	"sync/atomic"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
)

// check is one thing meshca waits for before it is ready.
type check struct {
	what string
	done func(context.Context) error
}

// readiness is meshca's ready state, as /readyz and gRPC health report it.
type readiness struct {
	log      *slog.Logger
	health   *health.Server
	ready    atomic.Bool
	notReady atomic.Pointer[string] // what it waits for, when known
	// lastCause is the last logged cause, so each is logged once.
	lastCause atomic.Pointer[string]
}

// newReadiness registers gRPC health on g, NOT_SERVING until wait finishes.
func newReadiness(g *grpc.Server, log *slog.Logger) *readiness {
	r := &readiness{log: log, health: health.NewServer()}
	r.health.SetServingStatus("", healthpb.HealthCheckResponse_NOT_SERVING)
	healthpb.RegisterHealthServer(g, r.health)
	return r
}

// wait runs each check until it passes, once a second, then reports
// SERVING. It returns nil, also when ctx ends first.
func (r *readiness) wait(ctx context.Context, checks []check) error {
	for _, c := range checks {
		for {
			err := c.done(ctx)
			if err == nil {
				break
			}
			// /readyz names the check; the cause (paths, hosts, apiserver
			// messages) goes to the log only, once per distinct cause.
			msg := c.what + " (see meshca's log for the cause)"
			cause := err.Error()
			if prev := r.lastCause.Swap(&cause); prev == nil || *prev != cause {
				r.log.Warn("not ready", "waiting_for", c.what, "err", err)
			}
			r.notReady.Store(&msg)
			select {
			case <-ctx.Done():
				return nil
			case <-time.After(time.Second):
			}
		}
	}
	r.notReady.Store(nil)
	r.ready.Store(true)
	r.health.SetServingStatus("", healthpb.HealthCheckResponse_SERVING)
	r.log.Info("meshca ready")
	return nil
}

// stop reports not ready, for shutdown.
func (r *readiness) stop() {
	r.ready.Store(false)
	r.health.Shutdown()
}

// problems lists why meshca is not ready; none means ready.
func (r *readiness) problems() []string {
	if r.ready.Load() {
		return nil
	}
	if p := r.notReady.Load(); p != nil {
		return []string{"waiting for " + *p}
	}
	return []string{"starting"}
}

// handler serves /readyz: 200 "ok", or 503 with one problem a line. extra
// adds problems found at request time; notes adds lines to a 200 answer
// for states that do not stop meshca from serving (a degraded upstream
// while an intermediate still signs).
func (r *readiness) handler(extra, notes func() []string) http.HandlerFunc {
	return func(w http.ResponseWriter, _ *http.Request) {
		problems := append(r.problems(), extra()...)
		if len(problems) > 0 {
			http.Error(w, strings.Join(problems, "\n"), http.StatusServiceUnavailable)
			return
		}
		fmt.Fprintln(w, "ok")
		for _, n := range notes() {
			fmt.Fprintln(w, n)
		}
	}
}
