package ca_test

import (
	"context"
	"crypto"
	"crypto/x509"
	"errors"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/stretchr/testify/require"

	"github.com/meshca/meshca/authn"
	"github.com/meshca/meshca/ca"
	"github.com/meshca/meshca/ca/catest"
)

// newTestCA returns a CA with policy p over b, or over a catest.Holder when
// b is nil.
func newTestCA(t *testing.T, p *ca.Policy, b ca.Backend) (*ca.CA, *ca.Metrics) {
	t.Helper()
	if b == nil {
		b = catest.NewHolder(t, false)
	}
	store, err := ca.NewPolicyStore(p)
	require.NoError(t, err)
	m := ca.NewMetrics(nil)
	c, err := ca.New(t.Context(), ca.Config{Backend: b, Policy: store, Metrics: m})
	require.NoError(t, err)
	return c, m
}

func testCaller(t *testing.T, ns, sa string) *authn.Caller {
	t.Helper()
	id, err := authn.ServiceAccountID(spiffeid.RequireTrustDomainFromString("cluster.local"), ns, sa)
	require.NoError(t, err)
	return &authn.Caller{ID: id, Namespace: ns, ServiceAccount: sa}
}

func TestIssueKeyPolicyPerNamespace(t *testing.T) {
	c, m := newTestCA(t, &ca.Policy{
		Namespaces: map[string]ca.Rule{
			"strict": {KeyTypes: []ca.KeyType{ca.KeyECDSAP384}},
			"edge":   {KeyTypes: []ca.KeyType{ca.KeyEd25519, ca.KeyECDSAP256}},
		},
	}, nil)
	edKey := catest.Key(t, "Ed25519")
	p256 := catest.Key(t, "P-256")

	tests := []struct {
		name    string
		ns      string
		key     crypto.Signer
		wantErr string
	}{
		{name: "P-256 allowed by default", ns: "web", key: p256},
		{name: "Ed25519 refused by default", ns: "web", key: edKey, wantErr: "CSR key is Ed25519; the policy for web/app allows ECDSA-P256, ECDSA-P384, RSA-2048, RSA-3072, RSA-4096"},
		{name: "Ed25519 allowed where the policy opts in", ns: "edge", key: edKey},
		{name: "P-256 refused where only P-384 is allowed", ns: "strict", key: p256, wantErr: "CSR key is ECDSA-P256; the policy for strict/app allows ECDSA-P384"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			cl := testCaller(t, tc.ns, "app")
			issued, err := c.Issue(t.Context(), ca.IssueRequest{Caller: cl, CSR: catest.CSRDER(t, tc.key, nil, cl.ID.String())})
			if tc.wantErr == "" {
				require.NoError(t, err)
				require.NotEmpty(t, issued.CertPEM)
				return
			}
			require.ErrorIs(t, err, ca.ErrBadCSR)
			require.EqualError(t, err, "bad CSR: "+tc.wantErr)
		})
	}
	require.Equal(t, 2.0, testutil.ToFloat64(m.CSRRejections.WithLabelValues(ca.CSRKeyType)))
	require.Equal(t, 1.0, testutil.ToFloat64(m.Issued.WithLabelValues(string(ca.KeyEd25519))))
}

// failingUpstream is an Upstream whose every SignLeaf fails with err.
type failingUpstream struct {
	roots []*x509.Certificate
	err   error
}

func (u failingUpstream) SignLeaf(context.Context, ca.SignRequest) (*ca.UpstreamLeaf, error) {
	return nil, u.err
}

func (u failingUpstream) TrustBundle(context.Context) ([]*x509.Certificate, error) {
	return u.roots, nil
}

func TestIssueBackendErrors(t *testing.T) {
	cl := testCaller(t, "demo", "web")
	csr := catest.CSRDER(t, catest.Key(t, "P-256"), nil, cl.ID.String())

	roots := catest.NewState(t, false, time.Now().Add(time.Hour)).Roots
	down := failingUpstream{roots: roots, err: errors.New("dial tcp 10.0.0.1:8200: connection refused")}
	c, _ := newTestCA(t, &ca.Policy{}, down)
	_, err := c.Issue(t.Context(), ca.IssueRequest{Caller: cl, CSR: csr})
	require.ErrorIs(t, err, ca.ErrBackendUnavailable, "an unknown backend failure is an outage: the client retries")

	c, _ = newTestCA(t, &ca.Policy{}, failingUpstream{roots: roots, err: ca.ErrInvalidSignRequest})
	_, err = c.Issue(t.Context(), ca.IssueRequest{Caller: cl, CSR: csr})
	require.ErrorIs(t, err, ca.ErrInvalidSignRequest)
	require.NotErrorIs(t, err, ca.ErrBackendUnavailable, "a request that slipped past the checks is a bug, not an outage")

	ctx, cancel := context.WithCancel(t.Context())
	cancel()
	c, _ = newTestCA(t, &ca.Policy{}, down)
	_, err = c.Issue(ctx, ca.IssueRequest{Caller: cl, CSR: csr})
	require.ErrorIs(t, err, context.Canceled)
}

func TestIssueValidity(t *testing.T) {
	c, m := newTestCA(t, &ca.Policy{Default: ca.Rule{DefaultTTL: 6 * time.Hour, MinTTL: time.Hour, MaxTTL: 12 * time.Hour}}, nil)
	cl := testCaller(t, "demo", "web")
	csr := catest.CSRDER(t, catest.Key(t, "P-256"), nil, cl.ID.String())
	tests := []struct {
		name      string
		lifetime  time.Duration
		wantLife  time.Duration
		wantClamp ca.Clamp
		wantErr   error
	}{
		{name: "zero is the default", lifetime: 0, wantLife: 6 * time.Hour},
		{name: "honoured inside bounds", lifetime: 2 * time.Hour, wantLife: 2 * time.Hour},
		{name: "clamped up", lifetime: time.Minute, wantLife: time.Hour, wantClamp: ca.ClampMin},
		{name: "clamped down", lifetime: 365 * 24 * time.Hour, wantLife: 12 * time.Hour, wantClamp: ca.ClampMax},
		{name: "the largest Duration", lifetime: 1<<63 - 1, wantLife: 12 * time.Hour, wantClamp: ca.ClampMax},
		{name: "negative", lifetime: -time.Second, wantErr: ca.ErrBadRequest},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			issued, err := c.Issue(t.Context(), ca.IssueRequest{Caller: cl, CSR: csr, Lifetime: tc.lifetime})
			if tc.wantErr != nil {
				require.ErrorIs(t, err, tc.wantErr)
				return
			}
			require.NoError(t, err)
			require.Equal(t, tc.wantClamp, issued.Clamp)
			require.Equal(t, tc.wantLife+30*time.Second, issued.NotAfter.Sub(issued.NotBefore).Round(time.Second))
		})
	}
	require.Equal(t, 2.0, testutil.ToFloat64(m.TTLClamps.WithLabelValues("max")))
	require.Equal(t, 1.0, testutil.ToFloat64(m.TTLClamps.WithLabelValues("min")))
}
