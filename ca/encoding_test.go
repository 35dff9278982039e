package ca

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"encoding/pem"
	"math/big"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// TestCertPEMMatchesEncodingPEM: the one-allocation encoder writes exactly
// what encoding/pem writes, at every length around the line boundaries.
func TestCertPEMMatchesEncodingPEM(t *testing.T) {
	for n := 0; n <= 200; n++ {
		der := make([]byte, n)
		_, _ = rand.Read(der)
		require.Equal(t, string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})), certPEM(der), "length %d", n)
	}
}

// TestCanonicalSPKIFastPath: the P-256 comparison agrees with
// x509.MarshalPKIXPublicKey, and refuses any change of the bytes.
func TestCanonicalSPKIFastPath(t *testing.T) {
	for range 20 {
		k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		require.NoError(t, err)
		canon, err := x509.MarshalPKIXPublicKey(&k.PublicKey)
		require.NoError(t, err)
		require.True(t, canonicalSPKI(&k.PublicKey, canon))
		for i := range canon {
			bad := append([]byte(nil), canon...)
			bad[i] ^= 0x01
			require.False(t, canonicalSPKI(&k.PublicKey, bad), "byte %d flipped", i)
		}
		require.False(t, canonicalSPKI(&k.PublicKey, append(canon, 0)), "trailing byte")
		require.False(t, canonicalSPKI(&k.PublicKey, canon[:len(canon)-1]), "short")
	}
	k, err := ecdsa.GenerateKey(elliptic.P384(), rand.Reader)
	require.NoError(t, err)
	canon, err := x509.MarshalPKIXPublicKey(&k.PublicKey)
	require.NoError(t, err)
	require.True(t, canonicalSPKI(&k.PublicKey, canon))
	require.False(t, canonicalSPKI(&k.PublicKey, append(canon, 0)))
}

// TestParseCertificatesPEM: every CERTIFICATE block in order, other blocks
// skipped, a broken certificate an error naming its place.
func TestParseCertificatesPEM(t *testing.T) {
	c1, c2 := testCert(t), testCert(t)
	data := []byte(certPEM(c1.Raw) + "junk between\n" +
		string(pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: []byte{1, 2, 3}})) + certPEM(c2.Raw))
	got, err := ParseCertificatesPEM(data)
	require.NoError(t, err)
	require.Len(t, got, 2)
	require.True(t, got[0].Equal(c1))
	require.True(t, got[1].Equal(c2))

	got, err = ParseCertificatesPEM(nil)
	require.NoError(t, err)
	require.Empty(t, got)

	_, err = ParseCertificatesPEM([]byte(certPEM(c1.Raw) + certPEM([]byte{0x30, 0x03, 0x02, 0x01, 0x01})))
	require.ErrorContains(t, err, "certificate 2")
}

func testCert(t *testing.T) *x509.Certificate {
	t.Helper()
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	require.NoError(t, err)
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), NotBefore: time.Now(), NotAfter: time.Now().Add(time.Hour)}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &k.PublicKey, k)
	require.NoError(t, err)
	c, err := x509.ParseCertificate(der)
	require.NoError(t, err)
	return c
}
