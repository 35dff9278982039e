// Package service serves Istio's certificate API,
// istio.v1.auth.IstioCertificateService/CreateCertificate, so that
// istio-agent can use meshca in place of istiod's CA. It converts the wire
// request into meshca's terms; package edge turns the outcome into a status
// code, an audit line and metrics.
package service

import (
	"context"
	"errors"
	"fmt"
	"math"
	"time"

	pb "istio.io/api/security/v1alpha1"

	"google.golang.org/grpc"
	"google.golang.org/grpc/metadata"
	"google.golang.org/protobuf/types/known/structpb"

	"github.com/meshca/meshca/ca"
	"github.com/meshca/meshca/ca/edge"
)

// An Issuer issues workload certificates; *ca.CA is one.
type Issuer interface {
	Issue(ctx context.Context, req ca.IssueRequest) (*ca.Issued, error)
	// RejectCSR counts a CSR refused before Issue saw it.
	RejectCSR(err error)
}

// Config configures a Service.
type Config struct {
	// CA issues the certificates. Required.
	CA Issuer
	// Edge authenticates, audits and counts requests; its Service should
	// be ServiceLabel. Required.
	Edge *edge.Edge
}

// ServiceLabel is this service's name in metrics and audit lines.
const ServiceLabel = "istio"

// RenewAtHeader is the response header metadata key by which
// CreateCertificate tells the client when to renew: the renewal point the
// policy sets (ca.RenewAt with the rule's renewFraction and renewJitter),
// RFC 3339 in UTC, whole seconds. Clients that do not know it ignore it.
const RenewAtHeader = "meshca-renew-at"

// ImpersonatedIdentityKey is the field of IstioCertificateRequest.metadata
// (a google.protobuf.Struct) by which a node agent asks for a certificate
// for another identity: ztunnel sets it to the SPIFFE ID of a workload on
// its node, and signs the CSR for that identity. The key and its meaning
// are Istio's (istiod's CA server reads the same field).
const ImpersonatedIdentityKey = "ImpersonatedIdentity"

// Service implements IstioCertificateServiceServer.
type Service struct {
	pb.UnimplementedIstioCertificateServiceServer
	ca   Issuer
	edge *edge.Edge
}

// New returns a Service.
func New(cfg Config) (*Service, error) {
	if cfg.CA == nil {
		return nil, errors.New("service: CA is required")
	}
	if cfg.Edge == nil {
		return nil, errors.New("service: Edge is required")
	}
	return &Service{ca: cfg.CA, edge: cfg.Edge}, nil
}

// Register adds the service to s.
func (s *Service) Register(g grpc.ServiceRegistrar) { pb.RegisterIstioCertificateServiceServer(g, s) }

// CreateCertificate authenticates the caller, checks the CSR and returns
// the chain leaf first, root last. A request whose metadata names an
// ImpersonatedIdentityKey is for that identity, if the edge's Impersonator
// allows it, and refused otherwise: it is never answered with a
// certificate for the caller's own identity.
func (s *Service) CreateCertificate(ctx context.Context, req *pb.IstioCertificateRequest) (*pb.IstioCertificateResponse, error) {
	call := s.edge.Start()
	resp, err := s.create(ctx, call, req)
	return resp, call.End(err)
}

func (s *Service) create(ctx context.Context, call *edge.Call, req *pb.IstioCertificateRequest) (*pb.IstioCertificateResponse, error) {
	release, err := call.Admit(ctx)
	if err != nil {
		return nil, err
	}
	defer release()
	caller, err := call.Authenticate(ctx)
	if err != nil {
		return nil, err
	}
	if err := call.AdmitCaller(caller); err != nil {
		return nil, err
	}
	asked, err := impersonatedIdentity(req)
	if err != nil {
		return nil, err
	}
	if asked != "" {
		// From here on, the certificate is the impersonated identity's:
		// its CSR and its policy are checked against that identity.
		if caller, err = call.Impersonate(caller, asked); err != nil {
			return nil, err
		}
	}
	if v := req.GetValidityDuration(); v < 0 {
		return nil, fmt.Errorf("%w: validity_duration is %d seconds; want 0 (policy default) or a positive number", ca.ErrBadRequest, v)
	}
	der, err := ca.CSRFromPEM([]byte(req.GetCsr()))
	if err != nil {
		s.ca.RejectCSR(err)
		return nil, err
	}
	issued, err := s.ca.Issue(ctx, ca.IssueRequest{
		Caller:   caller,
		CSR:      der,
		Lifetime: secondsToDuration(req.GetValidityDuration()),
	})
	if err != nil {
		return nil, err
	}
	call.Issued(issued)
	if err := setRenewAt(ctx, issued); err != nil {
		return nil, err
	}
	chain := make([]string, 0, 1+len(issued.ChainPEM))
	chain = append(chain, issued.CertPEM)
	chain = append(chain, issued.ChainPEM...)
	return &pb.IstioCertificateResponse{CertChain: chain}, nil
}

// impersonatedIdentity returns the request's ImpersonatedIdentityKey
// metadata, "" when it has none. An empty string counts as none, as for
// istiod; a value that is not a string is a malformed request.
func impersonatedIdentity(req *pb.IstioCertificateRequest) (string, error) {
	v, ok := req.GetMetadata().GetFields()[ImpersonatedIdentityKey]
	if !ok {
		return "", nil
	}
	s, ok := v.GetKind().(*structpb.Value_StringValue)
	if !ok {
		return "", fmt.Errorf("%w: metadata %s must be a string holding a SPIFFE ID", ca.ErrBadRequest, ImpersonatedIdentityKey)
	}
	return s.StringValue, nil
}

// setRenewAt sends RenewAtHeader with the response. A direct call with no
// gRPC stream behind its context (a unit test) has nowhere to send it and
// skips it; a stream that cannot take the header fails the call, since its
// response would not get through either.
func setRenewAt(ctx context.Context, issued *ca.Issued) error {
	if grpc.ServerTransportStreamFromContext(ctx) == nil {
		return nil
	}
	at := issued.RenewAt
	md := metadata.Pairs(RenewAtHeader, at.UTC().Truncate(time.Second).Format(time.RFC3339))
	if err := grpc.SetHeader(ctx, md); err != nil {
		return fmt.Errorf("set %s header: %w", RenewAtHeader, err)
	}
	return nil
}

// secondsToDuration converts without overflow: anything beyond what a
// Duration holds becomes the largest Duration, which the policy clamps.
func secondsToDuration(s int64) time.Duration {
	if s > math.MaxInt64/int64(time.Second) {
		return math.MaxInt64
	}
	return time.Duration(s) * time.Second
}
