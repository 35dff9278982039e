package edge

import (
	"context"
	"io"
	"log/slog"
	"time"

	"github.com/meshca/meshca/ca"
)

// AuditEvent is one certificate request's outcome. It holds no secrets: no
// token, key or CSR ever goes in.
type AuditEvent struct {
	// Service is "istio" or "sds".
	Service string
	// Result is "issued" or "refused".
	Result string
	// Code is the gRPC status code sent; Reason the specific cause of a
	// refusal (an authn or CSR reason).
	Code   string
	Reason string
	// Identity is the SPIFFE ID the certificate is for: the caller's own
	// when authenticated, or the one a node agent asked for.
	Identity string
	// ImpersonatedBy is the caller's SPIFFE ID when it asked for another
	// identity's certificate (ztunnel), and Node the caller's node.
	ImpersonatedBy string
	Node           string
	// Pod is the pod the caller's credential is bound to.
	Pod           string
	Authenticator string
	// Leaf facts, for issued certificates.
	Serial    string
	NotBefore time.Time
	NotAfter  time.Time
	KeyType   ca.KeyType
	SigningCA string
	// Peer is the caller's network address.
	Peer string
}

// Auditor writes one JSON line per certificate request. Writes are
// unbuffered, so a line is on its way to the sink before the reply leaves.
type Auditor struct {
	log *slog.Logger
}

// NewAuditor returns an Auditor writing JSON lines to w. A nil w discards.
func NewAuditor(w io.Writer) *Auditor {
	if w == nil {
		w = io.Discard
	}
	return &Auditor{log: slog.New(slog.NewJSONHandler(w, nil))}
}

// Record writes ev. Empty fields are left out.
func (a *Auditor) Record(ev AuditEvent) {
	attrs := make([]slog.Attr, 0, 16)
	attrs = append(attrs, slog.String("audit", "certificate"), slog.String("service", ev.Service), slog.String("result", ev.Result))
	add := func(k, v string) {
		if v != "" {
			attrs = append(attrs, slog.String(k, v))
		}
	}
	add("code", ev.Code)
	add("reason", ev.Reason)
	add("identity", ev.Identity)
	add("impersonated_by", ev.ImpersonatedBy)
	add("node", ev.Node)
	add("pod", ev.Pod)
	add("authenticator", ev.Authenticator)
	add("serial", ev.Serial)
	if !ev.NotAfter.IsZero() {
		attrs = append(attrs, slog.Time("not_before", ev.NotBefore), slog.Time("not_after", ev.NotAfter))
	}
	add("key_type", string(ev.KeyType))
	add("signing_ca", ev.SigningCA)
	add("peer", ev.Peer)
	a.log.LogAttrs(context.Background(), slog.LevelInfo, "certificate request", attrs...)
}
