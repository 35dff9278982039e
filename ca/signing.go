package ca

import (
	"bytes"
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/sha512"
	"crypto/x509"
	"encoding/asn1"
	"errors"
	"fmt"
	"slices"
	"time"

	"github.com/meshca/meshca/ca/internal/x509enc"
)

// ErrInvalidSignRequest is wrapped by SigningCA.Sign errors caused by the
// request itself (no CSR, an unsupported leaf key, an empty validity, no
// names): retrying the same request cannot succeed.
var ErrInvalidSignRequest = errors.New("invalid sign request")

// ErrInvalidCA is wrapped by NewSigningCA errors that mean the certificate,
// key or chain it was given cannot sign leaves.
var ErrInvalidCA = errors.New("invalid CA")

// minLeafRSABits is the smallest RSA leaf key SigningCA signs for. The CA's
// policy normally rejects weaker keys first; this is a last line of defence.
const minLeafRSABits = 2048

// A SigningCA is a CA certificate with its key that issues leaf certificates
// in process. It is immutable after NewSigningCA and safe for concurrent use
// as long as its crypto.Signer is (the standard library's keys are).
//
// Sign builds the leaf's DER directly instead of calling
// x509.CreateCertificate, which re-verifies every signature it makes; the
// result is byte-for-byte the TBSCertificate that x509.CreateCertificate
// would produce for the equivalent template. The signature is still checked
// after signing when the key is not one of the standard library's in-memory
// keys (an HSM or KMS signer may misbehave).
type SigningCA struct {
	cert  *x509.Certificate
	key   crypto.Signer
	chain []*x509.Certificate // cert first, root last

	// Per-CA constants precomputed by NewSigningCA.
	enc         *x509enc.Issuer
	hash        crypto.Hash
	knownSigner bool // an in-memory standard-library key: skip the self-check
	verify      func(tbsOrDigest, sig []byte) bool
	chainPEM    []string
	signedBy    string
	// notAfter is the earliest NotAfter in the chain: no leaf may outlive
	// any certificate it needs.
	notAfter time.Time
}

