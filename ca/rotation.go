package ca

import (
	"context"
	"crypto"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"fmt"
	"slices"
	"time"
)

// Defaults and bounds of IntermediateConfig.
const (
	DefaultIntermediateTTL           = 30 * 24 * time.Hour
	DefaultIntermediateRenewFraction = 0.5
	DefaultIntermediateKeyType       = KeyECDSAP256
	MinIntermediateTTL               = 10 * time.Minute
	// minMintWait is the least time between two mints, and the wait after
	// a failed one, so that an intermediate squeezed by an expiring root
	// (or an upstream that keeps failing) cannot make Run spin.
	minMintWait = time.Minute
)

// IntermediateConfig shapes the intermediates the CA generates and has an
// Authority sign.
type IntermediateConfig struct {
	// TTL is the lifetime asked for. Default 30 days; at least
	// MinIntermediateTTL.
	TTL time.Duration
	// RenewFraction of its lifetime passes before an intermediate is
	// replaced, in (0, 1). Default 0.5.
	RenewFraction float64
	// KeyType is the intermediate key's type, one of CAKeyTypes. Default
	// ECDSA-P256.
	KeyType KeyType
	// Subject is the subject the CA asks for. An Authority may name the
	// certificate itself.
	Subject pkix.Name
}

func (c IntermediateConfig) withDefaults() (IntermediateConfig, error) {
	if c.TTL == 0 {
		c.TTL = DefaultIntermediateTTL
	}
	if c.RenewFraction == 0 {
		c.RenewFraction = DefaultIntermediateRenewFraction
	}
	if c.KeyType == "" {
		c.KeyType = DefaultIntermediateKeyType
	}
	var errs []error
	if c.TTL < MinIntermediateTTL {
		errs = append(errs, fmt.Errorf("intermediate TTL %s is below the minimum %s", c.TTL, MinIntermediateTTL))
	}
	if c.RenewFraction <= 0 || c.RenewFraction >= 1 {
		errs = append(errs, fmt.Errorf("intermediate renew fraction %v is not in (0, 1)", c.RenewFraction))
	}
	if !slices.Contains(CAKeyTypes, c.KeyType) {
		errs = append(errs, fmt.Errorf("intermediate key type %q is not one of %s", c.KeyType, keyTypeList(CAKeyTypes)))
	}
	return c, errors.Join(errs...)
}

// IntermediateSettings are the configuration keys of the intermediate a
// remote backend (vault, awspca) signs for meshca; each backend inlines
// them into its YAML section.
type IntermediateSettings struct {
	// IntermediateTTL is the lifetime asked for; the upstream may cap it
	// (at its own NotAfter, or a mount's maximum). Default
	// DefaultIntermediateTTL (30 days); at least MinIntermediateTTL.
	IntermediateTTL time.Duration `yaml:"intermediateTTL"`
	// IntermediateRenewFraction of its life passes before the next
	// intermediate is obtained, in (0, 1). Default 0.5.
	IntermediateRenewFraction float64 `yaml:"intermediateRenewFraction"`
	// IntermediateKeyType is the intermediate key's type, one of
	// CAKeyTypes. Default ECDSA-P256.
	IntermediateKeyType KeyType `yaml:"intermediateKeyType"`
}

// Validate reports each bad field by its dotted path, path being the
// backend's section ("backend.vault.").
func (s IntermediateSettings) Validate(path string) []error {
	var errs []error
	if s.IntermediateTTL < 0 {
		errs = append(errs, fmt.Errorf("%sintermediateTTL: must not be negative (0 means the default, %s)", path, DefaultIntermediateTTL))
	} else if s.IntermediateTTL > 0 && s.IntermediateTTL < MinIntermediateTTL {
		errs = append(errs, fmt.Errorf("%sintermediateTTL: must be at least %s, got %s", path, MinIntermediateTTL, s.IntermediateTTL))
	}
	if f := s.IntermediateRenewFraction; f < 0 || f >= 1 {
		errs = append(errs, fmt.Errorf("%sintermediateRenewFraction: must be in (0, 1) (0 means the default, %v), got %v", path, DefaultIntermediateRenewFraction, f))
	}
	if k := s.IntermediateKeyType; k != "" && !slices.Contains(CAKeyTypes, k) {
		errs = append(errs, fmt.Errorf("%sintermediateKeyType: unknown key type %q, want one of %s", path, k, keyTypeList(CAKeyTypes)))
	}
	return errs
}

// WithDefaults returns s with its zero fields defaulted.
func (s IntermediateSettings) WithDefaults() IntermediateSettings {
	if s.IntermediateTTL == 0 {
		s.IntermediateTTL = DefaultIntermediateTTL
	}
	if s.IntermediateRenewFraction == 0 {
		s.IntermediateRenewFraction = DefaultIntermediateRenewFraction
	}
	if s.IntermediateKeyType == "" {
		s.IntermediateKeyType = DefaultIntermediateKeyType
	}
	return s
}

