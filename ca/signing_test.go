package ca_test

import (
	"crypto"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"encoding/pem"
	"io"
	"math/big"
	"net"
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/stretchr/testify/require"

	"github.com/meshca/meshca/ca"
	"github.com/meshca/meshca/ca/catest"
)

// testPKI is a root and an intermediate below it.
type testPKI struct {
	root, inter       *x509.Certificate
	rootKey, interKey crypto.Signer
}

func newTestPKI(t testing.TB, keyType string, notAfter time.Time) testPKI {
	t.Helper()
	now := time.Now()
	p := testPKI{rootKey: catest.Key(t, keyType), interKey: catest.Key(t, keyType)}
	p.root = catest.Issue(t, catest.CATemplate("test root", now.Add(-time.Hour), notAfter.Add(time.Hour)), p.rootKey, nil, nil)
	p.inter = catest.Issue(t, catest.CATemplate("test intermediate", now.Add(-time.Hour), notAfter), p.interKey, p.root, p.rootKey)
	return p
}

func (p testPKI) signingCA(t testing.TB) *ca.SigningCA {
	t.Helper()
	s, err := ca.NewSigningCA(p.inter, p.interKey, []*x509.Certificate{p.root})
	require.NoError(t, err)
	return s
}

// x509Equivalent builds, with x509.CreateCertificate, the certificate that
// SigningCA.Sign should have produced as resp for req.
func x509Equivalent(t *testing.T, req ca.SignRequest, resp *ca.SignResponse, parent *x509.Certificate, parentKey crypto.Signer) *x509.Certificate {
	t.Helper()
	ku := x509.KeyUsageDigitalSignature
	if _, ok := req.CSR.PublicKey.(*rsa.PublicKey); ok {
		ku |= x509.KeyUsageKeyEncipherment
	}
	tmpl := &x509.Certificate{
		SerialNumber:          resp.Serial,
		NotBefore:             resp.NotBefore,
		NotAfter:              resp.NotAfter,
		KeyUsage:              ku,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
		BasicConstraintsValid: true,
		DNSNames:              req.DNSNames,
		IPAddresses:           req.IPAddresses,
	}
	if !req.ID.IsZero() {
		tmpl.URIs = []*url.URL{req.ID.URL()}
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, parent, req.CSR.PublicKey, parentKey)
	require.NoError(t, err)
	cert, err := x509.ParseCertificate(der)
	require.NoError(t, err)
	return cert
}

func verifyLeaf(t *testing.T, leaf *x509.Certificate, roots []*x509.Certificate, chainPEM []string, usage x509.ExtKeyUsage, at time.Time) {
	t.Helper()
	rootPool := x509.NewCertPool()
	for _, r := range roots {
		rootPool.AddCert(r)
	}
	inter := x509.NewCertPool()
	for _, p := range chainPEM {
		require.True(t, inter.AppendCertsFromPEM([]byte(p)))
	}
	_, err := leaf.Verify(x509.VerifyOptions{
		Roots:         rootPool,
		Intermediates: inter,
		CurrentTime:   at,
		KeyUsages:     []x509.ExtKeyUsage{usage},
	})
	require.NoError(t, err)
}

var testID = spiffeid.RequireFromString("spiffe://cluster.local/ns/default/sa/web")

