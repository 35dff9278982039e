package ca_test

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/asn1"
	"encoding/pem"
	"net/url"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/meshca/meshca/ca"
)

// csrPEM builds a PEM CSR for the given URIs with key, applying edit to
// the template first.
func csrPEM(t testing.TB, key crypto.Signer, uris []string, edit func(*x509.CertificateRequest)) []byte {
	t.Helper()
	tmpl := &x509.CertificateRequest{}
	for _, u := range uris {
		pu, err := url.Parse(u)
		require.NoError(t, err)
		tmpl.URIs = append(tmpl.URIs, pu)
	}
	if edit != nil {
		edit(tmpl)
	}
	der, err := x509.CreateCertificateRequest(rand.Reader, tmpl, key)
	require.NoError(t, err)
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: der})
}

func ecKey(t testing.TB, c elliptic.Curve) crypto.Signer {
	t.Helper()
	k, err := ecdsa.GenerateKey(c, rand.Reader)
	require.NoError(t, err)
	return k
}

func rsaKey(t testing.TB, bits int) crypto.Signer {
	t.Helper()
	k, err := rsa.GenerateKey(rand.Reader, bits)
	require.NoError(t, err)
	return k
}

const csrTestID = "spiffe://cluster.local/ns/demo/sa/web"

func TestParseCSR(t *testing.T) {
	p256 := ecKey(t, elliptic.P256())
	good := csrPEM(t, p256, []string{csrTestID}, nil)
	block, _ := pem.Decode(good)
	broken := append([]byte(nil), block.Bytes...)
	broken[len(broken)-3] ^= 0xff // inside the signature
	_, edKey, err := ed25519.GenerateKey(rand.Reader)
	require.NoError(t, err)
	caTrue, err := asn1.Marshal(struct{ IsCA bool }{true})
	require.NoError(t, err)
	caFalse, err := asn1.Marshal(struct{}{})
	require.NoError(t, err)

	tests := []struct {
		name       string
		pem        []byte
		wantReason string
		wantKey    ca.KeyType
	}{
		{name: "P-256", pem: good, wantKey: ca.KeyECDSAP256},
		{name: "P-384", pem: csrPEM(t, ecKey(t, elliptic.P384()), []string{csrTestID}, nil), wantKey: ca.KeyECDSAP384},
		{name: "RSA-2048", pem: csrPEM(t, rsaKey(t, 2048), []string{csrTestID}, nil), wantKey: ca.KeyRSA2048},
		{name: "Ed25519", pem: csrPEM(t, edKey, []string{csrTestID}, nil), wantKey: ca.KeyEd25519},
		{name: "empty", pem: nil, wantReason: ca.CSREmpty},
		{name: "over 64 KiB", pem: []byte(strings.Repeat("A", ca.MaxCSRBytes+1)), wantReason: ca.CSRTooLarge},
		{name: "not PEM", pem: []byte("hello, I am a CSR"), wantReason: ca.CSRNotPEM},
		{name: "PEM of a certificate", pem: pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: block.Bytes}), wantReason: ca.CSRNotPEM},
		{name: "PEM of garbage", pem: pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: []byte{1, 2, 3}}), wantReason: ca.CSRMalformed},
		{name: "broken signature", pem: pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: broken}), wantReason: ca.CSRBadSignature},
		{name: "asks for CA:true", pem: csrPEM(t, p256, []string{csrTestID}, func(r *x509.CertificateRequest) {
			r.ExtraExtensions = []pkix.Extension{{Id: asn1.ObjectIdentifier{2, 5, 29, 19}, Critical: true, Value: caTrue}}
		}), wantReason: ca.CSRRequestsCA},
		{name: "basicConstraints CA:false is still an extra extension", pem: csrPEM(t, p256, []string{csrTestID}, func(r *x509.CertificateRequest) {
			r.ExtraExtensions = []pkix.Extension{{Id: asn1.ObjectIdentifier{2, 5, 29, 19}, Value: caFalse}}
		}), wantReason: ca.CSRForbiddenExtension},
		{name: "name constraints extension", pem: csrPEM(t, p256, []string{csrTestID}, func(r *x509.CertificateRequest) {
			r.ExtraExtensions = []pkix.Extension{{Id: asn1.ObjectIdentifier{2, 5, 29, 30}, Value: caFalse}}
		}), wantReason: ca.CSRForbiddenExtension},
		{name: "P-224 key", pem: csrPEM(t, ecKey(t, elliptic.P224()), []string{csrTestID}, nil), wantReason: ca.CSRKeyType},
		{name: "RSA-1024 key", pem: csrPEM(t, rsaKey(t, 1024), []string{csrTestID}, nil), wantReason: ca.CSRKeyType},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			csr, kt, err := ca.ParseCSR(tc.pem)
			if tc.wantReason == "" {
				require.NoError(t, err)
				require.Equal(t, tc.wantKey, kt)
				require.Equal(t, csrTestID, csr.URIs[0].String())
				return
			}
			require.ErrorIs(t, err, ca.ErrBadCSR)
			var ce *ca.CSRError
			require.ErrorAs(t, err, &ce)
			require.Equal(t, tc.wantReason, ce.Reason)
			require.NotContains(t, err.Error(), "MII", "an error must not echo the CSR")
		})
	}
}
