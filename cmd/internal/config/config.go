// Package config loads meshca's one YAML configuration file: decoded
// strictly (an unknown key is an error naming its dotted path), defaults
// filled in one place, and every section validated without side effects.
package config

import (
	_ "embed"
	"errors"
	"fmt"
	"math"
	"net"
	"net/netip"
	"os"
	"slices"
	"strings"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"k8s.io/apimachinery/pkg/util/validation"

	"github.com/meshca/meshca/authn"
	"github.com/meshca/meshca/authn/kube"
	"github.com/meshca/meshca/backends"
	"github.com/meshca/meshca/ca"
)

// Config is the whole of meshca's configuration. README.md documents every
// key; Defaults shows their default values.
type Config struct {
	// TrustDomain is the SPIFFE trust domain of issued identities.
	TrustDomain string          `yaml:"trustDomain"`
	Server      Server          `yaml:"server"`
	Authn       Authn           `yaml:"authn"`
	Backend     backends.Config `yaml:"backend"`
	Policy      Policy          `yaml:"policy"`
	SDS         SDS             `yaml:"sds"`
	Admission   Admission       `yaml:"admission"`
	Audit       Audit           `yaml:"audit"`
	Log         Log             `yaml:"log"`
	Dev         Dev             `yaml:"dev"`
}

// Server configures the listeners and meshca's own serving certificate.
type Server struct {
	// GRPCAddress serves Istio's CreateCertificate and gRPC health, over TLS.
	GRPCAddress string `yaml:"grpcAddress"`
	// AdminAddress serves /metrics, /healthz and /readyz over plain HTTP.
	AdminAddress string `yaml:"adminAddress"`
	// DNSNames and IPAddresses go into the serving certificate; clients
	// verify the one they dial.
	DNSNames    []string `yaml:"dnsNames"`
	IPAddresses []string `yaml:"ipAddresses"`
	// ServingTTL is the serving certificate's lifetime; it is renewed at half.
	ServingTTL time.Duration `yaml:"servingTTL"`
	// ShutdownGrace bounds how long in-flight requests may finish on stop.
	ShutdownGrace time.Duration `yaml:"shutdownGrace"`
	// MaxConcurrentStreams bounds concurrent requests per client connection.
	MaxConcurrentStreams uint32 `yaml:"maxConcurrentStreams"`
	// MaxConnections bounds open gRPC connections.
	MaxConnections int `yaml:"maxConnections"`
	// HandshakeTimeout bounds a connection's TLS handshake.
	HandshakeTimeout time.Duration `yaml:"handshakeTimeout"`
	// MaxHeaderListBytes bounds a request's header list.
	MaxHeaderListBytes uint32 `yaml:"maxHeaderListBytes"`
	// RequestTimeout bounds how long a stream may wait for its first
	// message.
	RequestTimeout time.Duration `yaml:"requestTimeout"`
	// MaxConnectionAge and MaxConnectionAgeGrace recycle connections so
	// that load rebalances across replicas.
	MaxConnectionAge      time.Duration `yaml:"maxConnectionAge"`
	MaxConnectionAgeGrace time.Duration `yaml:"maxConnectionAgeGrace"`
	// MaxConnectionIdle closes connections without streams.
	MaxConnectionIdle time.Duration `yaml:"maxConnectionIdle"`
	// MaxClientChain bounds the certificates a client may send in its TLS
	// handshake.
	MaxClientChain int `yaml:"maxClientChain"`
	// GCHeapFloorMiB keeps the Go garbage collector's heap goal at least
	// this large, so that a small live heap is not collected several times
	// a second under load; -1 turns it off, and a GOGC environment
	// variable overrides it.
	GCHeapFloorMiB int `yaml:"gcHeapFloorMiB"`
}

