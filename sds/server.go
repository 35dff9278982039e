package sds

import (
	"context"
	"crypto"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"runtime"
	"sort"
	"sync"
	"sync/atomic"
	"time"

	discovery "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	secretv3 "github.com/envoyproxy/go-control-plane/envoy/service/secret/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"github.com/envoyproxy/go-control-plane/pkg/server/delta/v3"
	"github.com/envoyproxy/go-control-plane/pkg/server/sotw/v3"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"

	"github.com/meshca/meshca/authn"
	"github.com/meshca/meshca/ca"
	"github.com/meshca/meshca/ca/edge"
)

// Mode says where the server runs.
type Mode string

// Modes, also the values of the "mode" metric label.
const (
	// ModeCentral is inside meshca serve: streams authenticate, and each
	// gets its own key and certificates from the CA core.
	ModeCentral Mode = "central"
	// ModeAgent is inside meshca agent: every stream on the pod's socket
	// is served the pod's one credential.
	ModeAgent Mode = "agent"
)

// ServiceLabel is SDS's name in the edge's metrics and audit lines.
const ServiceLabel = "sds"

// An Issuer issues certificates for keys the server generates, and says
// when its trust bundle or signing CA changes. *ca.CA is one.
type Issuer interface {
	IssueKey(ctx context.Context, caller *authn.Caller, key crypto.Signer, lifetime time.Duration) (*ca.Issued, error)
	Rule(namespace, serviceAccount string) ca.Effective
	State() ca.State
	Subscribe(fn func(ca.Change)) (cancel func())
}

// Config configures a Server. Set CA and Edge for central mode, or Source
// and ID for agent mode.
type Config struct {
	// CA issues the streams' certificates (central mode).
	CA Issuer
	// Edge authenticates streams, and audits and counts every issuance
	// with service label "sds" (central mode).
	Edge *edge.Edge
	// ServiceAccounts, when set, lets the server end the streams of
	// service accounts that were deleted or re-created (central mode).
	ServiceAccounts authn.ServiceAccountLookup

	// Source is the pod's credential and bundle (agent mode).
	Source Source
	// ID is the identity the agent serves (agent mode).
	ID spiffeid.ID

	// MaxStreams bounds open streams; more are refused with
	// ResourceExhausted. Default 20000.
	MaxStreams int
	// MaxIssuing bounds first certificates being issued at once; streams
	// beyond it wait their turn. Default 2 × GOMAXPROCS.
	MaxIssuing int
	// RenewWorkers is how many renewals run at once. They are kept apart
	// from first issuances, so that new pods come first. Default
	// GOMAXPROCS/2, at least 1.
	RenewWorkers int
	// BundleAckTimeout is how long leaves under a new root wait for every
	// stream to accept the bundle that holds it. Default 5s.
	BundleAckTimeout time.Duration
	// ReissueSpread spreads the new certificates that follow a change of
	// signing CA over this long. Default 10s.
	ReissueSpread time.Duration
	// RecheckInterval is how often open streams' credentials are checked
	// (token expiry, deleted service account). Default 30s.
	RecheckInterval time.Duration
	// RetryMin and RetryMax bound the backoff of a failed renewal.
	// Defaults 1s and 1m.
	RetryMin, RetryMax time.Duration
	// Metrics records pushes, NACKs and refusals. Default: unregistered;
	// its registerer (if any) also gets the server's scrape-time gauges.
	Metrics *Metrics
	// Log receives operational logs. Default: discard.
	Log *slog.Logger
}

// Server serves Envoy's SecretDiscoveryService. Run must be called for
// pushes to happen.
type Server struct {
	secretv3.UnimplementedSecretDiscoveryServiceServer

	cfg     Config
	mode    Mode
	log     *slog.Logger
	metrics *Metrics
	descs   descs

	open    atomic.Int64
	nextID  atomic.Int64
	issuing chan struct{}
	queue   renewQueue

	mu      sync.Mutex
	streams map[int64]*stream
	bundle  *servedBundle
	// cred is the agent's credential (agent mode), and src the Source
	// credential it encodes.
	cred *material
	src  *Credential
	// retired holds roots that left the CA's bundle while leaves signed
	// under them may still be in use (central mode).
	retired map[string]retiredRoot
}

type retiredRoot struct {
	root  *x509.Certificate
	until time.Time
}

