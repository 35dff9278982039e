package ca_test

import (
	"context"
	"crypto/x509"
	"net/url"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/meshca/meshca/ca"
	"github.com/meshca/meshca/ca/catest"
)

// TestUpstreamLeafChecked: meshca hands out an upstream's leaf only if it
// is exactly what was asked for; anything else is an outage of the
// upstream, never a certificate for a client.
func TestUpstreamLeafChecked(t *testing.T) {
	now := time.Now()
	interKey := catest.Key(t, "P-256")
	rootKey := catest.Key(t, "P-256")
	rt := catest.CATemplate("up root", now.Add(-time.Hour), now.Add(48*time.Hour))
	root := catest.Issue(t, rt, rootKey, nil, nil)
	inter := catest.Issue(t, catest.CATemplate("up inter", now.Add(-time.Hour), now.Add(47*time.Hour)), interKey, root, rootKey)
	leafKey := catest.Key(t, "P-256")
	csr := catest.CSR(t, leafKey)

	good := func(req ca.SignRequest) *x509.Certificate {
		return &x509.Certificate{
			NotBefore: req.NotBefore, NotAfter: req.NotAfter, URIs: []*url.URL{req.ID.URL()},
			KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth, x509.ExtKeyUsageServerAuth},
			BasicConstraintsValid: true,
		}
	}
	for _, tc := range []struct {
		name    string
		edit    func(*x509.Certificate)
		signer  *x509.Certificate // default inter
		wantErr bool
	}{
		{name: "exact", edit: func(*x509.Certificate) {}},
		{name: "another identity", edit: func(c *x509.Certificate) {
			c.URIs = []*url.URL{{Scheme: "spiffe", Host: "cluster.local", Path: "/ns/kube-system/sa/admin"}}
		}, wantErr: true},
		{name: "extra DNS SAN", edit: func(c *x509.Certificate) { c.DNSNames = []string{"evil.example"} }, wantErr: true},
		{name: "a CA certificate", edit: func(c *x509.Certificate) { c.IsCA = true; c.KeyUsage |= x509.KeyUsageCertSign }, wantErr: true},
		{name: "short lifetime", edit: func(c *x509.Certificate) { c.NotAfter = c.NotBefore.Add(10 * time.Minute) }, wantErr: true},
		{name: "long lifetime", edit: func(c *x509.Certificate) { c.NotAfter = c.NotAfter.Add(time.Hour) }, wantErr: true},
		{name: "does not chain to the bundle", edit: func(*x509.Certificate) {}, signer: root, wantErr: true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			signer, signerKey := inter, interKey
			if tc.signer != nil {
				// Signed by an unrelated root that is not in the bundle.
				otherKey := catest.Key(t, "P-256")
				signer = catest.Issue(t, catest.CATemplate("up root", now.Add(-time.Hour), now.Add(48*time.Hour)), otherKey, nil, nil)
				signerKey = otherKey
			}
			up := &fixedUpstream{roots: []*x509.Certificate{root}, sign: func(req ca.SignRequest) (*ca.UpstreamLeaf, error) {
				tmpl := good(req)
				tc.edit(tmpl)
				leaf := catest.Issue(t, tmpl, leafKey, signer, signerKey)
				return &ca.UpstreamLeaf{Leaf: leaf, Chain: []*x509.Certificate{inter}}, nil
			}}
			c, err := ca.New(t.Context(), ca.Config{Backend: up})
			require.NoError(t, err)
			resp, err := c.Sign(t.Context(), ca.SignRequest{CSR: csr, ID: testID, NotBefore: now.Add(-30 * time.Second), NotAfter: now.Add(time.Hour)})
			if tc.wantErr {
				require.ErrorIs(t, err, ca.ErrBackendUnavailable)
				require.Nil(t, resp)
				return
			}
			require.NoError(t, err)
			require.Len(t, resp.ChainPEM, 2, "the root is added to the chain the upstream sent")
		})
	}
}

type fixedUpstream struct {
	roots []*x509.Certificate
	sign  func(ca.SignRequest) (*ca.UpstreamLeaf, error)
}

func (u *fixedUpstream) SignLeaf(_ context.Context, req ca.SignRequest) (*ca.UpstreamLeaf, error) {
	return u.sign(req)
}

func (u *fixedUpstream) TrustBundle(context.Context) ([]*x509.Certificate, error) {
	return u.roots, nil
}

// csrUpstream records the CSR it was asked to sign.
type csrUpstream struct {
	*gatedUpstream
	got *x509.CertificateRequest
}

func (u *csrUpstream) SignLeaf(ctx context.Context, req ca.SignRequest) (*ca.UpstreamLeaf, error) {
	u.got = req.CSR
	return u.gatedUpstream.SignLeaf(ctx, req)
}

// TestIssueKeyGivesUpstreamSignedCSR: central SDS generates keys itself; an
// upstream (Vault, AWS) signs only real CSRs, so IssueKey makes one with
// the key, naming exactly the caller.
func TestIssueKeyGivesUpstreamSignedCSR(t *testing.T) {
	pki := newUpstreamPKI(t, "csr")
	up := &csrUpstream{gatedUpstream: &gatedUpstream{t: t, pki: pki, roots: []*x509.Certificate{pki.root}}}
	c, err := ca.New(t.Context(), ca.Config{Backend: up})
	require.NoError(t, err)
	key := catest.Key(t, "P-256")
	is, err := c.IssueKey(t.Context(), testCaller(t, "default", "web"), key, time.Hour)
	require.NoError(t, err)
	require.NotNil(t, up.got)
	require.NotEmpty(t, up.got.Raw)
	parsed, err := x509.ParseCertificateRequest(up.got.Raw)
	require.NoError(t, err)
	require.NoError(t, parsed.CheckSignature(), "signed by the key")
	require.Len(t, parsed.URIs, 1)
	require.Equal(t, testID.String(), parsed.URIs[0].String())
	require.Contains(t, is.CertPEM, "BEGIN CERTIFICATE")
}
