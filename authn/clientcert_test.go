package authn_test

import (
	"context"
	"crypto"
	"crypto/x509"
	"errors"
	"net/url"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/stretchr/testify/require"

	"github.com/meshca/meshca/authn"
	"github.com/meshca/meshca/ca/catest"
)

// saTable is a state-based ServiceAccountLookup: namespace/name -> UID.
type saTable map[string]string

func (s saTable) ServiceAccountUID(ns, name string) (string, bool, error) {
	uid, ok := s[ns+"/"+name]
	return uid, ok, nil
}

type unsynced struct{}

func (unsynced) ServiceAccountUID(string, string) (string, bool, error) {
	return "", false, authn.ErrUnavailable
}

type pki struct {
	root, inter *x509.Certificate
	interKey    crypto.Signer
}

func newPKI(t *testing.T) pki {
	t.Helper()
	now := time.Now()
	rootKey, interKey := catest.Key(t, "P-256"), catest.Key(t, "P-256")
	root := catest.Issue(t, catest.CATemplate("root", now.Add(-time.Hour), now.Add(24*time.Hour)), rootKey, nil, nil)
	inter := catest.Issue(t, catest.CATemplate("inter", now.Add(-time.Hour), now.Add(24*time.Hour)), interKey, root, rootKey)
	return pki{root: root, inter: inter, interKey: interKey}
}

func (p pki) leaf(t *testing.T, uri string, notAfter time.Time, eku ...x509.ExtKeyUsage) *x509.Certificate {
	t.Helper()
	tmpl := &x509.Certificate{NotBefore: time.Now().Add(-time.Hour), NotAfter: notAfter, ExtKeyUsage: eku, KeyUsage: x509.KeyUsageDigitalSignature}
	if uri != "" {
		u, err := url.Parse(uri)
		require.NoError(t, err)
		tmpl.URIs = []*url.URL{u}
	} else {
		tmpl.DNSNames = []string{"meshca.istio-system.svc"}
	}
	return catest.Issue(t, tmpl, catest.Key(t, "P-256"), p.inter, p.interKey)
}

func TestClientCert(t *testing.T) {
	p := newPKI(t)
	other := newPKI(t)
	td := spiffeid.RequireTrustDomainFromString("cluster.local")
	roots := func(context.Context) ([]*x509.Certificate, error) { return []*x509.Certificate{p.root}, nil }
	later := time.Now().Add(time.Hour)
	client := []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}
	web := "spiffe://cluster.local/ns/demo/sa/web"

	tests := []struct {
		name       string
		chain      []*x509.Certificate
		token      string
		lookup     authn.ServiceAccountLookup
		wantErr    error
		wantReason string
	}{
		{name: "renews its own identity", chain: []*x509.Certificate{p.leaf(t, web, later, client...), p.inter}, lookup: saTable{"demo/web": "u1"}},
		{name: "no certificate", wantErr: authn.ErrNoCredentials},
		{name: "a token present is left to the token authenticators", chain: []*x509.Certificate{p.leaf(t, web, later, client...), p.inter}, token: "tok", wantErr: authn.ErrNoCredentials},
		{name: "intermediate not sent", chain: []*x509.Certificate{p.leaf(t, web, later, client...)}, wantReason: authn.ReasonUntrustedCert},
		{name: "issued by another CA", chain: []*x509.Certificate{other.leaf(t, web, later, client...), other.inter}, wantReason: authn.ReasonUntrustedCert},
		{name: "expired", chain: []*x509.Certificate{p.leaf(t, web, time.Now().Add(-time.Minute), client...), p.inter}, wantReason: authn.ReasonExpired},
		{name: "server-only EKU", chain: []*x509.Certificate{p.leaf(t, web, later, x509.ExtKeyUsageServerAuth), p.inter}, wantReason: authn.ReasonUntrustedCert},
		{name: "no SPIFFE ID (a serving certificate)", chain: []*x509.Certificate{p.leaf(t, "", later, client...), p.inter}, wantReason: authn.ReasonNotServiceAccount},
		{name: "other trust domain", chain: []*x509.Certificate{p.leaf(t, "spiffe://evil.example/ns/demo/sa/web", later, client...), p.inter}, wantReason: authn.ReasonUnknownIssuer},
		{name: "not a service-account path", chain: []*x509.Certificate{p.leaf(t, "spiffe://cluster.local/workload/web", later, client...), p.inter}, wantReason: authn.ReasonNotServiceAccount},
		{name: "service account deleted", chain: []*x509.Certificate{p.leaf(t, web, later, client...), p.inter}, lookup: saTable{}, wantReason: authn.ReasonServiceAccountGone},
		{name: "service accounts not synced yet", chain: []*x509.Certificate{p.leaf(t, web, later, client...), p.inter}, lookup: unsynced{}, wantErr: authn.ErrUnavailable},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			a, err := authn.NewClientCert(authn.ClientCertConfig{TrustDomain: td, Roots: roots, ServiceAccounts: tc.lookup})
			require.NoError(t, err)
			caller, err := a.Authenticate(t.Context(), authn.Credentials{PeerCertificates: tc.chain, Token: tc.token})
			switch {
			case tc.wantErr != nil:
				require.ErrorIs(t, err, tc.wantErr)
			case tc.wantReason != "":
				var ae *authn.Error
				require.True(t, errors.As(err, &ae), "%v", err)
				require.Equal(t, tc.wantReason, ae.Reason)
			default:
				require.NoError(t, err)
				require.Equal(t, web, caller.ID.String())
				require.Equal(t, "demo", caller.Namespace)
				require.Equal(t, "web", caller.ServiceAccount)
				require.Equal(t, "clientcert", caller.Authenticator)
			}
		})
	}
}

