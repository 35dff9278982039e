package ca_test

import (
	"context"
	"crypto"
	"crypto/x509"
	"errors"
	"fmt"
	"net/url"
	"sync"
	"sync/atomic"
	"testing"
	"testing/synctest"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/stretchr/testify/require"

	"github.com/meshca/meshca/ca"
	"github.com/meshca/meshca/ca/catest"
)

// upstreamPKI is a root and an intermediate that sign "upstream" leaves.
type upstreamPKI struct {
	root, inter       *x509.Certificate
	rootKey, interKey crypto.Signer
}

func newUpstreamPKI(t *testing.T, name string) *upstreamPKI {
	now := time.Now()
	rootKey, interKey := catest.Key(t, "P-256"), catest.Key(t, "P-256")
	root := catest.Issue(t, catest.CATemplate(name+" root", now.Add(-time.Hour), now.Add(96*time.Hour)), rootKey, nil, nil)
	inter := catest.Issue(t, catest.CATemplate(name+" inter", now.Add(-time.Hour), now.Add(48*time.Hour)), interKey, root, rootKey)
	return &upstreamPKI{root: root, inter: inter, rootKey: rootKey, interKey: interKey}
}

// gatedUpstream signs leaves once its gate opens, fails while down, and
// serves whatever bundle it holds.
type gatedUpstream struct {
	t       *testing.T
	pki     *upstreamPKI
	gate    chan struct{}
	down    atomic.Bool
	inSign  atomic.Int64
	maxSeen atomic.Int64

	mu    sync.Mutex
	roots []*x509.Certificate
}

