package sds

import (
	"strings"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// Resource names a stream may ask for. Istio's proxies use NameDefault and
// NameRootCA; SPIRE's use NameAll, a SPIFFE ID and a trust domain ID.
const (
	// NameDefault is the workload's certificate and key (tls_certificate).
	NameDefault = "default"
	// NameRootCA is the trust bundle (validation_context).
	NameRootCA = "ROOTCA"
	// NameAll stands for the caller's own SPIFFE ID and its trust domain's
	// bundle, as in SPIRE.
	NameAll = "ALL"
)

// kind is what a resource name asks for.
type kind uint8

const (
	kindUnknown kind = iota
	// kindCert is a tls_certificate: the caller's certificate and key.
	kindCert
	// kindBundle is a validation_context: the trust bundle.
	kindBundle
	// kindForeign is another workload's SPIFFE ID or another trust
	// domain: well-formed, but not the caller's to have.
	kindForeign
)

// classify says what name asks for from a stream authenticated as id.
func classify(name string, id spiffeid.ID) kind {
	switch name {
	case NameDefault:
		return kindCert
	case NameRootCA:
		return kindBundle
	}
	if !strings.HasPrefix(name, "spiffe://") {
		return kindUnknown
	}
	switch name {
	case id.String():
		return kindCert
	case id.TrustDomain().IDString():
		return kindBundle
	}
	if _, err := spiffeid.FromString(name); err == nil {
		return kindForeign
	}
	if _, err := spiffeid.TrustDomainFromString(name); err == nil {
		return kindForeign
	}
	return kindUnknown
}

// expand replaces NameAll by the names it stands for.
func expand(names []string, id spiffeid.ID) []string {
	for i, n := range names {
		if n != NameAll {
			continue
		}
		out := make([]string, 0, len(names)+1)
		out = append(out, names[:i]...)
		out = append(out, id.String(), id.TrustDomain().IDString())
		for _, m := range names[i+1:] {
			if m != NameAll {
				out = append(out, m)
			}
		}
		return out
	}
	return names
}

// pushLabel is a name's value of the "resource" metric label: bounded,
// unlike SPIFFE IDs.
func pushLabel(name string) string {
	switch name {
	case NameDefault, NameRootCA:
		return name
	}
	if strings.Count(name, "/") > 2 {
		return "spiffe_id"
	}
	return "trust_domain"
}

// knownNames is what the log tells a stream that asked for a name meshca
// does not serve.
func knownNames(id spiffeid.ID) string {
	return NameDefault + ", " + NameRootCA + ", " + NameAll + ", " + id.String() + ", " + id.TrustDomain().IDString()
}
