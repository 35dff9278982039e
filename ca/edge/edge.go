// Package edge is what meshca's gRPC services share: reading and checking a
// caller's credentials, the one mapping of errors to gRPC status codes and
// audit reasons, request metrics, and the audit line every request writes.
// ca/service (Istio's CreateCertificate) and sds use it, so that a refusal
// reads and counts the same whichever way a workload asked.
package edge

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"log/slog"
	"net"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promauto"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/meshca/meshca/authn"
	"github.com/meshca/meshca/ca"
)

// Metrics are the request metrics of every edge. Every metric is
// documented in README.md.
type Metrics struct {
	// Requests counts finished requests by service ("istio", "sds") and
	// gRPC status code.
	Requests *prometheus.CounterVec
	// Latency is the time from request arrival to response, by service.
	Latency *prometheus.HistogramVec
	// AuthnFailures counts refused credentials by authenticator and reason.
	AuthnFailures *prometheus.CounterVec
	// Impersonations counts requests for another identity's certificate
	// (ztunnel's), by result: "allowed", or why they were refused.
	Impersonations *prometheus.CounterVec
}

// NewMetrics creates the edge metrics on reg (nil: unregistered).
func NewMetrics(reg prometheus.Registerer) *Metrics {
	f := promauto.With(reg)
	return &Metrics{
		Requests: f.NewCounterVec(prometheus.CounterOpts{
			Name: "meshca_requests_total",
			Help: "Certificate requests finished, by service (istio, sds) and gRPC status code.",
		}, []string{"service", "code"}),
		Latency: f.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "meshca_issuance_duration_seconds",
			Help:    "Time from a certificate request's arrival to its answer, by service.",
			Buckets: []float64{.0001, .00025, .0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5},
		}, []string{"service"}),
		AuthnFailures: f.NewCounterVec(prometheus.CounterOpts{
			Name: "meshca_authn_failures_total",
			Help: "Refused credentials, by authenticator and reason.",
		}, []string{"authenticator", "reason"}),
		Impersonations: f.NewCounterVec(prometheus.CounterOpts{
			Name: "meshca_impersonations_total",
			Help: "Requests of node agents (ztunnel) for another identity's certificate, by result: allowed, or the reason for refusal.",
		}, []string{"result"}),
	}
}

// Edge is one gRPC service's view of the shared machinery.
type Edge struct {
	// Service labels metrics and audit lines: "istio" or "sds". Required.
	Service string
	// Authenticator vouches for callers. Required.
	Authenticator authn.Authenticator
	// Impersonator decides whether a caller may have a certificate for
	// another identity (Call.Impersonate). Default: nobody may.
	Impersonator Impersonator
	// Metrics records requests. Default: unregistered metrics.
	Metrics *Metrics
	// Audit receives one line per request. Default: discard.
	Audit *Auditor
	// Log receives operational logs. Default: discard.
	Log *slog.Logger
	// Admission, if set, rate-limits peers and identities and bounds
	// issuance in flight (see Call.Admit).
	Admission *Admission
}

// New checks e and fills in its defaults.
func New(e Edge) (*Edge, error) {
	if e.Service == "" {
		return nil, errors.New("edge: Service is required")
	}
	if e.Authenticator == nil {
		return nil, errors.New("edge: Authenticator is required")
	}
	if e.Metrics == nil {
		e.Metrics = NewMetrics(nil)
	}
	if e.Audit == nil {
		e.Audit = NewAuditor(nil)
	}
	if e.Log == nil {
		e.Log = slog.New(slog.DiscardHandler)
	}
	return &e, nil
}

// An Impersonator decides whether caller may have a certificate for
// identity, a SPIFFE ID, and returns the Caller to issue it to;
// *authn.NodeAuthorizer is one. A refusal wraps authn.ErrImpersonationDenied
// (an *authn.ImpersonationError), or authn.ErrUnavailable when it cannot
// tell now.
type Impersonator interface {
	Impersonate(caller *authn.Caller, identity string) (*authn.Caller, error)
}