func TestSigningCA_MatchesX509(t *testing.T) {
	keyTypes := []string{"P-256", "P-384", "RSA-2048", "Ed25519"}
	leafKeys := map[string]crypto.Signer{}
	for _, kt := range keyTypes {
		leafKeys[kt] = catest.Key(t, kt)
	}
	now := time.Now()
	shapes := []struct {
		name string
		req  ca.SignRequest
	}{
		{name: "spiffe-id", req: ca.SignRequest{ID: testID}},
		{name: "dns-ip", req: ca.SignRequest{
			DNSNames:    []string{"meshca.meshca-system.svc", "meshca.meshca-system.svc.cluster.local"},
			IPAddresses: []net.IP{net.ParseIP("10.0.0.7"), net.ParseIP("fd00::7")},
		}},
		{name: "spiffe-id-dns-ip", req: ca.SignRequest{
			ID:          testID,
			DNSNames:    []string{"localhost"},
			IPAddresses: []net.IP{net.IPv4(127, 0, 0, 1).To4(), net.IPv6loopback},
		}},
	}

	for _, caType := range keyTypes {
		pki := newTestPKI(t, caType, now.Add(48*time.Hour))
		signer := pki.signingCA(t)
		for _, leafType := range append(keyTypes, "P-256 with trailing bytes in its SPKI") {
			csr := catest.CSR(t, leafKeys[strings.TrimSuffix(leafType, " with trailing bytes in its SPKI")])
			if leafType != strings.TrimSuffix(leafType, " with trailing bytes in its SPKI") {
				// What Go's CSR parser lets through (ca.ParseCSR refuses it
				// first): the leaf must carry the key's canonical encoding.
				odd := *csr
				odd.RawSubjectPublicKeyInfo = append(append([]byte(nil), csr.RawSubjectPublicKeyInfo...), 0x04, 0x02, 'h', 'i')
				csr = &odd
			}
			for _, shape := range shapes {
				t.Run(caType+"/"+leafType+"/"+shape.name, func(t *testing.T) {
					req := shape.req
					req.CSR = csr
					req.NotBefore = now.Add(-30 * time.Second)
					req.NotAfter = now.Add(time.Hour)
					resp, err := signer.Sign(req)
					require.NoError(t, err)

					leaf, err := x509.ParseCertificate(resp.Leaf)
					require.NoError(t, err)
					want := x509Equivalent(t, req, resp, pki.inter, pki.interKey)
					require.Equal(t, want.RawTBSCertificate, leaf.RawTBSCertificate)
					require.Equal(t, want.SignatureAlgorithm, leaf.SignatureAlgorithm)
					require.NoError(t, leaf.CheckSignatureFrom(pki.inter))

					require.Equal(t, resp.Serial, leaf.SerialNumber)
					require.True(t, resp.NotBefore.Equal(leaf.NotBefore))
					require.True(t, resp.NotAfter.Equal(leaf.NotAfter))
					for _, usage := range []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth, x509.ExtKeyUsageServerAuth} {
						verifyLeaf(t, leaf, []*x509.Certificate{pki.root}, resp.ChainPEM, usage, now)
					}
				})
			}
		}
	}
}

func TestSigningCA_SelfSignedRoot(t *testing.T) {
	now := time.Now()
	key := catest.Key(t, "P-256")
	root := catest.Issue(t, catest.CATemplate("root", now.Add(-time.Hour), now.Add(time.Hour)), key, nil, nil)
	s, err := ca.NewSigningCA(root, key, nil)
	require.NoError(t, err)
	require.Same(t, root, s.Root())
	require.Same(t, root, s.Certificate())
	require.Equal(t, []*x509.Certificate{root}, s.Chain())

	req := ca.SignRequest{CSR: catest.CSR(t, catest.Key(t, "P-256")), ID: testID, NotBefore: now, NotAfter: now.Add(time.Minute)}
	resp, err := s.Sign(req)
	require.NoError(t, err)
	require.Len(t, resp.ChainPEM, 1)
	block, _ := pem.Decode([]byte(resp.ChainPEM[0]))
	require.Equal(t, root.Raw, block.Bytes)

	leaf, err := x509.ParseCertificate(resp.Leaf)
	require.NoError(t, err)
	require.Equal(t, x509Equivalent(t, req, resp, root, key).RawTBSCertificate, leaf.RawTBSCertificate)
	verifyLeaf(t, leaf, []*x509.Certificate{root}, nil, x509.ExtKeyUsageClientAuth, now)
}

func TestSigningCA_TwoTierChainPEM(t *testing.T) {
	now := time.Now()
	pki := newTestPKI(t, "P-256", now.Add(time.Hour))
	s := pki.signingCA(t)
	require.Same(t, pki.inter, s.Certificate())
	require.Same(t, pki.root, s.Root())
	require.Equal(t, []*x509.Certificate{pki.inter, pki.root}, s.Chain())

	resp, err := s.Sign(ca.SignRequest{CSR: catest.CSR(t, catest.Key(t, "P-256")), ID: testID, NotBefore: now, NotAfter: now.Add(time.Minute)})
	require.NoError(t, err)
	require.Len(t, resp.ChainPEM, 2)
	for i, want := range []*x509.Certificate{pki.inter, pki.root} {
		block, rest := pem.Decode([]byte(resp.ChainPEM[i]))
		require.NotNil(t, block)
		require.Empty(t, rest)
		require.Equal(t, "CERTIFICATE", block.Type)
		require.Equal(t, want.Raw, block.Bytes)
	}
	require.Contains(t, resp.SignedBy, "CN=test intermediate")
	require.Contains(t, resp.SignedBy, "serial=")
}

