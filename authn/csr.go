package authn

import (
	"crypto/x509"
	"encoding/asn1"
	"errors"
	"fmt"
	"strconv"
	"strings"
)

var oidSubjectAltName = asn1.ObjectIdentifier{2, 5, 29, 17}

// rawURIs returns the URI names of csr's subjectAltName extension as
// encoded, or nil if there is none or it does not decode.
func rawURIs(csr *x509.CertificateRequest) []string {
	for _, ext := range csr.Extensions {
		if !ext.Id.Equal(oidSubjectAltName) {
			continue
		}
		var seq asn1.RawValue
		rest, err := asn1.Unmarshal(ext.Value, &seq)
		if err != nil || len(rest) != 0 || !seq.IsCompound || seq.Tag != asn1.TagSequence {
			return nil
		}
		var out []string
		for b := seq.Bytes; len(b) > 0; {
			var v asn1.RawValue
			if b, err = asn1.Unmarshal(b, &v); err != nil {
				return nil
			}
			if v.Class == asn1.ClassContextSpecific && v.Tag == 6 { // uniformResourceIdentifier
				out = append(out, string(v.Bytes))
			}
		}
		return out
	}
	return nil
}

// rawURIIs reports whether csr's only URI name is exactly want.
func rawURIIs(csr *x509.CertificateRequest, want string) bool {
	raw := rawURIs(csr)
	return len(raw) == 1 && raw[0] == want
}

// ErrIdentityMismatch is wrapped by every *MismatchError.
var ErrIdentityMismatch = errors.New("CSR does not match the caller's identity")

// MismatchError is a CSR that asks for something other than exactly the
// caller's identity. It names both sides so the operator can see which
// workload asked for what.
type MismatchError struct {
	// Held is the identity the caller proved.
	Held string
	// Asked lists every name the CSR asks for, URIs first.
	Asked []string
}

func (e *MismatchError) Error() string {
	asked := "nothing"
	if len(e.Asked) > 0 {
		asked = strings.Join(e.Asked, ", ")
	}
	return fmt.Sprintf("CSR asks for %s but the caller holds %s; the CSR's only SAN must be the caller's SPIFFE ID", asked, e.Held)
}

// Unwrap makes every *MismatchError match ErrIdentityMismatch.
func (e *MismatchError) Unwrap() error { return ErrIdentityMismatch }

// CheckCSR reports whether csr asks for exactly the caller's identity: one
// URI SAN equal to caller.ID, and no DNS, IP or email SANs. The subject is
// not checked: issued leaves carry an empty subject whatever it says.
//
// The URI is compared byte for byte as the CSR encodes it, not as a parsed
// URL: a parser normalises (a SPIFFE:// scheme, an empty #fragment), and
// what is signed must be exactly what was checked.
func CheckCSR(caller *Caller, csr *x509.CertificateRequest) error {
	held := caller.ID.String()
	if len(csr.URIs) == 1 && len(csr.DNSNames) == 0 && len(csr.IPAddresses) == 0 &&
		len(csr.EmailAddresses) == 0 && csr.URIs[0].String() == held && rawURIIs(csr, held) {
		return nil
	}
	asked := make([]string, 0, len(csr.URIs)+len(csr.DNSNames)+len(csr.IPAddresses)+len(csr.EmailAddresses))
	if raw := rawURIs(csr); len(raw) == len(csr.URIs) {
		for _, u := range raw {
			asked = append(asked, strconv.Quote(u)[1:len(strconv.Quote(u))-1])
		}
	} else {
		for _, u := range csr.URIs {
			asked = append(asked, u.String())
		}
	}
	for _, d := range csr.DNSNames {
		asked = append(asked, "DNS:"+d)
	}
	for _, ip := range csr.IPAddresses {
		asked = append(asked, "IP:"+ip.String())
	}
	for _, m := range csr.EmailAddresses {
		asked = append(asked, "email:"+m)
	}
	return &MismatchError{Held: held, Asked: asked}
}
