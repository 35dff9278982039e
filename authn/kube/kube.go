package kube

import (
	"context"
	"crypto/x509"
	"fmt"
	"log/slog"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"

	"github.com/meshca/meshca/authn"
)

// Names of the authenticators New builds, as `authn.chain` lists them.
const (
	NameClientCert  = "clientcert"
	NameJWT         = "jwt"
	NameTokenReview = "tokenreview"
)

// Client is meshca's one connection to the kube-apiserver, built once and
// shared by everything that needs it.
type Client struct {
	// Rest is the client configuration (for discovery and JWKS reads).
	Rest *rest.Config
	// Interface is the typed client for TokenReviews, rate-limited to the
	// configured QPS and burst.
	Interface kubernetes.Interface
	// Watch is a typed client with a budget of its own (5 QPS, burst 10),
	// for the service-account and pod lists and watches, so that a flood of reviews
	// cannot starve them (nor they the reviews). Discovery and JWKS reads
	// build their own clients from Rest, with their own budgets too.
	Watch kubernetes.Interface
}

// NewClient builds the client from the kubeconfig at path ("" means the
// in-cluster configuration), with meshca's own rate limit on its requests.
func NewClient(path string, qps float32, burst int) (*Client, error) {
	var (
		c   *rest.Config
		err error
	)
	if path == "" {
		c, err = rest.InClusterConfig()
		if err != nil {
			return nil, fmt.Errorf("in-cluster kube config (set authn.kubeconfig outside a cluster): %w", err)
		}
	} else if c, err = clientcmd.BuildConfigFromFlags("", path); err != nil {
		return nil, fmt.Errorf("kubeconfig %s: %w", path, err)
	}
	// client-go's default (5 QPS) would queue real cache misses behind a
	// burst; an explicit bound keeps the apiserver safe all the same.
	c.QPS, c.Burst = qps, burst
	cs, err := kubernetes.NewForConfig(c)
	if err != nil {
		return nil, fmt.Errorf("kube client: %w", err)
	}
	wc := rest.CopyConfig(c)
	wc.QPS, wc.Burst = 5, 10
	watch, err := kubernetes.NewForConfig(wc)
	if err != nil {
		return nil, fmt.Errorf("kube watch client: %w", err)
	}
	return &Client{Rest: c, Interface: cs, Watch: watch}, nil
}

// Config is what New needs from the `authn` section of the configuration.
type Config struct {
	// Chain names the authenticators in the order tried (NameClientCert,
	// NameJWT, NameTokenReview).
	Chain       []string
	TrustDomain spiffeid.TrustDomain
	Audiences   []string
	// Issuer is the tokens' issuer; "" discovers it.
	Issuer string
	// JWKSFile and JWKSURL are where the jwt authenticator reads keys.
	JWKSFile, JWKSURL  string
	Skew               time.Duration
	RefetchInterval    time.Duration
	MaxReviewsInFlight int
	Cache              CacheConfig
	// CheckServiceAccounts watches ServiceAccounts and refuses credentials
	// of deleted or re-created ones. Needs Deps.Client.
	CheckServiceAccounts bool
	// TrustedNodeAgents lists the service accounts ("namespace/name") of
	// the node agents (ztunnel) that may ask for certificates of the
	// workloads on their node. Non-empty, it watches Pods, to know which
	// run where. Needs Deps.Client.
	TrustedNodeAgents []string
}

// Deps are New's runtime inputs.
type Deps struct {
	// Client reaches the apiserver; needed by tokenreview, by jwt without
	// a JWKS file or URL, and by CheckServiceAccounts.
	Client *Client
	// Roots returns the CA's trust bundle, for client certificates.
	Roots func(context.Context) ([]*x509.Certificate, error)
	// Log receives operational logs. Default: discard.
	Log *slog.Logger
	// Registerer receives the authenticators' metrics. Optional.
	Registerer prometheus.Registerer
}

// Authenticators is the chain New built, with the parts the server waits
// for before it is ready.
type Authenticators struct {
	Chain *authn.Chain
	// JWT is the jwt authenticator, if in the chain: ready once Refresh
	// succeeds.
	JWT *JWT
	// ServiceAccounts is the watch, if CheckServiceAccounts: ready once it
	// has synced, and must be Run.
	ServiceAccounts *ServiceAccountIndex
	// Pods is the pod watch, if TrustedNodeAgents: ready once it has
	// synced, and must be Run.
	Pods *PodIndex
	// Impersonation decides node agents' impersonations, if
	// TrustedNodeAgents; nil otherwise.
	Impersonation *authn.NodeAuthorizer
}

