package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	httppprof "net/http/pprof"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"sync/atomic"
	"time"

	"github.com/google/renameio/v2"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"golang.org/x/sync/errgroup"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/keepalive"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
	"k8s.io/klog/v2"

	"github.com/meshca/meshca/authn"
	"github.com/meshca/meshca/authn/kube"
	"github.com/meshca/meshca/backends"
	"github.com/meshca/meshca/ca"
	"github.com/meshca/meshca/ca/service"
	"github.com/meshca/meshca/cmd/internal/config"
	"github.com/meshca/meshca/cmd/internal/devkey"
)

func serveCmd(ctx context.Context, args []string, stderr io.Writer) error {
	fs := flag.NewFlagSet("meshca serve", flag.ContinueOnError)
	fs.SetOutput(stderr)
	cfgPath := fs.String("config", "", "configuration file (see README.md)")
	dev := fs.Bool("dev", false, "use the embedded no-cluster development configuration")
	level := fs.String("log-level", "", "override log.level (debug, info, warn, error)")
	grpcAddr := fs.String("grpc-address", "", "override server.grpcAddress")
	adminAddr := fs.String("admin-address", "", "override server.adminAddress")
	pprof := fs.Bool("pprof", false, "serve Go profiles under /debug/pprof/ on the admin port")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() != 0 {
		return fmt.Errorf("serve takes no arguments, got %q", fs.Args())
	}
	cfg, err := loadConfig(*cfgPath, *dev)
	if err != nil {
		return err
	}
	if *level != "" {
		cfg.Log.Level = *level
	}
	if *grpcAddr != "" {
		cfg.Server.GRPCAddress = *grpcAddr
	}
	if *adminAddr != "" {
		cfg.Server.AdminAddress = *adminAddr
	}
	if err := cfg.Validate(); err != nil {
		return err
	}
	log := newLogger(cfg.Log, stderr)
	// client-go logs through klog; route it into the same structured log.
	klog.SetSlogLogger(log.With("component", "client-go"))
	// Bind first: a second meshca on the same ports must fail before it
	// touches anything (in dev mode, the root file a running one serves).
	grpcLis, err := net.Listen("tcp", cfg.Server.GRPCAddress)
	if err != nil {
		return fmt.Errorf("listen gRPC: %w", err)
	}
	defer grpcLis.Close()
	adminLis, err := net.Listen("tcp", cfg.Server.AdminAddress)
	if err != nil {
		return fmt.Errorf("listen admin: %w", err)
	}
	defer adminLis.Close()
	srv, err := newServer(ctx, cfg, log)
	if err != nil {
		log.Error("meshca failed to start", "err", err)
		return err
	}
	srv.pprof = *pprof
	defer srv.close()
	return srv.run(ctx, grpcLis, adminLis)
}

func newLogger(c config.Log, w io.Writer) *slog.Logger {
	var lvl slog.Level
	_ = lvl.UnmarshalText([]byte(c.Level)) // validated already
	opts := &slog.HandlerOptions{Level: lvl}
	if c.Format == "text" {
		return slog.New(slog.NewTextHandler(w, opts))
	}
	return slog.New(slog.NewJSONHandler(w, opts))
}

// server is meshca assembled from its configuration.
type server struct {
	cfg       *config.Config
	log       *slog.Logger
	reg       *prometheus.Registry
	backend   ca.Backend
	serving   *ca.ServingCert
	health    *health.Server
	grpc      *grpc.Server
	runners   map[string]ca.Runner
	saIndex   *kube.ServiceAccountIndex
	jwt       *kube.JWT
	notReady  atomic.Pointer[string]
	auditFile *os.File
	ready     atomic.Bool
	pprof     bool
}

