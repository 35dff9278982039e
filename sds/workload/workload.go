// Package workload is the SPIFFE Workload API that meshca agent serves on
// its Unix socket, for workloads that speak SPIFFE rather than Envoy SDS
// (go-spiffe, java-spiffe, spiffe-helper and the like).
//
// It serves one workload: every caller on the socket gets the credential
// and trust bundle of the one sds.Source it is given (the pod's). The
// X.509-SVID profile is served; the JWT-SVID and WIT-SVID profiles answer
// Unimplemented, since meshca signs neither.
//
// Streams wait on the Source and push a complete response whenever what
// they would send changes. A stream that has nothing to send yet (no
// credential issued, or no trust bundle) waits up to Config.FirstWait, then
// ends with Unavailable: the identity is defined, it is only not issued
// yet, which the SPIFFE Workload Endpoint specification calls initializing.
// Clients retry Unavailable with backoff; go-spiffe's does.
//
// Streams only end when their caller leaves or the gRPC server stops them:
// stop the server with Stop, or GracefulStop bounded by a timeout, since a
// watching client never ends its stream itself.
package workload

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promauto"
	workloadpb "github.com/spiffe/go-spiffe/v2/proto/spiffe/workload"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/meshca/meshca/sds"
)

// HeaderKey is the gRPC metadata key every Workload API call must carry,
// with the value "true", as a guard against server-side request forgery.
const HeaderKey = "workload.spiffe.io"

// Config configures a Server.
type Config struct {
	// Source is the workload's credential and trust bundle. Required.
	Source sds.Source
	// FirstWait is how long a stream waits for its first response (an
	// X.509-SVID, or a trust bundle) before it ends with Unavailable.
	// Default: 10s; negative: not at all.
	FirstWait time.Duration
	// Metrics counts calls and open streams. Default: unregistered metrics.
	Metrics *Metrics
	// Log receives operational logs. Default: discard.
	Log *slog.Logger
}

// Metrics are the Workload API's metrics. Every metric is documented in
// README.md.
type Metrics struct {
	// Calls counts finished calls by method and gRPC status code. A stream
	// the client closes ends as Canceled.
	Calls *prometheus.CounterVec
	// Streams is the number of open streams, by method.
	Streams *prometheus.GaugeVec
}

// NewMetrics creates the Workload API metrics on reg (nil: unregistered).
func NewMetrics(reg prometheus.Registerer) *Metrics {
	f := promauto.With(reg)
	return &Metrics{
		Calls: f.NewCounterVec(prometheus.CounterOpts{
			Name: "meshca_workload_api_calls_total",
			Help: "SPIFFE Workload API calls finished, by method and gRPC status code.",
		}, []string{"method", "code"}),
		Streams: f.NewGaugeVec(prometheus.GaugeOpts{
			Name: "meshca_workload_api_streams",
			Help: "Open SPIFFE Workload API streams, by method.",
		}, []string{"method"}),
	}
}

// Server is the SPIFFE Workload API over one Source. It is safe for
// concurrent use.
type Server struct {
	workloadpb.UnimplementedSpiffeWorkloadAPIServer

	src       sds.Source
	firstWait time.Duration
	metrics   *Metrics
	log       *slog.Logger
}

// New checks cfg and fills in its defaults.
func New(cfg Config) (*Server, error) {
	if cfg.Source == nil {
		return nil, errors.New("workload: Source is required")
	}
	switch {
	case cfg.FirstWait == 0:
		cfg.FirstWait = 10 * time.Second
	case cfg.FirstWait < 0:
		cfg.FirstWait = 0
	}
	if cfg.Metrics == nil {
		cfg.Metrics = NewMetrics(nil)
	}
	if cfg.Log == nil {
		cfg.Log = slog.New(slog.DiscardHandler)
	}
	return &Server{src: cfg.Source, firstWait: cfg.FirstWait, metrics: cfg.Metrics, log: cfg.Log}, nil
}

// Register adds the SpiffeWorkloadAPI service to r. Serve it without TLS,
// on a Unix socket only the workload can reach.
func (s *Server) Register(r grpc.ServiceRegistrar) {
	workloadpb.RegisterSpiffeWorkloadAPIServer(r, s)
}

