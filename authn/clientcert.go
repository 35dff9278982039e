package authn

import (
	"context"
	"crypto/x509"
	"errors"
	"strings"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// ClientCertConfig configures a ClientCert authenticator.
type ClientCertConfig struct {
	// TrustDomain is the only trust domain accepted. Required.
	TrustDomain spiffeid.TrustDomain
	// Roots returns the CA's current trust bundle. Required. Every CA under
	// these roots that issues SPIFFE IDs in TrustDomain is trusted to renew
	// them: where a root is shared with other issuers (clusters sharing a
	// plugged root and trust domain), leave clientcert out of the chain.
	Roots func(ctx context.Context) ([]*x509.Certificate, error)
	// ServiceAccounts, if set, refuses renewal for a service account that
	// no longer exists, so a held certificate cannot outlive its account.
	ServiceAccounts ServiceAccountLookup
	// Now is the clock. Default time.Now.
	Now func() time.Time
}

// ClientCert lets a workload that holds an unexpired certificate from this
// CA renew the same identity without a token. A call that also carries a
// token is left to the token authenticators, so a stale certificate never
// blocks a good token.
type ClientCert struct {
	cfg ClientCertConfig
}

// NewClientCert returns a ClientCert authenticator.
func NewClientCert(cfg ClientCertConfig) (*ClientCert, error) {
	if cfg.TrustDomain.IsZero() {
		return nil, errors.New("clientcert: TrustDomain is required")
	}
	if cfg.Roots == nil {
		return nil, errors.New("clientcert: Roots is required")
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	return &ClientCert{cfg: cfg}, nil
}

// Authenticate implements Authenticator. It verifies the presented chain
// against the current roots for client authentication, then reads the
// leaf's one SPIFFE ID of the form /ns/<ns>/sa/<sa>.
func (c *ClientCert) Authenticate(ctx context.Context, creds Credentials) (*Caller, error) {
	if len(creds.PeerCertificates) == 0 || creds.Token != "" {
		return nil, ErrNoCredentials
	}
	roots, err := c.cfg.Roots(ctx)
	if err != nil {
		return nil, errors.Join(ErrUnavailable, err)
	}
	pool := x509.NewCertPool()
	for _, r := range roots {
		pool.AddCert(r)
	}
	inter := x509.NewCertPool()
	for _, ic := range creds.PeerCertificates[1:] {
		inter.AddCert(ic)
	}
	leaf := creds.PeerCertificates[0]
	now := c.cfg.Now()
	if now.After(leaf.NotAfter) {
		return nil, Fail(ReasonExpired, "client certificate expired at %s", leaf.NotAfter.UTC().Format(time.RFC3339))
	}
	if _, err := leaf.Verify(x509.VerifyOptions{
		Roots: pool, Intermediates: inter, CurrentTime: now,
		KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
	}); err != nil {
		return nil, Fail(ReasonUntrustedCert, "client certificate does not chain to this CA's roots")
	}
	if len(leaf.URIs) != 1 {
		return nil, Fail(ReasonNotServiceAccount, "client certificate must carry exactly one SPIFFE ID, it has %d URI SANs", len(leaf.URIs))
	}
	id, err := spiffeid.FromURI(leaf.URIs[0])
	if err != nil {
		return nil, Fail(ReasonNotServiceAccount, "client certificate URI SAN is not a SPIFFE ID")
	}
	if id.TrustDomain() != c.cfg.TrustDomain {
		return nil, Fail(ReasonUnknownIssuer, "client certificate is for trust domain %q, this CA serves %q", id.TrustDomain().Name(), c.cfg.TrustDomain.Name())
	}
	var ns, sa string
	if segs := strings.Split(id.Path(), "/"); len(segs) == 5 && segs[1] == "ns" && segs[3] == "sa" {
		ns, sa = segs[2], segs[4]
	}
	if ns == "" || sa == "" {
		return nil, Fail(ReasonNotServiceAccount, "client certificate identity %s is not of the form /ns/<namespace>/sa/<serviceaccount>", id)
	}
	caller := &Caller{ID: id, Namespace: ns, ServiceAccount: sa, Authenticator: "clientcert", ExpiresAt: leaf.NotAfter}
	if err := CheckServiceAccount(c.cfg.ServiceAccounts, caller); err != nil {
		return nil, err
	}
	return caller, nil
}
