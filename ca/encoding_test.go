package ca

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"encoding/pem"
	"testing"

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