func (u *gatedUpstream) SignLeaf(ctx context.Context, req ca.SignRequest) (*ca.UpstreamLeaf, error) {
	n := u.inSign.Add(1)
	defer u.inSign.Add(-1)
	for {
		m := u.maxSeen.Load()
		if n <= m || u.maxSeen.CompareAndSwap(m, n) {
			break
		}
	}
	if u.gate != nil {
		select {
		case <-u.gate:
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
	if u.down.Load() {
		return nil, fmt.Errorf("%w: connection refused", ca.ErrBackendUnavailable)
	}
	tmpl := &x509.Certificate{NotBefore: req.NotBefore, NotAfter: req.NotAfter, URIs: []*url.URL{req.ID.URL()},
		KeyUsage: x509.KeyUsageDigitalSignature, BasicConstraintsValid: true,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth, x509.ExtKeyUsageServerAuth}}
	leaf := catest.IssueFor(u.t, tmpl, req.CSR.PublicKey, u.pki.inter, u.pki.interKey)
	return &ca.UpstreamLeaf{Leaf: leaf, Chain: []*x509.Certificate{u.pki.inter}}, nil
}

func (u *gatedUpstream) TrustBundle(context.Context) ([]*x509.Certificate, error) {
	if u.down.Load() {
		return nil, fmt.Errorf("%w: connection refused", ca.ErrBackendUnavailable)
	}
	u.mu.Lock()
	defer u.mu.Unlock()
	return u.roots, nil
}

func (u *gatedUpstream) setRoots(roots ...*x509.Certificate) {
	u.mu.Lock()
	defer u.mu.Unlock()
	u.roots = roots
}

// TestUpstreamInFlightBounded: however many requests arrive while the
// upstream hangs, at most MaxUpstreamInFlight calls reach it; the others
// give up with Unavailable when their deadline passes, and nothing is left
// waiting afterwards.
func TestUpstreamInFlightBounded(t *testing.T) {
	pki := newUpstreamPKI(t, "hanging")
	up := &gatedUpstream{t: t, pki: pki, gate: make(chan struct{}), roots: []*x509.Certificate{pki.root}}
	m := ca.NewMetrics(nil)
	c, err := ca.New(t.Context(), ca.Config{Backend: up, Metrics: m, MaxUpstreamInFlight: 4})
	require.NoError(t, err)

	const callers = 40
	var (
		wg                 sync.WaitGroup
		ok, unavailable, o atomic.Int64
	)
	ctx, cancel := context.WithTimeout(t.Context(), 300*time.Millisecond)
	defer cancel()
	for range callers {
		wg.Go(func() {
			now := time.Now()
			_, err := c.Sign(ctx, ca.SignRequest{CSR: catest.CSR(t, catest.Key(t, "P-256")), ID: testID, NotBefore: now, NotAfter: now.Add(time.Hour)})
			switch {
			case err == nil:
				ok.Add(1)
			case errors.Is(err, ca.ErrBackendUnavailable) || errors.Is(err, context.DeadlineExceeded):
				unavailable.Add(1)
			default:
				o.Add(1)
			}
		})
	}
	wg.Wait()
	require.Equal(t, int64(4), up.maxSeen.Load(), "calls in flight to the upstream")
	require.Equal(t, int64(callers), unavailable.Load())
	require.Zero(t, ok.Load()+o.Load())
	require.Zero(t, up.inSign.Load(), "no call is left running")
	require.Equal(t, 0.0, testutil.ToFloat64(m.UpstreamInFlight))

	// The gate opens: slots are free again, and a request is served.
	close(up.gate)
	now := time.Now()
	_, err = c.Sign(t.Context(), ca.SignRequest{CSR: catest.CSR(t, catest.Key(t, "P-256")), ID: testID, NotBefore: now, NotAfter: now.Add(time.Hour)})
	require.NoError(t, err)
}

// TestUpstreamDegradedAndRecovers: a failing direct-mode upstream shows as
// degraded (and leaves nothing behind), and recovers with no restart.
func TestUpstreamDegradedAndRecovers(t *testing.T) {
	pki := newUpstreamPKI(t, "flaky")
	up := &gatedUpstream{t: t, pki: pki, roots: []*x509.Certificate{pki.root}}
	m := ca.NewMetrics(nil)
	c, err := ca.New(t.Context(), ca.Config{Backend: up, Metrics: m})
	require.NoError(t, err)
	require.False(t, c.Health().Degraded)
	sign := func() error {
		now := time.Now()
		_, err := c.Sign(t.Context(), ca.SignRequest{CSR: catest.CSR(t, catest.Key(t, "P-256")), ID: testID, NotBefore: now, NotAfter: now.Add(time.Hour)})
		return err
	}
	require.NoError(t, sign())

	up.down.Store(true)
	err = sign()
	require.ErrorIs(t, err, ca.ErrBackendUnavailable)
	require.ErrorContains(t, err, "connection refused")
	h := c.Health()
	require.True(t, h.Degraded)
	require.ErrorContains(t, h.Err, "connection refused")
	require.Equal(t, 1.0, testutil.ToFloat64(m.Degraded))
	require.Equal(t, 1.0, testutil.ToFloat64(m.UpstreamCalls.WithLabelValues("sign", "failure")))

	up.down.Store(false)
	require.NoError(t, sign())
	require.False(t, c.Health().Degraded)
	require.Equal(t, 0.0, testutil.ToFloat64(m.Degraded))
	require.Equal(t, 2.0, testutil.ToFloat64(m.UpstreamCalls.WithLabelValues("sign", "success")))
}

// TestUpstreamLeafCappedAtIssuer: an upstream that caps a leaf at its
// issuing CA's NotAfter answers correctly; one that cuts it shorter does
// not.
func TestUpstreamLeafCappedAtIssuer(t *testing.T) {
	pki := newUpstreamPKI(t, "capping")
	for _, tc := range []struct {
		name    string
		cut     time.Duration // before the issuer's NotAfter
		wantErr bool
	}{{name: "at the issuer's NotAfter"}, {name: "an hour short of it", cut: time.Hour, wantErr: true}} {
		t.Run(tc.name, func(t *testing.T) {
			up := &fixedUpstream{roots: []*x509.Certificate{pki.root}, sign: func(req ca.SignRequest) (*ca.UpstreamLeaf, error) {
				tmpl := &x509.Certificate{NotBefore: req.NotBefore, NotAfter: pki.inter.NotAfter.Add(-tc.cut), URIs: []*url.URL{req.ID.URL()},
					KeyUsage: x509.KeyUsageDigitalSignature, BasicConstraintsValid: true}
				return &ca.UpstreamLeaf{Leaf: catest.IssueFor(t, tmpl, req.CSR.PublicKey, pki.inter, pki.interKey), Chain: []*x509.Certificate{pki.inter}}, nil
			}}
			c, err := ca.New(t.Context(), ca.Config{Backend: up})
			require.NoError(t, err)
			now := time.Now()
			_, err = c.Sign(t.Context(), ca.SignRequest{CSR: catest.CSR(t, catest.Key(t, "P-256")), ID: testID, NotBefore: now, NotAfter: now.Add(30 * 24 * time.Hour)})
			if tc.wantErr {
				require.ErrorIs(t, err, ca.ErrBackendUnavailable)
				return
			}
			require.NoError(t, err)
		})
	}
}

// TestUpstreamBundleRefreshed: a change of the upstream's trust bundle is
// published within one refresh interval, without a restart; a failed
// refresh keeps the bundle and marks the backend degraded until the next
// one succeeds.
func TestUpstreamBundleRefreshed(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		pki, next := newUpstreamPKI(t, "old"), newUpstreamPKI(t, "new")
		up := &gatedUpstream{t: t, pki: pki, roots: []*x509.Certificate{pki.root}}
		c, err := ca.New(t.Context(), ca.Config{Backend: up, BundleRefresh: time.Minute})
		require.NoError(t, err)
		changes := make(chan ca.Change, 4)
		defer c.Subscribe(func(ch ca.Change) { changes <- ch })()
		ctx, cancel := context.WithCancel(t.Context())
		defer cancel()
		go func() { _ = c.Run(ctx) }()

		up.setRoots(pki.root, next.root)
		time.Sleep(59 * time.Second)
		synctest.Wait()
		require.Empty(t, changes)
		time.Sleep(time.Second)
		synctest.Wait()
		require.Len(t, changes, 1)
		ch := <-changes
		require.True(t, ch.BundleChanged)
		require.Equal(t, []*x509.Certificate{pki.root, next.root}, c.State().Roots)

		up.down.Store(true)
		time.Sleep(time.Minute)
		synctest.Wait()
		require.True(t, c.Health().Degraded)
		require.Len(t, c.State().Roots, 2, "a failed refresh keeps the bundle")
		up.down.Store(false)
		time.Sleep(time.Minute)
		synctest.Wait()
		require.False(t, c.Health().Degraded)
		require.Empty(t, changes)
	})
}

