package kube

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/stretchr/testify/require"

	"github.com/meshca/meshca/authn"
)

func newTestCache(t *testing.T, cfg CacheConfig, clk *clock) *cache {
	t.Helper()
	m, err := newCacheMetrics(nil)
	require.NoError(t, err)
	return newCache(cfg, clk.Now, m, "test")
}

func callerUntil(exp time.Time) *authn.Caller {
	return &authn.Caller{Namespace: "ns", ServiceAccount: "sa", ExpiresAt: exp}
}

func TestCacheTTL(t *testing.T) {
	tests := []struct {
		name     string
		maxTTL   time.Duration
		tokenTTL time.Duration // zero: the token's exp is unknown
		after    time.Duration
		wantHit  bool
	}{
		{name: "fresh", maxTTL: time.Minute, tokenTTL: time.Hour, after: 30 * time.Second, wantHit: true},
		{name: "capped by MaxTTL", maxTTL: time.Minute, tokenTTL: time.Hour, after: time.Minute},
		{name: "capped by exp", maxTTL: time.Hour, tokenTTL: time.Minute, after: time.Minute},
		{name: "unknown exp: MaxTTL", maxTTL: time.Minute, after: 59 * time.Second, wantHit: true},
		{name: "disabled", maxTTL: -1, tokenTTL: time.Hour},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			clk := newClock()
			c := newTestCache(t, CacheConfig{MaxTTL: tt.maxTTL}, clk)
			var exp time.Time
			if tt.tokenTTL != 0 {
				exp = clk.Now().Add(tt.tokenTTL)
			}
			calls := 0
			verify := func(context.Context) (*authn.Caller, error) { calls++; return callerUntil(exp), nil }
			_, err := c.get(t.Context(), "tok", verify)
			require.NoError(t, err)
			clk.Advance(tt.after)
			_, err = c.get(t.Context(), "tok", verify)
			require.NoError(t, err)
			if tt.wantHit {
				require.Equal(t, 1, calls)
				require.Equal(t, 1.0, testutil.ToFloat64(c.hits))
			} else {
				require.Equal(t, 2, calls)
				require.Equal(t, 0.0, testutil.ToFloat64(c.hits))
			}
			require.Equal(t, 2.0, testutil.ToFloat64(c.hits)+testutil.ToFloat64(c.misses))
		})
	}
}

func TestCacheFailuresNotCached(t *testing.T) {
	c := newTestCache(t, CacheConfig{}, newClock())
	calls := 0
	fail := authn.Fail(authn.ReasonExpired, "x")
	for range 3 {
		_, err := c.get(t.Context(), "tok", func(context.Context) (*authn.Caller, error) { calls++; return nil, fail })
		require.ErrorIs(t, err, fail)
	}
	require.Equal(t, 3, calls)
	require.Zero(t, c.len())
}

func TestCacheReturnsCopies(t *testing.T) {
	clk := newClock()
	c := newTestCache(t, CacheConfig{}, clk)
	verify := func(context.Context) (*authn.Caller, error) { return callerUntil(clk.Now().Add(time.Hour)), nil }
	got, err := c.get(t.Context(), "tok", verify)
	require.NoError(t, err)
	got.Namespace = "changed"
	again, err := c.get(t.Context(), "tok", verify)
	require.NoError(t, err)
	require.Equal(t, "ns", again.Namespace)
}

func TestCacheEviction(t *testing.T) {
	clk := newClock()
	c := newTestCache(t, CacheConfig{MaxEntries: 100}, clk)
	add := func(i int, ttl time.Duration) {
		t.Helper()
		_, err := c.get(t.Context(), fmt.Sprint("tok", i), func(context.Context) (*authn.Caller, error) {
			return callerUntil(clk.Now().Add(ttl)), nil
		})
		require.NoError(t, err)
	}
	// 50 short-lived entries, 50 long-lived; then the short ones expire.
	for i := range 100 {
		ttl := time.Hour
		if i%2 == 0 {
			ttl = time.Second
		}
		add(i, ttl)
	}
	require.Equal(t, 100, c.len())
	clk.Advance(2 * time.Second)
	add(100, time.Hour)
	require.Equal(t, 51, c.len(), "the expired went first")

	// Full of live entries: arbitrary ones go, a tenth at a time.
	for i := 101; i < 150; i++ {
		add(i, time.Hour)
	}
	require.Equal(t, 100, c.len())
	add(150, time.Hour)
	require.Equal(t, 91, c.len())
	for i := 151; i < 1000; i++ {
		add(i, time.Hour)
		require.LessOrEqual(t, c.len(), 100)
	}
}

func TestCacheCollapsesConcurrentLookups(t *testing.T) {
	clk := newClock()
	c := newTestCache(t, CacheConfig{}, clk)
	var calls atomic.Int32
	release := make(chan struct{})
	verify := func(context.Context) (*authn.Caller, error) {
		calls.Add(1)
		<-release
		return callerUntil(clk.Now().Add(time.Hour)), nil
	}
	var wg sync.WaitGroup
	var started sync.WaitGroup
	for range 50 {
		started.Add(1)
		wg.Go(func() {
			started.Done()
			_, err := c.get(t.Context(), "tok", verify)
			require.NoError(t, err)
		})
	}
	started.Wait()
	// Let the goroutines reach the shared call before it finishes.
	require.Eventually(t, func() bool { return testutil.ToFloat64(c.misses) == 50 }, 5*time.Second, time.Millisecond)
	close(release)
	wg.Wait()
	require.Equal(t, int32(1), calls.Load())
}

func TestCacheCallerGivesUp(t *testing.T) {
	clk := newClock()
	c := newTestCache(t, CacheConfig{}, clk)
	release := make(chan struct{})
	verified := make(chan struct{})
	verify := func(ctx context.Context) (*authn.Caller, error) {
		<-release
		// The shared call outlives the first caller's context.
		if err := ctx.Err(); err != nil {
			return nil, err
		}
		close(verified)
		return callerUntil(clk.Now().Add(time.Hour)), nil
	}
	ctx, cancel := context.WithCancel(t.Context())
	errc := make(chan error, 1)
	go func() {
		_, err := c.get(ctx, "tok", verify)
		errc <- err
	}()
	require.Eventually(t, func() bool { return testutil.ToFloat64(c.misses) == 1 }, 5*time.Second, time.Millisecond)
	cancel()
	err := <-errc
	require.ErrorIs(t, err, authn.ErrUnavailable)
	require.True(t, errors.Is(err, context.Canceled))

	close(release)
	<-verified
	require.Eventually(t, func() bool { return c.len() == 1 }, 5*time.Second, time.Millisecond)
}
