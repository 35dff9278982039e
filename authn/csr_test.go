package authn_test

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/asn1"
	"net"
	"net/url"
	"testing"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/stretchr/testify/require"

	"github.com/meshca/meshca/authn"
)

func TestCheckCSR(t *testing.T) {
	td := spiffeid.RequireTrustDomainFromString("cluster.local")
	id, err := authn.ServiceAccountID(td, "demo", "web")
	require.NoError(t, err)
	caller := &authn.Caller{ID: id, Namespace: "demo", ServiceAccount: "web"}
	u := func(s string) *url.URL { p, err := url.Parse(s); require.NoError(t, err); return p }

	tests := []struct {
		name      string
		csr       x509.CertificateRequest
		wantErr   error
		wantAsked []string
	}{
		{name: "exact identity", csr: x509.CertificateRequest{URIs: []*url.URL{u("spiffe://cluster.local/ns/demo/sa/web")}}},
		{name: "other service account", csr: x509.CertificateRequest{URIs: []*url.URL{u("spiffe://cluster.local/ns/demo/sa/db")}},
			wantErr: authn.ErrIdentityMismatch, wantAsked: []string{"spiffe://cluster.local/ns/demo/sa/db"}},
		{name: "other namespace", csr: x509.CertificateRequest{URIs: []*url.URL{u("spiffe://cluster.local/ns/kube-system/sa/web")}},
			wantErr: authn.ErrIdentityMismatch, wantAsked: []string{"spiffe://cluster.local/ns/kube-system/sa/web"}},
		{name: "other trust domain", csr: x509.CertificateRequest{URIs: []*url.URL{u("spiffe://evil.example/ns/demo/sa/web")}},
			wantErr: authn.ErrIdentityMismatch, wantAsked: []string{"spiffe://evil.example/ns/demo/sa/web"}},
		{name: "no SAN", wantErr: authn.ErrIdentityMismatch, wantAsked: []string{}},
		{name: "extra DNS SAN", csr: x509.CertificateRequest{URIs: []*url.URL{u("spiffe://cluster.local/ns/demo/sa/web")}, DNSNames: []string{"bank.example"}},
			wantErr: authn.ErrIdentityMismatch, wantAsked: []string{"spiffe://cluster.local/ns/demo/sa/web", "DNS:bank.example"}},
		{name: "extra IP SAN", csr: x509.CertificateRequest{URIs: []*url.URL{u("spiffe://cluster.local/ns/demo/sa/web")}, IPAddresses: []net.IP{net.IPv4(10, 0, 0, 1)}},
			wantErr: authn.ErrIdentityMismatch, wantAsked: []string{"spiffe://cluster.local/ns/demo/sa/web", "IP:10.0.0.1"}},
		{name: "extra email SAN", csr: x509.CertificateRequest{URIs: []*url.URL{u("spiffe://cluster.local/ns/demo/sa/web")}, EmailAddresses: []string{"a@b.c"}},
			wantErr: authn.ErrIdentityMismatch, wantAsked: []string{"spiffe://cluster.local/ns/demo/sa/web", "email:a@b.c"}},
		{name: "two URIs", csr: x509.CertificateRequest{URIs: []*url.URL{u("spiffe://cluster.local/ns/demo/sa/web"), u("spiffe://cluster.local/ns/demo/sa/db")}},
			wantErr: authn.ErrIdentityMismatch, wantAsked: []string{"spiffe://cluster.local/ns/demo/sa/web", "spiffe://cluster.local/ns/demo/sa/db"}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			err := authn.CheckCSR(caller, realCSR(t, &tc.csr))
			if tc.wantErr == nil {
				require.NoError(t, err)
				return
			}
			require.ErrorIs(t, err, tc.wantErr)
			var me *authn.MismatchError
			require.ErrorAs(t, err, &me)
			require.Equal(t, "spiffe://cluster.local/ns/demo/sa/web", me.Held)
			require.Equal(t, tc.wantAsked, me.Asked)
			require.Contains(t, err.Error(), "spiffe://cluster.local/ns/demo/sa/web")
		})
	}
}

func TestServiceAccountID(t *testing.T) {
	td := spiffeid.RequireTrustDomainFromString("cluster.local")
	id, err := authn.ServiceAccountID(td, "demo", "web")
	require.NoError(t, err)
	require.Equal(t, "spiffe://cluster.local/ns/demo/sa/web", id.String())
	_, err = authn.ServiceAccountID(td, "", "web")
	require.ErrorIs(t, err, authn.ErrUnauthenticated)
	_, err = authn.ServiceAccountID(td, "demo", "we b")
	require.ErrorIs(t, err, authn.ErrUnauthenticated)
}

// realCSR signs tmpl and parses it back, so that CheckCSR sees the
// encoded extensions as it would from the wire.
func realCSR(t *testing.T, tmpl *x509.CertificateRequest) *x509.CertificateRequest {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	require.NoError(t, err)
	der, err := x509.CreateCertificateRequest(rand.Reader, tmpl, key)
	require.NoError(t, err)
	csr, err := x509.ParseCertificateRequest(der)
	require.NoError(t, err)
	return csr
}

// TestCheckCSRComparesEncodedBytes: URIs that parse to the caller's ID but
// are encoded otherwise are refused, so the leaf never carries other bytes
// than those checked.
func TestCheckCSRComparesEncodedBytes(t *testing.T) {
	td := spiffeid.RequireTrustDomainFromString("cluster.local")
	id, err := authn.ServiceAccountID(td, "demo", "web")
	require.NoError(t, err)
	caller := &authn.Caller{ID: id, Namespace: "demo", ServiceAccount: "web"}
	for _, raw := range []string{"SPIFFE://cluster.local/ns/demo/sa/web", "spiffe://cluster.local/ns/demo/sa/web#", "spiffe://CLUSTER.local/ns/demo/sa/web"} {
		san, err := asn1.Marshal([]asn1.RawValue{{Class: asn1.ClassContextSpecific, Tag: 6, Bytes: []byte(raw)}})
		require.NoError(t, err)
		csr := realCSR(t, &x509.CertificateRequest{ExtraExtensions: []pkix.Extension{{Id: asn1.ObjectIdentifier{2, 5, 29, 17}, Value: san}}})
		err = authn.CheckCSR(caller, csr)
		require.ErrorIs(t, err, authn.ErrIdentityMismatch, raw)
		var me *authn.MismatchError
		require.ErrorAs(t, err, &me)
		require.Equal(t, []string{raw}, me.Asked, "the refusal shows the bytes asked for")
	}
}