// bundleAuthority is an Authority that also serves its bundle.
type bundleAuthority struct {
	*catest.Authority
	mu    sync.Mutex
	roots []*x509.Certificate
}

func (a *bundleAuthority) TrustBundle(context.Context) ([]*x509.Certificate, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.roots, nil
}

// TestAuthorityBundleRefreshKeepsSigningRoot: an Authority's new bundle is
// published, but the root of the intermediate in use stays in it even
// when the upstream drops it, or its leaves would stop verifying.
func TestAuthorityBundleRefreshKeepsSigningRoot(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		auth := &bundleAuthority{Authority: catest.NewAuthority(t, 365*24*time.Hour)}
		auth.roots = []*x509.Certificate{auth.Root}
		c, err := ca.New(t.Context(), ca.Config{Backend: auth, BundleRefresh: time.Minute})
		require.NoError(t, err)
		ctx, cancel := context.WithCancel(t.Context())
		defer cancel()
		go func() { _ = c.Run(ctx) }()

		other := newUpstreamPKI(t, "replacement")
		auth.mu.Lock()
		auth.roots = []*x509.Certificate{other.root}
		auth.mu.Unlock()
		time.Sleep(time.Minute)
		synctest.Wait()
		require.Equal(t, []*x509.Certificate{other.root, auth.Root}, c.State().Roots)
	})
}

