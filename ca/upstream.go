package ca

import (
	"context"
	"crypto"
	"crypto/x509"
	"errors"
	"fmt"
	"time"
)

// upstreamLifetimeSlack is how far an upstream leaf's validity may stray
// from what was asked: upstreams round, back-date or cap at their own
// NotAfter within this.
const upstreamLifetimeSlack = 5 * time.Minute

// signUpstream has the Upstream sign req and hands out the leaf only if it
// is what was asked for. A wrong leaf is an outage of the upstream: the
// caller gets ErrBackendUnavailable, the log says what was wrong.
func (c *CA) signUpstream(ctx context.Context, req SignRequest) (*SignResponse, error) {
	release, err := c.acquireUpstream(ctx)
	if err != nil {
		return nil, fmt.Errorf("sign upstream: %w", err)
	}
	defer release()
	roots := c.State().Roots
	got, err := callUpstream(c, ctx, "sign", func(ctx context.Context) (*UpstreamLeaf, error) {
		got, err := c.upstream.SignLeaf(ctx, req)
		if err != nil {
			return nil, err
		}
		if err := checkUpstreamLeaf(req, got, roots, c.now()); err != nil {
			return nil, &wrongLeafError{err}
		}
		return got, nil
	})
	var wrong *wrongLeafError
	switch {
	case err == nil:
	case ctx.Err() != nil:
		return nil, fmt.Errorf("sign: %w", err)
	case errors.As(err, &wrong):
		c.log.Error("the upstream CA returned a wrong certificate; it was not handed out", "id", req.ID.String(), "err", wrong.err)
		return nil, fmt.Errorf("sign upstream: %w: %w", err, ErrBackendUnavailable)
	default:
		// As for a local signer, a request the upstream calls invalid is
		// meshca's bug, not an outage.
		if !errors.Is(err, ErrBackendUnavailable) && !errors.Is(err, ErrInvalidSignRequest) {
			err = fmt.Errorf("%w: %w", ErrBackendUnavailable, err)
		}
		return nil, fmt.Errorf("sign upstream: %w", err)
	}
	chain := got.Chain
	if n := len(chain); n == 0 || !containsCert(roots, chain[n-1]) {
		// Clients want the root last; add the one the leaf chains to.
		if r := rootOf(got, roots); r != nil {
			chain = append(chain[:n:n], r)
		}
	}
	chainPEM := make([]string, len(chain))
	for i, cert := range chain {
		chainPEM[i] = certPEM(cert.Raw)
	}
	signedBy := "upstream"
	if len(chain) > 0 {
		signedBy = fmt.Sprintf("%s serial=%x", chain[0].Subject, chain[0].SerialNumber)
	}
	return &SignResponse{Leaf: got.Leaf.Raw, Serial: got.Leaf.SerialNumber, NotBefore: got.Leaf.NotBefore,
		NotAfter: got.Leaf.NotAfter, ChainPEM: chainPEM, SignedBy: signedBy}, nil
}

// checkUpstreamLeaf checks that an upstream leaf carries exactly the names
// asked for, the CSR's key, no CA powers, a lifetime within
// upstreamLifetimeSlack of the one asked for, and chains to roots.
func checkUpstreamLeaf(req SignRequest, got *UpstreamLeaf, roots []*x509.Certificate, now time.Time) error {
	if got == nil || got.Leaf == nil {
		return errors.New("no certificate")
	}
	l := got.Leaf
	switch {
	case l.IsCA:
		return errors.New("the leaf is a CA certificate")
	case len(l.EmailAddresses) > 0:
		return fmt.Errorf("the leaf carries email SANs %q", l.EmailAddresses)
	case len(l.DNSNames) != len(req.DNSNames), len(l.IPAddresses) != len(req.IPAddresses):
		return fmt.Errorf("the leaf carries DNS SANs %q and IP SANs %v; asked for %q and %v", l.DNSNames, l.IPAddresses, req.DNSNames, req.IPAddresses)
	}
	wantURIs := 0
	if !req.ID.IsZero() {
		wantURIs = 1
	}
	if len(l.URIs) != wantURIs || (wantURIs == 1 && l.URIs[0].String() != req.ID.String()) {
		return fmt.Errorf("the leaf carries URI SANs %v; asked for %q", l.URIs, req.ID.String())
	}
	for i, n := range req.DNSNames {
		if l.DNSNames[i] != n {
			return fmt.Errorf("the leaf carries DNS SANs %q; asked for %q", l.DNSNames, req.DNSNames)
		}
	}
	for i, ip := range req.IPAddresses {
		if !l.IPAddresses[i].Equal(ip) {
			return fmt.Errorf("the leaf carries IP SANs %v; asked for %v", l.IPAddresses, req.IPAddresses)
		}
	}
	if pub, ok := l.PublicKey.(interface{ Equal(crypto.PublicKey) bool }); !ok || !pub.Equal(req.CSR.PublicKey) {
		return errors.New("the leaf's public key is not the CSR's")
	}
	// An upstream caps a leaf at its issuing CA's NotAfter, as a local
	// signer does.
	wantNotAfter := req.NotAfter
	if len(got.Chain) > 0 && got.Chain[0].NotAfter.Before(wantNotAfter) {
		wantNotAfter = got.Chain[0].NotAfter
	}
	if d := l.NotAfter.Sub(wantNotAfter); d > upstreamLifetimeSlack || d < -upstreamLifetimeSlack {
		return fmt.Errorf("the leaf expires at %s; asked for %s", l.NotAfter.UTC().Format(time.RFC3339), wantNotAfter.UTC().Format(time.RFC3339))
	}
	if d := l.NotBefore.Sub(req.NotBefore); d > upstreamLifetimeSlack {
		return fmt.Errorf("the leaf is valid from %s; asked for %s", l.NotBefore.UTC().Format(time.RFC3339), req.NotBefore.UTC().Format(time.RFC3339))
	}
	pool, inter := x509.NewCertPool(), x509.NewCertPool()
	for _, r := range roots {
		pool.AddCert(r)
	}
	for _, c := range got.Chain {
		inter.AddCert(c)
	}
	if _, err := l.Verify(x509.VerifyOptions{Roots: pool, Intermediates: inter, CurrentTime: now,
		KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}}); err != nil {
		return fmt.Errorf("the leaf does not chain to the trust bundle: %w", err)
	}
	return nil
}

// wrongLeafError is an upstream's answer that failed checkUpstreamLeaf.
type wrongLeafError struct{ err error }

func (e *wrongLeafError) Error() string {
	return "the upstream CA returned a certificate meshca did not ask for: " + e.err.Error()
}
func (e *wrongLeafError) Unwrap() error { return e.err }

// rootOf returns the root in roots that issued the top of got's chain.
func rootOf(got *UpstreamLeaf, roots []*x509.Certificate) *x509.Certificate {
	top := got.Leaf
	if n := len(got.Chain); n > 0 {
		top = got.Chain[n-1]
	}
	for _, r := range roots {
		if top.CheckSignatureFrom(r) == nil {
			return r
		}
	}
	return nil
}
