// Command istiod-ca runs istiod's own certificate-signing gRPC server
// (istio.io/istio/security/pkg/server/ca, the CreateCertificate service
// istiod registers on port 15012) outside a cluster, so that
// `make bench-vs-istiod` can put it under the same load as meshca.
//
// It is wired the way istiod wires it, from Istio's own packages:
//
//   - a plugged CA (Istio's `cacerts` files: ca-cert.pem, ca-key.pem,
//     cert-chain.pem, root-cert.pem), ECDSA P-256, loaded with
//     ca.NewPluggedCertIstioCAOptions and ca.NewIstioCA. With --cacerts
//     unset, a root and an intermediate are generated at start;
//   - the authenticators istiod runs outside a cluster (RunCA): the
//     client-certificate authenticator, then the JWT authenticator
//     (authenticate.NewJwtAuthenticator) for the token issuer, with no
//     jwks_uri, as istiod builds it. It finds the issuer's keys by OIDC
//     discovery, fetches the JWKS once, caches it, and verifies every token
//     locally. With a jwks_uri instead, Istio's verifier accepts RS256
//     only, and meshca's dev tokens are ES256; discovery advertises the
//     algorithms of the keys. This process answers the discovery itself:
//     it serves /.well-known/openid-configuration and the JWKS from --jwks
//     (meshca's dev JWKS) over HTTPS on a loopback port, and dials that
//     port for the issuer's host, like an /etc/hosts entry, so the tokens
//     keep meshca dev mode's issuer;
//   - istiod's gRPC server options (pilot/pkg/grpc.ServerOptions with the
//     default keepalive options and the go-grpc-prometheus interceptor) and
//     its TLS settings for the secure port; the serving certificate is
//     signed by the CA with IstioCA.GenKeyCert, as istiod does for itself
//     when it has no Kubernetes CA;
//   - Istio's metrics exporter on /metrics, with the Go process collector
//     (process_cpu_seconds_total, process_resident_memory_bytes).
//
// It binds to loopback only. It is a test tool, never shipped.
package main

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"encoding/pem"
	"errors"
	"flag"
	"fmt"
	"math/big"
	"net"
	"net/http"
	"net/http/pprof"
	"net/url"
	"os"
	"os/signal"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"time"

	grpcprom "github.com/grpc-ecosystem/go-grpc-prometheus"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	meshconfig "istio.io/api/mesh/v1alpha1"
	"istio.io/api/security/v1beta1"
	istiogrpc "istio.io/istio/pilot/pkg/grpc"
	"istio.io/istio/pkg/config/mesh"
	istiokeepalive "istio.io/istio/pkg/keepalive"
	"istio.io/istio/pkg/monitoring"
	"istio.io/istio/pkg/security"
	"istio.io/istio/security/pkg/pki/ca"
	caserver "istio.io/istio/security/pkg/server/ca"
	"istio.io/istio/security/pkg/server/ca/authenticate"
)

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "istiod-ca:", err)
		os.Exit(1)
	}
}