// Authn configures how callers are authenticated.
type Authn struct {
	// Chain lists the authenticators in the order tried: clientcert, jwt,
	// tokenreview. The first that finds its kind of credential decides.
	Chain []string `yaml:"chain"`
	// Audiences a token must be issued for (any of them).
	Audiences []string `yaml:"audiences"`
	// Issuer is the cluster's service-account token issuer (`iss`). ""
	// reads it from the apiserver's /.well-known/openid-configuration.
	// The jwt authenticator requires tokens to carry it; tokenreview uses
	// it only to explain rejections.
	Issuer string `yaml:"issuer"`
	// Kubeconfig is the path of a kubeconfig; "" means in-cluster config.
	// Needed by tokenreview, by jwt without a JWKS file or URL, and by the
	// service-account check.
	Kubeconfig string `yaml:"kubeconfig"`
	// KubeQPS and KubeBurst bound meshca's requests to the apiserver
	// (TokenReviews on cache misses, discovery, the watch).
	KubeQPS   float32 `yaml:"kubeQPS"`
	KubeBurst int     `yaml:"kubeBurst"`
	// MaxReviewsInFlight caps concurrent TokenReview calls; callers beyond
	// it wait (within their deadline) for a slot.
	MaxReviewsInFlight int `yaml:"maxReviewsInFlight"`
	// CheckServiceAccounts refuses tokens whose service account no longer
	// exists (or was re-created), using a watch on ServiceAccounts. Default
	// true unless in dev mode.
	CheckServiceAccounts *bool `yaml:"checkServiceAccounts"`
	// TrustedNodeAgents lists the service accounts, "namespace/name", of
	// the node agents (ztunnel) that may ask, with CreateCertificate's
	// ImpersonatedIdentity, for certificates of the workloads on their
	// node. Non-empty, meshca watches Pods. Default
	// [istio-system/ztunnel] unless in dev mode; [] turns it off.
	TrustedNodeAgents []string `yaml:"trustedNodeAgents"`
	JWT               JWT      `yaml:"jwt"`
	Cache             Cache    `yaml:"cache"`
}

// JWT configures local verification of service-account tokens.
type JWT struct {
	// JWKSFile or JWKSURL give the verification keys; with neither, they
	// are read from the apiserver's /openid/v1/jwks.
	JWKSFile string `yaml:"jwksFile"`
	JWKSURL  string `yaml:"jwksURL"`
	// Skew is the clock-skew allowance on exp, nbf and iat. tokenreview
	// uses it too, to refuse plainly expired tokens without a round trip.
	Skew time.Duration `yaml:"skew"`
	// RefetchInterval is the least time between JWKS refetches caused by
	// an unknown key ID.
	RefetchInterval time.Duration `yaml:"refetchInterval"`
}

// Cache bounds the cache of authenticated tokens.
type Cache struct {
	// MaxTTL caps how long a result is reused; never past the token's exp.
	// Negative turns the cache off.
	MaxTTL time.Duration `yaml:"maxTTL"`
	// MaxEntries bounds memory.
	MaxEntries int `yaml:"maxEntries"`
}

// Policy points at the rotation policy file.
type Policy struct {
	// File is the policy YAML; "" means built-in defaults only.
	File string `yaml:"file"`
	// ReloadInterval is how often the file is checked for changes.
	ReloadInterval time.Duration `yaml:"reloadInterval"`
}

// SDS configures central SDS, served on server.grpcAddress beside
// CreateCertificate.
type SDS struct {
	// Enabled serves envoy.service.secret.v3.SecretDiscoveryService.
	Enabled *bool `yaml:"enabled"`
	// MaxStreams bounds open SDS streams; more get ResourceExhausted.
	MaxStreams int `yaml:"maxStreams"`
	// MaxIssuing bounds first certificates issued at once; more wait.
	MaxIssuing int `yaml:"maxIssuing"`
	// RenewWorkers is how many renewals run at once.
	RenewWorkers int `yaml:"renewWorkers"`
	// BundleAckTimeout is how long certificates under a new root wait for
	// every stream to accept the bundle that holds it.
	BundleAckTimeout time.Duration `yaml:"bundleAckTimeout"`
	// ReissueSpread spreads the re-issue that follows a change of signing
	// CA over this long.
	ReissueSpread time.Duration `yaml:"reissueSpread"`
	// RecheckInterval is how often open streams' credentials are checked
	// (token expiry, deleted service account).
	RecheckInterval time.Duration `yaml:"recheckInterval"`
}

