package authn

import (
	"crypto/x509"
	"errors"
	"fmt"
	"strings"
)

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
func CheckCSR(caller *Caller, csr *x509.CertificateRequest) error {
	held := caller.ID.String()
	if len(csr.URIs) == 1 && len(csr.DNSNames) == 0 && len(csr.IPAddresses) == 0 &&
		len(csr.EmailAddresses) == 0 && csr.URIs[0].String() == held {
		return nil
	}
	asked := make([]string, 0, len(csr.URIs)+len(csr.DNSNames)+len(csr.IPAddresses)+len(csr.EmailAddresses))
	for _, u := range csr.URIs {
		asked = append(asked, u.String())
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
