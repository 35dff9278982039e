package sdstest

import (
	"bytes"
	"crypto"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
)

// Validate checks a secret the way the client does before it accepts a
// response. A tls_certificate must carry an inline PEM certificate chain,
// leaf first, and an inline PEM private key (PKCS#8, SEC 1 EC or PKCS#1
// RSA) whose public key is the leaf's. A validation_context must carry an
// inline PEM trusted_ca of at least one certificate. Session ticket keys
// and generic secrets pass unchecked; a secret of no type fails.
//
// The PEM checks are stricter than Envoy's (BoringSSL skips blocks of other
// types and trailing text): a server that sends either has a bug worth
// seeing. Errors never quote key material.
func Validate(s *tlsv3.Secret) error {
	switch s.GetType().(type) {
	case *tlsv3.Secret_TlsCertificate:
		_, _, err := ParseTLSCertificate(s)
		return err
	case *tlsv3.Secret_ValidationContext:
		_, err := ParseValidationContext(s)
		return err
	case nil:
		return errors.New("secret has no type")
	default:
		return nil
	}
}

// ParseTLSCertificate returns the certificate chain (leaf first) and the
// private key of a tls_certificate secret, after the checks Validate makes.
func ParseTLSCertificate(s *tlsv3.Secret) (chain []*x509.Certificate, key crypto.Signer, err error) {
	tc := s.GetTlsCertificate()
	if tc == nil {
		return nil, nil, errors.New("secret is not a tls_certificate")
	}
	chainPEM, err := inline(tc.GetCertificateChain())
	if err != nil {
		return nil, nil, fmt.Errorf("read certificate_chain: %w", err)
	}
	chain, err = parseCertificates(chainPEM)
	if err != nil {
		return nil, nil, fmt.Errorf("parse certificate_chain: %w", err)
	}
	keyPEM, err := inline(tc.GetPrivateKey())
	if err != nil {
		return nil, nil, fmt.Errorf("read private_key: %w", err)
	}
	key, err = parsePrivateKey(keyPEM)
	if err != nil {
		return nil, nil, fmt.Errorf("parse private_key: %w", err)
	}
	pub, ok := key.Public().(interface{ Equal(crypto.PublicKey) bool })
	if !ok || !pub.Equal(chain[0].PublicKey) {
		return nil, nil, errors.New("private key does not match the leaf certificate's public key")
	}
	return chain, key, nil
}

// ParseValidationContext returns the trusted CA certificates of a
// validation_context secret, after the checks Validate makes.
func ParseValidationContext(s *tlsv3.Secret) (roots []*x509.Certificate, err error) {
	vc := s.GetValidationContext()
	if vc == nil {
		return nil, errors.New("secret is not a validation_context")
	}
	caPEM, err := inline(vc.GetTrustedCa())
	if err != nil {
		return nil, fmt.Errorf("read trusted_ca: %w", err)
	}
	roots, err = parseCertificates(caPEM)
	if err != nil {
		return nil, fmt.Errorf("parse trusted_ca: %w", err)
	}
	return roots, nil
}

// inline returns the bytes of a DataSource that carries them itself: a
// proxy served over SDS has no file or environment variable to read.
func inline(ds *corev3.DataSource) ([]byte, error) {
	var b []byte
	switch sp := ds.GetSpecifier().(type) {
	case *corev3.DataSource_InlineBytes:
		b = sp.InlineBytes
	case *corev3.DataSource_InlineString:
		b = []byte(sp.InlineString)
	case nil:
		return nil, errors.New("missing")
	default:
		return nil, fmt.Errorf("not inline (%T)", sp)
	}
	if len(b) == 0 {
		return nil, errors.New("empty")
	}
	return b, nil
}

// parseCertificates parses PEM that holds only CERTIFICATE blocks, at
// least one.
func parseCertificates(b []byte) ([]*x509.Certificate, error) {
	var certs []*x509.Certificate
	rest := b
	for {
		var block *pem.Block
		block, rest = pem.Decode(rest)
		if block == nil {
			break
		}
		if block.Type != "CERTIFICATE" {
			return nil, fmt.Errorf("PEM block %d is %q, want CERTIFICATE", len(certs)+1, block.Type)
		}
		c, err := x509.ParseCertificate(block.Bytes)
		if err != nil {
			return nil, fmt.Errorf("parse certificate %d: %w", len(certs)+1, err)
		}
		certs = append(certs, c)
	}
	if len(certs) == 0 {
		return nil, errors.New("no PEM certificate")
	}
	if len(bytes.TrimSpace(rest)) > 0 {
		return nil, errors.New("text after the last PEM block")
	}
	return certs, nil
}

// parsePrivateKey parses PEM that holds exactly one private key, optionally
// after the EC PARAMETERS block openssl writes. Its errors name the block
// type and the parser's complaint, never the key's bytes.
func parsePrivateKey(b []byte) (crypto.Signer, error) {
	var key crypto.Signer
	rest := b
	for {
		var block *pem.Block
		block, rest = pem.Decode(rest)
		if block == nil {
			break
		}
		var (
			k   any
			err error
		)
		switch block.Type {
		case "EC PARAMETERS":
			continue
		case "PRIVATE KEY":
			k, err = x509.ParsePKCS8PrivateKey(block.Bytes)
		case "EC PRIVATE KEY":
			k, err = x509.ParseECPrivateKey(block.Bytes)
		case "RSA PRIVATE KEY":
			k, err = x509.ParsePKCS1PrivateKey(block.Bytes)
		case "ENCRYPTED PRIVATE KEY":
			return nil, errors.New("encrypted private keys are not supported")
		default:
			return nil, fmt.Errorf("PEM block is %q, want a private key", block.Type)
		}
		if err != nil {
			return nil, fmt.Errorf("parse %s: %w", block.Type, err)
		}
		if key != nil {
			return nil, errors.New("more than one private key")
		}
		signer, ok := k.(crypto.Signer)
		if !ok {
			return nil, fmt.Errorf("%s holds a %T, which cannot sign", block.Type, k)
		}
		key = signer
	}
	if key == nil {
		return nil, errors.New("no PEM private key")
	}
	if len(bytes.TrimSpace(rest)) > 0 {
		return nil, errors.New("text after the last PEM block")
	}
	return key, nil
}