// TestUpstreamTimeoutIsUnavailable: when meshca's own bound on an upstream
// call runs out, the caller (whose deadline has not) gets an outage, not
// a deadline error it did not cause.
func TestUpstreamTimeoutIsUnavailable(t *testing.T) {
	pki := newUpstreamPKI(t, "slow")
	up := &gatedUpstream{t: t, pki: pki, gate: make(chan struct{}), roots: []*x509.Certificate{pki.root}}
	defer close(up.gate)
	c, err := ca.New(t.Context(), ca.Config{Backend: up, UpstreamTimeout: 100 * time.Millisecond})
	require.NoError(t, err)
	now := time.Now()
	_, err = c.Sign(t.Context(), ca.SignRequest{CSR: catest.CSR(t, catest.Key(t, "P-256")), ID: testID, NotBefore: now, NotAfter: now.Add(time.Hour)})
	require.ErrorIs(t, err, ca.ErrBackendUnavailable)
	require.NotErrorIs(t, err, context.DeadlineExceeded)
	require.ErrorContains(t, err, "backend.upstream.timeout (100ms)")
	require.True(t, c.Health().Degraded)
}

// clientTimeoutUpstream fails as an HTTP client whose own timeout ran out.
type clientTimeoutUpstream struct{ *gatedUpstream }

func (u clientTimeoutUpstream) SignLeaf(context.Context, ca.SignRequest) (*ca.UpstreamLeaf, error) {
	return nil, fmt.Errorf("%w: Post \"https://vault/v1/pki/sign/mesh\": %w", ca.ErrBackendUnavailable, context.DeadlineExceeded)
}

// TestUpstreamClientTimeoutIsUnavailable: an upstream client's own timeout
// (it wraps context.DeadlineExceeded) is an outage too, not the caller's
// deadline.
func TestUpstreamClientTimeoutIsUnavailable(t *testing.T) {
	pki := newUpstreamPKI(t, "client-timeout")
	c, err := ca.New(t.Context(), ca.Config{Backend: clientTimeoutUpstream{&gatedUpstream{t: t, pki: pki, roots: []*x509.Certificate{pki.root}}}})
	require.NoError(t, err)
	now := time.Now()
	_, err = c.Sign(t.Context(), ca.SignRequest{CSR: catest.CSR(t, catest.Key(t, "P-256")), ID: testID, NotBefore: now, NotAfter: now.Add(time.Hour)})
	require.ErrorIs(t, err, ca.ErrBackendUnavailable)
	require.NotErrorIs(t, err, context.DeadlineExceeded)
}

// TestUpstreamDroppedRootRetires: a root the upstream stops listing stays
// in the bundle for the policy's longest maxTTL (leaves under it live that
// long), then goes.
func TestUpstreamDroppedRootRetires(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		old, next := newUpstreamPKI(t, "old"), newUpstreamPKI(t, "next")
		up := &gatedUpstream{t: t, pki: old, roots: []*x509.Certificate{old.root}}
		store, err := ca.NewPolicyStore(&ca.Policy{Default: ca.Rule{MaxTTL: time.Hour, DefaultTTL: time.Hour}})
		require.NoError(t, err)
		c, err := ca.New(t.Context(), ca.Config{Backend: up, Policy: store, BundleRefresh: time.Minute})
		require.NoError(t, err)
		ctx, cancel := context.WithCancel(t.Context())
		defer cancel()
		go func() { _ = c.Run(ctx) }()

		up.setRoots(next.root)
		time.Sleep(time.Minute)
		synctest.Wait()
		require.Equal(t, []*x509.Certificate{next.root, old.root}, c.State().Roots, "the dropped root stays")
		time.Sleep(time.Hour - 2*time.Minute)
		synctest.Wait()
		require.Len(t, c.State().Roots, 2, "still there while a leaf under it may live")
		time.Sleep(3 * time.Minute) // maxTTL plus the 30s back-date, then the next refresh
		synctest.Wait()
		require.Equal(t, []*x509.Certificate{next.root}, c.State().Roots, "and goes once its leaves have expired")
	})
}

// TestFirstMintFailure: an Authority that fails the very first mint makes
// New fail with its error (and the backend degraded), not panic.
func TestFirstMintFailure(t *testing.T) {
	auth := catest.NewAuthority(t, 365*24*time.Hour)
	auth.Down.Store(true)
	m := ca.NewMetrics(nil)
	_, err := ca.New(t.Context(), ca.Config{Backend: auth, Metrics: m})
	require.ErrorIs(t, err, ca.ErrBackendUnavailable)
	require.ErrorContains(t, err, "first intermediate")
	require.Equal(t, 1.0, testutil.ToFloat64(m.Degraded))
}
