// Package ca is meshca's certificate authority core. It owns the signing
// CA: it follows a Holder's replacements, or generates and rotates an
// intermediate that an Authority mints, or checks what an Upstream signs.
// Issue takes an authenticated caller and a CSR, checks the CSR against the
// caller's identity and the rotation policy, and signs the leaf. Subscribe
// tells the delivery edges when the trust bundle or the signing CA changed.
//
// The package knows nothing of gRPC: ca/service and sds turn its errors
// into status codes.
package ca

import (
	"bytes"
	"context"
	"crypto"
	"crypto/rand"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"math/big"
	"net/url"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/meshca/meshca/authn"
)

// ErrBadRequest is wrapped by errors about a request's own fields (other
// than its CSR), such as a negative lifetime.
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
	// Backend is a Holder, an Authority or an Upstream. Required.
	Backend Backend
	// Intermediate configures the intermediates the CA generates when the
	// Backend is an Authority. Ignored otherwise.
	Intermediate IntermediateConfig
	// Policy yields the rotation policy. Default: built-in defaults.
	Policy PolicySource
	// Metrics records CSR rejections, clamps, issuance counts and
	// intermediate rotations. Default: unregistered metrics.
	Metrics *Metrics
	// Backdate moves NotBefore into the past to absorb clock skew between
	// meshca and relying parties. Default 30s; negative means none.
	Backdate time.Duration
	// BundleRefresh is how often the trust bundle of an Upstream, or of an
	// Authority that is also a BundleSource, is fetched again; a change
	// is published like a rotation. It is also the upstream's health
	// probe. Default DefaultBundleRefresh.
	BundleRefresh time.Duration
	// MaxUpstreamInFlight bounds the SignLeaf calls in flight to an
	// Upstream; a request that finds no slot waits for one until its
	// context ends. Default DefaultMaxUpstreamInFlight.
	MaxUpstreamInFlight int
	// UpstreamTimeout bounds each call to an Authority or Upstream.
	// Default DefaultUpstreamTimeout.
	UpstreamTimeout time.Duration
	// Log receives operational logs. Default: discard.
	Log *slog.Logger
	// Now is the clock. Default time.Now.
	Now func() time.Time
}

// CA issues workload certificates. It is safe for concurrent use; Run must
// be called (once) for the signing CA to stay current.
type CA struct {
	holder    Holder
	authority Authority
	upstream  Upstream
	inter     IntermediateConfig
	policy    PolicySource
	metrics   *Metrics
	backdate  time.Duration
	log       *slog.Logger
	now       func() time.Time

	state atomic.Pointer[State]
	// leavesUntil is the latest NotAfter (Unix seconds) of any leaf signed
	// under the signing CA in force; publish hands it to subscribers as
	// Change.OldLeavesUntil and starts over.
	leavesUntil     atomic.Int64
	bundleRefresh   time.Duration
	upstreamTimeout time.Duration
	// upstreamSlots bounds SignLeaf calls in flight.
	upstreamSlots chan struct{}
	// health is the upstream's last known state (see health.go).
	health health

	// mu orders publications: subscribers see changes one at a time, in
	// the order they were made.
	mu     sync.Mutex
	subs   map[int]func(Change)
	nextID int
}

// New returns a CA holding its first signing state: the Holder's current
// one, an intermediate minted by the Authority (the reason for ctx), or the
// Upstream's trust bundle.
func New(ctx context.Context, cfg Config) (*CA, error) {
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
		cfg.Metrics = NewMetrics(nil)
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
	if cfg.BundleRefresh <= 0 {
		cfg.BundleRefresh = DefaultBundleRefresh
	}
	if cfg.MaxUpstreamInFlight <= 0 {
		cfg.MaxUpstreamInFlight = DefaultMaxUpstreamInFlight
	}
	if cfg.UpstreamTimeout <= 0 {
		cfg.UpstreamTimeout = DefaultUpstreamTimeout
	}
	c := &CA{policy: cfg.Policy, metrics: cfg.Metrics, backdate: cfg.Backdate, log: cfg.Log, now: cfg.Now,
		subs: map[int]func(Change){}, bundleRefresh: cfg.BundleRefresh, upstreamTimeout: cfg.UpstreamTimeout,
		upstreamSlots: make(chan struct{}, cfg.MaxUpstreamInFlight)}

	var first State
	switch b := cfg.Backend.(type) {
	case Holder:
		c.holder = b
		first = b.Current()
	case Authority:
		inter, err := cfg.Intermediate.withDefaults()
		if err != nil {
			return nil, fmt.Errorf("ca: %w", err)
		}
		c.authority, c.inter = b, inter
		s, err := c.mint(ctx)
		if err != nil {
			return nil, fmt.Errorf("ca: first intermediate: %w", err)
		}
		first = s
	case Upstream:
		c.upstream = b
		roots, err := c.fetchBundle(ctx, b)
		if err != nil {
			return nil, fmt.Errorf("ca: upstream trust bundle: %w", err)
		}
		first = State{Roots: roots}
	default:
		return nil, fmt.Errorf("ca: backend %T is none of Holder, Authority or Upstream", cfg.Backend)
	}
	if err := first.check(c.upstream != nil); err != nil {
		return nil, fmt.Errorf("ca: %w", err)
	}
	c.state.Store(&first)
	return c, nil
}