// Call is one request passing an edge. Start it on arrival; End it once.
type Call struct {
	edge     *Edge
	start    time.Time
	priority Priority
	renewKey string
	// The credentials on the call, read once by whichever of Admit and
	// Authenticate comes first.
	read     bool
	creds    authn.Credentials
	peerAddr string
	credsErr error
	// Event is the audit line End writes; handlers add what they learn.
	Event AuditEvent
}

// Start begins a call.
func (e *Edge) Start() *Call {
	return &Call{edge: e, start: time.Now(), Event: AuditEvent{Service: e.Service}}
}

// StartFor begins a call on behalf of a caller authenticated earlier (an
// SDS stream renewing its certificate), so it is audited and counted as
// any other request.
func (e *Edge) StartFor(caller *authn.Caller, peer string) *Call {
	c := e.Start()
	c.Event.Peer = peer
	c.Event.Identity, c.Event.Authenticator = caller.ID.String(), caller.Authenticator
	if caller.PodName != "" {
		c.Event.Pod = caller.Namespace + "/" + caller.PodName
	}
	return c
}

// incoming reads the call's credentials from ctx, once.
func (c *Call) incoming(ctx context.Context) (authn.Credentials, string, error) {
	if !c.read {
		c.creds, c.peerAddr, c.credsErr = authn.FromIncoming(ctx)
		c.read = true
	}
	return c.creds, c.peerAddr, c.credsErr
}

// Authenticate reads the caller's credentials from ctx and runs the
// authenticator chain. A refusal is counted by authenticator and reason,
// and recorded in the audit event.
func (c *Call) Authenticate(ctx context.Context) (*authn.Caller, error) {
	creds, peerAddr, err := c.incoming(ctx)
	c.Event.Peer = peerAddr
	if err != nil {
		c.Event.Reason = authn.ReasonMalformed
		c.edge.Metrics.AuthnFailures.WithLabelValues("none", c.Event.Reason).Inc()
		return nil, err
	}
	caller, err := c.edge.Authenticator.Authenticate(ctx, creds)
	if err != nil {
		c.Event.Reason = authn.ReasonOf(err)
		name := "none"
		var ce *authn.ChainError
		if errors.As(err, &ce) && ce.Authenticator != "" {
			name = ce.Authenticator
		}
		c.Event.Authenticator = name
		c.edge.Metrics.AuthnFailures.WithLabelValues(name, c.Event.Reason).Inc()
		return nil, err
	}
	c.Event.Identity, c.Event.Authenticator = caller.ID.String(), caller.Authenticator
	if caller.PodName != "" {
		c.Event.Pod = caller.Namespace + "/" + caller.PodName
	}
	return caller, nil
}

// Admit applies admission control before any work on the request: a
// slot among the issuances in flight, waited for in priority order, so
// that token checks and signing for a pod's first certificate go before
// renewals. A call that renews is one with only a client certificate, or
// whose credential names a pod (else an identity at an address) that
// holds an unexpired certificate from this meshca; the token is read
// without verifying it, which only decides the order. release must be
// called when the request is done; without Admission it does nothing.
func (c *Call) Admit(ctx context.Context) (release func(), err error) {
	a := c.edge.Admission
	if a == nil {
		return func() {}, nil
	}
	creds, peerAddr, _ := c.incoming(ctx)
	host := hostOf(peerAddr)
	switch {
	case creds.Token == "" && len(creds.PeerCertificates) > 0:
		c.priority = PriorityRenewal
	case creds.Token != "":
		if key := renewalKey(a.subject(creds.Token), host); key != "" && a.recent(key) {
			c.priority = PriorityRenewal
		}
	}
	if err := a.Peer(host, c.priority); err != nil {
		return nil, err
	}
	return a.Acquire(ctx, c.priority)
}

// AdmitCaller applies the authenticated identity's rate, and remembers
// the caller, so that its next request counts as a renewal.
func (c *Call) AdmitCaller(caller *authn.Caller) error {
	a := c.edge.Admission
	if a == nil {
		return nil
	}
	c.renewKey = renewalKey(caller.PodUID, hostOf(c.Event.Peer))
	if caller.PodUID == "" {
		// The subject a token without a pod carries, as Admit reads it.
		c.renewKey = renewalKey("system:serviceaccount:"+caller.Namespace+":"+caller.ServiceAccount, hostOf(c.Event.Peer))
	}
	return a.Identity(caller.ID.String(), c.priority)
}