// TestClientCertVerifiesOncePerConnection: requests on one connection (the
// same parsed leaf) verify the chain once; a new bundle or a new
// connection verifies again; a refused chain stays refused without more
// verification work.
func TestClientCertVerifiesOncePerConnection(t *testing.T) {
	p := newPKI(t)
	td := spiffeid.RequireTrustDomainFromString("cluster.local")
	bundle := []*x509.Certificate{p.root}
	verifications := prometheus.NewCounter(prometheus.CounterOpts{Name: "v"})
	a, err := authn.NewClientCert(authn.ClientCertConfig{TrustDomain: td, Verifications: verifications,
		Roots: func(context.Context) ([]*x509.Certificate, error) { return bundle, nil }})
	require.NoError(t, err)
	leaf := p.leaf(t, "spiffe://cluster.local/ns/demo/sa/web", time.Now().Add(time.Hour), x509.ExtKeyUsageClientAuth)
	conn := authn.Credentials{PeerCertificates: []*x509.Certificate{leaf, p.inter}}
	for range 50 {
		_, err := a.Authenticate(t.Context(), conn)
		require.NoError(t, err)
	}
	require.Equal(t, 1.0, testutil.ToFloat64(verifications))

	bundle = []*x509.Certificate{newPKI(t).root, p.root}
	_, err = a.Authenticate(t.Context(), conn)
	require.NoError(t, err)
	require.Equal(t, 2.0, testutil.ToFloat64(verifications), "a new bundle is verified against")

	reparsed, err := x509.ParseCertificate(leaf.Raw)
	require.NoError(t, err)
	_, err = a.Authenticate(t.Context(), authn.Credentials{PeerCertificates: []*x509.Certificate{reparsed, p.inter}})
	require.NoError(t, err)
	require.Equal(t, 3.0, testutil.ToFloat64(verifications), "another connection")

	forged := newPKI(t).leaf(t, "spiffe://cluster.local/ns/demo/sa/web", time.Now().Add(time.Hour), x509.ExtKeyUsageClientAuth)
	bad := authn.Credentials{PeerCertificates: []*x509.Certificate{forged}}
	for range 20 {
		_, err := a.Authenticate(t.Context(), bad)
		require.ErrorIs(t, err, authn.ErrUnauthenticated)
	}
	require.Equal(t, 4.0, testutil.ToFloat64(verifications), "a refused chain is not re-verified on its connection")
}

// createdTable is a lookup that also knows creation times.
type createdTable struct {
	saTable
	created time.Time
}

func (c createdTable) ServiceAccountCreated(ns, name string) (time.Time, bool, error) {
	_, ok := c.saTable[ns+"/"+name]
	return c.created, ok, nil
}

// TestClientCertRefusesCertificatesOfAnEarlierAccount: after a service
// account is deleted and re-created under the same name, certificates
// issued before the re-creation no longer renew.
func TestClientCertRefusesCertificatesOfAnEarlierAccount(t *testing.T) {
	p := newPKI(t)
	td := spiffeid.RequireTrustDomainFromString("cluster.local")
	leaf := p.leaf(t, "spiffe://cluster.local/ns/demo/sa/web", time.Now().Add(time.Hour), x509.ExtKeyUsageClientAuth)
	creds := authn.Credentials{PeerCertificates: []*x509.Certificate{leaf, p.inter}}
	for _, tc := range []struct {
		name    string
		created time.Time
		wantErr bool
	}{
		{"account older than the certificate", leaf.NotBefore.Add(-time.Hour), false},
		{"created within the back-date of the certificate", leaf.NotBefore.Add(30 * time.Second), false},
		{"re-created after the certificate", leaf.NotBefore.Add(2 * time.Minute), true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			a, err := authn.NewClientCert(authn.ClientCertConfig{TrustDomain: td,
				Roots:           func(context.Context) ([]*x509.Certificate, error) { return []*x509.Certificate{p.root}, nil },
				ServiceAccounts: createdTable{saTable: saTable{"demo/web": "uid-2"}, created: tc.created}})
			require.NoError(t, err)
			_, err = a.Authenticate(t.Context(), creds)
			if !tc.wantErr {
				require.NoError(t, err)
				return
			}
			require.ErrorIs(t, err, authn.ErrUnauthenticated)
			require.Equal(t, authn.ReasonServiceAccountGone, authn.ReasonOf(err))
			require.Contains(t, err.Error(), "issued before service account demo/web was created")
		})
	}
}