var (
	errNoHeader = errors.New(`missing security header: every Workload API call must carry the gRPC metadata "` +
		HeaderKey + `: true"`)
	errNoCredential = errors.New("no X.509-SVID issued for this workload yet; retry with backoff")
	errNoBundle     = errors.New("no trust bundle for this workload yet; retry with backoff")
	errNoJWT        = errors.New("meshca does not issue JWT-SVIDs: the JWT-SVID profile is not implemented")
	errNoWIT        = errors.New("meshca does not issue WIT-SVIDs: the WIT-SVID profile is not implemented")
)

// FetchJWTSVID implements the JWT-SVID profile: Unimplemented.
func (s *Server) FetchJWTSVID(ctx context.Context, _ *workloadpb.JWTSVIDRequest) (*workloadpb.JWTSVIDResponse, error) {
	return nil, s.call(ctx, "FetchJWTSVID", false, func() error { return errNoJWT })
}

// FetchJWTBundles implements the JWT-SVID profile: Unimplemented.
func (s *Server) FetchJWTBundles(_ *workloadpb.JWTBundlesRequest, stream workloadpb.SpiffeWorkloadAPI_FetchJWTBundlesServer) error {
	return s.call(stream.Context(), "FetchJWTBundles", false, func() error { return errNoJWT })
}

// ValidateJWTSVID implements the JWT-SVID profile: Unimplemented.
func (s *Server) ValidateJWTSVID(ctx context.Context, _ *workloadpb.ValidateJWTSVIDRequest) (*workloadpb.ValidateJWTSVIDResponse, error) {
	return nil, s.call(ctx, "ValidateJWTSVID", false, func() error { return errNoJWT })
}

// FetchWITSVID implements the WIT-SVID profile: Unimplemented.
func (s *Server) FetchWITSVID(_ *workloadpb.WITSVIDRequest, stream workloadpb.SpiffeWorkloadAPI_FetchWITSVIDServer) error {
	return s.call(stream.Context(), "FetchWITSVID", false, func() error { return errNoWIT })
}

// FetchWITBundles implements the WIT-SVID profile: Unimplemented.
func (s *Server) FetchWITBundles(_ *workloadpb.WITBundlesRequest, stream workloadpb.SpiffeWorkloadAPI_FetchWITBundlesServer) error {
	return s.call(stream.Context(), "FetchWITBundles", false, func() error { return errNoWIT })
}

// call runs one call of method: it checks the security header, runs serve,
// counts the call (and, for a serving stream, the open stream), and returns
// the status error the client sees. It is where errors become gRPC codes.
func (s *Server) call(ctx context.Context, method string, streaming bool, serve func() error) error {
	err := checkHeader(ctx)
	if err == nil {
		if streaming {
			g := s.metrics.Streams.WithLabelValues(method)
			g.Inc()
			defer g.Dec()
		}
		err = serve()
	}
	st := s.status(method, err)
	s.metrics.Calls.WithLabelValues(method, st.Code().String()).Inc()
	return st.Err()
}

func checkHeader(ctx context.Context) error {
	md, _ := metadata.FromIncomingContext(ctx)
	if v := md.Get(HeaderKey); len(v) != 1 || v[0] != "true" {
		return errNoHeader
	}
	return nil
}

// status maps err (nil for success) to the status the client sees, and
// logs what an operator should know about.
func (s *Server) status(method string, err error) *status.Status {
	switch {
	case err == nil:
		return status.New(codes.OK, "")
	// A caller that left is the normal end of a stream; check this first,
	// since a failed send wraps the context's error.
	case errors.Is(err, context.Canceled):
		return status.New(codes.Canceled, "stream canceled")
	case errors.Is(err, context.DeadlineExceeded):
		return status.New(codes.DeadlineExceeded, "deadline exceeded")
	case errors.Is(err, errNoHeader):
		s.log.Warn("Workload API call refused", "method", method, "err", err)
		return status.New(codes.InvalidArgument, err.Error())
	case errors.Is(err, errNoCredential), errors.Is(err, errNoBundle):
		s.log.Warn("Workload API stream had nothing to send", "method", method, "err", err)
		return status.New(codes.Unavailable, err.Error())
	case errors.Is(err, errNoJWT), errors.Is(err, errNoWIT):
		return status.New(codes.Unimplemented, err.Error())
	}
	if st, ok := status.FromError(err); ok {
		// The transport's own error, from a failed send.
		s.log.Debug("Workload API stream ended", "method", method, "err", err)
		return st
	}
	s.log.Error("Workload API call failed", "method", method, "err", err)
	return status.New(codes.Internal, fmt.Sprintf("internal error in %s; see meshca agent logs", method))
}