// Admission configures admission control of CreateCertificate.
type Admission struct {
	// PeerRate and PeerBurst bound requests per client address.
	PeerRate  float64 `yaml:"peerRate"`
	PeerBurst int     `yaml:"peerBurst"`
	// IdentityRate and IdentityBurst bound requests per identity.
	IdentityRate  float64 `yaml:"identityRate"`
	IdentityBurst int     `yaml:"identityBurst"`
	// MaxInFlight bounds issuances at once (0: 16 × CPUs); Queue bounds
	// those waiting, QueueWait how long each may wait.
	MaxInFlight int           `yaml:"maxInFlight"`
	Queue       int           `yaml:"queue"`
	QueueWait   time.Duration `yaml:"queueWait"`
	// MaxRenewalsInFlight bounds the renewals among the issuances at
	// once while first certificates are being asked for (0: CPUs / 2, at
	// least 1); MaxRenewalsQueued bounds those waiting then (0: 2 × CPUs),
	// more are refused with a retry hint.
	MaxRenewalsInFlight int `yaml:"maxRenewalsInFlight"`
	MaxRenewalsQueued   int `yaml:"maxRenewalsQueued"`
}

// Audit configures the audit trail.
type Audit struct {
	// File receives one JSON line per request, appended; "" means stdout.
	File string `yaml:"file"`
}

// Log configures operational logs (to stderr).
type Log struct {
	// Level is debug, info, warn or error.
	Level string `yaml:"level"`
	// Format is json or text.
	Format string `yaml:"format"`
}

// Dev is the no-cluster development mode of `make run`.
type Dev struct {
	// Enabled makes meshca create a development token-signing key in Dir
	// and write its JWKS and the CA root there. Never enable in production.
	Enabled bool `yaml:"enabled"`
	// Dir holds the development key, JWKS and root.
	Dir string `yaml:"dir"`
}

// Authenticator names accepted in authn.chain.
const (
	AuthClientCert  = kube.NameClientCert
	AuthJWT         = kube.NameJWT
	AuthTokenReview = kube.NameTokenReview
)

// Defaults returns a Config with every default filled in.
func Defaults() Config {
	var c Config
	c.applyDefaults()
	return c
}

