package kube

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"net/netip"
	"net/url"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/go-jose/go-jose/v4"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"golang.org/x/sync/singleflight"
	"k8s.io/client-go/rest"

	"github.com/meshca/meshca/authn"
)

// JWTConfig configures a JWT authenticator.
type JWTConfig struct {
	// TrustDomain of the SPIFFE IDs handed out. Required.
	TrustDomain spiffeid.TrustDomain
	// Issuer is the iss tokens must carry. If empty, it is read from the
	// kube-apiserver's /.well-known/openid-configuration (Kube required) on
	// first use.
	Issuer string
	// Audiences: a token must be meant for at least one. Default ["istio-ca"].
	Audiences []string
	// JWKSFile is a file holding the issuer's JSON Web Key Set. It is read
	// again when a token names an unknown key, and on the first call after
	// the keys in hand are 5 minutes old, so rotating its content needs no
	// restart. At most one of JWKSFile and
	// JWKSURL may be set; if neither is, the JWKS is read from the
	// kube-apiserver's /openid/v1/jwks with Kube's credentials.
	JWKSFile string
	// JWKSURL is an https URL serving the issuer's JSON Web Key Set,
	// verified with the system's roots. http is accepted only for a loopback
	// host (localhost, 127.0.0.0/8, ::1), for tests and development.
	// Redirects are followed only to URLs that obey the same rule.
	JWKSURL string
	// Kube reaches the kube-apiserver, for the issuer and the JWKS when they
	// are not configured otherwise. Optional.
	Kube *rest.Config
	// Skew is the clock skew allowed on exp, nbf and iat. Default 30s.
	Skew time.Duration
	// RefetchInterval is the least time between two JWKS fetches triggered
	// by tokens naming an unknown key. Default 10s.
	RefetchInterval time.Duration
	// Cache bounds the cache of verified tokens.
	Cache CacheConfig
	// ServiceAccounts, if set, is asked on every call (cache hits included)
	// whether the token's service account still exists with the token's
	// UID. Without it, a deleted service account's token is accepted until
	// it expires.
	ServiceAccounts ServiceAccountLookup
	// Now is the clock. Default time.Now.
	Now func() time.Time
	// Log receives key-rotation events and fetch failures, never tokens.
	// Default: discard.
	Log *slog.Logger
	// Metrics receives the cache and JWKS counts. Several authenticators
	// share one (see New). Default: unregistered metrics.
	Metrics *Metrics
}

// JWT authenticates projected service-account tokens by verifying their
// signature against the issuer's public keys in process, with no kube-apiserver
// round trip per call. It is safe for concurrent use.
//
// What it cannot see: that the pod or secret a token is bound to was deleted
// (such a token stays valid here until its exp, which the kubelet keeps
// short), or that the service account was deleted unless
// JWTConfig.ServiceAccounts is set. TokenReview sees both.
type JWT struct {
	td        spiffeid.TrustDomain
	audiences []string
	skew      time.Duration
	refetch   time.Duration
	now       func() time.Time
	log       *slog.Logger
	sas       ServiceAccountLookup
	fetcher   fetcher
	cache     *cache
	fetches   *prometheus.CounterVec

	issuer atomic.Pointer[string]
	keys   atomic.Pointer[keySet]
	group  singleflight.Group // collapses concurrent refreshes

	mu          sync.Mutex
	lastAttempt time.Time // of a refresh; rate-limits them
	lastErr     error     // of that attempt
}

// jwtAuthenticator is the Caller.Authenticator of JWT.
const jwtAuthenticator = "jwt"