// renewalKey is what renewals are recognised by: a pod's UID, else the
// identity (or token subject) at an address.
func renewalKey(podOrID, host string) string {
	switch {
	case podOrID == "":
		return ""
	case strings.HasPrefix(podOrID, "spiffe://"), strings.HasPrefix(podOrID, "system:"):
		return podOrID + "|" + host
	}
	return podOrID
}

// unverifiedPod returns the pod UID a service-account token names, else
// its subject (system:serviceaccount:<ns>:<sa>), else "". Nothing is
// verified: the answer only orders requests.
func unverifiedPod(token string) string {
	parts := strings.SplitN(token, ".", 3)
	if len(parts) != 3 || len(parts[1]) > 16<<10 {
		return ""
	}
	payload, err := base64.RawURLEncoding.DecodeString(parts[1])
	if err != nil {
		return ""
	}
	var claims struct {
		Sub string `json:"sub"`
		K8s struct {
			Pod struct {
				UID string `json:"uid"`
			} `json:"pod"`
		} `json:"kubernetes.io"`
	}
	if json.Unmarshal(payload, &claims) != nil {
		return ""
	}
	if claims.K8s.Pod.UID != "" {
		return claims.K8s.Pod.UID
	}
	return claims.Sub
}

// Impersonate asks the edge's Impersonator whether caller may have a
// certificate for identity, and returns the Caller to issue it to. The
// audit event then names identity as the identity and caller's as
// impersonated_by, refused or not; the decision is counted by result.
func (c *Call) Impersonate(caller *authn.Caller, identity string) (*authn.Caller, error) {
	c.Event.ImpersonatedBy, c.Event.Node = caller.ID.String(), caller.NodeName
	c.Event.Identity = auditIdentity(identity)
	var (
		imp *authn.Caller
		err error
	)
	if c.edge.Impersonator == nil {
		err = authn.ImpersonationOff(caller)
	} else {
		imp, err = c.edge.Impersonator.Impersonate(caller, identity)
	}
	var ie *authn.ImpersonationError
	switch {
	case err == nil:
		c.Event.Identity = imp.ID.String()
		// A node agent asks for many pods: none of its requests is a
		// renewal of its own certificate.
		c.renewKey = ""
		c.edge.Metrics.Impersonations.WithLabelValues("allowed").Inc()
		return imp, nil
	case errors.As(err, &ie):
		c.edge.Metrics.Impersonations.WithLabelValues(ie.Reason).Inc()
	case errors.Is(err, authn.ErrUnavailable):
		c.edge.Metrics.Impersonations.WithLabelValues(authn.ReasonUnavailable).Inc()
	default:
		c.edge.Metrics.Impersonations.WithLabelValues(ReasonInternal).Inc()
	}
	return nil, err
}

// maxAuditIdentity bounds an asked identity in an audit line: no SPIFFE ID
// is longer, and a caller must not be able to write megabytes into it.
const maxAuditIdentity = 2048

func auditIdentity(s string) string {
	if len(s) <= maxAuditIdentity {
		return s
	}
	return s[:maxAuditIdentity] + "…(truncated)"
}

// Issued records the leaf in the audit event.
func (c *Call) Issued(is *ca.Issued) {
	if a := c.edge.Admission; a != nil && c.renewKey != "" {
		a.note(c.renewKey, is.NotAfter)
	}
	c.Event.Serial = is.Serial.Text(16)
	c.Event.NotBefore, c.Event.NotAfter = is.NotBefore, is.NotAfter
	c.Event.KeyType, c.Event.SigningCA = is.KeyType, is.SignedBy
}