// New checks cfg and returns a Server.
func New(cfg Config) (*Server, error) {
	s := &Server{streams: map[int64]*stream{}, retired: map[string]retiredRoot{}, descs: newDescs()}
	switch {
	case cfg.CA != nil && cfg.Source != nil:
		return nil, errors.New("sds: set CA (central mode) or Source (agent mode), not both")
	case cfg.CA != nil:
		if cfg.Edge == nil {
			return nil, errors.New("sds: central mode needs an Edge to authenticate streams")
		}
		s.mode = ModeCentral
	case cfg.Source != nil:
		if cfg.ID.IsZero() {
			return nil, errors.New("sds: agent mode needs the ID it serves")
		}
		s.mode = ModeAgent
	default:
		return nil, errors.New("sds: CA (central mode) or Source (agent mode) is required")
	}
	if cfg.MaxStreams <= 0 {
		cfg.MaxStreams = 20000
	}
	if cfg.MaxIssuing <= 0 {
		cfg.MaxIssuing = 2 * runtime.GOMAXPROCS(0)
	}
	if cfg.RenewWorkers <= 0 {
		cfg.RenewWorkers = max(1, runtime.GOMAXPROCS(0)/2)
	}
	if cfg.BundleAckTimeout <= 0 {
		cfg.BundleAckTimeout = 5 * time.Second
	}
	if cfg.ReissueSpread <= 0 {
		cfg.ReissueSpread = 10 * time.Second
	}
	if cfg.RecheckInterval <= 0 {
		cfg.RecheckInterval = 30 * time.Second
	}
	if cfg.RetryMin <= 0 {
		cfg.RetryMin = time.Second
	}
	if cfg.RetryMax < cfg.RetryMin {
		cfg.RetryMax = max(time.Minute, cfg.RetryMin)
	}
	if cfg.Metrics == nil {
		cfg.Metrics = NewMetrics(nil)
	}
	if cfg.Log == nil {
		cfg.Log = slog.New(slog.DiscardHandler)
	}
	s.cfg, s.log, s.metrics = cfg, cfg.Log, cfg.Metrics
	s.issuing = make(chan struct{}, cfg.MaxIssuing)
	s.queue.signal = make(chan struct{}, 1)
	if s.mode == ModeCentral {
		s.bundle = newServedBundle(1, cfg.CA.State().Roots)
	} else {
		snap, _ := cfg.Source.Watch()
		s.bundle = newServedBundle(1, snap.Bundle.Roots)
	}
	if reg := cfg.Metrics.reg; reg != nil {
		if err := reg.Register(s); err != nil {
			return nil, fmt.Errorf("sds: register metrics: %w", err)
		}
	}
	return s, nil
}

// Register adds the SDS service to g.
func (s *Server) Register(g grpc.ServiceRegistrar) {
	secretv3.RegisterSecretDiscoveryServiceServer(g, s)
}

// Mode returns the server's mode.
func (s *Server) Mode() Mode { return s.mode }

// Run keeps every open stream current until ctx is done, then returns nil:
// in central mode it follows the CA's changes, renews certificates and
// rechecks credentials; in agent mode it follows the Source.
func (s *Server) Run(ctx context.Context) error {
	var wg sync.WaitGroup
	defer wg.Wait()
	if s.mode == ModeAgent {
		s.followSource(ctx)
		return nil
	}
	for range s.cfg.RenewWorkers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for st := s.queue.pop(ctx); st != nil; st = s.queue.pop(ctx) {
				s.renew(ctx, st)
			}
		}()
	}
	wg.Add(1)
	go func() {
		defer wg.Done()
		s.recheck(ctx)
	}()
	s.followCA(ctx)
	return nil
}

// StreamSecrets serves a state-of-the-world stream.
func (s *Server) StreamSecrets(ss secretv3.SecretDiscoveryService_StreamSecretsServer) error {
	st, err := s.openStream(ss.Context(), "sotw")
	if err != nil {
		return err
	}
	defer s.closeStream(st)
	err = sotw.NewServer(st.ctx, st.cache, st).StreamHandler(ss, resource.SecretType)
	return st.result(err)
}

// DeltaSecrets serves an incremental stream.
func (s *Server) DeltaSecrets(ss secretv3.SecretDiscoveryService_DeltaSecretsServer) error {
	st, err := s.openStream(ss.Context(), "delta")
	if err != nil {
		return err
	}
	defer s.closeStream(st)
	err = delta.NewServer(st.ctx, st.cache, st).DeltaStreamHandler(ss, resource.SecretType)
	return st.result(err)
}

// FetchSecrets answers one request. In central mode every fetch that asks
// for a certificate is issued a new one, as CreateCertificate would be.
func (s *Server) FetchSecrets(ctx context.Context, req *discovery.DiscoveryRequest) (*discovery.DiscoveryResponse, error) {
	if t := req.GetTypeUrl(); t != "" && t != resource.SecretType {
		return nil, wrongType(t)
	}
	st, err := s.openStream(ctx, "fetch")
	if err != nil {
		return nil, err
	}
	defer s.closeStream(st)
	names := req.GetResourceNames()
	if len(names) == 0 {
		names = []string{NameAll}
	}
	if err := st.subscribe(expand(names, st.ident), nil); err != nil {
		return nil, err
	}
	return st.fetchResponse(expand(names, st.ident))
}

func wrongType(t string) error {
	return status.Errorf(codes.InvalidArgument, "type_url %q is not served here: this is SDS, which serves %s", t, resource.SecretType)
}

