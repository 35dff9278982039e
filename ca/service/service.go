// Package service serves Istio's certificate API,
// istio.v1.auth.IstioCertificateService/CreateCertificate, so that
// istio-agent can use meshca in place of istiod's CA. It is the one place
// where the CA's errors become gRPC status codes.
package service

import (
	"context"
	"errors"
	"log/slog"
	"strings"
	"time"

	pb "istio.io/api/security/v1alpha1"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"

	"github.com/meshca/meshca/authn"
	"github.com/meshca/meshca/ca"
)

// Config configures a Service.
type Config struct {
	// CA issues the certificates. Required.
	CA *ca.CA
	// Authenticator vouches for callers. Required.
	Authenticator authn.Authenticator
	// Metrics records requests, latency and authentication failures.
	// Default: unregistered metrics.
	Metrics *ca.Metrics
	// Audit receives one line per request. Default: discard.
	Audit *ca.Auditor
	// Log receives operational logs. Default: discard.
	Log *slog.Logger
}

// Service implements IstioCertificateServiceServer.
type Service struct {
	pb.UnimplementedIstioCertificateServiceServer
	ca      *ca.CA
	authn   authn.Authenticator
	metrics *ca.Metrics
	audit   *ca.Auditor
	log     *slog.Logger
}

// New returns a Service.
func New(cfg Config) (*Service, error) {
	if cfg.CA == nil {
		return nil, errors.New("service: CA is required")
	}
	if cfg.Authenticator == nil {
		return nil, errors.New("service: Authenticator is required")
	}
	if cfg.Metrics == nil {
		m, err := ca.NewMetrics(nil)
		if err != nil {
			return nil, err
		}
		cfg.Metrics = m
	}
	if cfg.Audit == nil {
		cfg.Audit = ca.NewAuditor(nil)
	}
	if cfg.Log == nil {
		cfg.Log = slog.New(slog.DiscardHandler)
	}
	return &Service{ca: cfg.CA, authn: cfg.Authenticator, metrics: cfg.Metrics, audit: cfg.Audit, log: cfg.Log}, nil
}

// Register adds the service to s.
func (s *Service) Register(g grpc.ServiceRegistrar) { pb.RegisterIstioCertificateServiceServer(g, s) }

const serviceLabel = "istio"

// CreateCertificate authenticates the caller, checks the CSR and returns
// the chain leaf first, root last.
func (s *Service) CreateCertificate(ctx context.Context, req *pb.IstioCertificateRequest) (*pb.IstioCertificateResponse, error) {
	start := time.Now()
	ev := ca.AuditEvent{Service: serviceLabel}
	creds := authn.Credentials{}
	if p, ok := peer.FromContext(ctx); ok {
		ev.Peer = p.Addr.String()
		if ti, ok := p.AuthInfo.(credentials.TLSInfo); ok {
			creds.PeerCertificates = ti.State.PeerCertificates
		}
	}
	resp, err := s.create(ctx, req, creds, &ev)
	code := codes.OK
	if err != nil {
		st := toStatus(err)
		code = st.Code()
		ev.Result, ev.Code = "refused", code.String()
		if code == codes.Internal || code == codes.Unavailable {
			s.log.Error("certificate request failed", "identity", ev.Identity, "peer", ev.Peer, "err", err)
		}
		err = st.Err()
	} else {
		ev.Result, ev.Code = "issued", code.String()
	}
	s.audit.Record(ev)
	s.metrics.Requests.WithLabelValues(serviceLabel, code.String()).Inc()
	s.metrics.Latency.WithLabelValues(serviceLabel).Observe(time.Since(start).Seconds())
	return resp, err
}

