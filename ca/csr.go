package ca

import (
	"crypto/x509"
	"encoding/asn1"
	"encoding/pem"
	"errors"
	"fmt"

	"github.com/meshca/meshca/ca/internal/x509enc"
)

// MaxCSRBytes is the largest CSR PEM accepted; larger ones are refused
// before any parsing. A real workload CSR is under 2 KiB.
const MaxCSRBytes = 64 << 10

// ErrBadCSR is wrapped by every CSR rejection (*CSRError).
var ErrBadCSR = errors.New("bad CSR")

// Reasons a CSR is refused. They are metric label values.
const (
	CSRTooLarge           = "too_large"
	CSREmpty              = "empty"
	CSRNotPEM             = "not_pem"
	CSRMalformed          = "malformed_csr"
	CSRBadSignature       = "bad_csr_signature"
	CSRRequestsCA         = "requests_ca"
	CSRForbiddenExtension = "forbidden_extension"
	CSRKeyType            = "key_type"
	CSRWeakSignature      = "weak_csr_signature"
	CSRNonCanonicalKey    = "noncanonical_key"
)

// CSRError is a refused CSR. Its message is safe to send to the client and
// to log: it names the problem, never the CSR's contents beyond that.
type CSRError struct {
	Reason string
	Detail string
}

func (e *CSRError) Error() string { return "bad CSR: " + e.Detail }

// Unwrap makes every *CSRError match ErrBadCSR.
func (e *CSRError) Unwrap() error { return ErrBadCSR }

func csrErr(reason, format string, args ...any) *CSRError {
	return &CSRError{Reason: reason, Detail: fmt.Sprintf(format, args...)}
}

// CSRFromPEM returns the DER of the one PEM CSR in pemBytes. It refuses
// input over MaxCSRBytes before looking at it.
func CSRFromPEM(pemBytes []byte) ([]byte, error) {
	switch {
	case len(pemBytes) > MaxCSRBytes:
		return nil, csrErr(CSRTooLarge, "CSR is %d bytes, the limit is %d", len(pemBytes), MaxCSRBytes)
	case len(pemBytes) == 0:
		return nil, csrErr(CSREmpty, "CSR is empty")
	}
	block, _ := pem.Decode(pemBytes)
	if block == nil {
		return nil, csrErr(CSRNotPEM, "CSR is not PEM: want a -----BEGIN CERTIFICATE REQUEST----- block")
	}
	if block.Type != "CERTIFICATE REQUEST" && block.Type != "NEW CERTIFICATE REQUEST" {
		return nil, csrErr(CSRNotPEM, "CSR PEM block is %q, want \"CERTIFICATE REQUEST\"", block.Type)
	}
	return block.Bytes, nil
}

// ParseCSR parses a DER PKCS#10 request, verifies its self-signature and
// refuses requests for CA certificates or for extensions other than
// subject alternative names, key usage and extended key usage, or with a
// key of a type meshca never accepts. It returns the key's type for the
// policy's allow-list; the identity is checked by authn.CheckCSR.
func ParseCSR(der []byte) (*x509.CertificateRequest, KeyType, error) {
	switch {
	case len(der) > MaxCSRBytes:
		return nil, "", csrErr(CSRTooLarge, "CSR is %d bytes, the limit is %d", len(der), MaxCSRBytes)
	case len(der) == 0:
		return nil, "", csrErr(CSREmpty, "CSR is empty")
	}
	csr, err := x509.ParseCertificateRequest(der)
	if err != nil {
		return nil, "", csrErr(CSRMalformed, "CSR is not a valid PKCS#10 request: %v", err)
	}
	for _, ext := range csr.Extensions {
		switch {
		case ext.Id.Equal(x509enc.OIDExtensionSubjectAltName), ext.Id.Equal(x509enc.OIDExtensionKeyUsage), ext.Id.Equal(x509enc.OIDExtensionExtendedKeyUsage):
		case ext.Id.Equal(x509enc.OIDExtensionBasicConstraints):
			var bc struct {
				IsCA bool `asn1:"optional"`
			}
			if _, err := asn1.Unmarshal(ext.Value, &bc); err == nil && bc.IsCA {
				return nil, "", csrErr(CSRRequestsCA, "CSR asks for a CA certificate (basicConstraints CA:TRUE); meshca issues workload certificates only")
			}
			return nil, "", csrErr(CSRForbiddenExtension, "CSR carries a basicConstraints extension; only subjectAltName, keyUsage and extKeyUsage are allowed")
		default:
			return nil, "", csrErr(CSRForbiddenExtension, "CSR carries extension %s; only subjectAltName, keyUsage and extKeyUsage are allowed", ext.Id)
		}
	}
	switch csr.SignatureAlgorithm {
	case x509.SHA1WithRSA, x509.ECDSAWithSHA1, x509.DSAWithSHA1, x509.MD5WithRSA, x509.MD2WithRSA:
		return nil, "", csrErr(CSRWeakSignature, "CSR is signed with %s; sign it with SHA-256 or stronger", csr.SignatureAlgorithm)
	}
	kt, err := KeyTypeOf(csr)
	if err != nil {
		return nil, "", err
	}
	// The signer copies the key's encoding into the leaf. Go's parser
	// tolerates trailing data inside it (and inside an RSA key), which
	// other parsers refuse: only the canonical encoding goes through.
	if !canonicalSPKI(csr.PublicKey, csr.RawSubjectPublicKeyInfo) {
		return nil, "", csrErr(CSRNonCanonicalKey, "CSR's public key is not in canonical DER (it carries extra or non-minimal bytes); re-create the CSR with a standard library")
	}
	// Checked last: it is the expensive step, and the checks above refuse
	// cheaply what would be refused anyway.
	if err := csr.CheckSignature(); err != nil {
		return nil, "", csrErr(CSRBadSignature, "CSR signature does not verify with its own public key")
	}
	return csr, kt, nil
}
