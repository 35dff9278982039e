package authn

import (
	"context"
	"crypto/x509"
	"errors"
	"fmt"
	"strings"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"

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
	// Verifications, if set, counts chain verifications: one per client
	// connection (and bundle), not one per request.
	Verifications prometheus.Counter
}

// issueSkew is how far before its issue a leaf's NotBefore may lie: meshca
// back-dates it 30s, and creation timestamps have whole seconds.
const issueSkew = 31 * time.Second

// maxVerified bounds the remembered chain verifications.
const maxVerified = 4096

// ClientCert lets a workload that holds an unexpired certificate from this
// CA renew the same identity without a token. A call that also carries a
// token is left to the token authenticators, so a stale certificate never
// blocks a good token.
type ClientCert struct {
	cfg ClientCertConfig

	mu sync.Mutex
	// verified remembers, per client leaf (the same *x509.Certificate for
	// every request on a TLS connection), whether its chain verified
	// against a bundle (identified by its first root and length). A chain
	// is verified once per connection: a peer cannot make meshca verify
	// an expensive chain on every request.
	verified map[*x509.Certificate]verdict
	order    []*x509.Certificate
}

type verdict struct {
	root *x509.Certificate
	n    int
	ok   bool
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
	leaf := creds.PeerCertificates[0]
	now := c.cfg.Now()
	if now.After(leaf.NotAfter) {
		return nil, Fail(ReasonExpired, "client certificate expired at %s", leaf.NotAfter.UTC().Format(time.RFC3339))
	}
	if !c.verify(creds.PeerCertificates, roots, now) {
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
	// A certificate carries no account UID: one issued before the account
	// was (re-)created belongs to an earlier account of the same name.
	if cl, ok := c.cfg.ServiceAccounts.(ServiceAccountCreation); ok {
		created, found, err := cl.ServiceAccountCreated(ns, sa)
		if err != nil {
			return nil, fmt.Errorf("check service account: %w", err)
		}
		if found && created.After(leaf.NotBefore.Add(issueSkew)) {
			return nil, Fail(ReasonServiceAccountGone, "client certificate was issued before service account %s/%s was created (at %s); authenticate with a token",
				ns, sa, created.UTC().Format(time.RFC3339))
		}
	}
	return caller, nil
}

// verify reports whether chain verifies for client authentication against
// roots at now, remembering the answer for the chain's connection.
// Expiry is checked by the caller on every request, so a remembered
// verdict never outlives the leaf.
func (c *ClientCert) verify(chain, roots []*x509.Certificate, now time.Time) bool {
	leaf := chain[0]
	var first *x509.Certificate
	if len(roots) > 0 {
		first = roots[0]
	}
	c.mu.Lock()
	v, ok := c.verified[leaf]
	c.mu.Unlock()
	if ok && v.root == first && v.n == len(roots) {
		return v.ok
	}
	pool := x509.NewCertPool()
	for _, r := range roots {
		pool.AddCert(r)
	}
	inter := x509.NewCertPool()
	for _, ic := range chain[1:] {
		inter.AddCert(ic)
	}
	_, err := leaf.Verify(x509.VerifyOptions{
		Roots: pool, Intermediates: inter, CurrentTime: now,
		KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
	})
	if c.cfg.Verifications != nil {
		c.cfg.Verifications.Inc()
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.verified == nil {
		c.verified = map[*x509.Certificate]verdict{}
	}
	if _, known := c.verified[leaf]; !known {
		if len(c.order) >= maxVerified {
			delete(c.verified, c.order[0])
			c.order = c.order[1:]
		}
		c.order = append(c.order, leaf)
	}
	c.verified[leaf] = verdict{root: first, n: len(roots), ok: err == nil}
	return err == nil
}
