// Package catest builds throwaway keys, CA certificates and CSRs for tests.
// Never use it outside tests.
package catest

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"math/big"
	"net/url"
	"testing"
	"time"

	"github.com/meshca/meshca/ca"
	"github.com/stretchr/testify/require"
)

// Key generates a key of the named kind: "P-224", "P-256", "P-384",
// "P-521", "RSA-1024", "RSA-2048", "RSA-3072" or "Ed25519". An unknown kind fails the
// test. The weak kinds (P-224, RSA-1024) exist for tests that check they
// are refused.
func Key(t testing.TB, kind string) crypto.Signer {
	t.Helper()
	var k crypto.Signer
	var err error
	switch kind {
	case "P-224":
		k, err = ecdsa.GenerateKey(elliptic.P224(), rand.Reader)
	case "P-521":
		k, err = ecdsa.GenerateKey(elliptic.P521(), rand.Reader)
	case "RSA-1024":
		k, err = rsa.GenerateKey(rand.Reader, 1024)
	default:
		kt, ok := map[string]ca.KeyType{
			"P-256": ca.KeyECDSAP256, "P-384": ca.KeyECDSAP384, "RSA-2048": ca.KeyRSA2048,
			"RSA-3072": ca.KeyRSA3072, "Ed25519": ca.KeyEd25519,
		}[kind]
		if !ok {
			t.Fatalf("catest: unknown key kind %q", kind)
		}
		k, err = ca.GenerateKey(kt)
	}
	require.NoError(t, err)
	return k
}

// CATemplate returns a template for a CA certificate valid over
// [notBefore, notAfter]: subject CN=cn, O=meshca test, a random 128-bit
// serial, basic constraints CA:true and key usage certSign and cRLSign.
// The caller may change it before passing it to Issue.
func CATemplate(cn string, notBefore, notAfter time.Time) *x509.Certificate {
	return &x509.Certificate{
		SerialNumber:          serial(),
		Subject:               pkix.Name{CommonName: cn, Organization: []string{"meshca test"}},
		NotBefore:             notBefore,
		NotAfter:              notAfter,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
		BasicConstraintsValid: true,
		IsCA:                  true,
	}
}

// Issue signs tmpl, for key's public key, with parentKey as parent, or
// self-signed with key when parent is nil, and returns the parsed
// certificate. If tmpl has no SerialNumber the certificate gets a random
// 128-bit one; tmpl itself is not modified.
func Issue(t testing.TB, tmpl *x509.Certificate, key crypto.Signer, parent *x509.Certificate, parentKey crypto.Signer) *x509.Certificate {
	t.Helper()
	if tmpl.SerialNumber == nil {
		withSerial := *tmpl
		withSerial.SerialNumber = serial()
		tmpl = &withSerial
	}
	if parent == nil {
		parent, parentKey = tmpl, key
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, parent, key.Public(), parentKey)
	require.NoError(t, err)
	cert, err := x509.ParseCertificate(der)
	require.NoError(t, err)
	return cert
}

// IssueFor is Issue for a public key whose private key the caller does
// not hold (a CSR's), signed by parent.
func IssueFor(t testing.TB, tmpl *x509.Certificate, pub crypto.PublicKey, parent *x509.Certificate, parentKey crypto.Signer) *x509.Certificate {
	t.Helper()
	withSerial := *tmpl
	if withSerial.SerialNumber == nil {
		withSerial.SerialNumber = serial()
	}
	der, err := x509.CreateCertificate(rand.Reader, &withSerial, parent, pub, parentKey)
	require.NoError(t, err)
	cert, err := x509.ParseCertificate(der)
	require.NoError(t, err)
	return cert
}

// CSR returns a parsed certificate request signed by key, with an empty
// subject and no names, as a CA that takes the names from elsewhere sees it.
func CSR(t testing.TB, key crypto.Signer) *x509.CertificateRequest {
	t.Helper()
	csr, err := x509.ParseCertificateRequest(csrDER(t, key, nil, nil))
	require.NoError(t, err)
	return csr
}

// CSRPEM returns a PEM "CERTIFICATE REQUEST" signed by key for the given
// URI SANs. edit, if not nil, changes the request template before signing.
func CSRPEM(t testing.TB, key crypto.Signer, edit func(*x509.CertificateRequest), uris ...string) []byte {
	t.Helper()
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: csrDER(t, key, edit, uris)})
}

// CSRDER is CSRPEM without the PEM.
func CSRDER(t testing.TB, key crypto.Signer, edit func(*x509.CertificateRequest), uris ...string) []byte {
	t.Helper()
	return csrDER(t, key, edit, uris)
}

func csrDER(t testing.TB, key crypto.Signer, edit func(*x509.CertificateRequest), uris []string) []byte {
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
	return der
}

// serial returns a random serial number below 2^128.
func serial() *big.Int {
	n, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 128))
	if err != nil {
		// crypto/rand.Reader does not fail (Go 1.24+); rand.Int errs only on a reader error.
		panic(err)
	}
	return n
}