// openStream admits and authenticates a new stream.
func (s *Server) openStream(ctx context.Context, protocol string) (*stream, error) {
	if n := s.open.Add(1); n > int64(s.cfg.MaxStreams) {
		s.open.Add(-1)
		s.metrics.Shed.WithLabelValues("streams").Inc()
		return nil, status.Errorf(codes.ResourceExhausted, "meshca holds its limit of %d SDS streams (sds.maxStreams); retry later or add replicas", s.cfg.MaxStreams)
	}
	st := &stream{srv: s, id: s.nextID.Add(1), protocol: protocol, opened: time.Now(), names: map[string]kind{}}
	if p, ok := peer.FromContext(ctx); ok && p.Addr != nil {
		st.peer = p.Addr.String()
	}
	if s.mode == ModeCentral {
		call := s.cfg.Edge.Start()
		var (
			caller *authn.Caller
			err    error
		)
		offload(func() { caller, err = call.Authenticate(ctx) })
		if err != nil {
			s.open.Add(-1)
			return nil, call.End(err)
		}
		st.caller, st.ident = caller, caller.ID
	} else {
		st.ident = s.cfg.ID
	}
	st.init(ctx)
	s.mu.Lock()
	s.streams[st.id] = st
	s.mu.Unlock()
	return st, nil
}

// offload runs fn on a goroutine of its own and waits for it. Token checks
// and signing grow a goroutine's stack to 8-16 KiB, and Go keeps a grown
// stack: run on the stream's long-lived goroutine, they would cost that
// much for every open stream.
func offload(fn func()) {
	done := make(chan struct{})
	go func() {
		defer close(done)
		fn()
	}()
	<-done
}

func (s *Server) closeStream(st *stream) {
	st.stop()
	s.mu.Lock()
	delete(s.streams, st.id)
	s.mu.Unlock()
	s.open.Add(-1)
}

// snapshotStreams returns the open streams.
func (s *Server) snapshotStreams() []*stream {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make([]*stream, 0, len(s.streams))
	for _, st := range s.streams {
		out = append(out, st)
	}
	return out
}

// currentBundle returns the bundle in force.
func (s *Server) currentBundle() *servedBundle {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.bundle
}

// Proxy describes one open stream, for the admin listing.
type Proxy struct {
	Identity string `json:"identity"`
	// Node is the node ID the proxy declared (its claim, not checked).
	Node      string    `json:"node"`
	Mode      Mode      `json:"mode"`
	Protocol  string    `json:"protocol"`
	Peer      string    `json:"peer,omitempty"`
	Resources []string  `json:"resources"`
	Connected time.Time `json:"connected"`
	// Serial, NotAfter and NextRenewal describe the certificate last
	// pushed on the stream.
	Serial      string     `json:"serial,omitempty"`
	NotAfter    *time.Time `json:"notAfter,omitempty"`
	NextRenewal *time.Time `json:"nextRenewal,omitempty"`
	// BundleCurrent says the proxy accepted the bundle in force.
	BundleCurrent bool       `json:"bundleCurrent"`
	LastACK       *time.Time `json:"lastAck,omitempty"`
	LastNACK      *time.Time `json:"lastNack,omitempty"`
	NACKDetail    string     `json:"nackDetail,omitempty"`
}

// Proxies lists the open streams, soonest certificate expiry first.
func (s *Server) Proxies() []Proxy {
	cur := s.currentBundle()
	streams := s.snapshotStreams()
	out := make([]Proxy, 0, len(streams))
	for _, st := range streams {
		out = append(out, st.describe(cur))
	}
	sort.SliceStable(out, func(i, j int) bool {
		a, b := out[i].NotAfter, out[j].NotAfter
		switch {
		case a == nil:
			return false
		case b == nil:
			return true
		}
		return a.Before(*b)
	})
	return out
}

// Describe implements prometheus.Collector.
func (s *Server) Describe(ch chan<- *prometheus.Desc) {
	ch <- s.descs.streams
	ch <- s.descs.earliestExpiry
	ch <- s.descs.staleBundle
}

// Collect implements prometheus.Collector: the gauges that describe the
// open streams.
func (s *Server) Collect(ch chan<- prometheus.Metric) {
	cur := s.currentBundle()
	var earliest time.Time
	stale := 0
	streams := s.snapshotStreams()
	for _, st := range streams {
		na, wantsBundle, ackedSeq := st.acceptedState()
		if !na.IsZero() && (earliest.IsZero() || na.Before(earliest)) {
			earliest = na
		}
		if wantsBundle && ackedSeq != cur.seq {
			stale++
		}
	}
	ch <- prometheus.MustNewConstMetric(s.descs.streams, prometheus.GaugeValue, float64(len(streams)), string(s.mode))
	if !earliest.IsZero() {
		ch <- prometheus.MustNewConstMetric(s.descs.earliestExpiry, prometheus.GaugeValue, time.Until(earliest).Seconds())
	}
	ch <- prometheus.MustNewConstMetric(s.descs.staleBundle, prometheus.GaugeValue, float64(stale))
}
