package ca

import (
	"context"
	"crypto/x509"
	"errors"
	"fmt"
	"maps"
	"slices"
	"sync"
	"time"
)

// Defaults of the upstream fields of Config.
const (
	DefaultBundleRefresh       = 5 * time.Minute
	DefaultMaxUpstreamInFlight = 64
	DefaultUpstreamTimeout     = 30 * time.Second
)

// A BundleSource can tell the current trust bundle. Every Upstream is one;
// an Authority that is one (Vault's mount, an AWS Private CA) has its
// bundle fetched again every Config.BundleRefresh, so that a change of the
// upstream's chain reaches relying parties without a restart.
type BundleSource interface {
	TrustBundle(ctx context.Context) ([]*x509.Certificate, error)
}

// Health is what the CA knows of its upstream (an Authority or Upstream):
// whether the last call to it failed, and since when.
type Health struct {
	// Degraded is true while the last call failed.
	Degraded bool
	// Since is when the state last changed; zero before any call.
	Since time.Time
	// Err is the last failure, while Degraded.
	Err error
}

// health tracks the upstream's state across calls.
type health struct {
	mu sync.Mutex
	h  Health
}

// Health returns the upstream's last known state. A Holder has none: it is
// never degraded.
func (c *CA) Health() Health {
	c.health.mu.Lock()
	defer c.health.mu.Unlock()
	return c.health.h
}

// observe records the result of one call to the upstream: its metrics, and
// the degraded state, logged on each change.
func (c *CA) observe(op string, err error) {
	result := "success"
	var wrong *wrongLeafError
	switch {
	case errors.As(err, &wrong):
		result = "refused"
	case err != nil:
		result = "failure"
	}
	c.metrics.UpstreamCalls.WithLabelValues(op, result).Inc()
	// A caller that gave up says nothing about the upstream.
	if errors.Is(err, context.Canceled) {
		return
	}
	c.health.mu.Lock()
	defer c.health.mu.Unlock()
	was := c.health.h.Degraded
	switch {
	case err != nil && !was:
		c.health.h = Health{Degraded: true, Since: c.now(), Err: err}
		c.metrics.Degraded.Set(1)
		switch st := c.state.Load(); {
		case c.upstream != nil, st == nil || st.Signing == nil:
			// Direct mode, or no intermediate yet (the first mint).
			c.log.Error("the upstream CA is failing: certificates cannot be issued until it answers again", "operation", op, "err", err)
		default:
			c.log.Error("the upstream CA is failing: leaves are still signed by the current intermediate", "operation", op,
				"intermediate_not_after", st.Signing.NotAfter(), "err", err)
		}
	case err != nil:
		c.health.h.Err = err
	case was:
		c.log.Info("the upstream CA answers again", "operation", op, "degraded_for", c.now().Sub(c.health.h.Since).Round(time.Second))
		c.health.h = Health{Since: c.now()}
		c.metrics.Degraded.Set(0)
	}
}

// callUpstream makes one call to the upstream (op: mint, sign, bundle)
// under backend.upstream.timeout and records its outcome. When the caller
// gave up, the error is the caller's context error. When meshca's own
// bound ran out, or the upstream's client timed out by itself, it is
// ErrBackendUnavailable with the cause as text only: the caller, whose
// deadline has not passed, gets Unavailable, not DeadlineExceeded.
func callUpstream[T any](c *CA, ctx context.Context, op string, call func(context.Context) (T, error)) (T, error) {
	callCtx, cancel := context.WithTimeout(ctx, c.upstreamTimeout)
	defer cancel()
	v, err := call(callCtx)
	switch {
	case err == nil:
	case ctx.Err() != nil:
		err = fmt.Errorf("%w: %v", ctx.Err(), err)
	case callCtx.Err() != nil:
		err = fmt.Errorf("%w: no answer within backend.upstream.timeout (%s): %v", ErrBackendUnavailable, c.upstreamTimeout, err)
	case errors.Is(err, context.DeadlineExceeded), errors.Is(err, context.Canceled):
		err = fmt.Errorf("%w: %v", ErrBackendUnavailable, err)
	}
	c.observe(op, err)
	return v, err
}

