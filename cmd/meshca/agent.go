package main

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"golang.org/x/sync/errgroup"
	"google.golang.org/grpc"

	"github.com/meshca/meshca/ca"
	"github.com/meshca/meshca/cmd/internal/config"
	"github.com/meshca/meshca/sds"
	"github.com/meshca/meshca/sds/agent"
	"github.com/meshca/meshca/sds/workload"
)

// Istio's proxies look for an SDS server on this socket, relative to their
// working directory (/ in the istio-proxy image).
const defaultAgentSocket = "./var/run/secrets/workload-spiffe-uds/socket"

// agentFlags are meshca agent's settings; README.md documents each.
type agentFlags struct {
	caAddress, serverName, caRoots, tokenFile string
	trustDomain, namespace, serviceAccount    string
	socket                                    string
	socketMode                                uint64
	adminAddress                              string
	keyType                                   string
	ttl, renewJitter, retryMin, retryMax      time.Duration
	renewFraction                             float64
	logLevel, logFormat                       string
}

func agentCmd(ctx context.Context, args []string, stderr io.Writer) error {
	fs := flag.NewFlagSet("meshca agent", flag.ContinueOnError)
	fs.SetOutput(stderr)
	var f agentFlags
	fs.StringVar(&f.caAddress, "ca-address", envOr("CA_ADDR", "meshca.istio-system.svc:15012"), "meshca's gRPC address (env CA_ADDR)")
	fs.StringVar(&f.serverName, "server-name", "", "name to verify in meshca's certificate (default: the host of --ca-address)")
	fs.StringVar(&f.caRoots, "ca-roots", "./var/run/secrets/istio/root-cert.pem", "PEM roots that verify meshca's serving certificate")
	fs.StringVar(&f.tokenFile, "token-file", "./var/run/secrets/tokens/istio-token", "projected service-account token, read afresh for every request")
	fs.StringVar(&f.trustDomain, "trust-domain", envOr("TRUST_DOMAIN", "cluster.local"), "SPIFFE trust domain (env TRUST_DOMAIN)")
	fs.StringVar(&f.namespace, "namespace", os.Getenv("POD_NAMESPACE"), "the pod's namespace (env POD_NAMESPACE; default: from the token)")
	fs.StringVar(&f.serviceAccount, "service-account", os.Getenv("SERVICE_ACCOUNT"), "the pod's service account (env SERVICE_ACCOUNT; default: from the token)")
	fs.StringVar(&f.socket, "socket", defaultAgentSocket, "Unix socket serving SDS and the SPIFFE Workload API")
	fs.Uint64Var(&f.socketMode, "socket-mode", 0o660, "permissions of the socket (octal, e.g. 0660)")
	fs.StringVar(&f.adminAddress, "admin-address", "127.0.0.1:15016", "serves /metrics, /healthz and /readyz over HTTP ('' disables)")
	fs.StringVar(&f.keyType, "key-type", string(ca.KeyECDSAP256), "the workload key's type")
	fs.DurationVar(&f.ttl, "ttl", 0, "requested certificate lifetime (0: meshca's policy default)")
	fs.Float64Var(&f.renewFraction, "renew-fraction", 0.5, "renewal point as a fraction of the lifetime, if meshca does not say")
	fs.DurationVar(&f.renewJitter, "renew-jitter", 0, "random advance of the renewal point, if meshca does not say")
	fs.DurationVar(&f.retryMin, "retry-min", time.Second, "first wait after a failed request")
	fs.DurationVar(&f.retryMax, "retry-max", 2*time.Minute, "longest wait between failed requests")
	fs.StringVar(&f.logLevel, "log-level", "info", "debug, info, warn or error")
	fs.StringVar(&f.logFormat, "log-format", "json", "json or text")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() != 0 {
		return fmt.Errorf("agent takes no arguments, got %q", fs.Args())
	}
	switch {
	case f.logLevel != "debug" && f.logLevel != "info" && f.logLevel != "warn" && f.logLevel != "error":
		return fmt.Errorf("--log-level: want debug, info, warn or error, got %q", f.logLevel)
	case f.logFormat != "json" && f.logFormat != "text":
		return fmt.Errorf("--log-format: want json or text, got %q", f.logFormat)
	}
	log := newLogger(config.Log{Level: f.logLevel, Format: f.logFormat}, stderr)
	return runAgent(ctx, f, log)
}

func envOr(key, def string) string {
	if v := os.Getenv(key); v != "" {
		return v
	}
	return def
}

