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
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"time"

	"github.com/google/renameio/v2"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"golang.org/x/sync/errgroup"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"k8s.io/klog/v2"

	"github.com/meshca/meshca/authn/kube"
	"github.com/meshca/meshca/backends"
	"github.com/meshca/meshca/ca"
	"github.com/meshca/meshca/ca/edge"
	"github.com/meshca/meshca/ca/reload"
	"github.com/meshca/meshca/ca/service"
	"github.com/meshca/meshca/ca/serving"
	"github.com/meshca/meshca/cmd/internal/config"
	"github.com/meshca/meshca/cmd/internal/devkey"
	"github.com/meshca/meshca/sds"
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
	if cfg.Server.GCHeapFloorMiB > 0 {
		stop, on := startHeapFloor(uint64(cfg.Server.GCHeapFloorMiB) << 20)
		defer stop()
		if !on {
			log.Info("server.gcHeapFloorMiB ignored: the GOGC environment variable is set", "GOGC", os.Getenv("GOGC"))
		}
	}
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
	cfg     *config.Config
	log     *slog.Logger
	reg     *prometheus.Registry
	ca      *ca.CA
	serving *serving.Cert
	grpc    *grpc.Server
	runners map[string]ca.Runner
	// backendStatus is a remote backend's login state; nil for others.
	backendStatus func() error
	authn         *kube.Authenticators
	sds           *sds.Server
	limits        edge.Limits
	ready         *readiness
	auditFile     *os.File
	pprof         bool
}

