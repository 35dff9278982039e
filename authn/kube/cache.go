package kube

import (
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/sync/singleflight"

	"github.com/meshca/meshca/authn"
)

// CacheConfig bounds the cache of successful authentications that JWT and
// TokenReview keep. Entries are keyed by the SHA-256 of the token; the token
// itself is never stored. Failures are never cached.
type CacheConfig struct {
	// MaxTTL caps how long an entry is kept; an entry never outlives the
	// token's exp either. Default 5m. Negative disables the cache (concurrent
	// identical lookups are still collapsed into one).
	MaxTTL time.Duration
	// MaxEntries bounds memory. Default 100000. When the cache is full,
	// expired entries are dropped first, then arbitrary ones.
	MaxEntries int
}

const (
	defaultCacheMaxTTL     = 5 * time.Minute
	defaultCacheMaxEntries = 100_000
	// verifyTimeout bounds one shared verification (a JWKS fetch or a
	// TokenReview). It runs detached from the first caller's context so that
	// the caller giving up does not fail the others waiting on it.
	verifyTimeout = 30 * time.Second
)

func (c CacheConfig) withDefaults() CacheConfig {
	if c.MaxTTL == 0 {
		c.MaxTTL = defaultCacheMaxTTL
	}
	if c.MaxEntries == 0 {
		c.MaxEntries = defaultCacheMaxEntries
	}
	return c
}

type tokenHash [sha256.Size]byte

type cacheEntry struct {
	caller  authn.Caller
	expires time.Time // min(token exp, insertion + MaxTTL)
}

// cache maps token hashes to the Caller they authenticated as, and
// collapses concurrent verifications of one token into one.
type cache struct {
	maxTTL     time.Duration
	maxEntries int
	now        func() time.Time
	hits       prometheus.Counter
	misses     prometheus.Counter

	group singleflight.Group

	mu      sync.Mutex
	entries map[tokenHash]cacheEntry
}

func newCache(cfg CacheConfig, now func() time.Time, m *cacheMetrics, authenticator string) *cache {
	cfg = cfg.withDefaults()
	return &cache{
		maxTTL:     cfg.MaxTTL,
		maxEntries: cfg.MaxEntries,
		now:        now,
		hits:       m.requests.WithLabelValues(authenticator, "hit"),
		misses:     m.requests.WithLabelValues(authenticator, "miss"),
		entries:    make(map[tokenHash]cacheEntry),
	}
}

func (c *cache) enabled() bool { return c.maxTTL > 0 && c.maxEntries > 0 }

// get returns the Caller for token, from the cache or by calling verify.
// Concurrent calls for one token share a single verify, which runs with a
// context detached from ctx's cancellation (but not its values) and bounded
// by verifyTimeout; each caller still returns as soon as its own ctx is done.
// The returned Caller is the caller's to modify.
func (c *cache) get(ctx context.Context, token string, verify func(context.Context) (*authn.Caller, error)) (*authn.Caller, error) {
	key := tokenHash(sha256.Sum256([]byte(token)))
	if caller, ok := c.lookup(key); ok {
		c.hits.Inc()
		return caller, nil
	}
	c.misses.Inc()

	ch := c.group.DoChan(string(key[:]), func() (any, error) {
		vctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), verifyTimeout)
		defer cancel()
		caller, err := verify(vctx)
		if err != nil {
			return nil, err
		}
		c.store(key, caller)
		return caller, nil
	})
	select {
	case <-ctx.Done():
		return nil, fmt.Errorf("%w: %w", authn.ErrUnavailable, context.Cause(ctx))
	case res := <-ch:
		if res.Err != nil {
			return nil, res.Err
		}
		caller := *res.Val.(*authn.Caller)
		return &caller, nil
	}
}

// forget drops the entry for token, if any.
func (c *cache) forget(token string) {
	key := tokenHash(sha256.Sum256([]byte(token)))
	c.mu.Lock()
	delete(c.entries, key)
	c.mu.Unlock()
}

func (c *cache) lookup(key tokenHash) (*authn.Caller, bool) {
	if !c.enabled() {
		return nil, false
	}
	now := c.now()
	c.mu.Lock()
	defer c.mu.Unlock()
	e, ok := c.entries[key]
	if !ok {
		return nil, false
	}
	if !now.Before(e.expires) {
		// Let the authenticator decide afresh, so that the caller gets the
		// precise reason (expired, within skew, ...).
		delete(c.entries, key)
		return nil, false
	}
	caller := e.caller
	return &caller, true
}

func (c *cache) store(key tokenHash, caller *authn.Caller) {
	if !c.enabled() {
		return
	}
	now := c.now()
	expires := now.Add(c.maxTTL)
	if !caller.ExpiresAt.IsZero() && caller.ExpiresAt.Before(expires) {
		expires = caller.ExpiresAt
	}
	if !now.Before(expires) {
		return
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if _, ok := c.entries[key]; !ok && len(c.entries) >= c.maxEntries {
		c.evictLocked(now)
	}
	c.entries[key] = cacheEntry{caller: *caller, expires: expires}
}

// evictLocked makes room in a full cache: it drops every expired entry and,
// if that freed less than a tenth of the capacity, arbitrary entries until a
// tenth is free. So a sweep of the whole map happens at most once per
// MaxEntries/10 insertions: O(1) amortized.
func (c *cache) evictLocked(now time.Time) {
	for k, e := range c.entries {
		if !now.Before(e.expires) {
			delete(c.entries, k)
		}
	}
	target := c.maxEntries - max(c.maxEntries/10, 1)
	for k := range c.entries {
		if len(c.entries) <= target {
			break
		}
		delete(c.entries, k)
	}
}

func (c *cache) len() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return len(c.entries)
}

// cacheMetrics are the metrics the caches of all authenticators share.
type cacheMetrics struct {
	requests *prometheus.CounterVec
}

// newCacheMetrics registers the cache metrics on reg, or reuses the ones
// already registered there by another authenticator. A nil reg registers
// nothing (the counters still count, for tests).
func newCacheMetrics(reg prometheus.Registerer) (*cacheMetrics, error) {
	requests, err := registerCounterVec(reg, prometheus.CounterOpts{
		Name: "meshca_authn_cache_requests_total",
		Help: "Lookups in the cache of authenticated tokens, by authenticator and result (hit or miss).",
	}, []string{"authenticator", "result"})
	if err != nil {
		return nil, err
	}
	return &cacheMetrics{requests: requests}, nil
}

// registerCounterVec registers a CounterVec on reg, or returns the identical
// one already registered there, so that several authenticators can share a
// Registerer without a global.
func registerCounterVec(reg prometheus.Registerer, opts prometheus.CounterOpts, labels []string) (*prometheus.CounterVec, error) {
	cv := prometheus.NewCounterVec(opts, labels)
	if reg == nil {
		return cv, nil
	}
	err := reg.Register(cv)
	if err == nil {
		return cv, nil
	}
	var are prometheus.AlreadyRegisteredError
	if errors.As(err, &are) {
		if existing, ok := are.ExistingCollector.(*prometheus.CounterVec); ok {
			return existing, nil
		}
	}
	return nil, fmt.Errorf("register metric %s: %w", opts.Name, err)
}