// Config is the core's IntermediateConfig for s, with subject.
func (s IntermediateSettings) Config(subject pkix.Name) IntermediateConfig {
	d := s.WithDefaults()
	return IntermediateConfig{TTL: d.IntermediateTTL, RenewFraction: d.IntermediateRenewFraction, KeyType: d.IntermediateKeyType, Subject: subject}
}

// nextMint returns how long to wait before minting the next intermediate,
// given the one in use now and whether the last mint failed. It is a pure
// function of its arguments: the renewal point is the fraction of cur's
// life, and no wait after a mint is shorter than minMintWait, so a
// squeezed or failing mint is retried, never spun on. justMinted is true
// right after a mint attempt.
func nextMint(now time.Time, cur *x509.Certificate, fraction float64, justMinted, failed bool) time.Duration {
	if failed {
		return minMintWait
	}
	wait := RenewAt(cur.NotBefore, cur.NotAfter, fraction, 0).Sub(now)
	if justMinted {
		return max(wait, minMintWait)
	}
	return max(wait, 0)
}

// rotate replaces the intermediate at each renewal point until ctx is done.
// Leaves signed by an older intermediate keep verifying: they carry it in
// their chain, and the trust bundle holds its root. A failed mint is
// logged, counted and retried a minute later; the current intermediate
// stays in use meanwhile.
func (c *CA) rotate(ctx context.Context) error {
	timer := time.NewTimer(nextMint(c.now(), c.State().Signing.Certificate(), c.inter.RenewFraction, false, false))
	defer timer.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-timer.C:
		}
		cur := c.State().Signing.Certificate()
		if wait := nextMint(c.now(), cur, c.inter.RenewFraction, false, false); wait > 0 {
			timer.Reset(wait)
			continue
		}
		s, err := c.mint(ctx)
		if err == nil {
			err = c.publish(s)
		}
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			c.metrics.Rotations.WithLabelValues("failure").Inc()
			c.log.Error("minting a new intermediate failed; keeping the current one", "not_after", cur.NotAfter, "retry_in", minMintWait, "err", err)
			timer.Reset(nextMint(c.now(), cur, c.inter.RenewFraction, true, true))
			continue
		}
		c.metrics.Rotations.WithLabelValues("success").Inc()
		next := s.Signing.Certificate()
		c.log.Info("minted intermediate", "serial", next.SerialNumber.Text(16), "not_after", next.NotAfter,
			"renew_at", RenewAt(next.NotBefore, next.NotAfter, c.inter.RenewFraction, 0))
		timer.Reset(nextMint(c.now(), next, c.inter.RenewFraction, true, false))
	}
}

// mint generates an intermediate key, has the Authority sign it, and
// returns the State that signs with it. The key never leaves memory.
func (c *CA) mint(ctx context.Context) (State, error) {
	key, err := GenerateKey(c.inter.KeyType)
	if err != nil {
		return State{}, err
	}
	csr, err := caCSR(key, c.inter.Subject)
	if err != nil {
		return State{}, err
	}
	m, err := callUpstream(c, ctx, "mint", func(ctx context.Context) (*MintedCA, error) {
		return c.authority.MintCA(ctx, MintRequest{CSR: csr, TTL: c.inter.TTL})
	})
	if err != nil {
		return State{}, fmt.Errorf("mint intermediate: %w", err)
	}
	if m == nil || m.Cert == nil {
		return State{}, errors.New("mint intermediate: the backend returned no certificate")
	}
	s, err := NewSigningCA(m.Cert, key, m.Chain)
	if err != nil {
		return State{}, fmt.Errorf("mint intermediate: the backend's certificate cannot sign: %w", err)
	}
	st := State{Signing: s, Roots: m.Roots}
	// Leaves of the intermediate being replaced must keep verifying: if
	// the upstream's root changed too, its old root stays in the bundle
	// until the next rotation.
	if old := c.state.Load(); old != nil && old.Signing != nil && !containsCert(st.Roots, old.Signing.Root()) {
		st.Roots = append(st.Roots[:len(st.Roots):len(st.Roots)], old.Signing.Root())
	}
	if err := st.check(false); err != nil {
		return State{}, fmt.Errorf("mint intermediate: %w", err)
	}
	return st, nil
}

// caCSR returns a parsed CSR for key with subject.
func caCSR(key crypto.Signer, subject pkix.Name) (*x509.CertificateRequest, error) {
	der, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{Subject: subject}, key)
	if err != nil {
		return nil, fmt.Errorf("create intermediate CSR: %w", err)
	}
	csr, err := x509.ParseCertificateRequest(der)
	if err != nil {
		return nil, fmt.Errorf("parse intermediate CSR: %w", err)
	}
	return csr, nil
}
