package kube

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/grpc/peer"
	authenticationv1 "k8s.io/api/authentication/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"

	"github.com/meshca/meshca/authn"
)

// TokenReviewConfig configures a TokenReview authenticator.
type TokenReviewConfig struct {
	// Client reaches the kube-apiserver. Its identity must be allowed to
	// create tokenreviews (ClusterRole system:auth-delegator). Required.
	Client kubernetes.Interface
	// TrustDomain of the SPIFFE IDs handed out. Required.
	TrustDomain spiffeid.TrustDomain
	// Audiences are sent with every review; the token must be meant for at
	// least one. A token whose aud claim names none of them is refused
	// without a review. Default ["istio-ca"].
	Audiences []string
	// Issuer, if set, is the cluster's service-account issuer. A token whose
	// iss claim names another is refused without a review (unknown_issuer),
	// and it sharpens the reason given for a token the apiserver rejected.
	// Without it, the apiserver alone judges the issuer.
	Issuer string
	// Skew is the clock skew allowed when refusing an expired token without
	// a review. Default 30s.
	Skew time.Duration
	// MaxInFlight caps the TokenReviews under way at once. A verification
	// that finds every slot taken waits for one while a caller waits for it.
	// Default 32.
	MaxInFlight int
	// MaxPerPeer caps the reviews that callers from one address may have
	// under way or waiting, so that one peer cannot take the capacity that
	// others' real cache misses need; beyond it a caller gets Unavailable
	// at once. Default MaxInFlight/4, at least 1.
	MaxPerPeer int
	// Cache bounds the cache of reviewed tokens.
	Cache CacheConfig
	// ServiceAccounts, if set, is asked on every call (cache hits included)
	// whether the token's service account still exists with the UID the
	// apiserver reported. The apiserver checks this on a miss anyway.
	ServiceAccounts ServiceAccountLookup
	// Signatures, if set, checks each token's signature against the
	// issuer's keys before a review: a forged token is then refused
	// locally and never reaches the apiserver. When it cannot tell (the
	// keys are unreachable), the apiserver decides.
	Signatures SignatureChecker
	// Now is the clock. Default time.Now.
	Now func() time.Time
	// Log receives apiserver failures, never tokens. Default: discard.
	Log *slog.Logger
	// Metrics receives the cache counts. Several authenticators share one
	// (see New). Default: unregistered metrics.
	Metrics *Metrics
}

// A SignatureChecker checks a token's issuer and signature; *JWT is one.
type SignatureChecker interface {
	CheckSignature(ctx context.Context, token string) error
}

// TokenReview authenticates service-account tokens by asking the
// kube-apiserver (the TokenReview API) about each token it has not cached.
// Before asking, it reads the token's claims without verifying them and
// refuses outright a token that the apiserver would refuse anyway (not a
// JWT, expired, for another audience or issuer), so that unauthenticated
// junk costs no round trip; the apiserver decides on every other token.
// It is safe for concurrent use.
type TokenReview struct {
	client    kubernetes.Interface
	td        spiffeid.TrustDomain
	audiences []string
	issuer    string
	skew      time.Duration
	slots     chan struct{} // a semaphore of MaxInFlight TokenReviews
	perPeer   int
	peersMu   sync.Mutex
	peers     map[string]int // reviews under way or waiting, by caller address
	now       func() time.Time
	log       *slog.Logger
	sas       ServiceAccountLookup
	sigs      SignatureChecker
	cache     *cache
}

// tokenReviewAuthenticator is the Caller.Authenticator of TokenReview.
const tokenReviewAuthenticator = "tokenreview"

// defaultMaxInFlight is TokenReviewConfig.MaxInFlight's default.
const defaultMaxInFlight = 32

// Keys of TokenReview's status.user.extra for tokens bound to a pod, and
// the node that pod is scheduled on.
const (
	extraPodName  = "authentication.kubernetes.io/pod-name"
	extraPodUID   = "authentication.kubernetes.io/pod-uid"
	extraNodeName = "authentication.kubernetes.io/node-name"
)

