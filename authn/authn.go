// Package authn turns the credentials on an incoming call into a Caller: a
// Kubernetes service account and the SPIFFE identity it may hold. It also
// holds the check that a CSR asks for exactly that identity.
//
// Concrete authenticators live in sub-packages (authn/kube) or beside this
// file (client certificates); a Chain runs them in the configured order.
package authn

import (
	"context"
	"crypto/x509"
	"errors"
	"fmt"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// Credentials are what a caller presented. The Token is secret: it must
// never be logged, wrapped into an error or stored in the clear.
type Credentials struct {
	// Token is the bearer token from `authorization: Bearer <token>`, or "".
	Token string
	// PeerCertificates is the TLS client chain, leaf first, not yet verified.
	PeerCertificates []*x509.Certificate
}

// Caller is an authenticated workload.
type Caller struct {
	// ID is spiffe://<trust-domain>/ns/<Namespace>/sa/<ServiceAccount>.
	ID             spiffeid.ID
	Namespace      string
	ServiceAccount string
	// ServiceAccountUID is set when the credential names it (tokens do).
	ServiceAccountUID string
	// PodName and PodUID are set when the token was bound to a pod.
	PodName string
	PodUID  string
	// NodeName is the node that pod is scheduled on, as the token says
	// (the kubernetes.io claim's node, or TokenReview's node-name extra):
	// set only for a token bound to a pod that was scheduled when the token
	// was minted. Client certificates carry none.
	NodeName string
	// Authenticator names the authenticator that vouched for the caller:
	// "jwt", "tokenreview" or "clientcert".
	Authenticator string
	// ExpiresAt is when the credential stops being valid; zero if unknown.
	ExpiresAt time.Time
}

// An Authenticator turns credentials into a Caller.
//
// It returns an error wrapping ErrNoCredentials when the call carries no
// credential of the kind it checks, so that a Chain may try the next one.
// Any other failure wraps ErrUnauthenticated (usually as a *Error that names
// the failed check), or ErrUnavailable when the authority that would decide
// (the kube-apiserver, an OIDC endpoint) cannot be reached.
type Authenticator interface {
	Authenticate(ctx context.Context, creds Credentials) (*Caller, error)
}

var (
	// ErrUnauthenticated is wrapped by every authentication failure.
	ErrUnauthenticated = errors.New("unauthenticated")
	// ErrNoCredentials means the call carried no credential this
	// authenticator understands. It wraps ErrUnauthenticated.
	ErrNoCredentials = fmt.Errorf("%w: no credentials", ErrUnauthenticated)
	// ErrUnavailable means the decision could not be made now; retrying may
	// succeed. It does not wrap ErrUnauthenticated.
	ErrUnavailable = errors.New("authentication backend unavailable")
)

// Reasons an authentication failed. They are metric label values, so the
// set is closed and low-cardinality.
const (
	ReasonNoCredentials      = "no_credentials"
	ReasonMalformed          = "malformed"
	ReasonExpired            = "expired"
	ReasonNotYetValid        = "not_yet_valid"
	ReasonWrongAudience      = "wrong_audience"
	ReasonUnknownIssuer      = "unknown_issuer"
	ReasonBadSignature       = "bad_signature"
	ReasonUnknownKey         = "unknown_key"
	ReasonNotServiceAccount  = "not_service_account"
	ReasonServiceAccountGone = "service_account_deleted"
	ReasonRejected           = "rejected"
	ReasonUntrustedCert      = "untrusted_certificate"
	ReasonUnavailable        = "unavailable"
)

// Error is an authentication failure that names the check that failed. Its
// message is safe to return to the client: it never contains the token.
type Error struct {
	// Reason is one of the Reason* constants.
	Reason string
	// Detail is a short human explanation, e.g. "token expired at ...".
	Detail string
}

func (e *Error) Error() string {
	if e.Detail == "" {
		return "unauthenticated: " + e.Reason
	}
	return "unauthenticated: " + e.Reason + ": " + e.Detail
}

// Unwrap makes every *Error match ErrUnauthenticated.
func (e *Error) Unwrap() error { return ErrUnauthenticated }

// Fail returns an *Error with a formatted detail.
func Fail(reason, format string, args ...any) *Error {
	return &Error{Reason: reason, Detail: fmt.Sprintf(format, args...)}
}

// ReasonOf returns the Reason of the *Error in err's chain, ReasonUnavailable
// for ErrUnavailable, ReasonNoCredentials for ErrNoCredentials, and
// ReasonRejected otherwise.
func ReasonOf(err error) string {
	var e *Error
	switch {
	case errors.As(err, &e):
		return e.Reason
	case errors.Is(err, ErrUnavailable):
		return ReasonUnavailable
	case errors.Is(err, ErrNoCredentials):
		return ReasonNoCredentials
	default:
		return ReasonRejected
	}
}

// ServiceAccountID returns the SPIFFE identity of a service account.
func ServiceAccountID(td spiffeid.TrustDomain, namespace, serviceAccount string) (spiffeid.ID, error) {
	if namespace == "" || serviceAccount == "" {
		return spiffeid.ID{}, Fail(ReasonNotServiceAccount, "namespace and service account must both be set")
	}
	id, err := spiffeid.FromSegments(td, "ns", namespace, "sa", serviceAccount)
	if err != nil {
		return spiffeid.ID{}, Fail(ReasonNotServiceAccount, "namespace %q / service account %q do not form a SPIFFE ID", namespace, serviceAccount)
	}
	return id, nil
}

// A ServiceAccountLookup tells whether a service account exists now, and its
// UID. It must be fast (it runs on every authentication, cache hits
// included) and safe for concurrent use. It returns found=false for a
// service account that does not exist, and an error wrapping ErrUnavailable
// when it cannot tell yet.
type ServiceAccountLookup interface {
	ServiceAccountUID(namespace, name string) (uid string, found bool, err error)
}

// ServiceAccountCreation is what a ServiceAccountLookup may also tell:
// when the service account, as it exists now, was created. The clientcert
// authenticator uses it to refuse certificates issued to an earlier
// account of the same name.
type ServiceAccountCreation interface {
	ServiceAccountCreated(namespace, name string) (created time.Time, found bool, err error)
}

// CheckServiceAccount refuses a caller whose service account no longer
// exists, or was re-created (a different UID) since its credential was
// issued. A nil lookup checks nothing; an empty c.ServiceAccountUID checks
// existence only.
func CheckServiceAccount(lookup ServiceAccountLookup, c *Caller) error {
	if lookup == nil {
		return nil
	}
	uid, found, err := lookup.ServiceAccountUID(c.Namespace, c.ServiceAccount)
	if err != nil {
		return fmt.Errorf("check service account: %w", err)
	}
	if !found {
		return Fail(ReasonServiceAccountGone, "service account %s/%s no longer exists", c.Namespace, c.ServiceAccount)
	}
	if c.ServiceAccountUID != "" && uid != c.ServiceAccountUID {
		return Fail(ReasonServiceAccountGone, "service account %s/%s was deleted and re-created since the credential was issued", c.Namespace, c.ServiceAccount)
	}
	return nil
}