func TestSigningCA_CapsNotAfter(t *testing.T) {
	now := time.Now()
	pki := newTestPKI(t, "P-256", now.Add(time.Hour).Truncate(time.Second))
	s := pki.signingCA(t)
	notBefore := now.Add(-time.Minute)
	resp, err := s.Sign(ca.SignRequest{CSR: catest.CSR(t, catest.Key(t, "P-256")), ID: testID, NotBefore: notBefore, NotAfter: now.Add(24 * time.Hour)})
	require.NoError(t, err)
	leaf, err := x509.ParseCertificate(resp.Leaf)
	require.NoError(t, err)
	require.True(t, leaf.NotAfter.Equal(pki.inter.NotAfter), "leaf NotAfter %s, CA NotAfter %s", leaf.NotAfter, pki.inter.NotAfter)
	require.True(t, resp.NotAfter.Equal(pki.inter.NotAfter))
	require.True(t, leaf.NotBefore.Equal(notBefore.Truncate(time.Second)))
}

// TestSigningCA_TimeEncoding checks sub-second truncation and the switch
// from UTCTime to GeneralizedTime at 2050 against crypto/x509.
func TestSigningCA_TimeEncoding(t *testing.T) {
	key := catest.Key(t, "P-256")
	rootNotAfter := time.Date(2070, 1, 1, 0, 0, 0, 0, time.UTC)
	root := catest.Issue(t, catest.CATemplate("root", time.Date(2000, 1, 1, 0, 0, 0, 0, time.UTC), rootNotAfter), key, nil, nil)
	s, err := ca.NewSigningCA(root, key, nil)
	require.NoError(t, err)
	csr := catest.CSR(t, catest.Key(t, "P-256"))
	loc := time.FixedZone("UTC+5", 5*3600)
	for _, tc := range []struct {
		name                string
		notBefore, notAfter time.Time
	}{
		{name: "utc-time", notBefore: time.Date(2030, 6, 1, 12, 0, 0, 999_999_999, loc), notAfter: time.Date(2031, 6, 1, 12, 0, 0, 1, loc)},
		{name: "across-2050", notBefore: time.Date(2049, 12, 31, 23, 59, 59, 0, time.UTC), notAfter: time.Date(2050, 1, 1, 0, 0, 0, 0, time.UTC)},
		{name: "generalized-time", notBefore: time.Date(2060, 1, 1, 0, 0, 0, 0, time.UTC), notAfter: time.Date(2061, 1, 1, 0, 0, 0, 0, time.UTC)},
	} {
		t.Run(tc.name, func(t *testing.T) {
			req := ca.SignRequest{CSR: csr, ID: testID, NotBefore: tc.notBefore, NotAfter: tc.notAfter}
			resp, err := s.Sign(req)
			require.NoError(t, err)
			require.Equal(t, time.UTC, resp.NotBefore.Location())
			require.True(t, resp.NotBefore.Equal(tc.notBefore.Truncate(time.Second)))
			leaf, err := x509.ParseCertificate(resp.Leaf)
			require.NoError(t, err)
			require.Equal(t, x509Equivalent(t, req, resp, root, key).RawTBSCertificate, leaf.RawTBSCertificate)
		})
	}
}

func TestSigningCA_SerialsUnique(t *testing.T) {
	now := time.Now()
	pki := newTestPKI(t, "P-256", now.Add(time.Hour))
	s := pki.signingCA(t)
	req := ca.SignRequest{CSR: catest.CSR(t, catest.Key(t, "P-256")), ID: testID, NotBefore: now, NotAfter: now.Add(time.Minute)}
	seen := map[string]bool{}
	for range 1000 {
		resp, err := s.Sign(req)
		require.NoError(t, err)
		require.Positive(t, resp.Serial.Sign())
		require.LessOrEqual(t, resp.Serial.BitLen(), 128)
		key := resp.Serial.String()
		require.False(t, seen[key], "duplicate serial %s", key)
		seen[key] = true
	}
}

