package ca_test

import (
	"crypto/ecdsa"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/asn1"
	"encoding/pem"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/meshca/meshca/ca"
	"github.com/meshca/meshca/ca/catest"
)

const csrTestID = "spiffe://cluster.local/ns/demo/sa/web"

func TestParseCSR(t *testing.T) {
	p256 := catest.Key(t, "P-256")
	good := catest.CSRPEM(t, p256, nil, csrTestID)
	block, _ := pem.Decode(good)
	broken := append([]byte(nil), block.Bytes...)
	broken[len(broken)-3] ^= 0xff // inside the signature
	edKey := catest.Key(t, "Ed25519")
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
		{name: "P-384", pem: catest.CSRPEM(t, catest.Key(t, "P-384"), nil, csrTestID), wantKey: ca.KeyECDSAP384},
		{name: "RSA-2048", pem: catest.CSRPEM(t, catest.Key(t, "RSA-2048"), nil, csrTestID), wantKey: ca.KeyRSA2048},
		{name: "Ed25519", pem: catest.CSRPEM(t, edKey, nil, csrTestID), wantKey: ca.KeyEd25519},
		{name: "empty", pem: nil, wantReason: ca.CSREmpty},
		{name: "over 64 KiB", pem: []byte(strings.Repeat("A", ca.MaxCSRBytes+1)), wantReason: ca.CSRTooLarge},
		{name: "not PEM", pem: []byte("hello, I am a CSR"), wantReason: ca.CSRNotPEM},
		{name: "PEM of a certificate", pem: pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: block.Bytes}), wantReason: ca.CSRNotPEM},
		{name: "PEM of garbage", pem: pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: []byte{1, 2, 3}}), wantReason: ca.CSRMalformed},
		{name: "broken signature", pem: pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: broken}), wantReason: ca.CSRBadSignature},
		{name: "asks for CA:true", pem: catest.CSRPEM(t, p256, func(r *x509.CertificateRequest) {
			r.ExtraExtensions = []pkix.Extension{{Id: asn1.ObjectIdentifier{2, 5, 29, 19}, Critical: true, Value: caTrue}}
		}, csrTestID), wantReason: ca.CSRRequestsCA},
		{name: "basicConstraints CA:false is still an extra extension", pem: catest.CSRPEM(t, p256, func(r *x509.CertificateRequest) {
			r.ExtraExtensions = []pkix.Extension{{Id: asn1.ObjectIdentifier{2, 5, 29, 19}, Value: caFalse}}
		}, csrTestID), wantReason: ca.CSRForbiddenExtension},
		{name: "name constraints extension", pem: catest.CSRPEM(t, p256, func(r *x509.CertificateRequest) {
			r.ExtraExtensions = []pkix.Extension{{Id: asn1.ObjectIdentifier{2, 5, 29, 30}, Value: caFalse}}
		}, csrTestID), wantReason: ca.CSRForbiddenExtension},
		{name: "P-224 key", pem: catest.CSRPEM(t, catest.Key(t, "P-224"), nil, csrTestID), wantReason: ca.CSRKeyType},
		{name: "RSA-1024 key", pem: catest.CSRPEM(t, catest.Key(t, "RSA-1024"), nil, csrTestID), wantReason: ca.CSRKeyType},
		{name: "signed with SHA-1 (ECDSA)", pem: catest.CSRPEM(t, p256, func(r *x509.CertificateRequest) {
			r.SignatureAlgorithm = x509.ECDSAWithSHA1
		}, csrTestID), wantReason: ca.CSRWeakSignature},
		{name: "signed with SHA-1 (RSA)", pem: catest.CSRPEM(t, catest.Key(t, "RSA-2048"), func(r *x509.CertificateRequest) {
			r.SignatureAlgorithm = x509.SHA1WithRSA
		}, csrTestID), wantReason: ca.CSRWeakSignature},
		{name: "attacker text inside the public key", pem: spkiWithTrailer(t, p256.(*ecdsa.PrivateKey), good), wantReason: ca.CSRNonCanonicalKey},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			csr, kt, err := parseCSRPEM(tc.pem)
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

// spkiWithTrailer re-signs good's request with an extra element appended
// inside its SubjectPublicKeyInfo, which Go's parser accepts and would
// otherwise be copied into the leaf verbatim.
func spkiWithTrailer(t *testing.T, key *ecdsa.PrivateKey, good []byte) []byte {
	t.Helper()
	block, _ := pem.Decode(good)
	csr, err := x509.ParseCertificateRequest(block.Bytes)
	require.NoError(t, err)
	var tbs asn1.RawValue
	_, err = asn1.Unmarshal(csr.RawTBSCertificateRequest, &tbs)
	require.NoError(t, err)
	var parts []asn1.RawValue
	for b := tbs.Bytes; len(b) > 0; {
		var v asn1.RawValue
		b, err = asn1.Unmarshal(b, &v)
		require.NoError(t, err)
		parts = append(parts, v)
	}
	trailer, err := asn1.Marshal([]byte(strings.Repeat("attacker text ", 8)))
	require.NoError(t, err)
	spki := parts[2]
	spki.FullBytes = nil
	spki.Bytes = append(append([]byte(nil), spki.Bytes...), trailer...)
	parts[2] = spki
	var content []byte
	for _, p := range parts {
		enc, err := asn1.Marshal(p)
		require.NoError(t, err)
		content = append(content, enc...)
	}
	newTBS, err := asn1.Marshal(asn1.RawValue{Class: asn1.ClassUniversal, Tag: asn1.TagSequence, IsCompound: true, Bytes: content})
	require.NoError(t, err)
	digest := sha256.Sum256(newTBS)
	sig, err := ecdsa.SignASN1(rand.Reader, key, digest[:])
	require.NoError(t, err)
	der, err := asn1.Marshal(struct {
		TBS asn1.RawValue
		Alg pkix.AlgorithmIdentifier
		Sig asn1.BitString
	}{asn1.RawValue{FullBytes: newTBS}, pkix.AlgorithmIdentifier{Algorithm: asn1.ObjectIdentifier{1, 2, 840, 10045, 4, 3, 2}}, asn1.BitString{Bytes: sig, BitLength: 8 * len(sig)}})
	require.NoError(t, err)
	parsed, err := x509.ParseCertificateRequest(der)
	require.NoError(t, err, "Go's parser accepts it")
	require.NoError(t, parsed.CheckSignature())
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: der})
}

// parseCSRPEM runs a PEM CSR through both steps an edge takes.
func parseCSRPEM(p []byte) (*x509.CertificateRequest, ca.KeyType, error) {
	der, err := ca.CSRFromPEM(p)
	if err != nil {
		return nil, "", err
	}
	return ca.ParseCSR(der)
}
