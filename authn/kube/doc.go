// Package kube authenticates Kubernetes service-account tokens.
//
// Two authenticators implement authn.Authenticator:
//
//   - JWT verifies projected service-account tokens locally against the
//     issuer's JSON Web Key Set (a file, a URL, or the kube-apiserver's
//     /openid/v1/jwks). It is the fast path: no apiserver round trip per call.
//   - TokenReview asks the kube-apiserver (TokenReview API) for every token
//     it has not seen. It is slower, but the apiserver also checks that the
//     service account, and the pod or secret a token is bound to, still exist.
//     A token that the apiserver would refuse anyway (not a JWT, expired, for
//     another audience or issuer) is refused from its unverified claims with
//     no round trip, and at most TokenReviewConfig.MaxInFlight reviews are
//     under way at once.
//
// Both put successful answers in a cache keyed by the SHA-256 of the token
// (the token itself is never stored, logged or put in an error). An entry
// never outlives the token's exp nor CacheConfig.MaxTTL. Concurrent lookups
// of one token share one verification, which stops once no caller waits for
// it any more. A caller whose context ends gets an error wrapping its
// context's error, not authn.ErrUnavailable.
//
// A ServiceAccountLookup, such as the informer-backed ServiceAccountIndex,
// lets either authenticator refuse the token of a service account that was
// deleted (or deleted and re-created with a new UID) since the token was
// minted, including on cache hits: without one, the JWT path accepts such a
// token until it expires.
//
// RBAC meshca needs: create tokenreviews (ClusterRole system:auth-delegator)
// for TokenReview; get the non-resource URLs /.well-known/openid-configuration
// and /openid/v1/jwks (ClusterRole system:service-account-issuer-discovery,
// which a default binding grants every service account) for JWT without
// JWKSFile/JWKSURL; list and watch serviceaccounts for ServiceAccountIndex;
// list and watch pods for PodIndex.
//
// PodIndex, an informer on Pods indexed by node and service account, is the
// authn.PodLocator behind authn.NodeAuthorizer: it tells whether a pod of
// the identity a node agent (ztunnel) asks for runs on the agent's node,
// which the agent's pod-bound token names (Caller.NodeName).
package kube