// End finishes the call with err (nil for success): it writes the audit
// line and the metrics, logs outages, and returns the gRPC status error to
// send (nil for success).
func (c *Call) End(err error) error {
	code := codes.OK
	if err != nil {
		st := Status(err)
		code = st.Code()
		c.Event.Result = "refused"
		if c.Event.Reason == "" {
			c.Event.Reason = Reason(err)
		}
		if code == codes.Internal || code == codes.Unavailable {
			c.edge.Log.Error("certificate request failed", "service", c.edge.Service, "identity", c.Event.Identity, "peer", c.Event.Peer, "err", err)
		}
		err = st.Err()
	} else {
		c.Event.Result = "issued"
	}
	c.Event.Code = code.String()
	c.edge.Audit.Record(c.Event)
	c.edge.Metrics.Requests.WithLabelValues(c.edge.Service, c.Event.Code).Inc()
	c.edge.Metrics.Latency.WithLabelValues(c.edge.Service).Observe(time.Since(c.start).Seconds())
	return err
}

// hostOf is the host part of a peer address.
func hostOf(addr string) string {
	if h, _, err := net.SplitHostPort(addr); err == nil {
		return h
	}
	return addr
}

// Audit reasons that are not an authentication or CSR reason.
const (
	ReasonIdentityMismatch   = "identity_mismatch"
	ReasonBadRequest         = "bad_request"
	ReasonBackendUnavailable = "backend_unavailable"
	ReasonInternal           = "internal"
	ReasonShed               = "shed"
)

// Reason names why err refused a request, for audit lines: an
// authentication reason (authn.Reason*), an impersonation reason (the
// authn.Reason* of an *authn.ImpersonationError), a CSR reason (ca.CSR*), or
// one of the Reason constants above.
func Reason(err error) string {
	var (
		ce *ca.CSRError
		ie *authn.ImpersonationError
	)
	switch {
	case errors.Is(err, authn.ErrUnauthenticated), errors.Is(err, authn.ErrUnavailable):
		return authn.ReasonOf(err)
	case errors.As(err, &ce):
		return ce.Reason
	case errors.Is(err, authn.ErrIdentityMismatch):
		return ReasonIdentityMismatch
	case errors.As(err, &ie):
		return ie.Reason
	case errors.Is(err, ca.ErrBadRequest):
		return ReasonBadRequest
	case errors.Is(err, ca.ErrBackendUnavailable):
		return ReasonBackendUnavailable
	case errors.Is(err, ErrShed):
		return ReasonShed
	default:
		return ReasonInternal
	}
}

// Status maps an error from authentication or issuance to the status the
// client sees. Messages of known errors are written to be safe to return;
// anything unknown becomes a bare Internal.
func Status(err error) *status.Status {
	switch {
	// A caller that gave up is not an outage; check this first, since an
	// authenticator may wrap its caller's context error.
	case errors.Is(err, context.DeadlineExceeded):
		return status.New(codes.DeadlineExceeded, "deadline exceeded while issuing")
	case errors.Is(err, context.Canceled):
		return status.New(codes.Canceled, "request canceled")
	case errors.As(err, new(*ShedError)):
		var se *ShedError
		errors.As(err, &se)
		return shedStatus(se)
	case errors.Is(err, authn.ErrUnavailable):
		// The detail (hosts, paths, apiserver messages) goes to the log.
		return status.New(codes.Unavailable, "cannot authenticate now (the token authority is unreachable); retry later")
	case errors.Is(err, authn.ErrUnauthenticated):
		return status.New(codes.Unauthenticated, err.Error())
	case errors.Is(err, authn.ErrIdentityMismatch), errors.Is(err, authn.ErrImpersonationDenied):
		return status.New(codes.PermissionDenied, err.Error())
	case errors.Is(err, ca.ErrBadCSR), errors.Is(err, ca.ErrBadRequest):
		return status.New(codes.InvalidArgument, err.Error())
	case errors.Is(err, ca.ErrBackendUnavailable):
		return status.New(codes.Unavailable, "the signing backend (the upstream CA, or an expired signing CA) is unavailable; the cause is in meshca's log; retry later")
	default:
		return status.New(codes.Internal, "internal error; see meshca logs")
	}
}