// fetchBundle asks src for the trust bundle and records the outcome.
func (c *CA) fetchBundle(ctx context.Context, src BundleSource) ([]*x509.Certificate, error) {
	return callUpstream(c, ctx, "bundle", func(ctx context.Context) ([]*x509.Certificate, error) {
		roots, err := src.TrustBundle(ctx)
		if err == nil && len(roots) == 0 {
			err = fmt.Errorf("%w: the upstream returned an empty trust bundle", ErrBackendUnavailable)
		}
		return roots, err
	})
}

// refreshBundle fetches the trust bundle every bundleRefresh until ctx is
// done, and publishes a change. A root the upstream no longer lists stays
// in the bundle for the policy's longest maxTTL after it was last seen
// (leaves under it may live that long; never past its own NotAfter), and
// while an intermediate is in use its root stays too: leaves signed under
// either must keep verifying.
func (c *CA) refreshBundle(ctx context.Context, src BundleSource) {
	t := time.NewTicker(c.bundleRefresh)
	defer t.Stop()
	retired := map[string]retiredRoot{} // by DER
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		roots, err := c.fetchBundle(ctx, src)
		if err != nil {
			if ctx.Err() == nil {
				c.log.Warn("could not refresh the trust bundle from the upstream; keeping the current one", "retry_in", c.bundleRefresh, "err", err)
			}
			continue
		}
		cur := c.State()
		now := c.now()
		maxTTL, _ := c.policy.Policy().LongestMaxTTL()
		for _, r := range cur.Roots {
			if !containsCert(roots, r) {
				if _, ok := retired[string(r.Raw)]; !ok {
					until := now.Add(maxTTL + c.backdate)
					if r.NotAfter.Before(until) {
						until = r.NotAfter
					}
					retired[string(r.Raw)] = retiredRoot{cert: r, until: until}
					c.log.Info("the upstream no longer lists a root; it stays in the bundle while leaves under it may live",
						"root", r.Subject.String(), "until", until)
				}
			}
		}
		next := State{Signing: cur.Signing, Roots: roots[:len(roots):len(roots)]}
		for _, k := range slices.Sorted(maps.Keys(retired)) { // a stable order: no flapping
			switch r := retired[k]; {
			case containsCert(roots, r.cert), !now.Before(r.until):
				delete(retired, k)
			default:
				next.Roots = append(next.Roots, r.cert)
			}
		}
		if cur.Signing != nil && !containsCert(next.Roots, cur.Signing.Root()) {
			next.Roots = append(next.Roots, cur.Signing.Root())
		}
		if sameCerts(cur.Roots, next.Roots) {
			continue
		}
		if err := c.publish(next); err != nil {
			c.log.Error("the upstream's trust bundle is unusable; keeping the current one", "err", err)
			continue
		}
		c.log.Info("the upstream's trust bundle changed", "roots", len(next.Roots))
	}
}

// retiredRoot is a root the upstream dropped, kept until until.
type retiredRoot struct {
	cert  *x509.Certificate
	until time.Time
}

// acquireUpstream takes a SignLeaf slot, waiting until ctx ends.
func (c *CA) acquireUpstream(ctx context.Context) (release func(), err error) {
	select {
	case c.upstreamSlots <- struct{}{}:
	default:
		select {
		case c.upstreamSlots <- struct{}{}:
		case <-ctx.Done():
			return nil, fmt.Errorf("%w: all %d upstream signing slots stayed busy (the upstream CA is slow or down): %w",
				ErrBackendUnavailable, cap(c.upstreamSlots), ctx.Err())
		}
	}
	c.metrics.UpstreamInFlight.Inc()
	return func() {
		c.metrics.UpstreamInFlight.Dec()
		<-c.upstreamSlots
	}, nil
}