func TestSigningCA_SignErrors(t *testing.T) {
	now := time.Now()
	pki := newTestPKI(t, "P-256", now.Add(time.Hour))
	s := pki.signingCA(t)
	csr := catest.CSR(t, catest.Key(t, "P-256"))
	for _, tc := range []struct {
		name string
		req  ca.SignRequest
	}{
		{name: "nil CSR", req: ca.SignRequest{ID: testID, NotBefore: now, NotAfter: now.Add(time.Minute)}},
		{name: "NotAfter equals NotBefore", req: ca.SignRequest{CSR: csr, ID: testID, NotBefore: now, NotAfter: now}},
		{name: "NotAfter before NotBefore", req: ca.SignRequest{CSR: csr, ID: testID, NotBefore: now, NotAfter: now.Add(-time.Minute)}},
		{name: "no names", req: ca.SignRequest{CSR: csr, NotBefore: now, NotAfter: now.Add(time.Minute)}},
		{name: "non-ASCII DNS name", req: ca.SignRequest{CSR: csr, DNSNames: []string{"bücher.example"}, NotBefore: now, NotAfter: now.Add(time.Minute)}},
		{name: "bad IP", req: ca.SignRequest{CSR: csr, IPAddresses: []net.IP{{1, 2, 3}}, NotBefore: now, NotAfter: now.Add(time.Minute)}},
		{name: "weak RSA leaf", req: ca.SignRequest{CSR: catest.CSR(t, catest.Key(t, "RSA-1024")), ID: testID, NotBefore: now, NotAfter: now.Add(time.Minute)}},
		{name: "unsupported leaf key", req: ca.SignRequest{CSR: &x509.CertificateRequest{RawSubjectPublicKeyInfo: []byte{0x30, 0}, PublicKey: "not a key"}, ID: testID, NotBefore: now, NotAfter: now.Add(time.Minute)}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := s.Sign(tc.req)
			require.ErrorIs(t, err, ca.ErrInvalidSignRequest)
		})
	}
}

func TestNewSigningCA_Errors(t *testing.T) {
	now := time.Now()
	pki := newTestPKI(t, "P-256", now.Add(time.Hour))
	other := newTestPKI(t, "P-256", now.Add(time.Hour))

	leafTmpl := catest.CATemplate("not a CA", now.Add(-time.Hour), now.Add(time.Hour))
	leafTmpl.IsCA = false
	leafTmpl.KeyUsage = x509.KeyUsageDigitalSignature
	leafKey := catest.Key(t, "P-256")
	notCA := catest.Issue(t, leafTmpl, leafKey, pki.root, pki.rootKey)

	noCertSignTmpl := catest.CATemplate("no certSign", now.Add(-time.Hour), now.Add(time.Hour))
	noCertSignTmpl.KeyUsage = x509.KeyUsageDigitalSignature
	noCertSignKey := catest.Key(t, "P-256")
	noCertSign := catest.Issue(t, noCertSignTmpl, noCertSignKey, pki.root, pki.rootKey)

	zeroPathTmpl := catest.CATemplate("path len 0", now.Add(-time.Hour), now.Add(time.Hour))
	zeroPathTmpl.MaxPathLenZero = true
	zeroPathKey := catest.Key(t, "P-256")
	zeroPath := catest.Issue(t, zeroPathTmpl, zeroPathKey, pki.root, pki.rootKey)
	belowZeroKey := catest.Key(t, "P-256")
	belowZero := catest.Issue(t, catest.CATemplate("below path len 0", now.Add(-time.Hour), now.Add(time.Hour)), belowZeroKey, zeroPath, zeroPathKey)

	p224Key := catest.Key(t, "P-224")
	p224 := catest.Issue(t, catest.CATemplate("P-224", now.Add(-time.Hour), now.Add(time.Hour)), p224Key, nil, nil)

	for _, tc := range []struct {
		name  string
		cert  *x509.Certificate
		key   crypto.Signer
		chain []*x509.Certificate
	}{
		{name: "nil certificate", key: pki.interKey, chain: []*x509.Certificate{pki.root}},
		{name: "nil key", cert: pki.inter, chain: []*x509.Certificate{pki.root}},
		{name: "not a CA", cert: notCA, key: leafKey, chain: []*x509.Certificate{pki.root}},
		{name: "no certSign", cert: noCertSign, key: noCertSignKey, chain: []*x509.Certificate{pki.root}},
		{name: "key mismatch", cert: pki.inter, key: pki.rootKey, chain: []*x509.Certificate{pki.root}},
		{name: "chain to another root", cert: pki.inter, key: pki.interKey, chain: []*x509.Certificate{other.root}},
		{name: "intermediate without chain", cert: pki.inter, key: pki.interKey},
		{name: "chain stops below the root", cert: belowZero, key: belowZeroKey, chain: []*x509.Certificate{zeroPath}},
		{name: "chain out of order", cert: belowZero, key: belowZeroKey, chain: []*x509.Certificate{pki.root, zeroPath}},
		{name: "path length exceeded", cert: belowZero, key: belowZeroKey, chain: []*x509.Certificate{zeroPath, pki.root}},
		{name: "unsupported curve", cert: p224, key: p224Key},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := ca.NewSigningCA(tc.cert, tc.key, tc.chain)
			require.ErrorIs(t, err, ca.ErrInvalidCA)
		})
	}
}

// wrappedSigner hides the concrete key type, as an HSM or KMS signer would,
// and optionally corrupts its signatures.
type wrappedSigner struct {
	key     crypto.Signer
	corrupt bool
}