func newServer(ctx context.Context, cfg *config.Config, log *slog.Logger) (*server, error) {
	s := &server{cfg: cfg, log: log, reg: prometheus.NewRegistry(), runners: map[string]ca.Runner{}}
	s.reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	metrics, err := ca.NewMetrics(s.reg)
	if err != nil {
		return nil, err
	}
	td, err := spiffeid.TrustDomainFromString(cfg.TrustDomain)
	if err != nil {
		return nil, fmt.Errorf("trustDomain: %w", err)
	}

	// Backend.
	cfg.Backend.Plugged.OnReload = func(err error) { countReload(metrics, "backend", err) }
	s.backend, err = backends.New(cfg.Backend, log.With("component", "backend"))
	if err != nil {
		return nil, fmt.Errorf("backend: %w", err)
	}
	if r, ok := s.backend.(ca.Runner); ok {
		s.runners["backend"] = r
	}

	// Policy.
	pol, loaded, err := config.LoadPolicy(cfg.Policy.File)
	if err != nil {
		return nil, err
	}
	store, err := ca.NewPolicyStore(pol)
	if err != nil {
		return nil, err
	}
	if cfg.Policy.File != "" {
		s.runners["policy"] = &config.PolicyWatcher{
			Path: cfg.Policy.File, Store: store, Loaded: loaded, Interval: cfg.Policy.ReloadInterval,
			OnReload: func(err error) { countReload(metrics, "policy", err) },
			Log:      log.With("component", "policy"),
		}
	}
	core, err := ca.New(ca.Config{Backend: s.backend, Policy: store, Metrics: metrics, Log: log})
	if err != nil {
		return nil, err
	}

	// Development mode: the token signer and a root file for clients.
	if cfg.Dev.Enabled {
		log.Warn("DEVELOPMENT MODE: tokens are verified against a local development key; never use this in production", "dir", cfg.Dev.Dir)
		if _, err := devkey.Ensure(cfg.Dev.Dir); err != nil {
			return nil, err
		}
		if err := writeRoots(ctx, s.backend, filepath.Join(cfg.Dev.Dir, devkey.RootFile)); err != nil {
			return nil, err
		}
	}

	// Authentication.
	chain, err := s.authenticators(ctx, cfg, td, log)
	if err != nil {
		return nil, err
	}

	// Serving certificate, gRPC and health.
	s.serving, err = ca.NewServingCert(ctx, ca.ServingConfig{
		Backend: s.backend, DNSNames: cfg.Server.DNSNames, IPAddresses: parseIPs(cfg.Server.IPAddresses),
		TTL: cfg.Server.ServingTTL, Log: log.With("component", "serving-cert"),
	})
	if err != nil {
		return nil, err
	}
	s.runners["serving-cert"] = s.serving
	s.reg.MustRegister(&ca.ExpiryCollector{Backend: s.backend, Extra: func() map[string]*x509.Certificate {
		return map[string]*x509.Certificate{"serving": s.serving.Leaf()}
	}})

	audit := io.Writer(os.Stdout)
	if cfg.Audit.File != "" {
		f, err := os.OpenFile(cfg.Audit.File, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o600)
		if err != nil {
			return nil, fmt.Errorf("open audit file: %w", err)
		}
		s.auditFile, audit = f, f
	}
	svc, err := service.New(service.Config{
		CA: core, Authenticator: chain, Metrics: metrics, Audit: ca.NewAuditor(audit), Log: log.With("component", "service"),
	})
	if err != nil {
		return nil, err
	}
	s.grpc = grpc.NewServer(
		grpc.Creds(credentials.NewTLS(&tls.Config{
			GetCertificate: s.serving.GetCertificate,
			// Client certificates are optional and verified by the
			// clientcert authenticator against the current roots, which
			// rotate; the handshake only collects them.
			ClientAuth: tls.RequestClientCert,
			MinVersion: tls.VersionTLS12,
		})),
		// Large enough that an oversized CSR reaches the handler and gets
		// a precise answer; anything bigger is refused by gRPC itself.
		grpc.MaxRecvMsgSize(256<<10),
		grpc.MaxConcurrentStreams(cfg.Server.MaxConcurrentStreams),
		// Reused workers keep the stacks that signing grows; a fresh
		// goroutine per request paid for that growth every time.
		grpc.NumStreamWorkers(uint32(4*runtime.GOMAXPROCS(0))),
		grpc.KeepaliveEnforcementPolicy(keepalive.EnforcementPolicy{MinTime: 10 * time.Second, PermitWithoutStream: true}),
	)
	svc.Register(s.grpc)
	s.health = health.NewServer()
	s.health.SetServingStatus("", healthpb.HealthCheckResponse_NOT_SERVING)
	healthpb.RegisterHealthServer(s.grpc, s.health)
	return s, nil
}

// reviewIssuer is the issuer TokenReview names when it explains a
// rejection: the configured one, else the apiserver's. Failing to discover
// it only makes those explanations vaguer, so it is not fatal.
func (s *server) reviewIssuer(ctx context.Context, cfg *config.Config, restCfg *rest.Config, log *slog.Logger) string {
	if cfg.Authn.Issuer != "" || restCfg == nil {
		return cfg.Authn.Issuer
	}
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	iss, err := kube.DiscoverIssuer(ctx, restCfg)
	if err != nil {
		log.Warn("could not discover the service-account issuer; rejected tokens will be explained less precisely", "err", err)
	}
	return iss
}