func (c *Config) applyDefaults() {
	def := func(s *string, v string) {
		if *s == "" {
			*s = v
		}
	}
	defDur := func(d *time.Duration, v time.Duration) {
		if *d == 0 {
			*d = v
		}
	}
	def(&c.TrustDomain, "cluster.local")
	def(&c.Server.GRPCAddress, ":15012")
	def(&c.Server.AdminAddress, ":15014")
	if len(c.Server.DNSNames) == 0 && len(c.Server.IPAddresses) == 0 {
		c.Server.DNSNames = []string{"meshca.istio-system.svc"}
	}
	defDur(&c.Server.ServingTTL, 24*time.Hour)
	defDur(&c.Server.ShutdownGrace, 10*time.Second)
	if c.Server.MaxConcurrentStreams == 0 {
		c.Server.MaxConcurrentStreams = 128
	}
	if c.Server.MaxConnections == 0 {
		c.Server.MaxConnections = 4096
	}
	defDur(&c.Server.HandshakeTimeout, 5*time.Second)
	if c.Server.MaxHeaderListBytes == 0 {
		c.Server.MaxHeaderListBytes = 32 << 10
	}
	defDur(&c.Server.RequestTimeout, 10*time.Second)
	defDur(&c.Server.MaxConnectionAge, 30*time.Minute)
	defDur(&c.Server.MaxConnectionAgeGrace, time.Minute)
	defDur(&c.Server.MaxConnectionIdle, 5*time.Minute)
	if c.Server.MaxClientChain == 0 {
		c.Server.MaxClientChain = 4
	}
	if c.Server.GCHeapFloorMiB == 0 {
		c.Server.GCHeapFloorMiB = 128
	}
	if c.Authn.Chain == nil {
		c.Authn.Chain = []string{AuthClientCert, AuthTokenReview}
	}
	if c.Authn.Audiences == nil {
		c.Authn.Audiences = []string{"istio-ca"}
	}
	if c.Authn.KubeQPS == 0 {
		c.Authn.KubeQPS = 50
	}
	if c.Authn.KubeBurst == 0 {
		c.Authn.KubeBurst = 100
	}
	if c.Authn.MaxReviewsInFlight == 0 {
		c.Authn.MaxReviewsInFlight = 32
	}
	if c.Authn.CheckServiceAccounts == nil {
		v := !c.Dev.Enabled
		c.Authn.CheckServiceAccounts = &v
	}
	if c.Authn.TrustedNodeAgents == nil {
		// Dev mode has no cluster whose pods could be watched.
		c.Authn.TrustedNodeAgents = []string{}
		if !c.Dev.Enabled {
			c.Authn.TrustedNodeAgents = []string{DefaultNodeAgent}
		}
	}
	defDur(&c.Authn.JWT.Skew, 30*time.Second)
	defDur(&c.Authn.JWT.RefetchInterval, 10*time.Second)
	defDur(&c.Authn.Cache.MaxTTL, 5*time.Minute)
	if c.Authn.Cache.MaxEntries == 0 {
		c.Authn.Cache.MaxEntries = 100_000
	}
	if c.SDS.Enabled == nil {
		v := true
		c.SDS.Enabled = &v
	}
	if c.SDS.MaxStreams == 0 {
		c.SDS.MaxStreams = 20000
	}
	if c.SDS.MaxIssuing == 0 {
		c.SDS.MaxIssuing = 8
	}
	if c.SDS.RenewWorkers == 0 {
		c.SDS.RenewWorkers = 1
	}
	if c.Admission.PeerRate == 0 {
		c.Admission.PeerRate = 10000
	}
	if c.Admission.PeerBurst == 0 {
		c.Admission.PeerBurst = 20000
	}
	if c.Admission.IdentityRate == 0 {
		c.Admission.IdentityRate = 5000
	}
	if c.Admission.IdentityBurst == 0 {
		c.Admission.IdentityBurst = 10000
	}
	if c.Admission.Queue == 0 {
		c.Admission.Queue = 512
	}
	defDur(&c.Admission.QueueWait, time.Second)
	defDur(&c.SDS.BundleAckTimeout, 5*time.Second)
	defDur(&c.SDS.ReissueSpread, 10*time.Second)
	defDur(&c.SDS.RecheckInterval, 30*time.Second)
	def(&c.Backend.Type, "selfsigned")
	def(&c.Backend.SelfSigned.TrustDomain, c.TrustDomain)
	def(&c.Backend.Vault.TrustDomain, c.TrustDomain)
	defDur(&c.Backend.Upstream.BundleRefreshInterval, ca.DefaultBundleRefresh)
	defDur(&c.Backend.Upstream.Timeout, ca.DefaultUpstreamTimeout)
	if c.Backend.Upstream.MaxInFlight == 0 {
		c.Backend.Upstream.MaxInFlight = ca.DefaultMaxUpstreamInFlight
	}
	defDur(&c.Policy.ReloadInterval, 5*time.Second)
	def(&c.Log.Level, "info")
	def(&c.Log.Format, "json")
	def(&c.Dev.Dir, ".meshca-dev")
}

