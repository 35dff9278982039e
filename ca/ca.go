// Package ca is meshca's certificate authority core. Issue takes an
// authenticated caller and a CSR, checks the CSR against the caller's
// identity and the rotation policy, and has a Backend sign the leaf.
//
// The package knows nothing of gRPC: ca/service and sds turn its errors
// into status codes.
package ca

import (
	"context"
	"encoding/pem"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"math/big"
	"sync/atomic"
	"time"

	"github.com/meshca/meshca/authn"
)

// ErrBadRequest is wrapped by errors about a request's own fields (other
// than its CSR), such as a negative validity.
var ErrBadRequest = errors.New("bad request")

// A PolicySource yields the rotation policy in force. It must be cheap and
// safe for concurrent use: Issue calls it on every request.
type PolicySource interface {
	Policy() *Policy
}

// PolicyStore holds the policy in force and swaps it atomically.
type PolicyStore struct {
	p atomic.Pointer[Policy]
}

// NewPolicyStore returns a store holding p, which must be valid.
func NewPolicyStore(p *Policy) (*PolicyStore, error) {
	s := &PolicyStore{}
	if err := s.Store(p); err != nil {
		return nil, err
	}
	return s, nil
}

// Policy returns the policy in force.
func (s *PolicyStore) Policy() *Policy { return s.p.Load() }

// Store validates p and, if valid, puts it in force. An invalid p leaves
// the old policy in force.
func (s *PolicyStore) Store(p *Policy) error {
	if p == nil {
		return errors.New("policy is nil")
	}
	if err := p.Validate(); err != nil {
		return fmt.Errorf("invalid policy: %w", err)
	}
	s.p.Store(p)
	return nil
}

// Config configures a CA.
type Config struct {
	// Backend signs leaves. Required.
	Backend Backend
	// Policy yields the rotation policy. Default: built-in defaults.
	Policy PolicySource
	// Metrics records CSR rejections, clamps and issuance counts.
	// Default: unregistered metrics.
	Metrics *Metrics
	// Backdate moves NotBefore into the past to absorb clock skew between
	// meshca and relying parties. Default 30s; negative means none.
	Backdate time.Duration
	// Log receives operational logs. Default: discard.
	Log *slog.Logger
	// Now is the clock. Default time.Now.
	Now func() time.Time
}

// CA issues workload certificates.
type CA struct {
	backend  Backend
	policy   PolicySource
	metrics  *Metrics
	backdate time.Duration
	log      *slog.Logger
	now      func() time.Time
}

