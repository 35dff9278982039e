package ca

import (
	"context"
	"crypto/x509"
	"errors"
	"fmt"
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
		if c.upstream != nil {
			c.log.Error("the upstream CA is failing: certificates cannot be issued until it answers again", "operation", op, "err", err)
		} else {
			c.log.Error("the upstream CA is failing: leaves are still signed by the current intermediate", "operation", op,
				"intermediate_not_after", c.State().Signing.NotAfter(), "err", err)
		}
	case err != nil:
		c.health.h.Err = err
	case was:
		c.log.Info("the upstream CA answers again", "operation", op, "degraded_for", c.now().Sub(c.health.h.Since).Round(time.Second))
		c.health.h = Health{Since: c.now()}
		c.metrics.Degraded.Set(0)
	}
}

// fetchBundle asks src for the trust bundle, bounded by the upstream
// timeout, and records the outcome.
func (c *CA) fetchBundle(ctx context.Context, src BundleSource) ([]*x509.Certificate, error) {
	ctx, cancel := context.WithTimeout(ctx, c.upstreamTimeout)
	defer cancel()
	roots, err := src.TrustBundle(ctx)
	if err == nil && len(roots) == 0 {
		err = fmt.Errorf("%w: the upstream returned an empty trust bundle", ErrBackendUnavailable)
	}
	c.observe("bundle", err)
	return roots, err
}

// refreshBundle fetches the trust bundle every bundleRefresh until ctx is
// done, and publishes a change. While a signing CA is in force its root
// stays in the bundle even if the upstream no longer lists it: leaves it
// signed must keep verifying until the next intermediate replaces it.
func (c *CA) refreshBundle(ctx context.Context, src BundleSource) {
	t := time.NewTicker(c.bundleRefresh)
	defer t.Stop()
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
		next := State{Signing: cur.Signing, Roots: roots}
		if cur.Signing != nil && !containsCert(roots, cur.Signing.Root()) {
			next.Roots = append(roots[:len(roots):len(roots)], cur.Signing.Root())
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