func runAgent(ctx context.Context, f agentFlags, log *slog.Logger) error {
	td, err := spiffeid.TrustDomainFromString(f.trustDomain)
	if err != nil {
		return fmt.Errorf("--trust-domain: %w", err)
	}
	if f.namespace == "" || f.serviceAccount == "" {
		ns, sa, err := identityFromToken(f.tokenFile)
		if err != nil {
			return fmt.Errorf("--namespace and --service-account not given, and %w", err)
		}
		f.namespace, f.serviceAccount = or(f.namespace, ns), or(f.serviceAccount, sa)
	}
	if f.socketMode > 0o777 {
		return fmt.Errorf("--socket-mode %o is not a permission mode", f.socketMode)
	}
	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	keeper, err := agent.New(agent.Config{
		Address: f.caAddress, ServerName: f.serverName, RootsFile: f.caRoots, TokenFile: f.tokenFile,
		TrustDomain: td, Namespace: f.namespace, ServiceAccount: f.serviceAccount,
		KeyType: ca.KeyType(f.keyType), TTL: f.ttl, RenewFraction: f.renewFraction, RenewJitter: f.renewJitter,
		RetryMin: f.retryMin, RetryMax: f.retryMax, Log: log.With("component", "keeper"), Registerer: reg,
	})
	if err != nil {
		return err
	}
	secrets, err := sds.New(sds.Config{Source: keeper, ID: keeper.ID(), Metrics: sds.NewMetrics(reg), Log: log.With("component", "sds")})
	if err != nil {
		return err
	}
	wl, err := workload.New(workload.Config{Source: keeper, Metrics: workload.NewMetrics(reg), Log: log.With("component", "workload-api")})
	if err != nil {
		return err
	}
	lis, err := listenUnix(f.socket, os.FileMode(f.socketMode))
	if err != nil {
		return err
	}
	defer os.Remove(f.socket)
	g := grpc.NewServer(grpc.MaxRecvMsgSize(64 << 10))
	secrets.Register(g)
	wl.Register(g)

	var admin *http.Server
	var adminLis net.Listener
	if f.adminAddress != "" {
		if adminLis, err = net.Listen("tcp", f.adminAddress); err != nil {
			lis.Close()
			return fmt.Errorf("listen admin: %w", err)
		}
		mux := http.NewServeMux()
		mux.Handle("/metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{}))
		mux.HandleFunc("/healthz", func(w http.ResponseWriter, _ *http.Request) { fmt.Fprintln(w, "ok") })
		mux.HandleFunc("/readyz", func(w http.ResponseWriter, _ *http.Request) {
			if err := keeper.Ready(); err != nil {
				http.Error(w, "not ready: "+err.Error(), http.StatusServiceUnavailable)
				return
			}
			fmt.Fprintln(w, "ok")
		})
		admin = &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second, ReadTimeout: 10 * time.Second, WriteTimeout: 10 * time.Second, IdleTimeout: time.Minute}
	}
	log.Info("meshca agent serving", "socket", f.socket, "identity", keeper.ID().String(), "ca", f.caAddress, "admin", f.adminAddress)

	gr, gctx := errgroup.WithContext(ctx)
	gr.Go(func() error { return keeper.Run(gctx) })
	gr.Go(func() error { return secrets.Run(gctx) })
	gr.Go(func() error {
		if err := g.Serve(lis); err != nil {
			return fmt.Errorf("serve %s: %w", f.socket, err)
		}
		return nil
	})
	if admin != nil {
		gr.Go(func() error {
			if err := admin.Serve(adminLis); err != nil && !errors.Is(err, http.ErrServerClosed) {
				return fmt.Errorf("serve admin: %w", err)
			}
			return nil
		})
	}
	gr.Go(func() error {
		<-gctx.Done()
		// Watching clients never end their streams: give them a moment,
		// then close them.
		done := make(chan struct{})
		go func() { g.GracefulStop(); close(done) }()
		select {
		case <-done:
		case <-time.After(2 * time.Second):
			g.Stop()
		}
		if admin != nil {
			sctx, cancel := context.WithTimeout(context.Background(), time.Second)
			defer cancel()
			_ = admin.Shutdown(sctx)
		}
		log.Info("meshca agent stopped")
		return nil
	})
	return gr.Wait()
}

// listenUnix listens on path, replacing a stale socket a previous run left,
// and sets its mode.
func listenUnix(path string, mode os.FileMode) (net.Listener, error) {
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return nil, fmt.Errorf("socket directory: %w", err)
	}
	if fi, err := os.Lstat(path); err == nil {
		if fi.Mode().Type() != fs.ModeSocket {
			return nil, fmt.Errorf("--socket %s exists and is not a socket; refusing to replace it", path)
		}
		if c, err := net.Dial("unix", path); err == nil {
			c.Close()
			return nil, fmt.Errorf("--socket %s is in use by another process", path)
		}
		if err := os.Remove(path); err != nil {
			return nil, fmt.Errorf("remove stale socket: %w", err)
		}
	}
	lis, err := net.Listen("unix", path)
	if err != nil {
		return nil, fmt.Errorf("listen %s: %w", path, err)
	}
	if err := os.Chmod(path, mode); err != nil {
		lis.Close()
		return nil, fmt.Errorf("chmod socket: %w", err)
	}
	return lis, nil
}

// identityFromToken reads the namespace and service account from a
// service-account token's claims, without verifying it: the agent only
// needs them to build its CSR, and meshca verifies the token.
func identityFromToken(path string) (ns, sa string, err error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return "", "", fmt.Errorf("cannot read the token to learn them: %w", err)
	}
	parts := strings.Split(strings.TrimSpace(string(data)), ".")
	if len(parts) != 3 {
		return "", "", fmt.Errorf("the token in %s is not a JWT", path)
	}
	payload, err := base64.RawURLEncoding.DecodeString(parts[1])
	if err != nil {
		return "", "", fmt.Errorf("the token in %s has an undecodable payload", path)
	}
	var claims struct {
		Sub string `json:"sub"`
		K8s struct {
			Namespace      string `json:"namespace"`
			ServiceAccount struct {
				Name string `json:"name"`
			} `json:"serviceaccount"`
		} `json:"kubernetes.io"`
	}
	if err := json.Unmarshal(payload, &claims); err != nil {
		return "", "", fmt.Errorf("the token in %s has unreadable claims", path)
	}
	ns, sa = claims.K8s.Namespace, claims.K8s.ServiceAccount.Name
	if ns == "" || sa == "" {
		// system:serviceaccount:<ns>:<sa>
		if p := strings.Split(claims.Sub, ":"); len(p) == 4 && p[0] == "system" && p[1] == "serviceaccount" {
			ns, sa = p[2], p[3]
		}
	}
	if ns == "" || sa == "" {
		return "", "", fmt.Errorf("the token in %s names no service account", path)
	}
	return ns, sa, nil
}

func or(a, b string) string {
	if a != "" {
		return a
	}
	return b
}
