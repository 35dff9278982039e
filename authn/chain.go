package authn

import (
	"context"
	"errors"
)

// Named is an Authenticator with the name used in configuration, metrics
// and audit lines ("jwt", "tokenreview", "clientcert").
type Named struct {
	Name string
	Authenticator
}

// Chain tries authenticators in order. An authenticator that finds no
// credential of its kind (ErrNoCredentials) passes to the next; the first
// one that finds its kind of credential decides, success or failure. So a
// token that fails the local JWT check is not retried by TokenReview: that
// would turn every bad token into an apiserver round trip.
type Chain struct {
	links []Named
}

// NewChain returns a Chain over links, tried in the given order.
func NewChain(links ...Named) (*Chain, error) {
	if len(links) == 0 {
		return nil, errors.New("authn: a chain needs at least one authenticator")
	}
	for _, l := range links {
		if l.Name == "" || l.Authenticator == nil {
			return nil, errors.New("authn: every chain link needs a name and an authenticator")
		}
	}
	return &Chain{links: links}, nil
}

// ChainError is a failure from a Chain, naming the authenticator that
// decided ("" when none found credentials).
type ChainError struct {
	Authenticator string
	Err           error
}

func (e *ChainError) Error() string { return e.Err.Error() }

// Unwrap returns the authenticator's error.
func (e *ChainError) Unwrap() error { return e.Err }

// Authenticate implements Authenticator.
func (c *Chain) Authenticate(ctx context.Context, creds Credentials) (*Caller, error) {
	for _, l := range c.links {
		caller, err := l.Authenticate(ctx, creds)
		switch {
		case err == nil:
			if caller.Authenticator == "" {
				caller.Authenticator = l.Name
			}
			return caller, nil
		case errors.Is(err, ErrNoCredentials):
			continue
		default:
			return nil, &ChainError{Authenticator: l.Name, Err: err}
		}
	}
	return nil, &ChainError{Err: Fail(ReasonNoCredentials, "send a service-account token as `authorization: Bearer <token>` metadata, or a client certificate issued by this CA")}
}