func (w wrappedSigner) Public() crypto.PublicKey { return w.key.Public() }

func (w wrappedSigner) Sign(r io.Reader, digest []byte, opts crypto.SignerOpts) ([]byte, error) {
	sig, err := w.key.Sign(r, digest, opts)
	if err == nil && w.corrupt {
		sig[len(sig)/2] ^= 0x01
	}
	return sig, err
}

func TestSigningCA_CustomSignerSelfCheck(t *testing.T) {
	now := time.Now()
	for _, keyType := range []string{"P-256", "P-384", "RSA-2048", "Ed25519"} {
		pki := newTestPKI(t, keyType, now.Add(time.Hour))
		req := ca.SignRequest{CSR: catest.CSR(t, catest.Key(t, "P-256")), ID: testID, NotBefore: now, NotAfter: now.Add(time.Minute)}
		t.Run(keyType+"/good", func(t *testing.T) {
			s, err := ca.NewSigningCA(pki.inter, wrappedSigner{key: pki.interKey}, []*x509.Certificate{pki.root})
			require.NoError(t, err)
			resp, err := s.Sign(req)
			require.NoError(t, err)
			leaf, err := x509.ParseCertificate(resp.Leaf)
			require.NoError(t, err)
			require.NoError(t, leaf.CheckSignatureFrom(pki.inter))
		})
		t.Run(keyType+"/corrupt", func(t *testing.T) {
			s, err := ca.NewSigningCA(pki.inter, wrappedSigner{key: pki.interKey, corrupt: true}, []*x509.Certificate{pki.root})
			require.NoError(t, err)
			resp, err := s.Sign(req)
			require.Error(t, err)
			require.Nil(t, resp)
		})
	}
}

func BenchmarkSigningCA_Sign(b *testing.B) {
	now := time.Now()
	pki := newTestPKI(b, "P-256", now.Add(time.Hour))
	s := pki.signingCA(b)
	req := ca.SignRequest{CSR: catest.CSR(b, catest.Key(b, "P-256")), ID: testID, NotBefore: now, NotAfter: now.Add(time.Minute)}
	b.ReportAllocs()
	for b.Loop() {
		if _, err := s.Sign(req); err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkX509CreateCertificate(b *testing.B) {
	now := time.Now()
	pki := newTestPKI(b, "P-256", now.Add(time.Hour))
	csr := catest.CSR(b, catest.Key(b, "P-256"))
	tmpl := &x509.Certificate{
		NotBefore:             now,
		NotAfter:              now.Add(time.Minute),
		KeyUsage:              x509.KeyUsageDigitalSignature,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
		BasicConstraintsValid: true,
		URIs:                  []*url.URL{testID.URL()},
	}
	b.ReportAllocs()
	for b.Loop() {
		serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 128))
		if err != nil {
			b.Fatal(err)
		}
		tmpl.SerialNumber = serial
		if _, err := x509.CreateCertificate(rand.Reader, tmpl, pki.inter, csr.PublicKey, pki.interKey); err != nil {
			b.Fatal(err)
		}
	}
}

// TestSigningCA_CapsAtChain checks that a leaf never outlives any
// certificate it chains through, and that a CA that can no longer sign
// anything reports an outage rather than a bad request.
func TestSigningCA_CapsAtChain(t *testing.T) {
	now := time.Now()
	rootKey, interKey := catest.Key(t, "P-256"), catest.Key(t, "P-256")
	// The root expires before the intermediate it issued.
	root := catest.Issue(t, catest.CATemplate("short root", now.Add(-time.Hour), now.Add(2*time.Hour)), rootKey, nil, nil)
	inter := catest.Issue(t, catest.CATemplate("long intermediate", now.Add(-time.Hour), now.Add(24*time.Hour)), interKey, root, rootKey)
	s, err := ca.NewSigningCA(inter, interKey, []*x509.Certificate{root})
	require.NoError(t, err)
	csr := catest.CSR(t, catest.Key(t, "P-256"))
	resp, err := s.Sign(ca.SignRequest{CSR: csr, ID: testID, NotBefore: now, NotAfter: now.Add(12 * time.Hour)})
	require.NoError(t, err)
	require.Equal(t, root.NotAfter.UTC(), resp.NotAfter, "capped at the root, the earliest NotAfter in the chain")

	_, err = s.Sign(ca.SignRequest{CSR: csr, ID: testID, NotBefore: now.Add(3 * time.Hour), NotAfter: now.Add(4 * time.Hour)})
	require.ErrorIs(t, err, ca.ErrBackendUnavailable, "an expired chain is an outage")
	require.NotErrorIs(t, err, ca.ErrInvalidSignRequest)
}