func (s *Service) create(ctx context.Context, req *pb.IstioCertificateRequest, creds authn.Credentials, ev *ca.AuditEvent) (*pb.IstioCertificateResponse, error) {
	tok, err := bearerToken(ctx)
	if err != nil {
		ev.Reason = authn.ReasonMalformed
		s.metrics.AuthnFailures.WithLabelValues("none", ev.Reason).Inc()
		return nil, err
	}
	creds.Token = tok
	caller, err := s.authn.Authenticate(ctx, creds)
	if err != nil {
		ev.Reason = authn.ReasonOf(err)
		name := "none"
		var ce *authn.ChainError
		if errors.As(err, &ce) && ce.Authenticator != "" {
			name = ce.Authenticator
		}
		ev.Authenticator = name
		s.metrics.AuthnFailures.WithLabelValues(name, ev.Reason).Inc()
		return nil, err
	}
	ev.Identity, ev.Pod, ev.Authenticator = caller.ID.String(), caller.PodName, caller.Authenticator
	if caller.PodName != "" {
		ev.Pod = caller.Namespace + "/" + caller.PodName
	}
	issued, err := s.ca.Issue(ctx, ca.IssueRequest{
		Caller:          caller,
		CSR:             []byte(req.GetCsr()),
		ValiditySeconds: req.GetValidityDuration(),
	})
	if err != nil {
		ev.Reason = reasonOf(err)
		return nil, err
	}
	ev.Serial = issued.Serial.Text(16)
	ev.NotBefore, ev.NotAfter = issued.NotBefore, issued.NotAfter
	ev.KeyType, ev.SigningCA = issued.KeyType, issued.SignedBy
	chain := make([]string, 0, 1+len(issued.ChainPEM))
	chain = append(chain, issued.CertPEM)
	chain = append(chain, issued.ChainPEM...)
	return &pb.IstioCertificateResponse{CertChain: chain}, nil
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
		return "", authn.Fail(authn.ReasonMalformed, "send one `authorization` metadata entry, got %d", len(vals))
	}
	scheme, tok, ok := strings.Cut(vals[0], " ")
	if !ok || !strings.EqualFold(scheme, "Bearer") {
		return "", authn.Fail(authn.ReasonMalformed, "`authorization` metadata must be \"Bearer <token>\"")
	}
	tok = strings.TrimSpace(tok)
	if tok == "" {
		return "", authn.Fail(authn.ReasonMalformed, "`authorization` metadata has an empty bearer token")
	}
	return tok, nil
}

func reasonOf(err error) string {
	var ce *ca.CSRError
	switch {
	case errors.As(err, &ce):
		return ce.Reason
	case errors.Is(err, authn.ErrIdentityMismatch):
		return "identity_mismatch"
	case errors.Is(err, ca.ErrBadRequest):
		return "bad_request"
	case errors.Is(err, ca.ErrBackendUnavailable):
		return "backend_unavailable"
	default:
		return "internal"
	}
}

// toStatus maps an error from authentication or issuance to the status the
// client sees. Messages of known errors are written to be safe to return;
// anything unknown becomes a bare Internal.
func toStatus(err error) *status.Status {
	switch {
	// A caller that gave up is not an outage; check this first, since an
	// authenticator may wrap its caller's context error.
	case errors.Is(err, context.DeadlineExceeded):
		return status.New(codes.DeadlineExceeded, "deadline exceeded while issuing")
	case errors.Is(err, context.Canceled):
		return status.New(codes.Canceled, "request canceled")
	case errors.Is(err, authn.ErrUnavailable):
		// The detail (hosts, paths, apiserver messages) goes to the log.
		return status.New(codes.Unavailable, "cannot authenticate now (the token authority is unreachable); retry later")
	case errors.Is(err, authn.ErrUnauthenticated):
		return status.New(codes.Unauthenticated, err.Error())
	case errors.Is(err, authn.ErrIdentityMismatch):
		return status.New(codes.PermissionDenied, err.Error())
	case errors.Is(err, ca.ErrBadCSR), errors.Is(err, ca.ErrBadRequest):
		return status.New(codes.InvalidArgument, err.Error())
	case errors.Is(err, ca.ErrBackendUnavailable):
		return status.New(codes.Unavailable, "signing backend unavailable, retry later")
	default:
		return status.New(codes.Internal, "internal error; see meshca logs")
	}
}