// NewSigningCA returns a SigningCA that signs with key as cert. chain holds
// the certificates above cert, each issued by the next, up to and including
// the root; it is empty when cert is itself the root. cert and the chain
// must be parsed certificates (Raw set); the SigningCA keeps them, and
// callers must not modify them afterwards.
//
// NewSigningCA checks that cert is a CA allowed to sign certificates, that
// key's public key is cert's, and that cert chains, in order, through chain
// to its last element, a self-signed root, with room for a leaf below cert
// under every path length constraint. It does not check that cert is valid now: callers decide what an
// expired or not-yet-valid CA means to them.
func NewSigningCA(cert *x509.Certificate, key crypto.Signer, chain []*x509.Certificate) (*SigningCA, error) {
	if cert == nil || len(cert.Raw) == 0 {
		return nil, fmt.Errorf("new signing CA: certificate is missing or not parsed: %w", ErrInvalidCA)
	}
	if key == nil {
		return nil, fmt.Errorf("new signing CA: key is missing: %w", ErrInvalidCA)
	}
	if !cert.BasicConstraintsValid || !cert.IsCA {
		return nil, fmt.Errorf("new signing CA: certificate %q is not a CA: %w", cert.Subject, ErrInvalidCA)
	}
	if cert.KeyUsage&x509.KeyUsageCertSign == 0 {
		return nil, fmt.Errorf("new signing CA: certificate %q lacks key usage certSign: %w", cert.Subject, ErrInvalidCA)
	}
	pub, ok := key.Public().(interface{ Equal(crypto.PublicKey) bool })
	if !ok || !pub.Equal(cert.PublicKey) {
		return nil, fmt.Errorf("new signing CA: key does not match certificate %q: %w", cert.Subject, ErrInvalidCA)
	}
	full := append([]*x509.Certificate{cert}, chain...)
	if err := verifyChain(full); err != nil {
		return nil, fmt.Errorf("new signing CA: %w: %w", err, ErrInvalidCA)
	}

	s := &SigningCA{
		cert:  cert,
		key:   key,
		chain: full,
	}
	var sigOID asn1.ObjectIdentifier
	var sigParams asn1.RawValue
	switch pk := cert.PublicKey.(type) {
	case *ecdsa.PublicKey:
		switch pk.Curve {
		case elliptic.P256():
			sigOID, s.hash = x509enc.OIDSignatureECDSAWithSHA256, crypto.SHA256
		case elliptic.P384():
			sigOID, s.hash = x509enc.OIDSignatureECDSAWithSHA384, crypto.SHA384
		case elliptic.P521():
			sigOID, s.hash = x509enc.OIDSignatureECDSAWithSHA512, crypto.SHA512
		default:
			return nil, fmt.Errorf("new signing CA: unsupported curve %s: %w", pk.Curve.Params().Name, ErrInvalidCA)
		}
		s.verify = func(digest, sig []byte) bool { return ecdsa.VerifyASN1(pk, digest, sig) }
		_, s.knownSigner = key.(*ecdsa.PrivateKey)
	case *rsa.PublicKey:
		sigOID, sigParams, s.hash = x509enc.OIDSignatureSHA256WithRSA, asn1.NullRawValue, crypto.SHA256
		s.verify = func(digest, sig []byte) bool { return rsa.VerifyPKCS1v15(pk, crypto.SHA256, digest, sig) == nil }
		_, s.knownSigner = key.(*rsa.PrivateKey)
	case ed25519.PublicKey:
		sigOID, s.hash = x509enc.OIDSignatureEd25519, 0
		s.verify = func(msg, sig []byte) bool { return ed25519.Verify(pk, msg, sig) }
		_, s.knownSigner = key.(ed25519.PrivateKey)
	default:
		return nil, fmt.Errorf("new signing CA: unsupported key type %T: %w", cert.PublicKey, ErrInvalidCA)
	}

	var err error
	if s.enc, err = x509enc.NewIssuer(cert, sigOID, sigParams); err != nil {
		return nil, fmt.Errorf("new signing CA: %w", err)
	}

	// The chain a client needs above its leaf: cert and everything above
	// it. When cert is the root, that is the root alone.
	for _, c := range full {
		s.chainPEM = append(s.chainPEM, certPEM(c.Raw))
	}
	s.signedBy = fmt.Sprintf("%s serial=%x", cert.Subject, cert.SerialNumber)
	s.notAfter = cert.NotAfter
	for _, c := range chain {
		if c.NotAfter.Before(s.notAfter) {
			s.notAfter = c.NotAfter
		}
	}
	return s, nil
}

// verifyChain checks that each certificate in chain is issued by the next,
// that the last is a self-signed root, that no path length constraint
// forbids a leaf below the first, and that the first verifies, by x509's
// rules, to the last as a trust anchor. Validity periods are checked only
// for overlap: the chain is verified at the latest NotBefore among its
// certificates.
func verifyChain(chain []*x509.Certificate) error {
	for i, c := range chain {
		// Below chain[i] there will be i CA certificates and a leaf.
		if i > 0 && c.BasicConstraintsValid && c.MaxPathLen >= 0 && i > c.MaxPathLen {
			return fmt.Errorf("check path length: %q allows %d CA certificates below it, the chain has %d", c.Subject, c.MaxPathLen, i)
		}
		if i+1 < len(chain) {
			if err := c.CheckSignatureFrom(chain[i+1]); err != nil {
				return fmt.Errorf("check %q is issued by %q: %w", c.Subject, chain[i+1].Subject, err)
			}
		}
	}
	root := chain[len(chain)-1]
	if !bytes.Equal(root.RawIssuer, root.RawSubject) {
		return fmt.Errorf("check root: %q is not self-signed (issuer %q)", root.Subject, root.Issuer)
	}
	if err := root.CheckSignature(root.SignatureAlgorithm, root.RawTBSCertificate, root.Signature); err != nil {
		return fmt.Errorf("check root %q is self-signed: %w", root.Subject, err)
	}
	roots := x509.NewCertPool()
	roots.AddCert(root)
	inter := x509.NewCertPool()
	at := root.NotBefore
	for _, c := range chain {
		if c != root {
			inter.AddCert(c)
		}
		if c.NotBefore.After(at) {
			at = c.NotBefore
		}
	}
	_, err := chain[0].Verify(x509.VerifyOptions{
		Roots:         roots,
		Intermediates: inter,
		CurrentTime:   at,
		KeyUsages:     []x509.ExtKeyUsage{x509.ExtKeyUsageAny},
	})
	if err != nil {
		return fmt.Errorf("verify %q to root %q: %w", chain[0].Subject, root.Subject, err)
	}
	return nil
}