// NewTokenReview checks cfg and returns a TokenReview authenticator.
func NewTokenReview(cfg TokenReviewConfig) (*TokenReview, error) {
	if cfg.Client == nil {
		return nil, errors.New("new tokenreview authenticator: Client is required")
	}
	if cfg.TrustDomain.IsZero() {
		return nil, errors.New("new tokenreview authenticator: TrustDomain is required")
	}
	if cfg.Skew < 0 || cfg.MaxInFlight < 0 {
		return nil, errors.New("new tokenreview authenticator: Skew and MaxInFlight must not be negative")
	}
	if len(cfg.Audiences) == 0 {
		cfg.Audiences = []string{defaultAudience}
	}
	if cfg.Skew == 0 {
		cfg.Skew = 30 * time.Second
	}
	if cfg.MaxInFlight == 0 {
		cfg.MaxInFlight = defaultMaxInFlight
	}
	if cfg.MaxPerPeer <= 0 {
		cfg.MaxPerPeer = max(1, cfg.MaxInFlight/4)
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	if cfg.Log == nil {
		cfg.Log = slog.New(slog.DiscardHandler)
	}
	if cfg.Metrics == nil {
		cfg.Metrics = NewMetrics(nil)
	}
	cm := cfg.Metrics.cache()
	return &TokenReview{
		client:    cfg.Client,
		td:        cfg.TrustDomain,
		audiences: slices.Clone(cfg.Audiences),
		issuer:    cfg.Issuer,
		skew:      cfg.Skew,
		slots:     make(chan struct{}, cfg.MaxInFlight),
		perPeer:   cfg.MaxPerPeer,
		peers:     map[string]int{},
		now:       cfg.Now,
		log:       cfg.Log.With("authenticator", tokenReviewAuthenticator),
		sas:       cfg.ServiceAccounts,
		sigs:      cfg.Signatures,
		cache:     newCache(cfg.Cache, cfg.Now, cm, tokenReviewAuthenticator),
	}, nil
}

// Authenticate implements authn.Authenticator for a service-account token in
// creds.Token.
func (r *TokenReview) Authenticate(ctx context.Context, creds authn.Credentials) (*authn.Caller, error) {
	if creds.Token == "" {
		return nil, fmt.Errorf("tokenreview: %w", authn.ErrNoCredentials)
	}
	if len(creds.Token) > maxTokenBytes {
		return nil, authn.Fail(authn.ReasonMalformed, "token longer than %d bytes", maxTokenBytes)
	}
	from := peerHost(ctx)
	caller, err := r.cache.get(ctx, creds.Token, func(ctx context.Context) (*authn.Caller, error) {
		// Only on a miss: a cached token passed it, and stays cached no
		// longer than its exp.
		if err := precheck(creds.Token, r.now(), r.skew, r.issuer, r.audiences); err != nil {
			return nil, err
		}
		if !r.takePeer(from) {
			return nil, fmt.Errorf("%w: %d token reviews already under way for %s (authn.maxReviewsInFlight/4); retry", authn.ErrUnavailable, r.perPeer, from)
		}
		defer r.releasePeer(from)
		if r.sigs != nil {
			if err := r.sigs.CheckSignature(ctx, creds.Token); err != nil && !errors.Is(err, authn.ErrUnavailable) {
				return nil, err
			}
		}
		return r.review(ctx, creds.Token)
	})
	if err != nil {
		return nil, err
	}
	if err := checkServiceAccount(r.sas, caller); err != nil {
		r.cache.forget(creds.Token)
		return nil, err
	}
	return caller, nil
}

// review asks the apiserver about token, once a slot is free. ctx is the
// cache's shared verification context.
func (r *TokenReview) review(ctx context.Context, token string) (*authn.Caller, error) {
	if err := r.acquire(ctx); err != nil {
		return nil, err
	}
	defer func() { <-r.slots }()
	req := &authenticationv1.TokenReview{Spec: authenticationv1.TokenReviewSpec{
		Token:     token,
		Audiences: r.audiences,
	}}
	res, err := r.client.AuthenticationV1().TokenReviews().Create(ctx, req, metav1.CreateOptions{})
	if err != nil {
		if errors.Is(context.Cause(ctx), errAbandoned) {
			// Every caller gave up: not an apiserver failure, and nobody
			// reads this error.
			return nil, fmt.Errorf("create tokenreview: %w", context.Cause(ctx))
		}
		err = redact(err, token)
		if apierrors.IsForbidden(err) {
			r.log.Error("the kube-apiserver forbids meshca to create tokenreviews: bind meshca's service account to the ClusterRole system:auth-delegator", "error", err)
			return nil, fmt.Errorf("%w: create tokenreview: forbidden: bind meshca's service account to the ClusterRole system:auth-delegator: %w", authn.ErrUnavailable, err)
		}
		r.log.Warn("tokenreview failed", "error", err)
		return nil, fmt.Errorf("%w: create tokenreview: %w", authn.ErrUnavailable, err)
	}
	st := res.Status
	if !st.Authenticated {
		return nil, explainRejection(token, r.now(), r.issuer, r.audiences)
	}
	if !slices.Contains(st.User.Groups, serviceAccountsGroup) {
		return nil, authn.Fail(authn.ReasonNotServiceAccount, "token does not belong to a service account")
	}
	ns, sa, ok := splitServiceAccountUser(st.User.Username)
	if !ok {
		return nil, authn.Fail(authn.ReasonNotServiceAccount, "token does not belong to a service account")
	}
	// The apiserver intersects the requested audiences with the token's;
	// an empty answer means the token is for none of them (or the apiserver
	// is too old to check audiences, which is no better).
	if !audienceOK(st.Audiences, r.audiences) {
		return nil, wrongAudience(r.audiences)
	}
	id, err := authn.ServiceAccountID(r.td, ns, sa)
	if err != nil {
		return nil, err
	}
	caller := &authn.Caller{
		ID:                id,
		Namespace:         ns,
		ServiceAccount:    sa,
		ServiceAccountUID: st.User.UID,
		PodName:           firstExtra(st.User.Extra, extraPodName),
		PodUID:            firstExtra(st.User.Extra, extraPodUID),
		Authenticator:     tokenReviewAuthenticator,
		ExpiresAt:         unverifiedExpiry(token),
	}
	// A token bound to a Node alone also carries node-name; as with the
	// jwt authenticator, only a pod's node is taken.
	if caller.PodName != "" {
		caller.NodeName = firstExtra(st.User.Extra, extraNodeName)
	}
	return caller, nil
}

// peerHost is the host of the gRPC peer in ctx, or "" when unknown.
func peerHost(ctx context.Context) string {
	p, ok := peer.FromContext(ctx)
	if !ok || p.Addr == nil {
		return ""
	}
	if h, _, err := net.SplitHostPort(p.Addr.String()); err == nil {
		return h
	}
	return p.Addr.String()
}

// takePeer counts a review for the address from, unless it already has
// its share. Calls with no known address (not from gRPC) are not counted.
func (r *TokenReview) takePeer(from string) bool {
	if from == "" {
		return true
	}
	r.peersMu.Lock()
	defer r.peersMu.Unlock()
	if r.peers[from] >= r.perPeer {
		return false
	}
	r.peers[from]++
	return true
}

func (r *TokenReview) releasePeer(from string) {
	if from == "" {
		return
	}
	r.peersMu.Lock()
	defer r.peersMu.Unlock()
	if r.peers[from]--; r.peers[from] <= 0 {
		delete(r.peers, from)
	}
}

// acquire takes one of the MaxInFlight slots, waiting while ctx allows. ctx
// ends while waiting when every caller gave up (the error then reaches
// nobody: each caller got its own context's error) or when the shared
// verification ran out of time with every slot taken, an overload: the
// callers still waiting get ErrUnavailable.
func (r *TokenReview) acquire(ctx context.Context) error {
	if ctx.Err() == nil {
		select {
		case r.slots <- struct{}{}:
			return nil
		case <-ctx.Done():
		}
	}
	if errors.Is(context.Cause(ctx), errVerifyTimeout) {
		return fmt.Errorf("%w: no tokenreview slot free within %s", authn.ErrUnavailable, verifyTimeout)
	}
	return fmt.Errorf("wait for a tokenreview slot: %w", ctx.Err())
}

// redact returns err, or if its text contains token (client-go's errors
// carry the URL and the apiserver's status, not the request body, so this is
// a safety net) an error with the same text minus the token. The redacted
// error no longer matches apierrors' predicates.
func redact(err error, token string) error {
	if !strings.Contains(err.Error(), token) {
		return err
	}
	return errors.New(strings.ReplaceAll(err.Error(), token, "[token]"))
}

func firstExtra(extra map[string]authenticationv1.ExtraValue, key string) string {
	if v := extra[key]; len(v) > 0 {
		return v[0]
	}
	return ""
}

// unverifiedExpiry returns the exp of a token the apiserver has just
// accepted (so its claims are as good as verified), or zero if it has none
// or is not a JWT: the cache then keeps it for CacheConfig.MaxTTL.
func unverifiedExpiry(token string) time.Time {
	_, c, err := parseToken(token)
	if err != nil || c.Expiry == nil {
		return time.Time{}
	}
	return c.Expiry.Time()
}

var _ authn.Authenticator = (*TokenReview)(nil)
