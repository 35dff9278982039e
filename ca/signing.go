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
	"crypto/x509/pkix"
	"encoding/asn1"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"net"
	"slices"
	"time"
	"unicode"

	"golang.org/x/crypto/cryptobyte"
	cbasn1 "golang.org/x/crypto/cryptobyte/asn1"
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
	sigAlgID    []byte // DER AlgorithmIdentifier, used twice in each leaf
	hash        crypto.Hash
	issuer      []byte    // DER Name: the CA's RawSubject
	extPrefix   [2][]byte // DER extensions before subjectAltName; [1] for RSA leaves
	knownSigner bool      // an in-memory standard-library key: skip the self-check
	verify      func(tbsOrDigest, sig []byte) bool
	chainPEM    []string
	signedBy    string
	// notAfter is the earliest NotAfter in the chain: no leaf may outlive
	// any certificate it needs.
	notAfter time.Time
}

// Object identifiers and fixed DER pieces, as in crypto/x509.
var (
	oidSignatureECDSAWithSHA256 = asn1.ObjectIdentifier{1, 2, 840, 10045, 4, 3, 2}
	oidSignatureECDSAWithSHA384 = asn1.ObjectIdentifier{1, 2, 840, 10045, 4, 3, 3}
	oidSignatureECDSAWithSHA512 = asn1.ObjectIdentifier{1, 2, 840, 10045, 4, 3, 4}
	oidSignatureSHA256WithRSA   = asn1.ObjectIdentifier{1, 2, 840, 113549, 1, 1, 11}
	oidSignatureEd25519         = asn1.ObjectIdentifier{1, 3, 101, 112}

	oidExtensionKeyUsage         = asn1.ObjectIdentifier{2, 5, 29, 15}
	oidExtensionExtendedKeyUsage = asn1.ObjectIdentifier{2, 5, 29, 37}
	oidExtensionBasicConstraints = asn1.ObjectIdentifier{2, 5, 29, 19}
	oidExtensionAuthorityKeyID   = asn1.ObjectIdentifier{2, 5, 29, 35}
	oidExtensionSubjectAltName   = asn1.ObjectIdentifier{2, 5, 29, 17}

	oidExtKeyUsageServerAuth = asn1.ObjectIdentifier{1, 3, 6, 1, 5, 5, 7, 3, 1}
	oidExtKeyUsageClientAuth = asn1.ObjectIdentifier{1, 3, 6, 1, 5, 5, 7, 3, 2}
)

// emptyASN1Subject is the DER of an empty Name: an empty SEQUENCE.
var emptyASN1Subject = []byte{0x30, 0x00}

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
		cert:   cert,
		key:    key,
		chain:  full,
		issuer: cert.RawSubject,
	}
	var sigOID asn1.ObjectIdentifier
	var sigParams asn1.RawValue
	switch pk := cert.PublicKey.(type) {
	case *ecdsa.PublicKey:
		switch pk.Curve {
		case elliptic.P256():
			sigOID, s.hash = oidSignatureECDSAWithSHA256, crypto.SHA256
		case elliptic.P384():
			sigOID, s.hash = oidSignatureECDSAWithSHA384, crypto.SHA384
		case elliptic.P521():
			sigOID, s.hash = oidSignatureECDSAWithSHA512, crypto.SHA512
		default:
			return nil, fmt.Errorf("new signing CA: unsupported curve %s: %w", pk.Curve.Params().Name, ErrInvalidCA)
		}
		s.verify = func(digest, sig []byte) bool { return ecdsa.VerifyASN1(pk, digest, sig) }
		_, s.knownSigner = key.(*ecdsa.PrivateKey)
	case *rsa.PublicKey:
		sigOID, sigParams, s.hash = oidSignatureSHA256WithRSA, asn1.NullRawValue, crypto.SHA256
		s.verify = func(digest, sig []byte) bool { return rsa.VerifyPKCS1v15(pk, crypto.SHA256, digest, sig) == nil }
		_, s.knownSigner = key.(*rsa.PrivateKey)
	case ed25519.PublicKey:
		sigOID, s.hash = oidSignatureEd25519, 0
		s.verify = func(msg, sig []byte) bool { return ed25519.Verify(pk, msg, sig) }
		_, s.knownSigner = key.(ed25519.PrivateKey)
	default:
		return nil, fmt.Errorf("new signing CA: unsupported key type %T: %w", cert.PublicKey, ErrInvalidCA)
	}

	var err error
	if s.sigAlgID, err = asn1.Marshal(pkix.AlgorithmIdentifier{Algorithm: sigOID, Parameters: sigParams}); err != nil {
		return nil, fmt.Errorf("new signing CA: encode signature algorithm: %w", err)
	}
	for i, ku := range []x509.KeyUsage{
		x509.KeyUsageDigitalSignature,
		x509.KeyUsageDigitalSignature | x509.KeyUsageKeyEncipherment,
	} {
		if s.extPrefix[i], err = s.constantExtensions(ku); err != nil {
			return nil, fmt.Errorf("new signing CA: encode extensions: %w", err)
		}
	}

	// The chain a client needs above its leaf: cert and everything above
	// it. When cert is the root, that is the root alone.
	for _, c := range full {
		s.chainPEM = append(s.chainPEM, string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: c.Raw})))
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