// New returns a CA.
func New(cfg Config) (*CA, error) {
	if cfg.Backend == nil {
		return nil, errors.New("ca: Backend is required")
	}
	if cfg.Policy == nil {
		s, err := NewPolicyStore(&Policy{})
		if err != nil {
			return nil, err
		}
		cfg.Policy = s
	}
	if cfg.Metrics == nil {
		m, err := NewMetrics(nil)
		if err != nil {
			return nil, err
		}
		cfg.Metrics = m
	}
	switch {
	case cfg.Backdate == 0:
		cfg.Backdate = 30 * time.Second
	case cfg.Backdate < 0:
		cfg.Backdate = 0
	}
	if cfg.Log == nil {
		cfg.Log = slog.New(slog.DiscardHandler)
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	return &CA{backend: cfg.Backend, policy: cfg.Policy, metrics: cfg.Metrics,
		backdate: cfg.Backdate, log: cfg.Log, now: cfg.Now}, nil
}

// IssueRequest asks for a leaf.
type IssueRequest struct {
	// Caller is the authenticated workload. Required.
	Caller *authn.Caller
	// CSR is the PEM-encoded PKCS#10 request.
	CSR []byte
	// ValiditySeconds is the requested lifetime; 0 means the policy's
	// default. Negative is an error; values outside the policy's bounds
	// are clamped (and counted).
	ValiditySeconds int64
}

// Issued is an issued leaf with everything the edges need to answer and
// audit.
type Issued struct {
	// CertPEM is the leaf.
	CertPEM string
	// ChainPEM is everything above the leaf, root last. Shared: do not
	// modify.
	ChainPEM []string
	Serial   *big.Int
	// NotBefore and NotAfter are the leaf's validity.
	NotBefore time.Time
	NotAfter  time.Time
	KeyType   KeyType
	SignedBy  string
	// Rule is the policy that applied, for the renewal schedule.
	Rule Effective
	// Clamp says whether the requested lifetime was clamped.
	Clamp Clamp
}

// Issue checks req and has the backend sign it. Errors wrap ErrBadRequest,
// ErrBadCSR (*CSRError), authn.ErrIdentityMismatch (*authn.MismatchError),
// ErrBackendUnavailable (any other backend failure is reported as this),
// or ErrInvalidSignRequest.
func (c *CA) Issue(ctx context.Context, req IssueRequest) (*Issued, error) {
	caller := req.Caller
	if caller == nil {
		return nil, errors.New("issue: no caller")
	}
	if req.ValiditySeconds < 0 {
		return nil, fmt.Errorf("%w: validity_duration is %d seconds; want 0 (policy default) or a positive number", ErrBadRequest, req.ValiditySeconds)
	}
	rule := c.policy.Policy().Resolve(caller.Namespace, caller.ServiceAccount)
	csr, kt, err := ParseCSR(req.CSR)
	if err != nil {
		var ce *CSRError
		if errors.As(err, &ce) && ce.Reason == CSRKeyType {
			err = csrErr(CSRKeyType, "%s; the policy for %s/%s allows %s", ce.Detail, caller.Namespace, caller.ServiceAccount, keyTypeList(rule.KeyTypes))
		}
		c.rejectCSR(err)
		return nil, err
	}
	if !rule.Allows(kt) {
		err := csrErr(CSRKeyType, "CSR key is %s; the policy for %s/%s allows %s", kt, caller.Namespace, caller.ServiceAccount, keyTypeList(rule.KeyTypes))
		c.rejectCSR(err)
		return nil, err
	}
	if err := authn.CheckCSR(caller, csr); err != nil {
		c.metrics.CSRRejections.WithLabelValues("identity_mismatch").Inc()
		return nil, err
	}
	ttl, clamp := rule.TTL(secondsToDuration(req.ValiditySeconds))
	if clamp != ClampNone {
		c.metrics.TTLClamps.WithLabelValues(string(clamp)).Inc()
	}
	now := c.now()
	notBefore := now.Add(-c.backdate)
	resp, err := c.backend.Sign(ctx, SignRequest{
		CSR:       csr,
		ID:        caller.ID,
		NotBefore: notBefore,
		NotAfter:  now.Add(ttl),
	})
	if err != nil {
		if ctxErr := ctx.Err(); ctxErr != nil {
			return nil, fmt.Errorf("sign: %w", ctxErr)
		}
		// A request the backend calls invalid got past every check above:
		// that is meshca's bug, not an outage, so it is not dressed up as
		// one (it surfaces as Internal).
		if !errors.Is(err, ErrBackendUnavailable) && !errors.Is(err, ErrInvalidSignRequest) {
			err = fmt.Errorf("%w: %w", ErrBackendUnavailable, err)
		}
		return nil, fmt.Errorf("sign: %w", err)
	}
	c.metrics.Issued.WithLabelValues(string(kt)).Inc()
	return &Issued{
		CertPEM:   string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: resp.Leaf})),
		ChainPEM:  resp.ChainPEM,
		Serial:    resp.Serial,
		NotBefore: resp.NotBefore,
		NotAfter:  resp.NotAfter,
		KeyType:   kt,
		SignedBy:  resp.SignedBy,
		Rule:      rule,
		Clamp:     clamp,
	}, nil
}

func (c *CA) rejectCSR(err error) {
	var ce *CSRError
	if errors.As(err, &ce) {
		c.metrics.CSRRejections.WithLabelValues(ce.Reason).Inc()
	}
}

// secondsToDuration converts without overflow: anything beyond what a
// Duration holds becomes the largest Duration, which the policy clamps.
func secondsToDuration(s int64) time.Duration {
	if s > math.MaxInt64/int64(time.Second) {
		return math.MaxInt64
	}
	return time.Duration(s) * time.Second
}
