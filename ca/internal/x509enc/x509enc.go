// Package x509enc builds the DER of leaf certificates by hand, with
// cryptobyte, from constants computed once per signing CA. It exists for
// speed: x509.CreateCertificate re-verifies every signature it makes, which
// costs more than the signature itself. Its output is byte-for-byte the
// TBSCertificate that x509.CreateCertificate produces for the equivalent
// template; the tests beside it hold it to that.
//
// The package encodes only. Choosing the validity, the serial and the key,
// and signing, are the caller's (ca.SigningCA).
package x509enc

import (
	"bytes"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/asn1"
	"fmt"
	"math/big"
	"math/bits"
	"net"
	"time"
	"unicode"

	"golang.org/x/crypto/cryptobyte"
	cbasn1 "golang.org/x/crypto/cryptobyte/asn1"
)

// Object identifiers meshca reads or writes, as in crypto/x509. This is the
// one table: the CSR checks in package ca use it too.
var (
	OIDSignatureECDSAWithSHA256 = asn1.ObjectIdentifier{1, 2, 840, 10045, 4, 3, 2}
	OIDSignatureECDSAWithSHA384 = asn1.ObjectIdentifier{1, 2, 840, 10045, 4, 3, 3}
	OIDSignatureECDSAWithSHA512 = asn1.ObjectIdentifier{1, 2, 840, 10045, 4, 3, 4}
	OIDSignatureSHA256WithRSA   = asn1.ObjectIdentifier{1, 2, 840, 113549, 1, 1, 11}
	OIDSignatureEd25519         = asn1.ObjectIdentifier{1, 3, 101, 112}

	OIDExtensionKeyUsage         = asn1.ObjectIdentifier{2, 5, 29, 15}
	OIDExtensionExtendedKeyUsage = asn1.ObjectIdentifier{2, 5, 29, 37}
	OIDExtensionBasicConstraints = asn1.ObjectIdentifier{2, 5, 29, 19}
	OIDExtensionAuthorityKeyID   = asn1.ObjectIdentifier{2, 5, 29, 35}
	OIDExtensionSubjectAltName   = asn1.ObjectIdentifier{2, 5, 29, 17}

	OIDExtKeyUsageServerAuth = asn1.ObjectIdentifier{1, 3, 6, 1, 5, 5, 7, 3, 1}
	OIDExtKeyUsageClientAuth = asn1.ObjectIdentifier{1, 3, 6, 1, 5, 5, 7, 3, 2}
)

// emptySubject is the DER of an empty Name: an empty SEQUENCE.
var emptySubject = []byte{0x30, 0x00}

// An Issuer holds the DER pieces every leaf of one CA shares. It is
// immutable and safe for concurrent use.
type Issuer struct {
	sigAlgID  []byte    // DER AlgorithmIdentifier, used twice in each leaf
	issuer    []byte    // DER Name: the CA's RawSubject
	extPrefix [2][]byte // DER extensions before subjectAltName; [1] for RSA leaves
}

// NewIssuer precomputes the constants for leaves signed by ca with the
// signature algorithm sigOID (and its parameters, NULL for RSA).
func NewIssuer(ca *x509.Certificate, sigOID asn1.ObjectIdentifier, sigParams asn1.RawValue) (*Issuer, error) {
	e := &Issuer{issuer: ca.RawSubject}
	var err error
	if e.sigAlgID, err = asn1.Marshal(pkix.AlgorithmIdentifier{Algorithm: sigOID, Parameters: sigParams}); err != nil {
		return nil, fmt.Errorf("encode signature algorithm: %w", err)
	}
	for i, ku := range []x509.KeyUsage{
		x509.KeyUsageDigitalSignature,
		x509.KeyUsageDigitalSignature | x509.KeyUsageKeyEncipherment,
	} {
		if e.extPrefix[i], err = constantExtensions(ca, ku); err != nil {
			return nil, fmt.Errorf("encode extensions: %w", err)
		}
	}
	return e, nil
}

