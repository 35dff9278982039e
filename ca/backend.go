package ca

import (
	"context"
	"crypto/x509"
	"errors"
	"math/big"
	"net"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// A Backend signs leaf certificates. The CA has already authenticated the
// caller, verified the CSR and applied policy; a Backend must not loosen any
// of that, but may shorten the validity (for example to its own NotAfter).
//
// Two shapes fit behind it. A local backend (selfsigned, plugged, or an
// upstream that minted meshca's intermediate) signs with a *SigningCA in
// process. A pass-through backend sends every CSR to an upstream CA.
//
// Optional abilities are separate interfaces found by type assertion:
// Runner for background work such as reloading files or renewing tokens.
type Backend interface {
	// Sign issues a leaf for req. An error that means "try again later"
	// (upstream down, CA not loaded yet) wraps ErrBackendUnavailable.
	Sign(ctx context.Context, req SignRequest) (*SignResponse, error)
	// TrustBundle returns the roots that issued leaves chain to, current
	// root first. Callers must not modify the certificates.
	TrustBundle(ctx context.Context) ([]*x509.Certificate, error)
}

// A Runner is a Backend (or other part) with background work. Run blocks
// until ctx is done and returns nil then, or an error if it cannot go on.
type Runner interface {
	Run(ctx context.Context) error
}

// SignRequest is a leaf to be issued.
type SignRequest struct {
	// CSR is the parsed, signature-checked request. Its public key becomes
	// the leaf's key; its other fields are ignored in favour of those below.
	CSR *x509.CertificateRequest
	// ID is the leaf's one URI SAN; the zero ID means none.
	ID spiffeid.ID
	// DNSNames and IPAddresses are only used for meshca's own serving
	// certificate; workload leaves never carry them.
	DNSNames    []string
	IPAddresses []net.IP
	// NotBefore and NotAfter are the requested validity. A backend caps
	// NotAfter at its signing certificate's NotAfter.
	NotBefore time.Time
	NotAfter  time.Time
}

// SignResponse is an issued leaf with the chain a client needs.
type SignResponse struct {
	// Leaf is the DER of the issued certificate.
	Leaf []byte
	// Serial, NotBefore and NotAfter are the leaf's, for audit and rotation.
	Serial    *big.Int
	NotBefore time.Time
	NotAfter  time.Time
	// ChainPEM is the PEM of every certificate above the leaf: intermediates
	// first, the root last. Backends precompute it; callers must not modify it.
	ChainPEM []string
	// SignedBy describes the signing CA for audit logs: its subject and
	// serial.
	SignedBy string
}

// ErrBackendUnavailable is wrapped by backend errors that a retry may cure.
var ErrBackendUnavailable = errors.New("signing backend unavailable")

// An Inspector is a Backend that can report the CA certificates it signs
// with right now, signing certificate first and root last. The CA uses it
// for expiry metrics and status; it must be cheap and safe to call often.
type Inspector interface {
	SigningChain() []*x509.Certificate
}