func run() error {
	grpcAddr := flag.String("grpc-addr", "127.0.0.1:15212", "loopback address of the CreateCertificate gRPC server (TLS)")
	monAddr := flag.String("monitoring-addr", "127.0.0.1:15214", "loopback address of /metrics and /ready (and /debug/pprof/ with --pprof)")
	dir := flag.String("dir", ".istiod-ca", "folder for the generated CA files and the serving root (root-cert.pem)")
	cacerts := flag.String("cacerts", "", "folder holding Istio cacerts files to load instead of generating a CA")
	jwksFile := flag.String("jwks", ".meshca-dev/jwks.json", "JWKS the JWT authenticator verifies tokens against")
	issuer := flag.String("issuer", "https://meshca.dev.invalid", "token issuer (meshca dev mode's)")
	audience := flag.String("audience", "istio-ca", "token audience")
	trustDomain := flag.String("trust-domain", "cluster.local", "mesh trust domain")
	workloadTTL := flag.Duration("workload-cert-ttl", 24*time.Hour, "default leaf lifetime (istiod's DEFAULT_WORKLOAD_CERT_TTL)")
	maxTTL := flag.Duration("max-workload-cert-ttl", 90*24*time.Hour, "longest leaf lifetime (istiod's MAX_WORKLOAD_CERT_TTL)")
	withPprof := flag.Bool("pprof", false, "serve /debug/pprof/ on the monitoring address")
	flag.Parse()

	for _, a := range []string{*grpcAddr, *monAddr} {
		if err := requireLoopback(a); err != nil {
			return err
		}
	}
	if _, err := os.Stat(*jwksFile); err != nil {
		return fmt.Errorf("--jwks: %w (start `meshca serve --dev` once in this folder to create it)", err)
	}

	files := *cacerts
	if files == "" {
		files = filepath.Join(*dir, "cacerts")
		if err := writeCACerts(files); err != nil {
			return err
		}
	}
	opts, err := ca.NewPluggedCertIstioCAOptions(ca.SigningCAFileBundle{
		RootCertFile:    filepath.Join(files, ca.RootCertFile),
		CertChainFiles:  []string{filepath.Join(files, ca.CertChainFile)},
		SigningCertFile: filepath.Join(files, ca.CACertFile),
		SigningKeyFile:  filepath.Join(files, ca.CAPrivateKeyFile),
	}, *workloadTTL, *maxTTL, 2048)
	if err != nil {
		return fmt.Errorf("load plugged CA from %s: %w", files, err)
	}
	istioCA, err := ca.NewIstioCA(opts)
	if err != nil {
		return fmt.Errorf("create Istio CA: %w", err)
	}
	rootPEM := istioCA.GetCAKeyCertBundle().GetRootCertPem()
	if err := os.MkdirAll(*dir, 0o755); err != nil {
		return fmt.Errorf("create --dir: %w", err)
	}
	if err := os.WriteFile(filepath.Join(*dir, "root-cert.pem"), rootPEM, 0o644); err != nil {
		return fmt.Errorf("write root-cert.pem: %w", err)
	}

	// The serving certificate, as istiod makes its own when it signs it
	// with its CA (the key type follows the CA's: P-256 here).
	host, _, _ := net.SplitHostPort(*grpcAddr)
	chainPEM, keyPEM, err := istioCA.GenKeyCert([]string{host, "localhost", "istiod.istio-system.svc"}, 24*time.Hour, false)
	if err != nil {
		return fmt.Errorf("sign the serving certificate: %w", err)
	}
	serving, err := tls.X509KeyPair(chainPEM, keyPEM)
	if err != nil {
		return fmt.Errorf("load the serving certificate: %w", err)
	}
	roots := x509.NewCertPool()
	if !roots.AppendCertsFromPEM(rootPEM) {
		return errors.New("the CA's root-cert.pem holds no certificate")
	}

	// Metrics first: Istio's metrics are recorded through the provider
	// this installs, as in istiod's initMonitor.
	metricsHandler, err := monitoring.RegisterPrometheusExporter(nil, nil)
	if err != nil {
		return fmt.Errorf("register the metrics exporter: %w", err)
	}
	mon, err := net.Listen("tcp", *monAddr)
	if err != nil {
		return fmt.Errorf("listen %s: %w", *monAddr, err)
	}
	mux := http.NewServeMux()
	mux.Handle("/metrics", metricsHandler)
	mux.HandleFunc("/ready", func(w http.ResponseWriter, _ *http.Request) { fmt.Fprintln(w, "ready") })
	if *withPprof {
		mux.HandleFunc("/debug/pprof/", pprof.Index)
		mux.HandleFunc("/debug/pprof/profile", pprof.Profile)
		mux.HandleFunc("/debug/pprof/symbol", pprof.Symbol)
		mux.HandleFunc("/debug/pprof/trace", pprof.Trace)
	}
	go func() { _ = http.Serve(mon, mux) }()

	// istiod's authenticators outside a cluster: client certificates, then
	// JWT_RULE's JWT authenticator.
	mc := mesh.DefaultMeshConfig()
	mc.TrustDomain = *trustDomain
	if err := serveIssuer(*issuer, *jwksFile, istioCA, roots); err != nil {
		return err
	}
	jwtAuthn, err := authenticate.NewJwtAuthenticator(&v1beta1.JWTRule{
		Issuer:    *issuer,
		Audiences: []string{*audience},
	}, fixedMesh{mc})
	if err != nil {
		return fmt.Errorf("create the JWT authenticator: %w", err)
	}
	caServer, err := caserver.New(istioCA, *maxTTL, []security.Authenticator{&authenticate.ClientCertAuthenticator{}, jwtAuthn}, nil)
	if err != nil {
		return fmt.Errorf("create the CA server: %w", err)
	}

	// istiod's secure gRPC server: its TLS settings and server options.
	tlsCfg := &tls.Config{
		GetCertificate: func(*tls.ClientHelloInfo) (*tls.Certificate, error) { return &serving, nil },
		ClientAuth:     tls.VerifyClientCertIfGiven,
		ClientCAs:      roots,
		MinVersion:     tls.VersionTLS12,
	}
	// istiod also runs EnforceGoCompliance on this config; with the default
	// COMPLIANCE_POLICY it changes nothing, and its package pulls in all of
	// pilot's model, so it is left out.
	grpcprom.EnableHandlingTimeHistogram()
	grpcOpts := istiogrpc.ServerOptions(istiokeepalive.DefaultOption(), func(int64) {}, grpcprom.UnaryServerInterceptor)
	grpcOpts = append(grpcOpts, grpc.Creds(credentials.NewTLS(tlsCfg)))
	srv := grpc.NewServer(grpcOpts...)
	caServer.Register(srv)

	lis, err := net.Listen("tcp", *grpcAddr)
	if err != nil {
		return fmt.Errorf("listen %s: %w", *grpcAddr, err)
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	go func() { <-ctx.Done(); srv.Stop() }()
	fmt.Fprintf(os.Stderr, "istiod-ca: CreateCertificate on %s, metrics on http://%s/metrics, serving root %s\n",
		lis.Addr(), mon.Addr(), filepath.Join(*dir, "root-cert.pem"))
	if err := srv.Serve(lis); err != nil && ctx.Err() == nil {
		return fmt.Errorf("serve: %w", err)
	}
	return nil
}

// serveIssuer answers OIDC discovery for issuer from a loopback HTTPS
// listener: /.well-known/openid-configuration and /jwks.json (the file
// jwksFile), with a certificate for the issuer's host signed by the CA.
// Every process-wide HTTP client (go-oidc uses http.DefaultClient) then
// dials that listener for the issuer's host and trusts roots.
func serveIssuer(issuer, jwksFile string, istioCA *ca.IstioCA, roots *x509.CertPool) error {
	u, err := url.Parse(issuer)
	if err != nil || u.Scheme != "https" || u.Host == "" {
		return fmt.Errorf("--issuer %q: want an https URL", issuer)
	}
	issuerHostPort := u.Host
	if u.Port() == "" {
		issuerHostPort = net.JoinHostPort(u.Hostname(), "443")
	}
	jwks, err := os.ReadFile(jwksFile)
	if err != nil {
		return fmt.Errorf("read --jwks: %w", err)
	}
	var set struct {
		Keys []struct {
			Alg string `json:"alg"`
		} `json:"keys"`
	}
	if err := json.Unmarshal(jwks, &set); err != nil {
		return fmt.Errorf("--jwks %s: %w", jwksFile, err)
	}
	var algs []string
	for _, k := range set.Keys {
		if k.Alg != "" && !slices.Contains(algs, k.Alg) {
			algs = append(algs, k.Alg)
		}
	}
	if len(algs) == 0 {
		return fmt.Errorf("--jwks %s: no key names its alg", jwksFile)
	}
	base := strings.TrimSuffix(issuer, "/")
	discovery, err := json.Marshal(map[string]any{
		"issuer":                                issuer,
		"jwks_uri":                              base + "/jwks.json",
		"id_token_signing_alg_values_supported": algs,
		"response_types_supported":              []string{"id_token"},
		"subject_types_supported":               []string{"public"},
	})
	if err != nil {
		return fmt.Errorf("encode the discovery document: %w", err)
	}
	chainPEM, keyPEM, err := istioCA.GenKeyCert([]string{u.Hostname()}, 24*time.Hour, false)
	if err != nil {
		return fmt.Errorf("sign the issuer's certificate: %w", err)
	}
	cert, err := tls.X509KeyPair(chainPEM, keyPEM)
	if err != nil {
		return fmt.Errorf("load the issuer's certificate: %w", err)
	}
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return fmt.Errorf("listen for the issuer: %w", err)
	}
	mux := http.NewServeMux()
	mux.HandleFunc("/.well-known/openid-configuration", func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		_, _ = w.Write(discovery)
	})
	mux.HandleFunc("/jwks.json", func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		_, _ = w.Write(jwks)
	})
	srv := &http.Server{Handler: mux, TLSConfig: &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12}}
	go func() { _ = srv.ServeTLS(lis, "", "") }()

	tr := http.DefaultTransport.(*http.Transport).Clone()
	tr.TLSClientConfig = &tls.Config{RootCAs: roots, MinVersion: tls.VersionTLS12}
	var d net.Dialer
	tr.DialContext = func(ctx context.Context, network, addr string) (net.Conn, error) {
		if addr == issuerHostPort {
			addr = lis.Addr().String()
		}
		return d.DialContext(ctx, network, addr)
	}
	http.DefaultTransport = tr
	http.DefaultClient = &http.Client{Transport: tr, Timeout: 10 * time.Second}
	return nil
}