// New builds the authenticators cfg.Chain names, in order. An unknown name
// is an error. ctx bounds the discovery of the issuer.
func New(ctx context.Context, cfg Config, deps Deps) (*Authenticators, error) {
	if deps.Log == nil {
		deps.Log = slog.New(slog.DiscardHandler)
	}
	metrics := NewMetrics(deps.Registerer)
	out := &Authenticators{}
	var (
		restCfg *rest.Config
		client  kubernetes.Interface
		lookup  ServiceAccountLookup
	)
	if deps.Client != nil {
		restCfg, client = deps.Client.Rest, deps.Client.Interface
	}
	watch := client
	if deps.Client != nil && deps.Client.Watch != nil {
		watch = deps.Client.Watch
	}
	if cfg.CheckServiceAccounts {
		if client == nil {
			return nil, fmt.Errorf("authn.checkServiceAccounts needs a kube client")
		}
		out.ServiceAccounts = NewServiceAccountIndex(watch, deps.Log.With("component", "serviceaccounts"))
		lookup = out.ServiceAccounts
	}
	if len(cfg.TrustedNodeAgents) > 0 {
		if client == nil {
			return nil, fmt.Errorf("authn.trustedNodeAgents needs a kube client")
		}
		out.Pods = NewPodIndex(watch, deps.Log.With("component", "pods"))
		var err error
		out.Impersonation, err = authn.NewNodeAuthorizer(authn.NodeAuthorizerConfig{
			TrustDomain: cfg.TrustDomain, Trusted: cfg.TrustedNodeAgents, Pods: out.Pods,
		})
		if err != nil {
			return nil, fmt.Errorf("authn.trustedNodeAgents: %w", err)
		}
	}
	var links []authn.Named
	for _, name := range cfg.Chain {
		var (
			a   authn.Authenticator
			err error
		)
		switch name {
		case NameClientCert:
			a, err = authn.NewClientCert(authn.ClientCertConfig{TrustDomain: cfg.TrustDomain, Roots: deps.Roots, ServiceAccounts: lookup,
				Verifications: metrics.clientCertVerifications})
		case NameJWT:
			out.JWT, err = NewJWT(JWTConfig{
				TrustDomain: cfg.TrustDomain, Issuer: cfg.Issuer, Audiences: cfg.Audiences,
				JWKSFile: cfg.JWKSFile, JWKSURL: cfg.JWKSURL, Kube: restCfg,
				Skew: cfg.Skew, RefetchInterval: cfg.RefetchInterval,
				Cache: cfg.Cache, ServiceAccounts: lookup, Log: deps.Log.With("component", "jwt"), Metrics: metrics,
			})
			a = out.JWT
		case NameTokenReview:
			if client == nil {
				return nil, fmt.Errorf("authn.chain %s: needs a kube client", name)
			}
			issuer := reviewIssuer(ctx, cfg.Issuer, restCfg, deps.Log)
			// Signatures are checked locally first, against the same keys
			// the jwt authenticator uses, so forged tokens never take
			// review capacity from real ones.
			sigs, serr := NewJWT(JWTConfig{
				TrustDomain: cfg.TrustDomain, Issuer: issuer, Audiences: cfg.Audiences,
				JWKSFile: cfg.JWKSFile, JWKSURL: cfg.JWKSURL, Kube: restCfg,
				Skew: cfg.Skew, RefetchInterval: cfg.RefetchInterval,
				Cache: CacheConfig{MaxTTL: -1}, Log: deps.Log.With("component", "tokenreview-signatures"), Metrics: metrics,
			})
			if serr != nil {
				return nil, fmt.Errorf("authn.chain %s: signature pre-check: %w", name, serr)
			}
			a, err = NewTokenReview(TokenReviewConfig{
				Client: client, TrustDomain: cfg.TrustDomain, Audiences: cfg.Audiences, Issuer: issuer,
				Skew: cfg.Skew, MaxInFlight: cfg.MaxReviewsInFlight, Signatures: sigs,
				Cache: cfg.Cache, ServiceAccounts: lookup, Log: deps.Log.With("component", "tokenreview"), Metrics: metrics,
			})
		default:
			err = fmt.Errorf("unknown authenticator %q, want %s, %s or %s", name, NameClientCert, NameJWT, NameTokenReview)
		}
		if err != nil {
			return nil, fmt.Errorf("authn.chain %s: %w", name, err)
		}
		links = append(links, authn.Named{Name: name, Authenticator: a})
	}
	chain, err := authn.NewChain(links...)
	if err != nil {
		return nil, err
	}
	out.Chain = chain
	return out, nil
}

// reviewIssuer is the issuer TokenReview names when it explains a
// rejection: the configured one, else the apiserver's. Failing to discover
// it only makes those explanations vaguer, so it is not fatal.
func reviewIssuer(ctx context.Context, configured string, restCfg *rest.Config, log *slog.Logger) string {
	if configured != "" || restCfg == nil {
		return configured
	}
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	iss, err := DiscoverIssuer(ctx, restCfg)
	if err != nil {
		log.Warn("could not discover the service-account issuer; rejected tokens will be explained less precisely", "err", err)
	}
	return iss
}
