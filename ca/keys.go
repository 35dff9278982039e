package ca

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"fmt"
	"math/big"
)

// KeyType names a public key algorithm and size, for leaf keys in policies,
// metrics and audit lines, and for the CA keys meshca generates.
type KeyType string

// The key types meshca knows. Anything else in a CSR is refused.
const (
	KeyECDSAP256 KeyType = "ECDSA-P256"
	KeyECDSAP384 KeyType = "ECDSA-P384"
	KeyRSA2048   KeyType = "RSA-2048"
	KeyRSA3072   KeyType = "RSA-3072"
	KeyRSA4096   KeyType = "RSA-4096"
	KeyEd25519   KeyType = "Ed25519"
)

// knownKeyTypes is every KeyType, in the order error messages list them.
var knownKeyTypes = []KeyType{KeyECDSAP256, KeyECDSAP384, KeyRSA2048, KeyRSA3072, KeyRSA4096, KeyEd25519}

// CAKeyTypes are the key types meshca generates CA keys of: Ed25519 is left
// out, because too many relying parties cannot verify it in a chain.
var CAKeyTypes = []KeyType{KeyECDSAP256, KeyECDSAP384, KeyRSA2048, KeyRSA3072, KeyRSA4096}

// GenerateKey returns a new private key of type kt.
func GenerateKey(kt KeyType) (crypto.Signer, error) {
	var k crypto.Signer
	var err error
	switch kt {
	case KeyECDSAP256:
		k, err = ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	case KeyECDSAP384:
		k, err = ecdsa.GenerateKey(elliptic.P384(), rand.Reader)
	case KeyRSA2048:
		k, err = rsa.GenerateKey(rand.Reader, 2048)
	case KeyRSA3072:
		k, err = rsa.GenerateKey(rand.Reader, 3072)
	case KeyRSA4096:
		k, err = rsa.GenerateKey(rand.Reader, 4096)
	case KeyEd25519:
		_, k, err = ed25519.GenerateKey(rand.Reader)
	default:
		return nil, fmt.Errorf("generate key: unknown key type %q, want one of %s", kt, keyTypeList(knownKeyTypes))
	}
	if err != nil {
		return nil, fmt.Errorf("generate %s key: %w", kt, err)
	}
	return k, nil
}

// KeyTypeOfPublic names a public key, or returns a *CSRError for a key
// meshca never accepts (RSA below 2048 or of odd size, curves other than
// P-256 and P-384).
func KeyTypeOfPublic(pub crypto.PublicKey) (KeyType, error) {
	switch k := pub.(type) {
	case *ecdsa.PublicKey:
		switch k.Curve {
		case elliptic.P256():
			return KeyECDSAP256, nil
		case elliptic.P384():
			return KeyECDSAP384, nil
		}
		return "", csrErr(CSRKeyType, "CSR key is ECDSA %s", k.Curve.Params().Name)
	case *rsa.PublicKey:
		switch n := k.N.BitLen(); n {
		case 2048:
			return KeyRSA2048, nil
		case 3072:
			return KeyRSA3072, nil
		case 4096:
			return KeyRSA4096, nil
		default:
			return "", csrErr(CSRKeyType, "CSR key is RSA-%d", n)
		}
	case ed25519.PublicKey:
		return KeyEd25519, nil
	default:
		return "", csrErr(CSRKeyType, "CSR key is of type %T", k)
	}
}

// KeyTypeOf names the CSR's public key; see KeyTypeOfPublic.
func KeyTypeOf(csr *x509.CertificateRequest) (KeyType, error) {
	return KeyTypeOfPublic(csr.PublicKey)
}

// RandomSerial returns a random, positive, non-zero 128-bit serial number,
// for leaves and CA certificates alike.
func RandomSerial() (*big.Int, error) {
	var buf [16]byte
	for {
		if _, err := rand.Read(buf[:]); err != nil {
			return nil, fmt.Errorf("generate serial: %w", err)
		}
		if n := new(big.Int).SetBytes(buf[:]); n.Sign() > 0 {
			return n, nil
		}
	}
}