func (s *server) authenticators(ctx context.Context, cfg *config.Config, td spiffeid.TrustDomain, log *slog.Logger) (*authn.Chain, error) {
	var (
		restCfg *rest.Config
		client  kubernetes.Interface
		lookup  kube.ServiceAccountLookup
	)
	if cfg.NeedsKube() {
		var err error
		restCfg, err = kubeConfig(cfg.Authn.Kubeconfig)
		if err != nil {
			return nil, err
		}
		// client-go's default (5 QPS) would queue real cache misses behind
		// a burst; an explicit bound keeps the apiserver safe all the same.
		restCfg.QPS, restCfg.Burst = cfg.Authn.KubeQPS, cfg.Authn.KubeBurst
		client, err = kubernetes.NewForConfig(restCfg)
		if err != nil {
			return nil, fmt.Errorf("kube client: %w", err)
		}
		if *cfg.Authn.CheckServiceAccounts {
			s.saIndex = kube.NewServiceAccountIndex(client, log.With("component", "serviceaccounts"))
			lookup = s.saIndex
		}
	}
	cache := kube.CacheConfig{MaxTTL: cfg.Authn.Cache.MaxTTL, MaxEntries: cfg.Authn.Cache.MaxEntries}
	var links []authn.Named
	for _, name := range cfg.Authn.Chain {
		var (
			a   authn.Authenticator
			err error
		)
		switch name {
		case config.AuthClientCert:
			a, err = authn.NewClientCert(authn.ClientCertConfig{TrustDomain: td, Roots: s.backend.TrustBundle, ServiceAccounts: lookup})
		case config.AuthJWT:
			s.jwt, err = kube.NewJWT(kube.JWTConfig{
				TrustDomain: td, Issuer: cfg.Authn.Issuer, Audiences: cfg.Authn.Audiences,
				JWKSFile: cfg.Authn.JWT.JWKSFile, JWKSURL: cfg.Authn.JWT.JWKSURL, Kube: restCfg,
				Skew: cfg.Authn.JWT.Skew, RefetchInterval: cfg.Authn.JWT.RefetchInterval,
				Cache: cache, ServiceAccounts: lookup, Log: log.With("component", "jwt"), Registerer: s.reg,
			})
			a = s.jwt
		case config.AuthTokenReview:
			a, err = kube.NewTokenReview(kube.TokenReviewConfig{
				Client: client, TrustDomain: td, Audiences: cfg.Authn.Audiences, Issuer: s.reviewIssuer(ctx, cfg, restCfg, log),
				Skew: cfg.Authn.JWT.Skew, MaxInFlight: cfg.Authn.MaxReviewsInFlight,
				Cache: cache, ServiceAccounts: lookup, Log: log.With("component", "tokenreview"), Registerer: s.reg,
			})
		default:
			err = fmt.Errorf("unknown authenticator %q", name) // Validate refuses this earlier
		}
		if err != nil {
			return nil, fmt.Errorf("authn.chain %s: %w", name, err)
		}
		links = append(links, authn.Named{Name: name, Authenticator: a})
	}
	return authn.NewChain(links...)
}

func kubeConfig(path string) (*rest.Config, error) {
	if path == "" {
		c, err := rest.InClusterConfig()
		if err != nil {
			return nil, fmt.Errorf("in-cluster kube config (set authn.kubeconfig outside a cluster): %w", err)
		}
		return c, nil
	}
	c, err := clientcmd.BuildConfigFromFlags("", path)
	if err != nil {
		return nil, fmt.Errorf("kubeconfig %s: %w", path, err)
	}
	return c, nil
}

func (s *server) run(ctx context.Context, grpcLis, adminLis net.Listener) error {
	admin := &http.Server{Handler: s.adminMux(), ReadHeaderTimeout: 10 * time.Second}
	s.log.Info("meshca serving", "grpc", grpcLis.Addr().String(), "admin", adminLis.Addr().String(),
		"backend", s.cfg.Backend.Type, "authn", strings.Join(s.cfg.Authn.Chain, ","), "trust_domain", s.cfg.TrustDomain)

	g, gctx := errgroup.WithContext(ctx)
	for name, r := range s.runners {
		g.Go(func() error {
			if err := r.Run(gctx); err != nil {
				return fmt.Errorf("%s: %w", name, err)
			}
			return nil
		})
	}
	if s.saIndex != nil {
		g.Go(func() error { return s.saIndex.Run(gctx) })
	}
	g.Go(func() error {
		if err := s.grpc.Serve(grpcLis); err != nil {
			return fmt.Errorf("serve gRPC: %w", err)
		}
		return nil
	})
	g.Go(func() error {
		if err := admin.Serve(adminLis); err != nil && !errors.Is(err, http.ErrServerClosed) {
			return fmt.Errorf("serve admin: %w", err)
		}
		return nil
	})
	g.Go(func() error { return s.becomeReady(gctx) })
	g.Go(func() error {
		<-gctx.Done()
		s.shutdown(admin)
		return nil
	})
	return g.Wait()
}

