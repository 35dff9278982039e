package ca

import (
	"bytes"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/x509"
	"encoding/base64"
	"encoding/pem"
	"fmt"
)

// p256SPKIPrefix is the DER of a P-256 SubjectPublicKeyInfo up to its
// 65-byte uncompressed point: SEQUENCE { SEQUENCE { id-ecPublicKey,
// prime256v1 }, BIT STRING (0 unused bits) }.
var p256SPKIPrefix = []byte{
	0x30, 0x59, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01,
	0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07, 0x03, 0x42, 0x00,
}

// canonicalSPKI reports whether raw is the canonical DER encoding of pub,
// as x509.MarshalPKIXPublicKey makes it. P-256, the key nearly every
// proxy sends, is compared without encoding anything; other keys are
// encoded by x509.
func canonicalSPKI(pub crypto.PublicKey, raw []byte) bool {
	if k, ok := pub.(*ecdsa.PublicKey); ok && k.Curve == elliptic.P256() {
		if len(raw) != len(p256SPKIPrefix)+65 || !bytes.Equal(raw[:len(p256SPKIPrefix)], p256SPKIPrefix) {
			return false
		}
		e, err := k.ECDH()
		return err == nil && bytes.Equal(raw[len(p256SPKIPrefix):], e.Bytes())
	}
	canon, err := x509.MarshalPKIXPublicKey(pub)
	return err == nil && bytes.Equal(canon, raw)
}

// certPEM is pem.EncodeToMemory of a CERTIFICATE block, in one
// allocation: it is made for every leaf issued.
func certPEM(der []byte) string {
	const (
		begin = "-----BEGIN CERTIFICATE-----\n"
		end   = "-----END CERTIFICATE-----\n"
		line  = 64
	)
	n := base64.StdEncoding.EncodedLen(len(der))
	out := make([]byte, 0, len(begin)+n+(n+line-1)/line+len(end))
	out = append(out, begin...)
	// 48 bytes encode to exactly one 64-character line.
	for len(der) > 0 {
		chunk := der[:min(48, len(der))]
		der = der[len(chunk):]
		m := base64.StdEncoding.EncodedLen(len(chunk))
		base64.StdEncoding.Encode(out[len(out):len(out)+m], chunk)
		out = append(out[:len(out)+m], '\n')
	}
	out = append(out, end...)
	return string(out)
}

// ParseCertificatesPEM parses every CERTIFICATE block of data, in order,
// and skips blocks of other types (an upstream's chain may carry keys or
// comments). No block is no certificates and no error; callers that need
// one say so themselves.
func ParseCertificatesPEM(data []byte) ([]*x509.Certificate, error) {
	var certs []*x509.Certificate
	for {
		var block *pem.Block
		block, data = pem.Decode(data)
		if block == nil {
			return certs, nil
		}
		if block.Type != "CERTIFICATE" {
			continue
		}
		c, err := x509.ParseCertificate(block.Bytes)
		if err != nil {
			return nil, fmt.Errorf("certificate %d: %w", len(certs)+1, err)
		}
		certs = append(certs, c)
	}
}
