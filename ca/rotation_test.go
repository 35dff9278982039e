package ca_test

import (
	"context"
	"crypto/x509"
	"sync"
	"testing"
	"testing/synctest"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/stretchr/testify/require"

	"github.com/meshca/meshca/ca"
	"github.com/meshca/meshca/ca/catest"
)

// TestRotation runs the CA's one rotation loop against an Authority: the
// intermediate is replaced at its renewal point, every replacement is
// published once, a failing upstream is retried a minute apart without
// losing the current intermediate, and leaves never outlive their issuer.
func TestRotation(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		auth := catest.NewAuthority(t, 365*24*time.Hour)
		m := ca.NewMetrics(nil)
		c, err := ca.New(t.Context(), ca.Config{Backend: auth, Metrics: m,
			Intermediate: ca.IntermediateConfig{TTL: 10 * time.Hour, RenewFraction: 0.5}})
		require.NoError(t, err)
		first := c.State().Signing.Certificate()
		require.True(t, first.IsCA)
		require.Equal(t, []*x509.Certificate{auth.Root}, c.State().Roots)

		var (
			mu      sync.Mutex
			changes []ca.Change
		)
		cancelSub := c.Subscribe(func(ch ca.Change) {
			mu.Lock()
			defer mu.Unlock()
			changes = append(changes, ch)
		})
		defer cancelSub()
		got := func() []ca.Change {
			mu.Lock()
			defer mu.Unlock()
			return append([]ca.Change(nil), changes...)
		}

		ctx, cancel := context.WithCancel(t.Context())
		done := make(chan error, 1)
		go func() { done <- c.Run(ctx) }()

		// The intermediate is back-dated a minute: half its life ends
		// 4h59m30s after start.
		time.Sleep(4*time.Hour + 59*time.Minute)
		synctest.Wait()
		require.Empty(t, got(), "rotated before the renewal point")
		time.Sleep(time.Minute)
		synctest.Wait()
		require.Len(t, got(), 1)
		ch := got()[0]
		require.True(t, ch.SigningChanged)
		require.False(t, ch.BundleChanged, "a new intermediate under the same root needs no bundle change")
		second := c.State().Signing.Certificate()
		require.NotEqual(t, first.SerialNumber, second.SerialNumber)
		require.Same(t, second, ch.New.Signing.Certificate())
		require.Equal(t, 1.0, testutil.ToFloat64(m.Rotations.WithLabelValues("success")))

		// The upstream goes down at the next renewal point: the current
		// intermediate stays, and the mint is retried once a minute.
		auth.Down.Store(true)
		before := auth.Mints.Load()
		time.Sleep(5*time.Hour + 10*time.Minute)
		synctest.Wait()
		require.Same(t, second, c.State().Signing.Certificate())
		tries := auth.Mints.Load() - before
		require.GreaterOrEqual(t, tries, int64(9))
		require.LessOrEqual(t, tries, int64(12), "a failing mint must not spin")
		require.Equal(t, float64(tries), testutil.ToFloat64(m.Rotations.WithLabelValues("failure")))
		require.True(t, c.Health().Degraded, "a failing mint shows the backend degraded")
		require.ErrorIs(t, c.Health().Err, ca.ErrBackendUnavailable)
		require.Equal(t, 1.0, testutil.ToFloat64(m.Degraded))

		// Leaves signed meanwhile stop at the intermediate's NotAfter.
		resp, err := c.Sign(t.Context(), ca.SignRequest{CSR: catest.CSR(t, catest.Key(t, "P-256")), ID: testID,
			NotBefore: time.Now(), NotAfter: time.Now().Add(24 * time.Hour)})
		require.NoError(t, err)
		require.True(t, resp.NotAfter.Equal(second.NotAfter.Truncate(time.Second)))

		// It recovers without a restart.
		auth.Down.Store(false)
		time.Sleep(time.Minute)
		synctest.Wait()
		require.NotEqual(t, second.SerialNumber, c.State().Signing.Certificate().SerialNumber)
		require.Len(t, got(), 2)
		require.False(t, c.Health().Degraded)
		require.Equal(t, 0.0, testutil.ToFloat64(m.Degraded))

		cancel()
		synctest.Wait()
		require.NoError(t, <-done)
	})
}

// TestSubscribeOrderAndNoOps checks the change signal: a replacement holding
// the same certificates is no change, subscribers see changes in order with
// the new State already in force, and a cancelled subscription sees
// nothing more.
func TestSubscribeOrderAndNoOps(t *testing.T) {
	h := catest.NewHolder(t, true)
	c, err := ca.New(t.Context(), ca.Config{Backend: h})
	require.NoError(t, err)
	ctx, cancel := context.WithCancel(t.Context())
	done := make(chan error, 1)
	go func() { done <- c.Run(ctx) }()

	var (
		mu  sync.Mutex
		got []ca.Change
	)
	unsubscribe := c.Subscribe(func(ch ca.Change) {
		require.Equal(t, ch.New.Signing, c.State().Signing, "the new State is in force when subscribers hear of it")
		mu.Lock()
		defer mu.Unlock()
		got = append(got, ch)
	})
	first := c.State()
	h.Replace(ctx, first) // the same certificates: no change
	next := catest.NewState(t, true, time.Now().Add(time.Hour))
	h.Replace(ctx, next)
	// A new root with both roots in the bundle, as during a root migration.
	both := ca.State{Signing: next.Signing, Roots: append(append([]*x509.Certificate(nil), next.Roots...), first.Roots...)}
	h.Replace(ctx, both)
	require.Eventually(t, func() bool { mu.Lock(); defer mu.Unlock(); return len(got) == 2 }, 5*time.Second, time.Millisecond)
	unsubscribe()
	h.Replace(ctx, first)
	require.Eventually(t, func() bool { return c.State().Signing == first.Signing }, 5*time.Second, time.Millisecond)

	mu.Lock()
	defer mu.Unlock()
	require.Len(t, got, 2, "no-op and post-cancel changes are not delivered")
	require.True(t, got[0].SigningChanged)
	require.True(t, got[0].BundleChanged)
	require.False(t, got[1].SigningChanged)
	require.True(t, got[1].BundleChanged)
	require.Len(t, got[1].New.Roots, 2)
	cancel()
	require.NoError(t, <-done)
}

// TestUnusableStateRefused: a State whose bundle lacks the signing CA's
// root is never put in force.
func TestUnusableStateRefused(t *testing.T) {
	h := catest.NewHolder(t, false)
	c, err := ca.New(t.Context(), ca.Config{Backend: h})
	require.NoError(t, err)
	ctx, cancel := context.WithCancel(t.Context())
	done := make(chan error, 1)
	go func() { done <- c.Run(ctx) }()
	first := c.State()
	other := catest.NewState(t, false, time.Now().Add(time.Hour))
	h.Replace(ctx, ca.State{Signing: other.Signing, Roots: first.Roots})
	h.Replace(ctx, first) // a sync point: Watch has handled the bad one
	require.Same(t, first.Signing, c.State().Signing)
	cancel()
	require.NoError(t, <-done)
}
