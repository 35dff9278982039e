package authn

import (
	"context"
	"strings"

	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/peer"
)

// FromIncoming reads what a gRPC caller presented: the bearer token of
// `authorization: Bearer <token>` metadata and the TLS client chain (not yet
// verified), and the caller's network address for audit lines. Malformed
// `authorization` metadata is an *Error with ReasonMalformed; no metadata
// at all is not an error (the chain decides).
func FromIncoming(ctx context.Context) (creds Credentials, peerAddr string, err error) {
	if p, ok := peer.FromContext(ctx); ok {
		if p.Addr != nil {
			peerAddr = p.Addr.String()
		}
		if ti, ok := p.AuthInfo.(credentials.TLSInfo); ok {
			creds.PeerCertificates = ti.State.PeerCertificates
		}
	}
	creds.Token, err = bearerToken(ctx)
	return creds, peerAddr, err
}

// bearerToken returns the token from `authorization: Bearer <token>`, ""
// when there is none, and an error when the metadata is malformed.
func bearerToken(ctx context.Context) (string, error) {
	vals := metadata.ValueFromIncomingContext(ctx, "authorization")
	switch len(vals) {
	case 0:
		return "", nil
	case 1:
	default:
		return "", Fail(ReasonMalformed, "send one `authorization` metadata entry, got %d", len(vals))
	}
	scheme, tok, ok := strings.Cut(vals[0], " ")
	if !ok || !strings.EqualFold(scheme, "Bearer") {
		return "", Fail(ReasonMalformed, "`authorization` metadata must be \"Bearer <token>\"")
	}
	tok = strings.TrimSpace(tok)
	if tok == "" {
		return "", Fail(ReasonMalformed, "`authorization` metadata has an empty bearer token")
	}
	return tok, nil
}