// newServer builds every part from cfg, in dependency order: metrics, the
// backend and the CA over it, the policy, the Kubernetes client and the
// authenticators, the serving certificate, and the gRPC services.
func newServer(ctx context.Context, cfg *config.Config, log *slog.Logger) (*server, error) {
	s := &server{cfg: cfg, log: log, reg: prometheus.NewRegistry(), runners: map[string]ca.Runner{}}
	s.reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	reloads := reload.NewMetrics(s.reg)
	td, err := spiffeid.TrustDomainFromString(cfg.TrustDomain)
	if err != nil {
		return nil, fmt.Errorf("trustDomain: %w", err)
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
			Metrics: reloads, Log: log.With("component", "policy"), Check: cfg.Backend.CheckPolicy,
		}
	}

	// Backend and the CA core over it.
	if err := cfg.Backend.CheckPolicy(pol); err != nil {
		return nil, err
	}
	maxLeaf, _ := pol.LongestMaxTTL()
	backend, err := backends.New(ctx, cfg.Backend, backends.Deps{Log: log.With("component", "backend"), Reloads: reloads,
		Registerer: s.reg, MaxLeafTTL: maxLeaf})
	if err != nil {
		return nil, fmt.Errorf("backend: %w", err)
	}
	if r, ok := backend.(ca.Runner); ok {
		s.runners["backend"] = r // a remote backend's login
	}
	if st, ok := backend.(interface{ Status() error }); ok {
		s.backendStatus = st.Status
	}
	s.ca, err = ca.New(ctx, ca.Config{
		Backend: backend, Intermediate: cfg.Backend.IntermediateConfig(), Policy: store,
		Metrics: ca.NewMetrics(s.reg), Log: log.With("component", "ca"),
		BundleRefresh: cfg.Backend.Upstream.BundleRefreshInterval, UpstreamTimeout: cfg.Backend.Upstream.Timeout,
		MaxUpstreamInFlight: cfg.Backend.Upstream.MaxInFlight,
	})
	if err != nil {
		return nil, err
	}
	s.runners["ca"] = s.ca

	// Development mode: the token signer, and the trust bundle for clients,
	// rewritten whenever it changes.
	if cfg.Dev.Enabled {
		log.Warn("DEVELOPMENT MODE: tokens are verified against a local development key; never use this in production", "dir", cfg.Dev.Dir)
		if _, err := devkey.Ensure(cfg.Dev.Dir); err != nil {
			return nil, err
		}
		keyPath := filepath.Join(cfg.Dev.Dir, devkey.KeyFile)
		if fi, err := os.Stat(keyPath); err == nil && fi.Mode().Perm()&0o077 != 0 {
			log.Warn("the dev token-signing key is readable by group or others; run chmod 600 on it", "path", keyPath, "mode", fi.Mode().Perm().String())
		}
		rootFile := filepath.Join(cfg.Dev.Dir, devkey.RootFile)
		if err := writeRoots(s.ca.State().Roots, rootFile); err != nil {
			return nil, err
		}
		s.ca.Subscribe(func(ch ca.Change) {
			if !ch.BundleChanged {
				return
			}
			if err := writeRoots(ch.New.Roots, rootFile); err != nil {
				log.Error("could not rewrite the dev trust bundle", "path", rootFile, "err", err)
			}
		})
	}

	// Authentication: the Kubernetes client is built once, here.
	var client *kube.Client
	if cfg.NeedsKube() {
		client, err = kube.NewClient(cfg.Authn.Kubeconfig, cfg.Authn.KubeQPS, cfg.Authn.KubeBurst)
		if err != nil {
			return nil, err
		}
	}
	s.authn, err = kube.New(ctx, kube.Config{
		Chain: cfg.Authn.Chain, TrustDomain: td, Audiences: cfg.Authn.Audiences, Issuer: cfg.Authn.Issuer,
		JWKSFile: cfg.Authn.JWT.JWKSFile, JWKSURL: cfg.Authn.JWT.JWKSURL, Skew: cfg.Authn.JWT.Skew,
		RefetchInterval: cfg.Authn.JWT.RefetchInterval, MaxReviewsInFlight: cfg.Authn.MaxReviewsInFlight,
		Cache:                kube.CacheConfig{MaxTTL: cfg.Authn.Cache.MaxTTL, MaxEntries: cfg.Authn.Cache.MaxEntries},
		CheckServiceAccounts: *cfg.Authn.CheckServiceAccounts, TrustedNodeAgents: cfg.Authn.TrustedNodeAgents,
	}, kube.Deps{Client: client, Roots: s.trustBundle, Log: log, Registerer: s.reg})
	if err != nil {
		return nil, err
	}
	if s.authn.ServiceAccounts != nil {
		s.runners["serviceaccounts"] = s.authn.ServiceAccounts
	}
	if s.authn.Pods != nil {
		s.runners["pods"] = s.authn.Pods
	}

	// Serving certificate, gRPC and health.
	s.serving, err = serving.New(ctx, serving.Config{
		CA: s.ca, DNSNames: cfg.Server.DNSNames, IPAddresses: parseIPs(cfg.Server.IPAddresses),
		TTL: cfg.Server.ServingTTL, Log: log.With("component", "serving-cert"),
	})
	if err != nil {
		return nil, err
	}
	s.runners["serving-cert"] = s.serving
	s.reg.MustRegister(&ca.ExpiryCollector{CA: s.ca, Extra: func() map[string]*x509.Certificate {
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
	edgeMetrics, auditor := edge.NewMetrics(s.reg), edge.NewAuditor(audit)
	admission := edge.NewAdmission(edge.AdmissionConfig{
		PeerRate: cfg.Admission.PeerRate, PeerBurst: cfg.Admission.PeerBurst,
		IdentityRate: cfg.Admission.IdentityRate, IdentityBurst: cfg.Admission.IdentityBurst,
		MaxInFlight: cfg.Admission.MaxInFlight, Queue: cfg.Admission.Queue, QueueWait: cfg.Admission.QueueWait,
		MaxRenewalsInFlight: cfg.Admission.MaxRenewalsInFlight, MaxRenewalsQueued: cfg.Admission.MaxRenewalsQueued,
		Metrics: edge.NewAdmissionMetrics(s.reg),
	})
	istioEdge := edge.Edge{
		Service: service.ServiceLabel, Authenticator: s.authn.Chain, Metrics: edgeMetrics,
		Audit: auditor, Log: log.With("component", "service"), Admission: admission,
	}
	if s.authn.Impersonation != nil { // a nil *NodeAuthorizer would be a non-nil Impersonator
		istioEdge.Impersonator = s.authn.Impersonation
	}
	svcEdge, err := edge.New(istioEdge)
	if err != nil {
		return nil, err
	}
	svc, err := service.New(service.Config{CA: s.ca, Edge: svcEdge})
	if err != nil {
		return nil, err
	}
	s.limits = edge.Limits{
		MaxConnections: cfg.Server.MaxConnections, HandshakeTimeout: cfg.Server.HandshakeTimeout,
		MaxConcurrentStreams: cfg.Server.MaxConcurrentStreams, MaxHeaderListBytes: cfg.Server.MaxHeaderListBytes,
		RequestTimeout: cfg.Server.RequestTimeout, MaxConnectionAge: cfg.Server.MaxConnectionAge,
		MaxConnectionAgeGrace: cfg.Server.MaxConnectionAgeGrace, MaxConnectionIdle: cfg.Server.MaxConnectionIdle,
		Shed: edge.NewShedCounter(s.reg),
	}
	maxChain := cfg.Server.MaxClientChain
	opts := append(s.limits.ServerOptions(),
		grpc.Creds(credentials.NewTLS(&tls.Config{
			GetCertificate: s.serving.GetCertificate,
			// Client certificates are optional and verified by the
			// clientcert authenticator against the current roots, which
			// rotate; the handshake only collects them, and refuses
			// chains longer or larger than meshca ever issues, before
			// anyone spends CPU verifying them.
			ClientAuth: tls.RequestClientCert,
			VerifyPeerCertificate: func(raw [][]byte, _ [][]*x509.Certificate) error {
				return checkClientChain(raw, maxChain)
			},
			MinVersion: tls.VersionTLS12,
		})),
		// Large enough that an oversized CSR reaches the handler and gets
		// a precise answer; anything bigger is refused by gRPC itself.
		grpc.MaxRecvMsgSize(256<<10),
		// Reused workers keep the stacks that signing grows; a fresh
		// goroutine per request paid for that growth every time.
		grpc.NumStreamWorkers(uint32(4*runtime.GOMAXPROCS(0))),
	)
	s.grpc = grpc.NewServer(opts...)
	svc.Register(s.grpc)
	if *cfg.SDS.Enabled {
		sdsEdge, err := edge.New(edge.Edge{
			Service: sds.ServiceLabel, Authenticator: s.authn.Chain, Metrics: edgeMetrics,
			Audit: auditor, Log: log.With("component", "sds"),
		})
		if err != nil {
			return nil, err
		}
		sc := sds.Config{
			CA: s.ca, Edge: sdsEdge, MaxStreams: cfg.SDS.MaxStreams, MaxIssuing: cfg.SDS.MaxIssuing,
			RenewWorkers: cfg.SDS.RenewWorkers, BundleAckTimeout: cfg.SDS.BundleAckTimeout,
			ReissueSpread: cfg.SDS.ReissueSpread, RecheckInterval: cfg.SDS.RecheckInterval,
			Metrics: sds.NewMetrics(s.reg), Log: log.With("component", "sds"),
		}
		if s.authn.ServiceAccounts != nil {
			sc.ServiceAccounts = s.authn.ServiceAccounts
		}
		s.sds, err = sds.New(sc)
		if err != nil {
			return nil, err
		}
		s.sds.Register(s.grpc)
		s.runners["sds"] = s.sds
	}
	s.ready = newReadiness(s.grpc, log)
	return s, nil
}

// trustBundle is the CA's trust bundle, for the clientcert authenticator.
func (s *server) trustBundle(context.Context) ([]*x509.Certificate, error) {
	return s.ca.State().Roots, nil
}

func (s *server) run(ctx context.Context, grpcLis, adminLis net.Listener) error {
	admin := &http.Server{Handler: s.adminMux(), ReadHeaderTimeout: 10 * time.Second, ReadTimeout: 30 * time.Second,
		// pprof's CPU profile streams for its seconds parameter.
		WriteTimeout: 2 * time.Minute, IdleTimeout: 2 * time.Minute, MaxHeaderBytes: 64 << 10}
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
	g.Go(func() error {
		if err := s.grpc.Serve(s.limits.Listener(grpcLis)); err != nil {
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
	g.Go(func() error { return s.ready.wait(gctx, s.readinessChecks()) })
	g.Go(func() error {
		<-gctx.Done()
		s.shutdown(admin)
		return nil
	})
	return g.Wait()
}

// readinessChecks are what meshca waits for before it is ready: the
// service-account and pod watches have synced, and the jwt authenticator
// holds its issuer's keys. Until then /readyz says what is missing, so a wrong JWKS
// path or missing RBAC shows at once rather than as failed requests.
func (s *server) readinessChecks() []check {
	var checks []check
	if sa := s.authn.ServiceAccounts; sa != nil {
		checks = append(checks, check{"service-account watch", func(context.Context) error {
			if !sa.HasSynced() {
				return errors.New("not synced yet")
			}
			return nil
		}})
	}
	if pods := s.authn.Pods; pods != nil {
		// Until then every impersonation (ztunnel) would be Unavailable.
		checks = append(checks, check{"pod watch", func(context.Context) error {
			if !pods.HasSynced() {
				return errors.New("not synced yet")
			}
			return nil
		}})
	}
	if j := s.authn.JWT; j != nil {
		checks = append(checks, check{"jwt keys", func(ctx context.Context) error {
			ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
			defer cancel()
			return j.Refresh(ctx)
		}})
	}
	return checks
}

func (s *server) shutdown(admin *http.Server) {
	s.ready.stop()
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

// checkClientChain refuses, during the handshake, a client chain longer
// than max certificates or larger than 8 KiB per certificate allowed:
// meshca's own chains are a leaf and at most a few CAs, and verifying a
// long chain of expensive signatures is work an unauthenticated peer could
// make meshca do.
func checkClientChain(raw [][]byte, maxCerts int) error {
	if len(raw) > maxCerts {
		return fmt.Errorf("client certificate chain has %d certificates; meshca accepts at most %d (server.maxClientChain)", len(raw), maxCerts)
	}
	total := 0
	for _, c := range raw {
		total += len(c)
	}
	if total > maxCerts*8<<10 {
		return fmt.Errorf("client certificate chain is %d bytes; meshca accepts at most %d", total, maxCerts*8<<10)
	}
	return nil
}

func writeRoots(roots []*x509.Certificate, path string) error {
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
