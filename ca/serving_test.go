package ca_test

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

	"github.com/meshca/meshca/backends/selfsigned"
	"github.com/meshca/meshca/ca"
)

// flakyBackend fails Sign while down is set.
type flakyBackend struct {
	ca.Backend
	down atomic.Bool
}

func (f *flakyBackend) Sign(ctx context.Context, req ca.SignRequest) (*ca.SignResponse, error) {
	if f.down.Load() {
		return nil, errors.New("backend down")
	}
	return f.Backend.Sign(ctx, req)
}

func TestServingCertRotates(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		ss, err := selfsigned.New(selfsigned.Config{})
		require.NoError(t, err)
		b := &flakyBackend{Backend: ss}
		s, err := ca.NewServingCert(t.Context(), ca.ServingConfig{
			Backend: b, DNSNames: []string{"meshca.istio-system.svc"}, IPAddresses: []net.IP{net.IPv4(127, 0, 0, 1)},
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
	ss, err := selfsigned.New(selfsigned.Config{})
	require.NoError(t, err)
	_, err = ca.NewServingCert(t.Context(), ca.ServingConfig{Backend: ss})
	require.ErrorContains(t, err, "at least one DNS name or IP address")
	_, err = ca.NewServingCert(t.Context(), ca.ServingConfig{DNSNames: []string{"x"}})
	require.ErrorContains(t, err, "Backend is required")
}

// squeezedBackend caps every leaf at deadline, as a CA about to expire does,
// and counts signatures.
type squeezedBackend struct {
	ca.Backend
	deadline time.Time
	signs    atomic.Int64
}

func (b *squeezedBackend) Sign(ctx context.Context, req ca.SignRequest) (*ca.SignResponse, error) {
	b.signs.Add(1)
	if req.NotAfter.After(b.deadline) {
		req.NotAfter = b.deadline
	}
	return b.Backend.Sign(ctx, req)
}

func TestServingCertSqueezedByExpiringCANeverSpins(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		ss, err := selfsigned.New(selfsigned.Config{})
		require.NoError(t, err)
		b := &squeezedBackend{Backend: ss, deadline: time.Now().Add(2 * time.Minute)}
		s, err := ca.NewServingCert(t.Context(), ca.ServingConfig{Backend: b, DNSNames: []string{"meshca"}, TTL: time.Hour, RetryInterval: 10 * time.Second})
		require.NoError(t, err)
		ctx, cancel := context.WithCancel(t.Context())
		done := make(chan error)
		go func() { done <- s.Run(ctx) }()
		time.Sleep(5 * time.Minute)
		synctest.Wait()
		// At most one attempt per RetryInterval, however short the lifetime.
		require.LessOrEqual(t, b.signs.Load(), int64(5*60/10+1))
		cancel()
		require.NoError(t, <-done)
	})
}