// becomeReady reports SERVING once the service-account watch has synced
// and the jwt authenticator holds its issuer's keys. Until then /readyz
// says what is missing, so a wrong JWKS path or missing RBAC shows at
// once rather than as failed requests.
func (s *server) becomeReady(ctx context.Context) error {
	wait := func(what string, done func(context.Context) error) bool {
		for {
			err := done(ctx)
			if err == nil {
				return true
			}
			msg := what + ": " + err.Error()
			if prev := s.notReady.Swap(&msg); prev == nil || *prev != msg {
				s.log.Warn("not ready", "waiting_for", what, "err", err)
			}
			select {
			case <-ctx.Done():
				return false
			case <-time.After(time.Second):
			}
		}
	}
	if s.saIndex != nil && !wait("service-account watch", func(context.Context) error {
		if !s.saIndex.HasSynced() {
			return errors.New("not synced yet")
		}
		return nil
	}) {
		return nil
	}
	if s.jwt != nil && !wait("jwt keys", func(ctx context.Context) error {
		ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		defer cancel()
		return s.jwt.Refresh(ctx)
	}) {
		return nil
	}
	s.notReady.Store(nil)
	s.ready.Store(true)
	s.health.SetServingStatus("", healthpb.HealthCheckResponse_SERVING)
	s.log.Info("meshca ready")
	return nil
}

func (s *server) shutdown(admin *http.Server) {
	s.ready.Store(false)
	s.health.Shutdown()
	done := make(chan struct{})
	go func() { s.grpc.GracefulStop(); close(done) }()
	select {
	case <-done:
	case <-time.After(s.cfg.Server.ShutdownGrace):
		s.log.Warn("in-flight requests did not finish in time; closing them", "grace", s.cfg.Server.ShutdownGrace)
		s.grpc.Stop()
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	_ = admin.Shutdown(ctx)
	s.log.Info("meshca stopped")
}

func (s *server) close() {
	if s.auditFile != nil {
		s.auditFile.Close()
	}
}

func (s *server) adminMux() *http.ServeMux {
	mux := http.NewServeMux()
	mux.Handle("/metrics", promhttp.HandlerFor(s.reg, promhttp.HandlerOpts{}))
	if s.pprof {
		mux.HandleFunc("/debug/pprof/", httppprof.Index)
		mux.HandleFunc("/debug/pprof/profile", httppprof.Profile)
		mux.HandleFunc("/debug/pprof/symbol", httppprof.Symbol)
		mux.HandleFunc("/debug/pprof/trace", httppprof.Trace)
	}
	mux.HandleFunc("/healthz", func(w http.ResponseWriter, _ *http.Request) {
		fmt.Fprintln(w, "ok")
	})
	mux.HandleFunc("/readyz", func(w http.ResponseWriter, r *http.Request) {
		var problems []string
		if !s.ready.Load() {
			why := "starting"
			if p := s.notReady.Load(); p != nil {
				why = "waiting for " + *p
			}
			problems = append(problems, why)
		}
		if leaf := s.serving.Leaf(); time.Now().After(leaf.NotAfter) {
			problems = append(problems, "serving certificate expired")
		}
		if roots, err := s.backend.TrustBundle(r.Context()); err != nil || len(roots) == 0 {
			problems = append(problems, fmt.Sprintf("backend has no trust bundle: %v", err))
		}
		if len(problems) > 0 {
			http.Error(w, strings.Join(problems, "\n"), http.StatusServiceUnavailable)
			return
		}
		fmt.Fprintln(w, "ok")
	})
	return mux
}

func countReload(m *ca.Metrics, what string, err error) {
	result := "success"
	if err != nil {
		result = "failure"
	}
	m.Reloads.WithLabelValues(what, result).Inc()
}

func writeRoots(ctx context.Context, b ca.Backend, path string) error {
	roots, err := b.TrustBundle(ctx)
	if err != nil {
		return fmt.Errorf("read trust bundle: %w", err)
	}
	var buf []byte
	for _, r := range roots {
		buf = append(buf, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: r.Raw})...)
	}
	return renameio.WriteFile(path, buf, 0o644)
}

func parseIPs(ss []string) []net.IP {
	ips := make([]net.IP, 0, len(ss))
	for _, s := range ss {
		if ip := net.ParseIP(s); ip != nil {
			ips = append(ips, ip)
		}
	}
	return ips
}
