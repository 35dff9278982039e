package sds

import (
	"bytes"
	"crypto"
	"crypto/sha256"
	"crypto/x509"
	"encoding/hex"
	"encoding/pem"
	"fmt"
	"math/big"
	"time"

	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
)

// material is a credential encoded once for every stream that serves it.
type material struct {
	chainPEM []byte
	keyPEM   []byte
	serial   *big.Int
	// notBefore, notAfter and renewAt are the leaf's validity and when it
	// is replaced.
	notBefore, notAfter, renewAt time.Time
}

// encodeCredential encodes c's chain and key as Envoy wants them: PEM
// certificates leaf first, and a PKCS#8 PEM key.
func encodeCredential(c *Credential) (*material, error) {
	var chain bytes.Buffer
	for _, cert := range c.Chain {
		_ = pem.Encode(&chain, &pem.Block{Type: "CERTIFICATE", Bytes: cert.Raw})
	}
	key, err := encodeKey(c.Key)
	if err != nil {
		return nil, err
	}
	leaf := c.Leaf()
	return &material{chainPEM: chain.Bytes(), keyPEM: key, serial: leaf.SerialNumber,
		notBefore: leaf.NotBefore, notAfter: leaf.NotAfter, renewAt: c.RenewAt}, nil
}

func encodeKey(k crypto.Signer) ([]byte, error) {
	der, err := x509.MarshalPKCS8PrivateKey(k)
	if err != nil {
		return nil, fmt.Errorf("encode private key: %w", err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der}), nil
}

// certSecret is m as a tls_certificate named name.
func certSecret(name string, m *material) *tlsv3.Secret {
	return &tlsv3.Secret{
		Name: name,
		Type: &tlsv3.Secret_TlsCertificate{TlsCertificate: &tlsv3.TlsCertificate{
			CertificateChain: &core.DataSource{Specifier: &core.DataSource_InlineBytes{InlineBytes: m.chainPEM}},
			PrivateKey:       &core.DataSource{Specifier: &core.DataSource_InlineBytes{InlineBytes: m.keyPEM}},
		}},
	}
}

// servedBundle is a trust bundle as streams are served it.
type servedBundle struct {
	// seq numbers the bundles served, from 1, so that an ACK can be
	// compared with the bundle in force.
	seq   uint64
	roots []*x509.Certificate
	pem   []byte
	// hash identifies the contents in logs and the proxies listing.
	hash string
}

func newServedBundle(seq uint64, roots []*x509.Certificate) *servedBundle {
	var buf bytes.Buffer
	for _, r := range roots {
		_ = pem.Encode(&buf, &pem.Block{Type: "CERTIFICATE", Bytes: r.Raw})
	}
	sum := sha256.Sum256(buf.Bytes())
	return &servedBundle{seq: seq, roots: roots, pem: buf.Bytes(), hash: hex.EncodeToString(sum[:6])}
}

// bundleSecret is b as a validation_context named name.
func bundleSecret(name string, b *servedBundle) *tlsv3.Secret {
	return &tlsv3.Secret{
		Name: name,
		Type: &tlsv3.Secret_ValidationContext{ValidationContext: &tlsv3.CertificateValidationContext{
			TrustedCa: &core.DataSource{Specifier: &core.DataSource_InlineBytes{InlineBytes: b.pem}},
		}},
	}
}

// sameRoots reports whether a and b hold the same certificates in the same
// order.
func sameRoots(a, b []*x509.Certificate) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if !bytes.Equal(a[i].Raw, b[i].Raw) {
			return false
		}
	}
	return true
}

func containsRoot(roots []*x509.Certificate, c *x509.Certificate) bool {
	for _, r := range roots {
		if bytes.Equal(r.Raw, c.Raw) {
			return true
		}
	}
	return false
}