// State returns what the CA signs with and trusts now. It does not block.
func (c *CA) State() State { return *c.state.Load() }

// Change is one replacement of the CA's State.
type Change struct {
	Old, New State
	// SigningChanged says leaves are now signed by another CA certificate;
	// BundleChanged says the trust bundle differs.
	SigningChanged, BundleChanged bool
	// OldLeavesUntil is, when SigningChanged, the latest NotAfter of the
	// leaves this process signed under Old's signing CA (zero if none):
	// until then, relying parties must still trust Old's roots.
	OldLeavesUntil time.Time
}

// Subscribe calls fn with every later change of State, in order, until
// cancel is called. fn runs on the publishing goroutine and must not block
// or call back into Subscribe; the new State is already in force when it
// runs.
func (c *CA) Subscribe(fn func(Change)) (cancel func()) {
	c.mu.Lock()
	defer c.mu.Unlock()
	id := c.nextID
	c.nextID++
	c.subs[id] = fn
	return func() {
		c.mu.Lock()
		defer c.mu.Unlock()
		delete(c.subs, id)
	}
}

// publish puts s in force and tells the subscribers. A State equal to the
// one in force is not a change.
func (c *CA) publish(s State) error {
	if err := s.check(c.upstream != nil); err != nil {
		return err
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	old := *c.state.Load()
	ch := Change{Old: old, New: s, SigningChanged: !sameSigning(old.Signing, s.Signing), BundleChanged: !sameCerts(old.Roots, s.Roots)}
	if !ch.SigningChanged && !ch.BundleChanged {
		return nil
	}
	if ch.SigningChanged {
		if u := c.leavesUntil.Swap(0); u != 0 {
			ch.OldLeavesUntil = time.Unix(u, 0)
		}
	}
	c.state.Store(&s)
	for _, fn := range c.subs {
		fn(ch)
	}
	return nil
}

// Run keeps the signing state current until ctx is done, then returns nil:
// it follows a Holder's replacements, or rotates the intermediate an
// Authority mints (see nextMint). With an Upstream it only waits.
func (c *CA) Run(ctx context.Context) error {
	switch {
	case c.holder != nil:
		return c.holder.Watch(ctx, func(s State) {
			if err := c.publish(s); err != nil {
				c.log.Error("backend published an unusable signing state; keeping the current one", "err", err)
			}
		})
	case c.authority != nil:
		if src, ok := c.authority.(BundleSource); ok {
			go c.refreshBundle(ctx, src)
		}
		return c.rotate(ctx)
	}
	c.refreshBundle(ctx, c.upstream)
	return nil
}

// IssueRequest asks for a leaf.
type IssueRequest struct {
	// Caller is the authenticated workload. Required.
	Caller *authn.Caller
	// CSR is the DER of a PKCS#10 request.
	CSR []byte
	// Lifetime is the requested lifetime; 0 means the policy's default.
	// Negative is an error; values outside the policy's bounds are clamped
	// (and counted).
	Lifetime time.Duration
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
	// RenewAt is when the holder should replace the leaf: RenewAt over
	// the leaf's life counted from the moment it was issued, not from
	// its back-dated NotBefore (which, for short lifetimes, would put the
	// renewal point in the past).
	RenewAt time.Time
	// Clamp says whether the requested lifetime was clamped.
	Clamp Clamp
}

// Issue checks req and signs it. Errors wrap ErrBadRequest, ErrBadCSR
// (*CSRError), authn.ErrIdentityMismatch (*authn.MismatchError),
// ErrBackendUnavailable (any other signing failure is reported as this),
// or ErrInvalidSignRequest.
func (c *CA) Issue(ctx context.Context, req IssueRequest) (*Issued, error) {
	caller := req.Caller
	if caller == nil {
		return nil, errors.New("issue: no caller")
	}
	if req.Lifetime < 0 {
		return nil, fmt.Errorf("%w: requested lifetime %s is negative; want 0 (policy default) or more", ErrBadRequest, req.Lifetime)
	}
	rule := c.policy.Policy().Resolve(caller.Namespace, caller.ServiceAccount)
	csr, kt, err := ParseCSR(req.CSR)
	if err != nil {
		var ce *CSRError
		if errors.As(err, &ce) && ce.Reason == CSRKeyType {
			err = csrErr(CSRKeyType, "%s; the policy for %s/%s allows %s", ce.Detail, caller.Namespace, caller.ServiceAccount, keyTypeList(rule.KeyTypes))
		}
		c.RejectCSR(err)
		return nil, err
	}
	if !rule.Allows(kt) {
		err := csrErr(CSRKeyType, "CSR key is %s; the policy for %s/%s allows %s", kt, caller.Namespace, caller.ServiceAccount, keyTypeList(rule.KeyTypes))
		c.RejectCSR(err)
		return nil, err
	}
	if err := authn.CheckCSR(caller, csr); err != nil {
		c.metrics.CSRRejections.WithLabelValues("identity_mismatch").Inc()
		return nil, err
	}
	return c.issue(ctx, caller, rule, csr, kt, req.Lifetime)
}

// IssueKey issues a leaf for caller over key, a key meshca generated itself
// (central SDS): there is no CSR to check, and the leaf carries the
// caller's identity by construction. The key type must be one the
// caller's policy allows. Only an Upstream needs a signed CSR, so only
// then is key used to sign one. Errors are those of Issue.
func (c *CA) IssueKey(ctx context.Context, caller *authn.Caller, key crypto.Signer, lifetime time.Duration) (*Issued, error) {
	if caller == nil {
		return nil, errors.New("issue: no caller")
	}
	if lifetime < 0 {
		return nil, fmt.Errorf("%w: requested lifetime %s is negative; want 0 (policy default) or more", ErrBadRequest, lifetime)
	}
	rule := c.policy.Policy().Resolve(caller.Namespace, caller.ServiceAccount)
	pub := key.Public()
	kt, err := KeyTypeOfPublic(pub)
	if err != nil {
		return nil, fmt.Errorf("issue: %w: %w", err, ErrInvalidSignRequest)
	}
	if !rule.Allows(kt) {
		return nil, fmt.Errorf("issue: key type %s is not allowed for %s/%s: %w", kt, caller.Namespace, caller.ServiceAccount, ErrInvalidSignRequest)
	}
	spki, err := x509.MarshalPKIXPublicKey(pub)
	if err != nil {
		return nil, fmt.Errorf("issue: %w: %w", err, ErrInvalidSignRequest)
	}
	csr := &x509.CertificateRequest{PublicKey: pub, RawSubjectPublicKeyInfo: spki, URIs: []*url.URL{caller.ID.URL()}}
	if c.upstream != nil {
		der, err := x509.CreateCertificateRequest(rand.Reader, csr, key)
		if err == nil {
			csr, err = x509.ParseCertificateRequest(der)
		}
		if err != nil {
			return nil, fmt.Errorf("issue: CSR for the upstream: %w: %w", err, ErrInvalidSignRequest)
		}
	}
	return c.issue(ctx, caller, rule, csr, kt, lifetime)
}

// Rule returns the rotation policy in force for a service account.
func (c *CA) Rule(namespace, serviceAccount string) Effective {
	return c.policy.Policy().Resolve(namespace, serviceAccount)
}

func (c *CA) issue(ctx context.Context, caller *authn.Caller, rule Effective, csr *x509.CertificateRequest, kt KeyType, lifetime time.Duration) (*Issued, error) {
	ttl, clamp := rule.TTL(lifetime)
	if clamp != ClampNone {
		c.metrics.TTLClamps.WithLabelValues(string(clamp)).Inc()
	}
	now := c.now()
	resp, err := c.Sign(ctx, SignRequest{
		CSR: csr,
		// ParseCSR refused a key not in canonical DER, and IssueKey made
		// its encoding: either way these are the canonical bytes.
		SPKI:      csr.RawSubjectPublicKeyInfo,
		ID:        caller.ID,
		NotBefore: now.Add(-c.backdate),
		NotAfter:  now.Add(ttl),
	})
	if err != nil {
		return nil, err
	}
	c.metrics.Issued.WithLabelValues(string(kt)).Inc()
	return &Issued{
		CertPEM:   certPEM(resp.Leaf),
		ChainPEM:  resp.ChainPEM,
		Serial:    resp.Serial,
		NotBefore: resp.NotBefore,
		NotAfter:  resp.NotAfter,
		KeyType:   kt,
		SignedBy:  resp.SignedBy,
		Rule:      rule,
		Clamp:     clamp,
		RenewAt:   RenewAt(maxTime(now, resp.NotBefore), resp.NotAfter, rule.RenewFraction, rule.RenewJitter),
	}, nil
}

// RejectCSR counts err if it is a *CSRError. Edges that refuse a CSR before
// Issue sees it (a PEM that does not decode) call it, so every refusal is
// counted once.
func (c *CA) RejectCSR(err error) {
	var ce *CSRError
	if errors.As(err, &ce) {
		c.metrics.CSRRejections.WithLabelValues(ce.Reason).Inc()
	}
}

// Sign signs req with the signing CA in force, or has the Upstream sign it
// and checks the answer. It applies no policy and no identity check: Issue
// does those for workloads, and meshca's own serving certificate, which
// carries DNS names, comes here directly. Errors wrap
// ErrBackendUnavailable or ErrInvalidSignRequest, or the context's error.
func (c *CA) Sign(ctx context.Context, req SignRequest) (*SignResponse, error) {
	if err := ctx.Err(); err != nil {
		return nil, fmt.Errorf("sign: %w", err)
	}
	if c.upstream != nil {
		return c.signUpstream(ctx, req)
	}
	s := c.state.Load().Signing
	if na := s.NotAfter(); !c.now().Before(na) {
		return nil, fmt.Errorf("sign: the signing CA chain expired at %s: %w", na.UTC().Format(time.RFC3339), ErrBackendUnavailable)
	}
	resp, err := s.Sign(req)
	if err == nil {
		c.noteLeaf(resp.NotAfter)
	}
	if err != nil {
		// A request the signer calls invalid got past every check: that is
		// meshca's bug, not an outage, so it is not dressed up as one (it
		// surfaces as Internal).
		if !errors.Is(err, ErrBackendUnavailable) && !errors.Is(err, ErrInvalidSignRequest) {
			err = fmt.Errorf("%w: %w", ErrBackendUnavailable, err)
		}
		return nil, fmt.Errorf("sign: %w", err)
	}
	return resp, nil
}

func maxTime(a, b time.Time) time.Time {
	if a.After(b) {
		return a
	}
	return b
}

// noteLeaf records a leaf's NotAfter for Change.OldLeavesUntil.
func (c *CA) noteLeaf(notAfter time.Time) {
	u := notAfter.Unix()
	for {
		cur := c.leavesUntil.Load()
		if u <= cur || c.leavesUntil.CompareAndSwap(cur, u) {
			return
		}
	}
}

// check refuses a State the CA cannot work with.
func (s State) check(upstream bool) error {
	if !upstream && s.Signing == nil {
		return errors.New("signing state has no signing CA")
	}
	if len(s.Roots) == 0 {
		return errors.New("signing state has an empty trust bundle")
	}
	if s.Signing != nil && !containsCert(s.Roots, s.Signing.Root()) {
		return fmt.Errorf("the trust bundle does not hold the signing CA's root %q", s.Signing.Root().Subject)
	}
	return nil
}

func sameSigning(a, b *SigningCA) bool {
	if a == nil || b == nil {
		return a == b
	}
	return sameCerts(a.chain, b.chain)
}

func sameCerts(a, b []*x509.Certificate) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if !bytes.Equal(a[i].Raw, b[i].Raw) {
			return false
		}
	}
	return true
}

func containsCert(certs []*x509.Certificate, c *x509.Certificate) bool {
	for _, x := range certs {
		if bytes.Equal(x.Raw, c.Raw) {
			return true
		}
	}
	return false
}

// Metrics are the CA core's Prometheus metrics. Every metric is documented
// in README.md.
type Metrics struct {
	// CSRRejections counts refused CSRs by reason.
	CSRRejections *prometheus.CounterVec
	// TTLClamps counts requested lifetimes moved into policy bounds, by the
	// bound that applied ("min" or "max").
	TTLClamps *prometheus.CounterVec
	// Issued counts issued leaves by key type.
	Issued *prometheus.CounterVec
	// Rotations counts intermediate mints by result ("success", "failure").
	Rotations *prometheus.CounterVec
	// UpstreamCalls counts calls to an Authority or Upstream by operation
	// (mint, sign, bundle) and result (success, failure, refused).
	UpstreamCalls *prometheus.CounterVec
	// UpstreamInFlight is the number of SignLeaf calls in flight.
	UpstreamInFlight prometheus.Gauge
	// Degraded is 1 while the last call to the upstream failed.
	Degraded prometheus.Gauge
}
