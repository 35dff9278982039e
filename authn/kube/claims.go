package kube

import (
	"slices"
	"strings"
	"time"

	"github.com/go-jose/go-jose/v4"
	"github.com/go-jose/go-jose/v4/jwt"
	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/meshca/meshca/authn"
)

const (
	// serviceAccountUserPrefix starts the username (and a projected token's
	// sub) of every service account: system:serviceaccount:<ns>:<name>.
	serviceAccountUserPrefix = "system:serviceaccount:"
	// serviceAccountsGroup holds every service account.
	serviceAccountsGroup = "system:serviceaccounts"
	// legacyIssuer is the iss of the secret-based tokens that predate
	// projected tokens.
	legacyIssuer = "kubernetes/serviceaccount"
	// maxTokenBytes bounds what is parsed at all. Projected tokens are about
	// 1 KiB; the apiserver's own bound is larger but no SA token comes close.
	maxTokenBytes = 16 << 10
	// defaultAudience is the audience Istio's agents request for the CA.
	defaultAudience = "istio-ca"
)

// parseAlgorithms lists every "alg" header go-jose may parse. HMAC is in it
// only so that such a token reads as a bad signature rather than as
// malformed: no HMAC key is ever loaded, so none can verify.
func parseAlgorithms() []jose.SignatureAlgorithm {
	return []jose.SignatureAlgorithm{
		jose.RS256, jose.RS384, jose.RS512,
		jose.PS256, jose.PS384, jose.PS512,
		jose.ES256, jose.ES384, jose.ES512,
		jose.EdDSA,
		jose.HS256, jose.HS384, jose.HS512,
	}
}

// claims is the payload of a projected service-account token.
type claims struct {
	jwt.Claims
	Kubernetes *kubernetesClaim `json:"kubernetes.io,omitempty"`
}

// kubernetesClaim is the private "kubernetes.io" claim of projected tokens.
type kubernetesClaim struct {
	Namespace      string     `json:"namespace,omitempty"`
	ServiceAccount *objectRef `json:"serviceaccount,omitempty"`
	Pod            *objectRef `json:"pod,omitempty"`
	Secret         *objectRef `json:"secret,omitempty"`
	Node           *objectRef `json:"node,omitempty"`
}

type objectRef struct {
	Name string `json:"name,omitempty"`
	UID  string `json:"uid,omitempty"`
}

// parseToken parses a compact JWS without verifying it.
func parseToken(token string) (*jwt.JSONWebToken, *claims, error) {
	if len(token) > maxTokenBytes {
		return nil, nil, authn.Fail(authn.ReasonMalformed, "token longer than %d bytes", maxTokenBytes)
	}
	tok, err := jwt.ParseSigned(token, parseAlgorithms())
	if err != nil {
		return nil, nil, authn.Fail(authn.ReasonMalformed, "token is not a signed JWT")
	}
	if len(tok.Headers) != 1 {
		return nil, nil, authn.Fail(authn.ReasonMalformed, "token does not have exactly one signature")
	}
	var c claims
	if err := tok.UnsafeClaimsWithoutVerification(&c); err != nil {
		return nil, nil, authn.Fail(authn.ReasonMalformed, "token claims are not valid JSON claims")
	}
	return tok, &c, nil
}

// splitServiceAccountUser splits system:serviceaccount:<ns>:<name>.
func splitServiceAccountUser(user string) (namespace, name string, ok bool) {
	rest, ok := strings.CutPrefix(user, serviceAccountUserPrefix)
	if !ok {
		return "", "", false
	}
	namespace, name, ok = strings.Cut(rest, ":")
	if !ok || namespace == "" || name == "" || strings.Contains(name, ":") {
		return "", "", false
	}
	return namespace, name, true
}

// checkTimes checks exp, nbf and iat against now, allowing skew either way.
// A token without exp is malformed: every service-account token has one.
func checkTimes(c *claims, now time.Time, skew time.Duration) error {
	if c.Expiry == nil {
		return authn.Fail(authn.ReasonMalformed, "token has no exp")
	}
	if exp := c.Expiry.Time(); now.After(exp.Add(skew)) {
		return authn.Fail(authn.ReasonExpired, "token expired at %s", exp.UTC().Format(time.RFC3339))
	}
	if c.NotBefore != nil {
		if nbf := c.NotBefore.Time(); now.Add(skew).Before(nbf) {
			return authn.Fail(authn.ReasonNotYetValid, "token not valid before %s", nbf.UTC().Format(time.RFC3339))
		}
	}
	if c.IssuedAt != nil {
		if iat := c.IssuedAt.Time(); now.Add(skew).Before(iat) {
			return authn.Fail(authn.ReasonNotYetValid, "token issued in the future, at %s", iat.UTC().Format(time.RFC3339))
		}
	}
	return nil
}

// audienceOK reports whether a token for got is meant for one of want.
func audienceOK(got, want []string) bool {
	return slices.ContainsFunc(want, func(a string) bool { return slices.Contains(got, a) })
}

func wrongAudience(want []string) *authn.Error {
	return authn.Fail(authn.ReasonWrongAudience, "token audience includes none of %q", want)
}