// NewJWT checks cfg and returns a JWT authenticator. It does no I/O: the
// issuer (if not configured) and the keys are fetched on first use, or by
// Refresh.
func NewJWT(cfg JWTConfig) (*JWT, error) {
	if cfg.TrustDomain.IsZero() {
		return nil, errors.New("new jwt authenticator: TrustDomain is required")
	}
	if cfg.JWKSFile != "" && cfg.JWKSURL != "" {
		return nil, errors.New("new jwt authenticator: set at most one of JWKSFile and JWKSURL")
	}
	if cfg.JWKSURL != "" {
		u, err := url.Parse(cfg.JWKSURL)
		if err != nil {
			return nil, fmt.Errorf("new jwt authenticator: JWKSURL: %w", err)
		}
		if err := checkJWKSURL(u); err != nil {
			return nil, fmt.Errorf("new jwt authenticator: JWKSURL: %w", err)
		}
	}
	if cfg.Kube == nil && cfg.JWKSFile == "" && cfg.JWKSURL == "" {
		return nil, errors.New("new jwt authenticator: one of JWKSFile, JWKSURL or Kube is required")
	}
	if cfg.Kube == nil && cfg.Issuer == "" {
		return nil, errors.New("new jwt authenticator: Issuer is required without Kube")
	}
	if cfg.Skew < 0 || cfg.RefetchInterval < 0 {
		return nil, errors.New("new jwt authenticator: Skew and RefetchInterval must not be negative")
	}
	if len(cfg.Audiences) == 0 {
		cfg.Audiences = []string{defaultAudience}
	}
	if cfg.Skew == 0 {
		cfg.Skew = 30 * time.Second
	}
	if cfg.RefetchInterval == 0 {
		cfg.RefetchInterval = 10 * time.Second
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	if cfg.Log == nil {
		cfg.Log = slog.New(slog.DiscardHandler)
	}

	var kube *kubeFetcher
	if cfg.Kube != nil {
		var err error
		if kube, err = newKubeFetcher(cfg.Kube); err != nil {
			return nil, fmt.Errorf("new jwt authenticator: %w", err)
		}
	}
	var f fetcher
	switch {
	case cfg.JWKSFile != "":
		f = &fileFetcher{path: cfg.JWKSFile, kube: kube}
	case cfg.JWKSURL != "":
		f = &urlFetcher{url: cfg.JWKSURL, client: &http.Client{Timeout: fetchTimeout, CheckRedirect: checkJWKSRedirect}, kube: kube}
	default:
		f = kube
	}

	if cfg.Metrics == nil {
		cfg.Metrics = NewMetrics(nil)
	}

	j := &JWT{
		td:        cfg.TrustDomain,
		audiences: slices.Clone(cfg.Audiences),
		skew:      cfg.Skew,
		refetch:   cfg.RefetchInterval,
		now:       cfg.Now,
		log:       cfg.Log.With("authenticator", jwtAuthenticator),
		sas:       cfg.ServiceAccounts,
		fetcher:   f,
		cache:     newCache(cfg.Cache, cfg.Now, cfg.Metrics.cache(), jwtAuthenticator),
		fetches:   cfg.Metrics.jwksFetches,
	}
	if cfg.Issuer != "" {
		iss := cfg.Issuer
		j.issuer.Store(&iss)
	}
	return j, nil
}

// checkJWKSURL refuses a JWKS URL whose keys could be swapped in transit:
// anything but https, except http to a loopback host.
func checkJWKSURL(u *url.URL) error {
	if u.Hostname() == "" {
		return fmt.Errorf("%q has no host", u.Redacted())
	}
	switch u.Scheme {
	case "https":
		return nil
	case "http":
		if isLoopback(u.Hostname()) {
			return nil
		}
		return fmt.Errorf("%q: must be https (http only for a loopback host: localhost, 127.0.0.0/8, ::1)", u.Redacted())
	default:
		return fmt.Errorf("%q: scheme must be https", u.Redacted())
	}
}

// isLoopback reports whether host (without port or brackets) is localhost
// or a loopback IP address. Other names are not resolved: what they resolve
// to may change.
func isLoopback(host string) bool {
	if strings.EqualFold(host, "localhost") {
		return true
	}
	addr, err := netip.ParseAddr(host)
	return err == nil && addr.Unmap().IsLoopback()
}

// checkJWKSRedirect holds the JWKS fetch's redirects to checkJWKSURL, so that
// an https URL cannot hand the fetch over to plain http.
func checkJWKSRedirect(req *http.Request, via []*http.Request) error {
	if len(via) >= 10 {
		return errors.New("stopped after 10 redirects")
	}
	if err := checkJWKSURL(req.URL); err != nil {
		return fmt.Errorf("refuse redirect: %w", err)
	}
	return nil
}

// Issuer returns the iss that tokens must carry: JWTConfig.Issuer, or the
// one discovered from the kube-apiserver, or "" until that discovery has
// succeeded.
func (j *JWT) Issuer() string {
	if p := j.issuer.Load(); p != nil {
		return *p
	}
	return ""
}

// Refresh discovers the issuer (if not configured) and fetches the keys now,
// so that a caller may warm the authenticator up, or fail fast at start-up.
// It is optional: Authenticate does the same on demand. Like those on-demand
// fetches, it is skipped if one happened less than RefetchInterval ago, and
// then returns that one's error.
func (j *JWT) Refresh(ctx context.Context) error {
	_, err := j.refresh(ctx)
	return err
}

// Authenticate implements authn.Authenticator for a projected
// service-account token in creds.Token.
func (j *JWT) Authenticate(ctx context.Context, creds authn.Credentials) (*authn.Caller, error) {
	if creds.Token == "" {
		return nil, fmt.Errorf("jwt: %w", authn.ErrNoCredentials)
	}
	caller, err := j.cache.get(ctx, creds.Token, func(ctx context.Context) (*authn.Caller, error) {
		return j.verify(ctx, creds.Token)
	})
	if err != nil {
		return nil, err
	}
	if err := checkServiceAccount(j.sas, caller); err != nil {
		j.cache.forget(creds.Token)
		return nil, err
	}
	return caller, nil
}

// verify checks token fully: signature, issuer, times, audience, subject.
func (j *JWT) verify(ctx context.Context, token string) (*authn.Caller, error) {
	c, err := j.signed(ctx, token)
	if err != nil {
		return nil, err
	}
	if err := checkTimes(c, j.now(), j.skew); err != nil {
		return nil, err
	}
	if !audienceOK(c.Audience, j.audiences) {
		return nil, wrongAudience(j.audiences)
	}
	return callerFromClaims(c, jwtAuthenticator, j.td)
}

// CheckSignature checks only that token names the cluster's issuer and is
// signed by one of its keys. TokenReview runs it before asking the
// apiserver, so that a forged token costs a local signature check and no
// apiserver round trip. An error wrapping authn.ErrUnavailable means it
// could not tell (the keys are unreachable).
func (j *JWT) CheckSignature(ctx context.Context, token string) error {
	_, err := j.signed(ctx, token)
	return err
}

// signed returns token's claims once its issuer and signature check out.
func (j *JWT) signed(ctx context.Context, token string) (*claims, error) {
	tok, unverified, err := parseToken(token)
	if err != nil {
		return nil, err
	}
	// The issuer is checked before the key is looked up, so that tokens of
	// other issuers cannot trigger JWKS fetches.
	iss, err := j.issuerName(ctx)
	if err != nil {
		return nil, err
	}
	if unverified.Issuer != iss {
		if unverified.Issuer == legacyIssuer {
			return nil, authn.Fail(authn.ReasonUnknownIssuer, "legacy secret-based service-account tokens are not accepted; use a projected token with issuer %q", iss)
		}
		return nil, authn.Fail(authn.ReasonUnknownIssuer, "token issuer is not %q", iss)
	}

	h := tok.Headers[0]
	keys, err := j.keysFor(ctx, h.KeyID)
	if err != nil {
		return nil, err
	}
	var c claims
	algOK, verified := false, false
	for _, k := range keys {
		if !slices.Contains(k.algs, jose.SignatureAlgorithm(h.Algorithm)) {
			continue
		}
		algOK = true
		if err := tok.Claims(k.key, &c); err == nil {
			verified = true
			break
		}
	}
	switch {
	case !algOK:
		return nil, authn.Fail(authn.ReasonBadSignature, "signature algorithm %s is not accepted for key %q", h.Algorithm, h.KeyID)
	case !verified:
		return nil, authn.Fail(authn.ReasonBadSignature, "signature does not verify with key %q", h.KeyID)
	}
	return &c, nil
}

// issuerName returns the expected issuer, discovering it if needed.
func (j *JWT) issuerName(ctx context.Context) (string, error) {
	if iss := j.Issuer(); iss != "" {
		return iss, nil
	}
	if _, err := j.refresh(ctx); err != nil && j.Issuer() == "" {
		return "", fmt.Errorf("%w: %w", authn.ErrUnavailable, err)
	}
	if iss := j.Issuer(); iss != "" {
		return iss, nil
	}
	return "", fmt.Errorf("%w: service-account issuer not discovered yet", authn.ErrUnavailable)
}

// keysFor returns the keys that may have signed a token with kid, fetching
// the JWKS when there is none yet, when it is stale, or when kid is unknown
// (each at most once per RefetchInterval).
func (j *JWT) keysFor(ctx context.Context, kid string) ([]verifyKey, error) {
	ks := j.keys.Load()
	if keys := ks.lookup(kid); len(keys) > 0 && j.now().Sub(ks.fetchedAt) < keysMaxAge {
		return keys, nil
	}
	fresh, err := j.refresh(ctx)
	if fresh != nil {
		ks = fresh
	}
	if keys := ks.lookup(kid); len(keys) > 0 {
		return keys, nil // possibly stale: better than failing while the source is down
	}
	if err != nil {
		return nil, fmt.Errorf("%w: %w", authn.ErrUnavailable, err)
	}
	return nil, authn.Fail(authn.ReasonUnknownKey, "no key %q in the issuer's key set", kid)
}

// refresh fetches the issuer (if unknown) and the JWKS, unless a fetch was
// attempted less than RefetchInterval ago. Concurrent calls share one fetch,
// which serves the verifications of many tokens: so it runs detached from
// the cancellation of the ctx that started it (bounded by verifyTimeout),
// and each caller stops waiting for it when its own ctx is done. It returns
// the current key set (nil if none was ever fetched) and the error of the
// last attempt, or ctx's error.
func (j *JWT) refresh(ctx context.Context) (*keySet, error) {
	ch := j.group.DoChan("refresh", func() (any, error) {
		j.mu.Lock()
		now := j.now()
		if !j.lastAttempt.IsZero() && now.Sub(j.lastAttempt) < j.refetch {
			err := j.lastErr
			j.mu.Unlock()
			return nil, err
		}
		j.lastAttempt = now
		j.mu.Unlock()

		fctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), verifyTimeout)
		defer cancel()
		err := j.fetch(fctx, now)
		j.mu.Lock()
		j.lastErr = err
		j.mu.Unlock()
		return nil, err
	})
	select {
	case res := <-ch:
		return j.keys.Load(), res.Err
	case <-ctx.Done():
		return j.keys.Load(), fmt.Errorf("wait for the JWKS fetch: %w", ctx.Err())
	}
}

