package kube

import (
	"context"
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"testing/synctest"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/stretchr/testify/require"

	"github.com/meshca/meshca/authn"
)

func newTestCache(t *testing.T, cfg CacheConfig, clk *clock) *cache {
	t.Helper()
	return newCache(cfg, clk.Now, NewMetrics(nil).cache(), "test")
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

// TestCacheCollapsesConcurrentLookups runs in a synctest bubble so that
// every lookup has joined the shared verification before it is released:
// synctest.Wait returns only once all 50 goroutines are blocked on it.
func TestCacheCollapsesConcurrentLookups(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		clk := newClock()
		c := newTestCache(t, CacheConfig{}, clk)
		var calls atomic.Int32
		release := make(chan struct{})
		verify := func(ctx context.Context) (*authn.Caller, error) {
			calls.Add(1)
			select {
			case <-release:
			case <-ctx.Done(): // the test failed and its context ended
				return nil, ctx.Err()
			}
			return callerUntil(clk.Now().Add(time.Hour)), nil
		}
		var wg sync.WaitGroup
		errs := make([]error, 50)
		for i := range errs {
			wg.Go(func() {
				_, errs[i] = c.get(t.Context(), "tok", verify)
			})
		}
		synctest.Wait()
		require.Equal(t, 50.0, testutil.ToFloat64(c.misses))
		close(release)
		wg.Wait()
		for _, err := range errs {
			require.NoError(t, err)
		}
		require.Equal(t, int32(1), calls.Load())
	})
}

// TestCacheCallerGivesUp: a caller whose context ends gets its context's
// error, not ErrUnavailable; the shared verification goes on for the
// callers still waiting.
func TestCacheCallerGivesUp(t *testing.T) {
	tests := []struct {
		name    string
		ctx     func(context.Context) (context.Context, context.CancelFunc)
		giveUp  func(cancel context.CancelFunc)
		wantErr error
	}{
		{name: "cancelled", ctx: context.WithCancel, giveUp: func(cancel context.CancelFunc) { cancel() }, wantErr: context.Canceled},
		{
			name: "deadline",
			ctx: func(ctx context.Context) (context.Context, context.CancelFunc) {
				return context.WithTimeout(ctx, time.Second)
			},
			giveUp:  func(context.CancelFunc) { time.Sleep(time.Second) },
			wantErr: context.DeadlineExceeded,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				clk := newClock()
				c := newTestCache(t, CacheConfig{}, clk)
				release := make(chan struct{})
				verify := func(ctx context.Context) (*authn.Caller, error) {
					select {
					case <-release:
					case <-ctx.Done():
						return nil, context.Cause(ctx)
					}
					return callerUntil(clk.Now().Add(time.Hour)), nil
				}
				ctx, cancel := tt.ctx(t.Context())
				defer cancel()
				quitter := make(chan error, 1)
				go func() {
					_, err := c.get(ctx, "tok", verify)
					quitter <- err
				}()
				stayer := make(chan error, 1)
				go func() {
					_, err := c.get(t.Context(), "tok", verify)
					stayer <- err
				}()
				synctest.Wait()
				tt.giveUp(cancel)

				err := <-quitter
				require.ErrorIs(t, err, tt.wantErr)
				require.NotErrorIs(t, err, authn.ErrUnavailable)
				require.NotErrorIs(t, err, authn.ErrUnauthenticated)

				synctest.Wait()
				require.Empty(t, stayer, "the other caller still waits")
				close(release)
				require.NoError(t, <-stayer)
				require.Equal(t, 1, c.len())
			})
		})
	}
}

// TestCacheAbandonedVerificationStops: once every caller waiting for a
// shared verification has given up, the verification's context is
// cancelled at once (not after verifyTimeout), and the next caller starts
// a fresh one.
func TestCacheAbandonedVerificationStops(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		c := newTestCache(t, CacheConfig{}, newClock())
		type stopped struct {
			after time.Duration
			cause error
		}
		var calls atomic.Int32
		stops := make(chan stopped, 2)
		blockUntilCancelled := func(ctx context.Context) (*authn.Caller, error) {
			calls.Add(1)
			start := time.Now()
			<-ctx.Done()
			stops <- stopped{after: time.Since(start), cause: context.Cause(ctx)}
			return nil, ctx.Err()
		}

		const callers = 3
		cancels := make([]context.CancelFunc, callers)
		errs := make(chan error, callers)
		for i := range cancels {
			ctx, cancel := context.WithCancel(t.Context())
			cancels[i] = cancel
			go func() {
				_, err := c.get(ctx, "tok", blockUntilCancelled)
				errs <- err
			}()
		}
		synctest.Wait()
		require.Equal(t, int32(1), calls.Load())

		// While one caller still waits, the verification goes on.
		for _, cancel := range cancels[:callers-1] {
			cancel()
			require.ErrorIs(t, <-errs, context.Canceled)
		}
		synctest.Wait()
		require.Empty(t, stops)

		// The last one leaves: the verification sees it with no time passed.
		cancels[callers-1]()
		require.ErrorIs(t, <-errs, context.Canceled)
		synctest.Wait()
		require.Len(t, stops, 1)
		s := <-stops
		require.Zero(t, s.after)
		require.ErrorIs(t, s.cause, errAbandoned)

		// A new caller does not join the abandoned verification.
		_, err := c.get(t.Context(), "tok", func(context.Context) (*authn.Caller, error) {
			calls.Add(1)
			return callerUntil(time.Now().Add(time.Hour)), nil
		})
		require.NoError(t, err)
		require.Equal(t, int32(2), calls.Load())
	})
}

// TestCacheVerifyTimeout: a verification nobody gives up on still ends
// after verifyTimeout, and the callers get ErrUnavailable without the
// context error it wrapped: their own contexts did not end.
func TestCacheVerifyTimeout(t *testing.T) {
	tests := []struct {
		name string
		fail func(ctx context.Context) error // the verification's error once ctx is done
	}{
		{name: "wrapped in ErrUnavailable", fail: func(ctx context.Context) error { return fmt.Errorf("%w: fetch: %w", authn.ErrUnavailable, ctx.Err()) }},
		{name: "bare", fail: func(ctx context.Context) error { return ctx.Err() }},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				c := newTestCache(t, CacheConfig{}, newClock())
				start := time.Now()
				var cause error
				_, err := c.get(t.Context(), "tok", func(ctx context.Context) (*authn.Caller, error) {
					<-ctx.Done()
					cause = context.Cause(ctx)
					return nil, tt.fail(ctx)
				})
				require.Equal(t, verifyTimeout, time.Since(start))
				require.ErrorIs(t, cause, errVerifyTimeout)
				require.ErrorIs(t, err, authn.ErrUnavailable)
				require.NotErrorIs(t, err, context.DeadlineExceeded)
				require.NotErrorIs(t, err, authn.ErrUnauthenticated)
				require.Equal(t, 1, strings.Count(err.Error(), authn.ErrUnavailable.Error()))
			})
		})
	}
}
