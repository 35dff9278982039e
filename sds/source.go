package sds

import (
	"crypto"
	"crypto/x509"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// Credential is a workload's certificate chain and private key. It is
// immutable once published.
type Credential struct {
	// ID is the SPIFFE ID the leaf carries.
	ID spiffeid.ID
	// Chain is the leaf first, then the intermediates above it; never the
	// root.
	Chain []*x509.Certificate
	// Key is the leaf's private key. It never leaves memory.
	Key crypto.Signer
	// RenewAt is when a newer credential replaces this one.
	RenewAt time.Time
}

// Leaf returns the credential's certificate.
func (c *Credential) Leaf() *x509.Certificate { return c.Chain[0] }

// Bundle is the trust bundle of one trust domain. It is immutable once
// published.
type Bundle struct {
	TrustDomain spiffeid.TrustDomain
	// Roots are the CA certificates to trust, in a stable order.
	Roots []*x509.Certificate
}

// Snapshot is everything one workload is served.
type Snapshot struct {
	// Credential is nil until the first one is issued.
	Credential *Credential
	Bundle     Bundle
}

// A Source is one workload's secrets, kept current: meshca agent's keeper
// is one. It must be safe for concurrent use.
type Source interface {
	// Watch returns the snapshot in force and a channel that is closed once
	// a newer snapshot is in force.
	Watch() (Snapshot, <-chan struct{})
}