func (j *JWT) fetch(ctx context.Context, now time.Time) error {
	if j.Issuer() == "" {
		iss, err := j.fetcher.issuer(ctx)
		if err != nil {
			j.fetches.WithLabelValues("error").Inc()
			j.log.Warn("cannot discover the service-account issuer", "source", j.fetcher.String(), "error", err)
			return err
		}
		j.issuer.Store(&iss)
		j.log.Info("discovered the service-account issuer", "issuer", iss)
	}
	b, err := j.fetcher.jwks(ctx)
	var ks *keySet
	var skipped int
	if err == nil {
		ks, skipped, err = parseJWKS(b, now)
	}
	if err != nil {
		j.fetches.WithLabelValues("error").Inc()
		j.log.Warn("cannot fetch the service-account issuer's keys", "source", j.fetcher.String(), "error", err)
		return err
	}
	j.fetches.WithLabelValues("ok").Inc()
	old := j.keys.Swap(ks)
	if kids := keyIDs(ks); old == nil || !slices.Equal(kids, keyIDs(old)) {
		j.log.Info("loaded the service-account issuer's keys", "source", j.fetcher.String(), "kids", kids, "skipped", skipped)
	}
	return nil
}

func keyIDs(ks *keySet) []string {
	out := make([]string, len(ks.keys))
	for i, k := range ks.keys {
		out[i] = k.kid
	}
	return out
}

var _ authn.Authenticator = (*JWT)(nil)