// Validate checks the whole configuration and reports every problem by
// its dotted path.
func (c *Config) Validate() error {
	var errs []error
	bad := func(path, format string, args ...any) {
		errs = append(errs, fmt.Errorf("%s: %s", path, fmt.Sprintf(format, args...)))
	}
	if _, err := spiffeid.TrustDomainFromString(c.TrustDomain); err != nil {
		bad("trustDomain", "%q is not a valid trust domain name", c.TrustDomain)
	}
	for path, addr := range map[string]string{"server.grpcAddress": c.Server.GRPCAddress, "server.adminAddress": c.Server.AdminAddress} {
		if _, _, err := net.SplitHostPort(addr); err != nil {
			bad(path, "want host:port, got %q", addr)
		}
	}
	for i, ip := range c.Server.IPAddresses {
		if _, err := netip.ParseAddr(ip); err != nil {
			bad(fmt.Sprintf("server.ipAddresses[%d]", i), "%q is not an IP address", ip)
		}
	}
	if c.Server.ServingTTL < 10*time.Minute {
		bad("server.servingTTL", "must be at least 10m, got %s", c.Server.ServingTTL)
	}
	if c.Server.ShutdownGrace < 0 {
		bad("server.shutdownGrace", "must not be negative")
	}
	if c.Server.MaxConnections < 1 {
		bad("server.maxConnections", "must be at least 1, got %d", c.Server.MaxConnections)
	}
	if c.Server.MaxClientChain < 1 || c.Server.MaxClientChain > 10 {
		bad("server.maxClientChain", "must be between 1 and 10, got %d", c.Server.MaxClientChain)
	}
	if c.Server.GCHeapFloorMiB < -1 || c.Server.GCHeapFloorMiB > 1<<20 {
		bad("server.gcHeapFloorMiB", "must be -1 (off) or between 1 and 1048576, got %d", c.Server.GCHeapFloorMiB)
	}
	if c.Server.MaxHeaderListBytes < 20<<10 {
		bad("server.maxHeaderListBytes", "must be at least 20480 (a token may be 16 KiB), got %d", c.Server.MaxHeaderListBytes)
	}
	for path, d := range map[string]time.Duration{
		"server.handshakeTimeout": c.Server.HandshakeTimeout, "server.requestTimeout": c.Server.RequestTimeout,
		"server.maxConnectionAge": c.Server.MaxConnectionAge, "server.maxConnectionAgeGrace": c.Server.MaxConnectionAgeGrace,
		"server.maxConnectionIdle": c.Server.MaxConnectionIdle,
	} {
		if d < time.Second {
			bad(path, "must be at least 1s, got %s", d)
		}
	}
	if len(c.Authn.Chain) == 0 {
		bad("authn.chain", "list at least one of clientcert, jwt, tokenreview")
	}
	for i, name := range c.Authn.Chain {
		switch name {
		case AuthClientCert, AuthJWT, AuthTokenReview:
			if slices.Index(c.Authn.Chain, name) != i {
				bad(fmt.Sprintf("authn.chain[%d]", i), "%q is listed twice", name)
			}
		default:
			bad(fmt.Sprintf("authn.chain[%d]", i), "unknown authenticator %q, want clientcert, jwt or tokenreview", name)
		}
	}
	if len(c.Authn.Audiences) == 0 {
		bad("authn.audiences", "list at least one audience (istio-agent uses istio-ca)")
	}
	if !(c.Authn.KubeQPS >= 0) || math.IsInf(float64(c.Authn.KubeQPS), 1) || c.Authn.KubeBurst < 0 { // also refuses NaN and +Inf
		bad("authn.kubeQPS", "kubeQPS and kubeBurst must not be negative")
	}
	if c.Authn.MaxReviewsInFlight < 0 {
		bad("authn.maxReviewsInFlight", "must not be negative")
	}
	for i, a := range c.Authn.TrustedNodeAgents {
		path := fmt.Sprintf("authn.trustedNodeAgents[%d]", i)
		if err := validNodeAgent(a); err != nil {
			bad(path, "%v", err)
		} else if slices.Index(c.Authn.TrustedNodeAgents, a) != i {
			bad(path, "%q is listed twice", a)
		}
	}
	if c.Authn.JWT.JWKSFile != "" && c.Authn.JWT.JWKSURL != "" {
		bad("authn.jwt", "set jwksFile or jwksURL, not both")
	}
	if (c.Authn.JWT.JWKSFile != "" || c.Authn.JWT.JWKSURL != "") && c.Authn.Issuer == "" && slices.Contains(c.Authn.Chain, AuthJWT) {
		bad("authn.issuer", "is required with authn.jwt.jwksFile or jwksURL (it is discovered only from the apiserver)")
	}
	if c.Authn.JWT.Skew < 0 || c.Authn.JWT.Skew > 5*time.Minute {
		bad("authn.jwt.skew", "must be between 0 and 5m, got %s", c.Authn.JWT.Skew)
	}
	if c.Authn.JWT.RefetchInterval < time.Second {
		bad("authn.jwt.refetchInterval", "must be at least 1s (it bounds JWKS fetches that unknown key IDs cause), got %s", c.Authn.JWT.RefetchInterval)
	}
	if c.Authn.Cache.MaxEntries < 0 {
		bad("authn.cache.maxEntries", "must not be negative")
	}
	if err := c.Backend.Validate(); err != nil {
		errs = append(errs, err)
	}
	if c.Policy.ReloadInterval < 100*time.Millisecond {
		bad("policy.reloadInterval", "must be at least 100ms")
	}
	for path, n := range map[string]int{"sds.maxStreams": c.SDS.MaxStreams, "sds.maxIssuing": c.SDS.MaxIssuing, "sds.renewWorkers": c.SDS.RenewWorkers} {
		if n < 1 {
			bad(path, "must be at least 1, got %d", n)
		}
	}
	if !(c.Admission.PeerRate > 0) || !(c.Admission.IdentityRate > 0) || math.IsInf(c.Admission.PeerRate, 0) || math.IsInf(c.Admission.IdentityRate, 0) {
		bad("admission", "peerRate and identityRate must be positive numbers")
	}
	if c.Admission.PeerBurst < 1 || c.Admission.IdentityBurst < 1 || c.Admission.Queue < 1 || c.Admission.MaxInFlight < 0 || c.Admission.MaxRenewalsInFlight < 0 || c.Admission.MaxRenewalsQueued < 0 {
		bad("admission", "peerBurst, identityBurst and queue must be at least 1, maxInFlight, maxRenewalsInFlight and maxRenewalsQueued not negative")
	}
	if c.Admission.QueueWait < time.Millisecond || c.Admission.QueueWait > time.Minute {
		bad("admission.queueWait", "must be between 1ms and 1m, got %s", c.Admission.QueueWait)
	}
	if c.SDS.BundleAckTimeout < 0 || c.SDS.BundleAckTimeout > time.Minute {
		bad("sds.bundleAckTimeout", "must be between 0 and 1m, got %s", c.SDS.BundleAckTimeout)
	}
	if c.SDS.ReissueSpread < 0 {
		bad("sds.reissueSpread", "must not be negative")
	}
	if c.SDS.RecheckInterval < time.Second {
		bad("sds.recheckInterval", "must be at least 1s, got %s", c.SDS.RecheckInterval)
	}
	switch c.Log.Level {
	case "debug", "info", "warn", "error":
	default:
		bad("log.level", "want debug, info, warn or error, got %q", c.Log.Level)
	}
	switch c.Log.Format {
	case "json", "text":
	default:
		bad("log.format", "want json or text, got %q", c.Log.Format)
	}
	if c.Dev.Enabled && c.Dev.Dir == "" {
		bad("dev.dir", "is required in dev mode")
	}
	return errors.Join(errs...)
}