// callerFromClaims builds the Caller of a verified projected token, checking
// that sub and the kubernetes.io claim agree.
func callerFromClaims(c *claims, authenticator string, td spiffeid.TrustDomain) (*authn.Caller, error) {
	k := c.Kubernetes
	if k == nil {
		if c.Issuer == legacyIssuer {
			return nil, authn.Fail(authn.ReasonNotServiceAccount, "legacy secret-based service-account tokens are not accepted; use a projected token")
		}
		return nil, authn.Fail(authn.ReasonNotServiceAccount, "token has no kubernetes.io claim")
	}
	ns, sa, ok := splitServiceAccountUser(c.Subject)
	if !ok {
		return nil, authn.Fail(authn.ReasonNotServiceAccount, "token subject is not a service account")
	}
	if k.ServiceAccount == nil || k.Namespace != ns || k.ServiceAccount.Name != sa {
		return nil, authn.Fail(authn.ReasonMalformed, "token subject does not match its kubernetes.io claim")
	}
	if k.ServiceAccount.UID == "" {
		return nil, authn.Fail(authn.ReasonMalformed, "token names no service account UID")
	}
	id, err := authn.ServiceAccountID(td, ns, sa)
	if err != nil {
		return nil, err
	}
	caller := &authn.Caller{
		ID:                id,
		Namespace:         ns,
		ServiceAccount:    sa,
		ServiceAccountUID: k.ServiceAccount.UID,
		Authenticator:     authenticator,
		ExpiresAt:         c.Expiry.Time(),
	}
	if k.Pod != nil {
		if k.Pod.Name == "" || k.Pod.UID == "" {
			return nil, authn.Fail(authn.ReasonMalformed, "token pod claim lacks a name or UID")
		}
		caller.PodName, caller.PodUID = k.Pod.Name, k.Pod.UID
		// The apiserver adds the pod's node to a pod-bound token
		// (ServiceAccountTokenPodNodeInfo, on since 1.30). A token bound to
		// a Node alone names no pod, and no node is taken from it.
		if k.Node != nil {
			caller.NodeName = k.Node.Name
		}
	}
	return caller, nil
}

// explainRejection says why the apiserver probably refused token, from the
// token's own claims, parsed WITHOUT verifying its signature: the apiserver
// has already decided, this only explains, and nothing here can accept a
// token. The apiserver's error text is not used (it is not a stable API and
// may echo details we do not control). In order: not a JWT, or a JWT from
// another issuer than issuer (if set) or with no kubernetes.io claim ->
// unknown_issuer; exp before now -> expired; nbf after now -> not_yet_valid;
// no audience in common with audiences -> wrong_audience; anything else
// (revoked, bound object deleted, bad signature) -> rejected.
func explainRejection(token string, now time.Time, issuer string, audiences []string) *authn.Error {
	_, c, err := parseToken(token)
	if err != nil {
		return authn.Fail(authn.ReasonRejected, "the kube-apiserver did not accept the token")
	}
	if (issuer != "" && c.Issuer != issuer) || (c.Kubernetes == nil && c.Issuer != legacyIssuer) {
		return authn.Fail(authn.ReasonUnknownIssuer, "token was not issued by this cluster's service-account issuer")
	}
	if c.Expiry != nil && now.After(c.Expiry.Time()) {
		return authn.Fail(authn.ReasonExpired, "token expired at %s", c.Expiry.Time().UTC().Format(time.RFC3339))
	}
	if c.NotBefore != nil && now.Before(c.NotBefore.Time()) {
		return authn.Fail(authn.ReasonNotYetValid, "token not valid before %s", c.NotBefore.Time().UTC().Format(time.RFC3339))
	}
	if !audienceOK(c.Audience, audiences) {
		return wrongAudience(audiences)
	}
	return authn.Fail(authn.ReasonRejected, "the kube-apiserver did not accept the token")
}

// precheck refuses, from its own claims parsed WITHOUT verifying its
// signature, a token that the kube-apiserver would refuse anyway, so that
// junk costs no TokenReview: not a JWT (malformed), issued by another issuer
// than issuer if that is set (unknown_issuer), expired more than skew ago
// (expired), or meant for none of audiences (wrong_audience). The reasons
// are those explainRejection gives after a round trip. It can only refuse:
// a token it lets through still goes to the apiserver, which decides.
// A token without exp is let through (legacy secret-based tokens have none).
func precheck(token string, now time.Time, skew time.Duration, issuer string, audiences []string) error {
	_, c, err := parseToken(token)
	if err != nil {
		return err
	}
	if issuer != "" && c.Issuer != issuer {
		return authn.Fail(authn.ReasonUnknownIssuer, "token was not issued by this cluster's service-account issuer")
	}
	if c.Expiry != nil && now.After(c.Expiry.Time().Add(skew)) {
		return authn.Fail(authn.ReasonExpired, "token expired at %s", c.Expiry.Time().UTC().Format(time.RFC3339))
	}
	if !audienceOK(c.Audience, audiences) {
		return wrongAudience(audiences)
	}
	return nil
}