// constantExtensions returns the DER of the leaf extensions that precede
// subjectAltName, in crypto/x509's order: keyUsage, extKeyUsage,
// basicConstraints, authorityKeyIdentifier.
func (s *SigningCA) constantExtensions(ku x509.KeyUsage) ([]byte, error) {
	// keyUsage: a BIT STRING with bit 0 first, trimmed after its last set
	// bit, exactly as x509.marshalKeyUsage does for usages in one byte.
	kuBits := reverseBits(byte(ku))
	kuDER, err := asn1.Marshal(asn1.BitString{Bytes: []byte{kuBits}, BitLength: 8 - trailingZeros(kuBits)})
	if err != nil {
		return nil, err
	}
	ekuDER, err := asn1.Marshal([]asn1.ObjectIdentifier{oidExtKeyUsageServerAuth, oidExtKeyUsageClientAuth})
	if err != nil {
		return nil, err
	}
	// BasicConstraintsValid, IsCA false, no path length: an empty SEQUENCE.
	bcDER, err := asn1.Marshal(struct{}{})
	if err != nil {
		return nil, err
	}
	exts := []pkix.Extension{
		{Id: oidExtensionKeyUsage, Critical: true, Value: kuDER},
		{Id: oidExtensionExtendedKeyUsage, Value: ekuDER},
		{Id: oidExtensionBasicConstraints, Critical: true, Value: bcDER},
	}
	// x509 adds the authority key ID only when issuer and subject differ;
	// the leaf's subject is empty.
	if len(s.cert.SubjectKeyId) > 0 && !bytes.Equal(s.issuer, emptyASN1Subject) {
		akid, err := asn1.Marshal(struct {
			ID []byte `asn1:"optional,tag:0"`
		}{s.cert.SubjectKeyId})
		if err != nil {
			return nil, err
		}
		exts = append(exts, pkix.Extension{Id: oidExtensionAuthorityKeyID, Value: akid})
	}
	var out []byte
	for _, e := range exts {
		der, err := asn1.Marshal(e)
		if err != nil {
			return nil, err
		}
		out = append(out, der...)
	}
	return out, nil
}

func reverseBits(b byte) byte {
	var r byte
	for i := 0; i < 8; i++ {
		r = r<<1 | b&1
		b >>= 1
	}
	return r
}

