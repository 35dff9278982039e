package serving_test

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"net"
	"sync/atomic"
	"testing"
	"testing/synctest"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/meshca/meshca/ca"
	"github.com/meshca/meshca/ca/catest"
	"github.com/meshca/meshca/ca/serving"
)

// flakyBackend fails Sign while down is set.
type flakyBackend struct {
	serving.Signer
	down atomic.Bool
}

func (f *flakyBackend) Sign(ctx context.Context, req ca.SignRequest) (*ca.SignResponse, error) {
	if f.down.Load() {
		return nil, errors.New("backend down")
	}
	return f.Signer.Sign(ctx, req)
}

func TestServingCertRotates(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		b := &flakyBackend{Signer: catest.NewCA(t, false)}
		s, err := serving.New(t.Context(), serving.Config{
			CA: b, DNSNames: []string{"meshca.istio-system.svc"}, IPAddresses: []net.IP{net.IPv4(127, 0, 0, 1)},
			TTL: time.Hour, RetryInterval: time.Minute,
		})
		require.NoError(t, err)
		first := s.Leaf()
		require.Equal(t, []string{"meshca.istio-system.svc"}, first.DNSNames)
		require.Empty(t, first.URIs, "the serving certificate carries no workload identity")
		require.Contains(t, first.ExtKeyUsage, x509.ExtKeyUsageServerAuth)
		got, err := s.GetCertificate(&tls.ClientHelloInfo{})
		require.NoError(t, err)
		require.Same(t, first, got.Leaf)

		ctx, cancel := context.WithCancel(t.Context())
		done := make(chan error)
		go func() { done <- s.Run(ctx) }()

		time.Sleep(29 * time.Minute)
		synctest.Wait()
		require.Same(t, first, s.Leaf(), "not renewed before half its life")

		// At half-life the backend is down: the old certificate stays...
		b.down.Store(true)
		time.Sleep(2 * time.Minute)
		synctest.Wait()
		require.Same(t, first, s.Leaf())
		// ...and the retry after the backend recovers replaces it.
		b.down.Store(false)
		time.Sleep(time.Minute)
		synctest.Wait()
		second := s.Leaf()
		require.NotEqual(t, first.SerialNumber, second.SerialNumber)
		require.True(t, second.NotAfter.After(first.NotAfter))

		// And again at the new certificate's half-life.
		time.Sleep(31 * time.Minute)
		synctest.Wait()
		require.NotEqual(t, second.SerialNumber, s.Leaf().SerialNumber)

		cancel()
		require.NoError(t, <-done)
	})
}

func TestServingCertNeedsNames(t *testing.T) {
	_, err := serving.New(t.Context(), serving.Config{CA: catest.NewCA(t, false)})
	require.ErrorContains(t, err, "at least one DNS name or IP address")
	_, err = serving.New(t.Context(), serving.Config{DNSNames: []string{"x"}})
	require.ErrorContains(t, err, "CA is required")
}

// squeezedBackend caps every leaf at deadline, as a CA about to expire does,
// and counts signatures.
type squeezedBackend struct {
	serving.Signer
	deadline time.Time
	signs    atomic.Int64
}

func (b *squeezedBackend) Sign(ctx context.Context, req ca.SignRequest) (*ca.SignResponse, error) {
	b.signs.Add(1)
	if req.NotAfter.After(b.deadline) {
		req.NotAfter = b.deadline
	}
	return b.Signer.Sign(ctx, req)
}

func TestServingCertSqueezedByExpiringCANeverSpins(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		b := &squeezedBackend{Signer: catest.NewCA(t, false), deadline: time.Now().Add(2 * time.Minute)}
		s, err := serving.New(t.Context(), serving.Config{CA: b, DNSNames: []string{"meshca"}, TTL: time.Hour, RetryInterval: 10 * time.Second})
		require.NoError(t, err)
		ctx, cancel := context.WithCancel(t.Context())
		done := make(chan error)
		go func() { done <- s.Run(ctx) }()
		time.Sleep(5 * time.Minute)
		synctest.Wait()
		// At most one attempt per RetryInterval, however short the lifetime.
		require.LessOrEqual(t, b.signs.Load(), int64(5*60/10+1))
		// And Run did not give up: it renewed at half-life, then kept
		// retrying every RetryInterval once the CA could sign no more.
		require.GreaterOrEqual(t, b.signs.Load(), int64(10), "Run must keep renewing")
		cancel()
		require.NoError(t, <-done)
	})
}
