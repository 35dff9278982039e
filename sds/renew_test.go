package sds

import (
	"context"
	"crypto"
	"sync/atomic"
	"testing"
	"testing/synctest"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/stretchr/testify/require"
	"google.golang.org/grpc/metadata"

	"github.com/meshca/meshca/authn"
	"github.com/meshca/meshca/ca"
	"github.com/meshca/meshca/ca/catest"
	"github.com/meshca/meshca/ca/edge"
)

// oneCaller authenticates every call as the same workload.
type oneCaller struct{ c *authn.Caller }

func (o oneCaller) Authenticate(context.Context, authn.Credentials) (*authn.Caller, error) {
	cc := *o.c
	return &cc, nil
}

// flakyCA is a CA that can be taken down, counting issuance attempts.
type flakyCA struct {
	*ca.CA
	down     atomic.Bool
	attempts atomic.Int64
}

func (f *flakyCA) IssueKey(ctx context.Context, c *authn.Caller, key crypto.Signer, lifetime time.Duration) (*ca.Issued, error) {
	f.attempts.Add(1)
	if f.down.Load() {
		return nil, ca.ErrBackendUnavailable
	}
	return f.CA.IssueKey(ctx, c, key, lifetime)
}

// TestRenewalSchedule runs the central renewal scheduler under synctest:
// 24-hour certificates renewed at half-life minus up to an hour of jitter,
// and a CA outage retried with bounded backoff, in microseconds.
func TestRenewalSchedule(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		ctx, cancel := context.WithCancel(t.Context())
		defer cancel()
		half, jitter := 0.5, time.Hour
		pol, err := ca.NewPolicyStore(&ca.Policy{Default: ca.Rule{DefaultTTL: 24 * time.Hour, MinTTL: 2 * time.Hour, RenewFraction: &half, RenewJitter: &jitter}})
		require.NoError(t, err)
		core, err := ca.New(ctx, ca.Config{Backend: catest.NewHolder(t, false), Policy: pol})
		require.NoError(t, err)
		fc := &flakyCA{CA: core}
		id := spiffeid.RequireFromString("spiffe://cluster.local/ns/shop/sa/web")
		e, err := edge.New(edge.Edge{Service: ServiceLabel, Authenticator: oneCaller{&authn.Caller{ID: id, Namespace: "shop", ServiceAccount: "web"}}})
		require.NoError(t, err)
		s, err := New(Config{CA: fc, Edge: e, RetryMin: time.Second, RetryMax: time.Minute})
		require.NoError(t, err)
		go func() { _ = s.Run(ctx) }()

		sctx := metadata.NewIncomingContext(ctx, metadata.Pairs("authorization", "Bearer x"))
		st, err := s.openStream(sctx, "sotw")
		require.NoError(t, err)
		defer s.closeStream(st)
		require.NoError(t, st.subscribe([]string{NameDefault}, nil))
		cred := func() *material {
			st.mu.Lock()
			defer st.mu.Unlock()
			return st.cred
		}

		// Three renewals, each in [12h-1h, 12h] after the previous issue.
		for range 3 {
			prev := cred()
			issued := time.Now()
			for cred() == prev {
				time.Sleep(time.Minute)
				synctest.Wait()
				require.Less(t, time.Since(issued), 12*time.Hour+2*time.Minute, "no renewal by half-life")
			}
			require.GreaterOrEqual(t, time.Since(issued), 11*time.Hour-time.Minute, "renewed before half-life minus jitter")
			require.True(t, time.Now().Before(prev.notAfter))
			_, ok := st.cache.GetResources()[NameDefault]
			require.True(t, ok)
		}

		// The CA goes down at the renewal point: retries back off from 1s
		// to at most 1m (never spinning), the proxy keeps its certificate,
		// and renewal resumes within a minute of the CA's return.
		held := cred()
		fc.down.Store(true)
		time.Sleep(time.Until(held.renewAt) + time.Second)
		synctest.Wait()
		before := fc.attempts.Load()
		time.Sleep(10 * time.Minute)
		synctest.Wait()
		tries := fc.attempts.Load() - before
		require.GreaterOrEqual(t, tries, int64(9), "retried")
		require.LessOrEqual(t, tries, int64(25), "backoff caps the retry rate")
		require.Same(t, held, cred())
		fc.down.Store(false)
		time.Sleep(time.Minute + time.Second)
		synctest.Wait()
		require.NotSame(t, held, cred(), "renewed once the CA was back")
	})
}
