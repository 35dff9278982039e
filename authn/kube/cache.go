package kube

import (
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"strings"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promauto"

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
	// that caller giving up does not fail the others waiting on it; it stops
	// early once no caller waits for it any more.
	verifyTimeout = 30 * time.Second
)

// errVerifyTimeout is the cause of a shared verification's context when it
// ran for verifyTimeout.
var errVerifyTimeout = fmt.Errorf("verification took longer than %s", verifyTimeout)

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

	mu      sync.Mutex // guards entries, flights and flight.waiters
	entries map[tokenHash]cacheEntry
	flights map[tokenHash]*flight // verifications under way
}

// flight is one shared verification of a token.
type flight struct {
	done   chan struct{} // closed when caller and err are set
	caller *authn.Caller
	err    error

	cancel  context.CancelCauseFunc
	waiters int // callers waiting for done; guarded by cache.mu
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
		flights:    make(map[tokenHash]*flight),
	}
}

func (c *cache) enabled() bool { return c.maxTTL > 0 && c.maxEntries > 0 }

// get returns the Caller for token, from the cache or by calling verify.
// Concurrent calls for one token share a single verify. It runs with a
// context detached from the first caller's (keeping its values), bounded by
// verifyTimeout, and cancelled as soon as no caller waits for it any more.
// Each caller returns as soon as its own ctx is done, with an error wrapping
// ctx.Err(). The returned Caller is the caller's to modify.
func (c *cache) get(ctx context.Context, token string, verify func(context.Context) (*authn.Caller, error)) (*authn.Caller, error) {
	key := tokenHash(sha256.Sum256([]byte(token)))
	now := c.now()
	// The lookup and the join are one critical section, and a verification
	// stores its result and leaves flights in another: so a caller either
	// finds the result or joins the verification, never misses both and
	// starts a second one.
	c.mu.Lock()
	if caller, ok := c.lookupLocked(key, now); ok {
		c.mu.Unlock()
		c.hits.Inc()
		return caller, nil
	}
	if err := ctx.Err(); err != nil {
		c.mu.Unlock()
		c.misses.Inc()
		return nil, fmt.Errorf("wait for token verification: %w", err)
	}
	f := c.joinLocked(ctx, key, verify)
	c.mu.Unlock()
	c.misses.Inc()

	select {
	case <-f.done:
		if f.err != nil {
			return nil, f.err
		}
		caller := *f.caller
		return &caller, nil
	case <-ctx.Done():
		c.leave(key, f)
		// A context error, not ErrUnavailable: the caller gave up, the
		// authority did not fail.
		return nil, fmt.Errorf("wait for token verification: %w", ctx.Err())
	}
}

// joinLocked adds the caller to the verification of key under way, starting
// one if there is none. c.mu must be held.
func (c *cache) joinLocked(ctx context.Context, key tokenHash, verify func(context.Context) (*authn.Caller, error)) *flight {
	f, ok := c.flights[key]
	if !ok {
		vctx, cancel := context.WithCancelCause(context.WithoutCancel(ctx))
		vctx, stop := context.WithTimeoutCause(vctx, verifyTimeout, errVerifyTimeout)
		f = &flight{done: make(chan struct{}), cancel: cancel}
		c.flights[key] = f
		go func() {
			defer cancel(nil)
			defer stop()
			caller, err := verify(vctx)
			if err != nil {
				err = hideContextErrors(err)
			}
			now := c.now()
			c.mu.Lock()
			if err == nil {
				c.storeLocked(key, caller, now)
			}
			if c.flights[key] == f {
				delete(c.flights, key)
			}
			c.mu.Unlock()
			f.caller, f.err = caller, err
			close(f.done)
		}()
	}
	f.waiters++
	return f
}

// leave removes a caller that stopped waiting from f, and cancels f once
// nobody waits for it: its result would be of no use to anyone. A later
// caller of the same token starts afresh.
func (c *cache) leave(key tokenHash, f *flight) {
	c.mu.Lock()
	defer c.mu.Unlock()
	f.waiters--
	if f.waiters > 0 {
		return
	}
	if c.flights[key] == f {
		delete(c.flights, key)
	}
	f.cancel(errAbandoned)
}

// hideContextErrors turns an error of a shared verification that wraps a
// context error into a plain ErrUnavailable with the same text. A shared
// verification never runs with a caller's context, so such an error is the
// verification's own (it hit verifyTimeout, or a fetch it shared timed
// out): left wrapped, it would read as the caller's deadline or cancellation
// rather than as the outage it is. Authentication failures (*authn.Error)
// never wrap a context error, so none is lost here.
func hideContextErrors(err error) error {
	if !errors.Is(err, context.Canceled) && !errors.Is(err, context.DeadlineExceeded) {
		return err
	}
	msg := strings.TrimPrefix(err.Error(), authn.ErrUnavailable.Error()+": ")
	return fmt.Errorf("%w: %s", authn.ErrUnavailable, msg)
}

// errAbandoned is the cause of a shared verification's context when every
// caller waiting for it gave up.
var errAbandoned = errors.New("every caller waiting for the verification gave up")

// forget drops the entry for token, if any.
func (c *cache) forget(token string) {
	key := tokenHash(sha256.Sum256([]byte(token)))
	c.mu.Lock()
	delete(c.entries, key)
	c.mu.Unlock()
}

// lookupLocked returns a copy of the cached Caller of key. c.mu must be held.
func (c *cache) lookupLocked(key tokenHash, now time.Time) (*authn.Caller, bool) {
	if !c.enabled() {
		return nil, false
	}
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

// storeLocked caches caller under key. c.mu must be held.
func (c *cache) storeLocked(key tokenHash, caller *authn.Caller, now time.Time) {
	if !c.enabled() {
		return
	}
	expires := now.Add(c.maxTTL)
	if !caller.ExpiresAt.IsZero() && caller.ExpiresAt.Before(expires) {
		expires = caller.ExpiresAt
	}
	if !now.Before(expires) {
		return
	}
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

// Metrics are the authenticators' metrics. Make one per process (New does)
// and share it: every authenticator counts into the same series.
type Metrics struct {
	cacheRequests           *prometheus.CounterVec
	jwksFetches             *prometheus.CounterVec
	clientCertVerifications prometheus.Counter
}

// NewMetrics creates the metrics on reg (nil: unregistered), the way every
// meshca package does: promauto.With(reg), once.
func NewMetrics(reg prometheus.Registerer) *Metrics {
	f := promauto.With(reg)
	return &Metrics{
		cacheRequests: f.NewCounterVec(prometheus.CounterOpts{
			Name: "meshca_authn_cache_requests_total",
			Help: "Lookups in the cache of authenticated tokens, by authenticator and result (hit or miss).",
		}, []string{"authenticator", "result"}),
		clientCertVerifications: f.NewCounter(prometheus.CounterOpts{
			Name: "meshca_authn_clientcert_verifications_total",
			Help: "Client certificate chains verified: one per connection and trust bundle, not one per request.",
		}),
		jwksFetches: f.NewCounterVec(prometheus.CounterOpts{
			Name: "meshca_authn_jwks_fetches_total",
			Help: "Fetches of the service-account issuer's JSON Web Key Set, by result (ok or error).",
		}, []string{"result"}),
	}
}

func (m *Metrics) cache() *cacheMetrics { return &cacheMetrics{requests: m.cacheRequests} }