// constantExtensions returns the DER of the leaf extensions that precede
// subjectAltName, in crypto/x509's order: keyUsage, extKeyUsage,
// basicConstraints, authorityKeyIdentifier.
func constantExtensions(ca *x509.Certificate, ku x509.KeyUsage) ([]byte, error) {
	// keyUsage: a BIT STRING with bit 0 first, trimmed after its last set
	// bit, exactly as x509.marshalKeyUsage does for usages in one byte.
	kuBits := bits.Reverse8(uint8(ku))
	kuDER, err := asn1.Marshal(asn1.BitString{Bytes: []byte{kuBits}, BitLength: 8 - bits.TrailingZeros8(kuBits)})
	if err != nil {
		return nil, err
	}
	ekuDER, err := asn1.Marshal([]asn1.ObjectIdentifier{OIDExtKeyUsageServerAuth, OIDExtKeyUsageClientAuth})
	if err != nil {
		return nil, err
	}
	// BasicConstraintsValid, IsCA false, no path length: an empty SEQUENCE.
	bcDER, err := asn1.Marshal(struct{}{})
	if err != nil {
		return nil, err
	}
	exts := []pkix.Extension{
		{Id: OIDExtensionKeyUsage, Critical: true, Value: kuDER},
		{Id: OIDExtensionExtendedKeyUsage, Value: ekuDER},
		{Id: OIDExtensionBasicConstraints, Critical: true, Value: bcDER},
	}
	// x509 adds the authority key ID only when issuer and subject differ;
	// the leaf's subject is empty.
	if len(ca.SubjectKeyId) > 0 && !bytes.Equal(ca.RawSubject, emptySubject) {
		akid, err := asn1.Marshal(struct {
			ID []byte `asn1:"optional,tag:0"`
		}{ca.SubjectKeyId})
		if err != nil {
			return nil, err
		}
		exts = append(exts, pkix.Extension{Id: OIDExtensionAuthorityKeyID, Value: akid})
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

// Leaf is what varies between two leaves of one Issuer.
type Leaf struct {
	Serial *big.Int
	// NotBefore and NotAfter must be UTC whole seconds.
	NotBefore, NotAfter time.Time
	// SPKI is the DER SubjectPublicKeyInfo, copied verbatim: the caller
	// must have checked it is canonical.
	SPKI []byte
	// RSA selects the key usage RSA keys get (keyEncipherment too).
	RSA bool
	// URI, DNSNames and IPAddresses go into a critical subjectAltName.
	URI         string
	DNSNames    []string
	IPAddresses []net.IP
}

// TBS returns the DER TBSCertificate of l: v3, an empty subject, the
// constant extensions and the subjectAltName. DNS names must be ASCII and
// IP addresses 4 or 16 bytes; CheckNames says whether they are.
func (e *Issuer) TBS(l Leaf) ([]byte, error) {
	prefix := e.extPrefix[0]
	if l.RSA {
		prefix = e.extPrefix[1]
	}
	b := cryptobyte.NewBuilder(make([]byte, 0, 256+len(e.issuer)+len(l.SPKI)+len(prefix)+len(l.URI)))
	b.AddASN1(cbasn1.SEQUENCE, func(b *cryptobyte.Builder) {
		b.AddASN1(cbasn1.Tag(0).Constructed().ContextSpecific(), func(b *cryptobyte.Builder) {
			b.AddASN1Int64(2) // v3
		})
		b.AddASN1BigInt(l.Serial)
		b.AddBytes(e.sigAlgID)
		b.AddBytes(e.issuer)
		b.AddASN1(cbasn1.SEQUENCE, func(b *cryptobyte.Builder) {
			addTime(b, l.NotBefore)
			addTime(b, l.NotAfter)
		})
		b.AddBytes(emptySubject)
		b.AddBytes(l.SPKI)
		b.AddASN1(cbasn1.Tag(3).Constructed().ContextSpecific(), func(b *cryptobyte.Builder) {
			b.AddASN1(cbasn1.SEQUENCE, func(b *cryptobyte.Builder) {
				b.AddBytes(prefix)
				addSAN(b, l.URI, l.DNSNames, l.IPAddresses)
			})
		})
	})
	tbs, err := b.Bytes()
	if err != nil {
		return nil, fmt.Errorf("encode certificate: %w", err)
	}
	return tbs, nil
}

// Certificate wraps a TBSCertificate and its signature into the DER of a
// Certificate.
func (e *Issuer) Certificate(tbs, sig []byte) ([]byte, error) {
	b := cryptobyte.NewBuilder(make([]byte, 0, len(tbs)+len(e.sigAlgID)+len(sig)+16))
	b.AddASN1(cbasn1.SEQUENCE, func(b *cryptobyte.Builder) {
		b.AddBytes(tbs)
		b.AddBytes(e.sigAlgID)
		b.AddASN1BitString(sig)
	})
	der, err := b.Bytes()
	if err != nil {
		return nil, fmt.Errorf("encode certificate: %w", err)
	}
	return der, nil
}

// CheckNames returns an error if a DNS name is not ASCII or an IP address
// is neither 4 nor 16 bytes: the encoder would write them, but not as
// crypto/x509 does.
func CheckNames(dnsNames []string, ips []net.IP) error {
	for _, name := range dnsNames {
		for _, r := range name {
			if r > unicode.MaxASCII {
				return fmt.Errorf("DNS name %q is not ASCII", name)
			}
		}
	}
	for _, ip := range ips {
		if len(ip) != net.IPv4len && len(ip) != net.IPv6len {
			return fmt.Errorf("IP address of %d bytes", len(ip))
		}
	}
	return nil
}

// addSAN appends a critical subjectAltName extension holding, in
// crypto/x509's order, the DNS names, the IP addresses (IPv4 in 4 bytes)
// and the URI, if any.
func addSAN(b *cryptobyte.Builder, uri string, dnsNames []string, ips []net.IP) {
	b.AddASN1(cbasn1.SEQUENCE, func(b *cryptobyte.Builder) {
		b.AddASN1ObjectIdentifier(OIDExtensionSubjectAltName)
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

// addTime appends t (UTC, whole seconds) as encoding/asn1 does: a UTCTime
// for the years 1950 to 2049, a GeneralizedTime otherwise.
func addTime(b *cryptobyte.Builder, t time.Time) {
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