// Certificate returns the certificate Sign signs as. Callers must not
// modify it.
func (s *SigningCA) Certificate() *x509.Certificate { return s.cert }

// Root returns the trust anchor the signing certificate chains to (the
// signing certificate itself when it is the root). Callers must not modify
// it.
func (s *SigningCA) Root() *x509.Certificate { return s.chain[len(s.chain)-1] }

// Chain returns the signing certificate and every certificate above it,
// root last, as an Inspector reports them. The slice is a copy; the
// certificates are shared and must not be modified.
func (s *SigningCA) Chain() []*x509.Certificate { return slices.Clone(s.chain) }

// Sign issues a leaf for req: a v3 certificate with an empty subject, the
// CSR's public key, a random positive 128-bit serial, the SPIFFE ID, DNS
// names and IP addresses as a critical subjectAltName, key usage
// digitalSignature (plus keyEncipherment for RSA keys), extended key usage
// serverAuth and clientAuth, and basic constraints CA:false. NotAfter is
// capped at the earliest NotAfter of the signing certificate and the chain
// above it (an expired chain is ErrBackendUnavailable); both times are truncated to
// whole seconds, as X.509 encodes them, and the response carries the
// truncated values.
//
// Errors caused by the request wrap ErrInvalidSignRequest. Sign does no I/O
// unless its crypto.Signer does.
func (s *SigningCA) Sign(req SignRequest) (*SignResponse, error) {
	csr := req.CSR
	if csr == nil || csr.PublicKey == nil {
		return nil, fmt.Errorf("sign leaf: no CSR: %w", ErrInvalidSignRequest)
	}
	rsaLeaf, err := checkLeafKey(csr.PublicKey)
	if err != nil {
		return nil, fmt.Errorf("sign leaf: %w: %w", err, ErrInvalidSignRequest)
	}
	notBefore := req.NotBefore.UTC().Truncate(time.Second)
	notAfter := req.NotAfter
	capped := notAfter.After(s.notAfter)
	if capped {
		notAfter = s.notAfter
	}
	notAfter = notAfter.UTC().Truncate(time.Second)
	if capped && !notAfter.After(notBefore) {
		// Not the request's fault: the CA can no longer sign anything.
		return nil, fmt.Errorf("sign leaf: the signing CA chain expired at %s: %w",
			s.notAfter.UTC().Format(time.RFC3339), ErrBackendUnavailable)
	}
	if !notAfter.After(notBefore) {
		return nil, fmt.Errorf("sign leaf: NotAfter %s is not after NotBefore %s (after capping at the CA's NotAfter): %w",
			notAfter.Format(time.RFC3339), notBefore.Format(time.RFC3339), ErrInvalidSignRequest)
	}
	if req.ID.IsZero() && len(req.DNSNames) == 0 && len(req.IPAddresses) == 0 {
		return nil, fmt.Errorf("sign leaf: no SPIFFE ID, DNS name or IP address: %w", ErrInvalidSignRequest)
	}
	if err := x509enc.CheckNames(req.DNSNames, req.IPAddresses); err != nil {
		return nil, fmt.Errorf("sign leaf: %w: %w", err, ErrInvalidSignRequest)
	}

	serial, err := RandomSerial()
	if err != nil {
		return nil, fmt.Errorf("sign leaf: %w", err)
	}

	uri := ""
	if !req.ID.IsZero() {
		uri = req.ID.String()
	}
	// The key is re-encoded, never copied: a request's own encoding may
	// carry bytes Go's parser tolerates and other parsers refuse.
	spki := req.SPKI
	if spki == nil {
		if spki, err = x509.MarshalPKIXPublicKey(csr.PublicKey); err != nil {
			return nil, fmt.Errorf("sign leaf: encode public key: %w: %w", err, ErrInvalidSignRequest)
		}
	}
	tbs, err := s.enc.TBS(x509enc.Leaf{
		Serial: serial, NotBefore: notBefore, NotAfter: notAfter,
		SPKI: spki, RSA: rsaLeaf,
		URI: uri, DNSNames: req.DNSNames, IPAddresses: req.IPAddresses,
	})
	if err != nil {
		return nil, fmt.Errorf("sign leaf: %w", err)
	}

	sig, err := s.signTBS(tbs)
	if err != nil {
		return nil, fmt.Errorf("sign leaf: %w", err)
	}

	der, err := s.enc.Certificate(tbs, sig)
	if err != nil {
		return nil, fmt.Errorf("sign leaf: %w", err)
	}
	return &SignResponse{
		Leaf:      der,
		Serial:    serial,
		NotBefore: notBefore,
		NotAfter:  notAfter,
		ChainPEM:  s.chainPEM,
		SignedBy:  s.signedBy,
	}, nil
}