// fixedMesh is a mesh.Watcher whose configuration never changes.
type fixedMesh struct{ mc *meshconfig.MeshConfig }

func (f fixedMesh) Mesh() *meshconfig.MeshConfig { return f.mc }
func (fixedMesh) AddMeshHandler(func()) *mesh.WatcherHandlerRegistration {
	return mesh.NewWatcherHandlerRegistration(func() {})
}
func (fixedMesh) DeleteMeshHandler(*mesh.WatcherHandlerRegistration) {}

func requireLoopback(addr string) error {
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		return fmt.Errorf("address %q: %w", addr, err)
	}
	if ip := net.ParseIP(host); ip == nil || !ip.IsLoopback() {
		return fmt.Errorf("address %q: bind to a loopback IP only", addr)
	}
	return nil
}

// writeCACerts generates an ECDSA P-256 root and an intermediate signed by
// it, and writes them as Istio's cacerts files.
func writeCACerts(dir string) error {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("create %s: %w", dir, err)
	}
	now := time.Now().Add(-time.Minute)
	rootKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return fmt.Errorf("generate root key: %w", err)
	}
	rootTmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{Organization: []string{"meshca bench"}, CommonName: "istiod-ca bench root"},
		NotBefore: now, NotAfter: now.Add(10 * 365 * 24 * time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
	}
	rootDER, err := x509.CreateCertificate(rand.Reader, rootTmpl, rootTmpl, rootKey.Public(), rootKey)
	if err != nil {
		return fmt.Errorf("sign root: %w", err)
	}
	root, err := x509.ParseCertificate(rootDER)
	if err != nil {
		return fmt.Errorf("parse root: %w", err)
	}
	caKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return fmt.Errorf("generate intermediate key: %w", err)
	}
	caTmpl := &x509.Certificate{
		SerialNumber: big.NewInt(2), Subject: pkix.Name{Organization: []string{"meshca bench"}, CommonName: "istiod-ca bench intermediate"},
		NotBefore: now, NotAfter: now.Add(2 * 365 * 24 * time.Hour),
		IsCA: true, BasicConstraintsValid: true, MaxPathLenZero: true,
		KeyUsage: x509.KeyUsageCertSign | x509.KeyUsageCRLSign | x509.KeyUsageDigitalSignature,
	}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, root, caKey.Public(), rootKey)
	if err != nil {
		return fmt.Errorf("sign intermediate: %w", err)
	}
	keyDER, err := x509.MarshalPKCS8PrivateKey(caKey)
	if err != nil {
		return fmt.Errorf("encode intermediate key: %w", err)
	}
	certPEM := func(der []byte) []byte { return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}) }
	out := map[string][]byte{
		ca.RootCertFile:     certPEM(rootDER),
		ca.CACertFile:       certPEM(caDER),
		ca.CAPrivateKeyFile: pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: keyDER}),
		ca.CertChainFile:    append(certPEM(caDER), certPEM(rootDER)...),
	}
	for name, data := range out {
		if err := os.WriteFile(filepath.Join(dir, name), data, 0o600); err != nil {
			return fmt.Errorf("write %s: %w", name, err)
		}
	}
	return nil
}