func trailingZeros(b byte) int {
	n := 0
	for n < 8 && b&(1<<n) == 0 {
		n++
	}
	return n
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
	if csr == nil || len(csr.RawSubjectPublicKeyInfo) == 0 {
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
	for _, name := range req.DNSNames {
		if !isIA5String(name) {
			return nil, fmt.Errorf("sign leaf: DNS name %q is not ASCII: %w", name, ErrInvalidSignRequest)
		}
	}
	for _, ip := range req.IPAddresses {
		if len(ip) != net.IPv4len && len(ip) != net.IPv6len {
			return nil, fmt.Errorf("sign leaf: IP address of %d bytes: %w", len(ip), ErrInvalidSignRequest)
		}
	}

	serial, err := randomSerial()
	if err != nil {
		return nil, fmt.Errorf("sign leaf: %w", err)
	}

	prefix := s.extPrefix[0]
	if rsaLeaf {
		prefix = s.extPrefix[1]
	}
	uri := ""
	if !req.ID.IsZero() {
		uri = req.ID.String()
	}

	b := cryptobyte.NewBuilder(make([]byte, 0, 256+len(s.issuer)+len(csr.RawSubjectPublicKeyInfo)+len(prefix)+len(uri)))
	b.AddASN1(cbasn1.SEQUENCE, func(b *cryptobyte.Builder) {
		b.AddASN1(cbasn1.Tag(0).Constructed().ContextSpecific(), func(b *cryptobyte.Builder) {
			b.AddASN1Int64(2) // v3
		})
		b.AddASN1BigInt(serial)
		b.AddBytes(s.sigAlgID)
		b.AddBytes(s.issuer)
		b.AddASN1(cbasn1.SEQUENCE, func(b *cryptobyte.Builder) {
			addASN1Time(b, notBefore)
			addASN1Time(b, notAfter)
		})
		b.AddBytes(emptyASN1Subject)
		b.AddBytes(csr.RawSubjectPublicKeyInfo)
		b.AddASN1(cbasn1.Tag(3).Constructed().ContextSpecific(), func(b *cryptobyte.Builder) {
			b.AddASN1(cbasn1.SEQUENCE, func(b *cryptobyte.Builder) {
				b.AddBytes(prefix)
				addSANExtension(b, uri, req.DNSNames, req.IPAddresses)
			})
		})
	})
	tbs, err := b.Bytes()
	if err != nil {
		return nil, fmt.Errorf("sign leaf: encode certificate: %w", err)
	}

	sig, err := s.signTBS(tbs)
	if err != nil {
		return nil, fmt.Errorf("sign leaf: %w", err)
	}

	cb := cryptobyte.NewBuilder(make([]byte, 0, len(tbs)+len(s.sigAlgID)+len(sig)+16))
	cb.AddASN1(cbasn1.SEQUENCE, func(b *cryptobyte.Builder) {
		b.AddBytes(tbs)
		b.AddBytes(s.sigAlgID)
		b.AddASN1BitString(sig)
	})
	der, err := cb.Bytes()
	if err != nil {
		return nil, fmt.Errorf("sign leaf: encode certificate: %w", err)
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

// randomSerial returns a random, positive, non-zero 128-bit serial number.
func randomSerial() (*big.Int, error) {
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

// addSANExtension appends a critical subjectAltName extension holding, in
// crypto/x509's order, the DNS names, the IP addresses (IPv4 in 4 bytes)
// and the URI, if any.
func addSANExtension(b *cryptobyte.Builder, uri string, dnsNames []string, ips []net.IP) {
	b.AddASN1(cbasn1.SEQUENCE, func(b *cryptobyte.Builder) {
		b.AddASN1ObjectIdentifier(oidExtensionSubjectAltName)
		b.AddASN1Boolean(true) // critical: the subject is empty (RFC 5280 4.2.1.6)
		b.AddASN1(cbasn1.OCTET_STRING, func(b *cryptobyte.Builder) {
			b.AddASN1(cbasn1.SEQUENCE, func(b *cryptobyte.Builder) {
				for _, name := range dnsNames {
					b.AddASN1(cbasn1.Tag(2).ContextSpecific(), func(b *cryptobyte.Builder) {
						b.AddBytes([]byte(name))
					})
				}
				for _, ip := range ips {
					if v4 := ip.To4(); v4 != nil {
						ip = v4
					}
					b.AddASN1(cbasn1.Tag(7).ContextSpecific(), func(b *cryptobyte.Builder) {
						b.AddBytes(ip)
					})
				}
				if uri != "" {
					b.AddASN1(cbasn1.Tag(6).ContextSpecific(), func(b *cryptobyte.Builder) {
						b.AddBytes([]byte(uri))
					})
				}
			})
		})
	})
}

// addASN1Time appends t (UTC, whole seconds) as encoding/asn1 does: a
// UTCTime for the years 1950 to 2049, a GeneralizedTime otherwise.
func addASN1Time(b *cryptobyte.Builder, t time.Time) {
	year := t.Year()
	if year < 0 || year > 9999 {
		b.SetError(fmt.Errorf("cannot encode time %s", t))
		return
	}
	var buf [15]byte
	out := buf[:0]
	tag := cbasn1.UTCTime
	if year < 1950 || year >= 2050 {
		tag = cbasn1.GeneralizedTime
		out = appendDigits(out, year/100)
	}
	out = appendDigits(out, year%100)
	out = appendDigits(out, int(t.Month()))
	out = appendDigits(out, t.Day())
	out = appendDigits(out, t.Hour())
	out = appendDigits(out, t.Minute())
	out = appendDigits(out, t.Second())
	out = append(out, 'Z')
	b.AddASN1(tag, func(b *cryptobyte.Builder) { b.AddBytes(out) })
}

func appendDigits(dst []byte, v int) []byte {
	return append(dst, byte('0'+v/10), byte('0'+v%10))
}

func isIA5String(s string) bool {
	for _, r := range s {
		if r > unicode.MaxASCII {
			return false
		}
	}
	return true
}