// NeedsKube reports whether the configuration talks to a kube-apiserver.
func (c *Config) NeedsKube() bool {
	jwtNeeds := slices.Contains(c.Authn.Chain, AuthJWT) && c.Authn.JWT.JWKSFile == "" && c.Authn.JWT.JWKSURL == ""
	return slices.Contains(c.Authn.Chain, AuthTokenReview) || jwtNeeds || *c.Authn.CheckServiceAccounts ||
		len(c.Authn.TrustedNodeAgents) > 0
}

// DefaultNodeAgent is authn.trustedNodeAgents' default: Istio's ztunnel.
const DefaultNodeAgent = "istio-system/ztunnel"

// validNodeAgent checks a trusted node agent: namespace/serviceaccount,
// each a name Kubernetes accepts.
func validNodeAgent(s string) error {
	n, err := authn.ParseServiceAccountName(s)
	if err != nil {
		return err
	}
	if errs := validation.IsDNS1123Label(n.Namespace); len(errs) > 0 {
		return fmt.Errorf("%q: namespace %q: %s", s, n.Namespace, strings.Join(errs, "; "))
	}
	if errs := validation.IsDNS1123Subdomain(n.Name); len(errs) > 0 {
		return fmt.Errorf("%q: service account %q: %s", s, n.Name, strings.Join(errs, "; "))
	}
	return nil
}

// Parse decodes, defaults and validates a configuration.
func Parse(data []byte) (*Config, error) {
	var c Config
	if err := decodeStrict(data, &c); err != nil {
		return nil, err
	}
	c.applyDefaults()
	if err := c.Validate(); err != nil {
		return nil, err
	}
	return &c, nil
}

// Load reads and parses the configuration file at path.
func Load(path string) (*Config, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("read config: %w", err)
	}
	c, err := Parse(data)
	if err != nil {
		return nil, fmt.Errorf("config %s: %w", path, err)
	}
	return c, nil
}

//go:embed dev.yaml
var devYAML []byte

// DevYAML returns the embedded development configuration used by
// `meshca serve --dev` and `make run`.
func DevYAML() []byte { return slices.Clone(devYAML) }

// LoadDev parses the embedded development configuration.
func LoadDev() (*Config, error) {
	c, err := Parse(devYAML)
	if err != nil {
		return nil, fmt.Errorf("embedded dev config: %w", err)
	}
	return c, nil
}
