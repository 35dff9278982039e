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

// A Backend is where meshca's signing authority comes from. It is exactly
// one of three kinds, and New refuses a value that is none of them:
//
//   - a Holder keeps a signing CA it owns (key and certificate): Istio's
//     plugged cacerts, or a self-signed root that signs leaves itself. The
//     CA signs leaves with it in process and follows its replacements.
//   - an Authority mints CA certificates for keys the CA generates and
//     keeps in memory: a self-signed root minting intermediates, or Vault
//     or AWS Private CA signing meshca's intermediate. The CA owns the
//     intermediate's key and its rotation; the Authority only signs.
//   - an Upstream signs every leaf itself, for audit regimes that want each
//     certificate recorded upstream. The CA still checks every request
//     first, and checks what comes back.
//
// Backends never sign leaves with a local key themselves: when the signer
// is local, a leaf never leaves package ca.
type Backend any

// A Holder owns a signing CA. The CA asks it for the current one once, at
// New, and then learns of replacements through Watch.
type Holder interface {
	// Current returns the signing CA and trust bundle in force now. It
	// must not block.
	Current() State
	// Watch calls publish with every replacement, in order, until ctx is
	// done, then returns nil. publish must not be called concurrently. A
	// Holder whose CA never changes just waits for ctx.
	Watch(ctx context.Context, publish func(State)) error
}

// State is what the CA signs with, and what relying parties must trust, at
// one moment. It is immutable once published.
type State struct {
	// Signing issues leaves. Nil for an Upstream.
	Signing *SigningCA
	// Roots is the trust bundle: every root a leaf issued now, or still
	// held by a workload, may chain to. The root of Signing comes first.
	Roots []*x509.Certificate
}

// An Authority mints CA certificates for keys the CA generates. The CA
// calls MintCA at New and again at each renewal point of the intermediate.
type Authority interface {
	// MintCA signs req.CSR, a request for a CA certificate (the CA sets the
	// subject and key; the Authority sets the extensions a CA needs, path
	// length 0). It may shorten the lifetime (to its own NotAfter). An
	// error that a retry may cure wraps ErrBackendUnavailable.
	MintCA(ctx context.Context, req MintRequest) (*MintedCA, error)
}

// MintRequest asks an Authority for a CA certificate.
type MintRequest struct {
	// CSR is the parsed, signature-checked request for the new CA key.
	CSR *x509.CertificateRequest
	// TTL is the lifetime wanted.
	TTL time.Duration
}

// MintedCA is a CA certificate an Authority issued, with what sits above it.
type MintedCA struct {
	// Cert is the new CA certificate, for the CSR's key.
	Cert *x509.Certificate
	// Chain is every certificate above Cert, each issued by the next, up
	// to and including the root.
	Chain []*x509.Certificate
	// Roots is the trust bundle, the root of Chain first.
	Roots []*x509.Certificate
}

// An Upstream signs every leaf itself (the direct modes of Vault and AWS
// Private CA).
type Upstream interface {
	// SignLeaf has the upstream issue a leaf for req, which the CA has
	// already checked. The CA checks the answer again (identity, no CA,
	// chain, lifetime) before anyone sees it. An error that a retry may
	// cure wraps ErrBackendUnavailable.
	SignLeaf(ctx context.Context, req SignRequest) (*UpstreamLeaf, error)
	// TrustBundle returns the roots upstream leaves chain to.
	TrustBundle(ctx context.Context) ([]*x509.Certificate, error)
}

// UpstreamLeaf is what an Upstream returned.
type UpstreamLeaf struct {
	// Leaf is the issued certificate; Chain the certificates above it,
	// root last (the root may be left out).
	Leaf  *x509.Certificate
	Chain []*x509.Certificate
}

// A Runner has background work. Run blocks until ctx is done and returns
// nil then, or an error if it cannot go on.
type Runner interface {
	Run(ctx context.Context) error
}

// SignRequest is a leaf to be issued.
type SignRequest struct {
	// CSR is the parsed, signature-checked request. Its public key becomes
	// the leaf's key; its other fields are ignored in favour of those below.
	CSR *x509.CertificateRequest
	// SPKI, if set, is the canonical DER encoding of CSR.PublicKey, which
	// the caller has checked (ParseCSR refuses any other); else the signer
	// encodes the key itself. The request's own bytes are never copied.
	SPKI []byte
	// ID is the leaf's one URI SAN; the zero ID means none.
	ID spiffeid.ID
	// DNSNames and IPAddresses are only used for meshca's own serving
	// certificate; workload leaves never carry them.
	DNSNames    []string
	IPAddresses []net.IP
	// NotBefore and NotAfter are the requested validity. The signer caps
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
	// first, the root last. Shared: callers must not modify it.
	ChainPEM []string
	// SignedBy describes the signing CA for audit logs: its subject and
	// serial.
	SignedBy string
}

// ErrBackendUnavailable is wrapped by errors that a retry may cure: the
// upstream is down, or the signing CA expired.
var ErrBackendUnavailable = errors.New("signing backend unavailable")