// signTBS signs the DER of a TBSCertificate. Signers other than the
// standard library's in-memory keys have their signature verified, as
// x509.CreateCertificate does for every signer.
func (s *SigningCA) signTBS(tbs []byte) ([]byte, error) {
	var digest []byte
	switch s.hash {
	case crypto.SHA256:
		d := sha256.Sum256(tbs)
		digest = d[:]
	case crypto.SHA384:
		d := sha512.Sum384(tbs)
		digest = d[:]
	case crypto.SHA512:
		d := sha512.Sum512(tbs)
		digest = d[:]
	default: // Ed25519 signs the message itself.
		digest = tbs
	}

	var sig []byte
	var err error
	switch k := s.key.(type) {
	case *ecdsa.PrivateKey:
		sig, err = ecdsa.SignASN1(rand.Reader, k, digest)
	case *rsa.PrivateKey:
		sig, err = rsa.SignPKCS1v15(nil, k, s.hash, digest)
	case ed25519.PrivateKey:
		sig = ed25519.Sign(k, digest)
	default:
		sig, err = s.key.Sign(rand.Reader, digest, s.hash)
	}
	if err != nil {
		return nil, fmt.Errorf("sign certificate: %w", err)
	}
	if !s.knownSigner && !s.verify(digest, sig) {
		return nil, errors.New("sign certificate: signer returned an invalid signature")
	}
	return sig, nil
}

// checkLeafKey reports whether a leaf public key is RSA, or an error if
// SigningCA does not sign for its type.
func checkLeafKey(pub crypto.PublicKey) (isRSA bool, err error) {
	switch k := pub.(type) {
	case *ecdsa.PublicKey:
		switch k.Curve {
		case elliptic.P256(), elliptic.P384(), elliptic.P521():
			return false, nil
		}
		return false, fmt.Errorf("unsupported leaf curve %s", k.Curve.Params().Name)
	case *rsa.PublicKey:
		if k.N.BitLen() < minLeafRSABits {
			return false, fmt.Errorf("leaf RSA key of %d bits, need at least %d", k.N.BitLen(), minLeafRSABits)
		}
		return true, nil
	case ed25519.PublicKey:
		return false, nil
	}
	return false, fmt.Errorf("unsupported leaf key type %T", pub)
}

// NotAfter returns the earliest NotAfter in the chain: no leaf signed now
// may outlive it.
func (s *SigningCA) NotAfter() time.Time { return s.notAfter }
