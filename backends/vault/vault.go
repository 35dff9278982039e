// Package vault is the backend that has HashiCorp Vault's PKI secrets
// engine sign: in intermediate mode Vault signs an intermediate whose key
// meshca keeps in memory (a ca.Authority), in direct mode Vault signs every
// leaf (a ca.Upstream). meshca logs in with a token, Kubernetes or AppRole,
// keeps the token alive, and logs in again when Vault refuses it.
package vault

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/hashicorp/vault/api"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promauto"
	"github.com/ryanuber/go-glob"

	"github.com/meshca/meshca/ca"
)

// Deps are the runtime inputs of the backend, apart from its configuration.
type Deps struct {
	// Log receives operational logs. Default: discard.
	Log *slog.Logger
	// Now is the clock. Default time.Now.
	Now func() time.Time
	// Registerer receives the backend's metrics. Default: unregistered.
	Registerer prometheus.Registerer
	// MaxLeafTTL is the longest leaf lifetime the policy allows; in
	// direct mode the role's max_ttl must cover it. 0 skips the check.
	MaxLeafTTL time.Duration
	// MinLoginInterval overrides DefaultMinLoginInterval (tests).
	MinLoginInterval time.Duration
}

type metrics struct {
	logins        *prometheus.CounterVec
	renewals      *prometheus.CounterVec
	authenticated prometheus.Gauge
	tokenExpiry   prometheus.Gauge
}

func newMetrics(reg prometheus.Registerer) *metrics {
	f := promauto.With(reg)
	return &metrics{
		logins: f.NewCounterVec(prometheus.CounterOpts{
			Name: "meshca_vault_logins_total",
			Help: "Logins to Vault, by auth method and result (success, failure).",
		}, []string{"method", "result"}),
		renewals: f.NewCounterVec(prometheus.CounterOpts{
			Name: "meshca_vault_token_renewals_total",
			Help: "Renewals of meshca's Vault token by the lifetime watcher, by result.",
		}, []string{"result"}),
		authenticated: f.NewGauge(prometheus.GaugeOpts{
			Name: "meshca_vault_authenticated",
			Help: "1 while meshca holds a Vault token from a successful login, 0 after a failed one.",
		}),
		tokenExpiry: f.NewGauge(prometheus.GaugeOpts{
			Name: "meshca_vault_token_expiry_timestamp_seconds",
			Help: "When meshca's Vault token expires unless renewed, as a Unix timestamp; 0 for a token without expiry.",
		}),
	}
}

// backend is what both modes share: the client, the session and the paths.
type backend struct {
	cfg  Config
	log  *slog.Logger
	now  func() time.Time
	vc   *api.Client
	sess *session
}

// Authority is the intermediate mode: a ca.Authority and ca.BundleSource.
type Authority struct{ *backend }

// Upstream is the direct mode: a ca.Upstream.
type Upstream struct{ *backend }

// New checks that Vault is reachable, logs in, and validates the mount,
// issuer and (direct mode) role against the policy, naming the setting to
// fix on failure. It returns an *Authority or an *Upstream by cfg.Mode;
// both are ca.Runners that keep the login alive.
func New(ctx context.Context, cfg Config, deps Deps) (ca.Backend, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	cfg = cfg.withDefaults()
	if deps.Log == nil {
		deps.Log = slog.New(slog.DiscardHandler)
	}
	if deps.Now == nil {
		deps.Now = time.Now
	}
	if deps.MinLoginInterval <= 0 {
		deps.MinLoginInterval = DefaultMinLoginInterval
	}
	vc, err := newClient(cfg)
	if err != nil {
		return nil, err
	}
	b := &backend{cfg: cfg, log: deps.Log, now: deps.Now, vc: vc}
	b.sess = &session{cfg: cfg, client: vc, log: deps.Log, now: deps.Now, metrics: newMetrics(deps.Registerer),
		minRelogin: deps.MinLoginInterval, kick: make(chan struct{})}

	h, err := vc.Sys().HealthWithContext(ctx)
	if err != nil {
		return nil, fmt.Errorf("%saddress: Vault at %s is not reachable: %w", configPath, cfg.Address, err)
	}
	if h.Sealed || !h.Initialized {
		return nil, fmt.Errorf("%saddress: Vault at %s is sealed or not initialized", configPath, cfg.Address)
	}
	if err := b.sess.login(ctx); err != nil {
		return nil, fmt.Errorf("%sauth: %w", configPath, err)
	}
	if _, err := b.TrustBundle(ctx); err != nil {
		setting := "mount"
		if cfg.Issuer != "" {
			setting = "issuer"
		}
		return nil, fmt.Errorf("%s%s: cannot read the CA chain of issuer %q on mount %q: %w", configPath, setting, b.issuerRef(), cfg.Mount, err)
	}
	if cfg.Mode == ModeDirect {
		if err := b.checkRole(ctx, deps.MaxLeafTTL); err != nil {
			return nil, err
		}
		b.log.Info("Vault backend ready", "mode", cfg.Mode, "mount", cfg.Mount, "role", cfg.Role, "auth", cfg.Auth.Method)
		return &Upstream{b}, nil
	}
	if err := b.checkMountTTL(ctx); err != nil {
		return nil, err
	}
	b.log.Info("Vault backend ready", "mode", cfg.Mode, "mount", cfg.Mount, "auth", cfg.Auth.Method)
	return &Authority{b}, nil
}

// newClient builds a Vault client from cfg alone: none of the VAULT_*
// environment variables the API client otherwise reads (a stray
// VAULT_SKIP_VERIFY or VAULT_TOKEN) takes effect.
func newClient(cfg Config) (*api.Client, error) {
	tlsCfg := &tls.Config{MinVersion: tls.VersionTLS12, ServerName: cfg.TLSServerName}
	if cfg.CACertFile != "" {
		pemBytes, err := os.ReadFile(cfg.CACertFile)
		if err != nil {
			return nil, fmt.Errorf("%scaCertFile: %w", configPath, err)
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pemBytes) {
			return nil, fmt.Errorf("%scaCertFile: %s holds no PEM certificate", configPath, cfg.CACertFile)
		}
		tlsCfg.RootCAs = pool
	}
	transport := &http.Transport{
		Proxy:               http.ProxyFromEnvironment,
		DialContext:         (&net.Dialer{Timeout: 5 * time.Second, KeepAlive: 30 * time.Second}).DialContext,
		TLSClientConfig:     tlsCfg,
		TLSHandshakeTimeout: 5 * time.Second,
		MaxIdleConnsPerHost: 32,
		// Calls are bounded by the core (backend.upstream.maxInFlight);
		// this bounds the connections behind them.
		MaxConnsPerHost:   64,
		IdleConnTimeout:   90 * time.Second,
		ForceAttemptHTTP2: true,
	}
	vc, err := api.NewClient(&api.Config{
		Address:    cfg.Address,
		HttpClient: &http.Client{Transport: transport},
		Timeout:    cfg.RequestTimeout,
		// One retry of a 5xx: the core bounds the whole call, and in
		// direct mode a request waits for it.
		MaxRetries:   1,
		MinRetryWait: 100 * time.Millisecond,
		MaxRetryWait: 500 * time.Millisecond,
	})
	if err != nil {
		return nil, fmt.Errorf("%saddress: %w", configPath, err)
	}
	vc.ClearToken()
	vc.SetHeaders(http.Header{})
	vc.SetNamespace(cfg.Namespace)
	return vc, nil
}

// Run keeps meshca logged in until ctx is done.
func (b *backend) Run(ctx context.Context) error { return b.sess.run(ctx) }

// Status is nil while meshca holds a working Vault token, else why not.
func (b *backend) Status() error { return b.sess.status() }

func (b *backend) issuerRef() string {
	if b.cfg.Issuer != "" {
		return b.cfg.Issuer
	}
	return "default"
}

// write is a Vault write with meshca's token; see retryRefused.
func (b *backend) write(ctx context.Context, path string, data map[string]any) (*api.Secret, error) {
	return b.retryRefused(ctx, func() (*api.Secret, error) { return b.vc.Logical().WriteWithContext(ctx, path, data) })
}

// read is a Vault read with meshca's token; see retryRefused.
func (b *backend) read(ctx context.Context, path string) (*api.Secret, error) {
	return b.retryRefused(ctx, func() (*api.Secret, error) { return b.vc.Logical().ReadWithContext(ctx, path) })
}

// retryRefused makes call with meshca's token. A 403 may mean the token was
// revoked: the session logs in again (at most once per interval) and the
// call is made once more with the new token.
func (b *backend) retryRefused(ctx context.Context, call func() (*api.Secret, error)) (*api.Secret, error) {
	tok := b.sess.current()
	s, err := call()
	if isForbidden(err) && b.sess.refused(ctx, tok) {
		s, err = call()
	}
	return s, classify(err)
}

// TrustBundle returns the roots of the issuer's CA chain: its self-signed
// certificates, or the top of the chain when the root lives outside Vault.
func (b *backend) TrustBundle(ctx context.Context) ([]*x509.Certificate, error) {
	path := b.cfg.Mount + "/issuer/" + b.issuerRef() + "/json"
	s, err := b.read(ctx, path)
	if err != nil {
		return nil, fmt.Errorf("read %s: %w", path, err)
	}
	if s == nil {
		return nil, fmt.Errorf("read %s: no such issuer", path)
	}
	chain, err := certsField(s.Data, "ca_chain")
	if err != nil || len(chain) == 0 {
		chain, err = certsField(s.Data, "certificate")
	}
	if err != nil {
		return nil, fmt.Errorf("read %s: %w", path, err)
	}
	if len(chain) == 0 {
		return nil, fmt.Errorf("read %s: the issuer has no certificate", path)
	}
	return rootsOf(chain), nil
}

// SignLeaf has Vault sign the leaf: sign/<role> (or sign-verbatim), with the
// URI SAN and the lifetime asked for.
func (u *Upstream) SignLeaf(ctx context.Context, req ca.SignRequest) (*ca.UpstreamLeaf, error) {
	if len(req.CSR.Raw) == 0 {
		return nil, fmt.Errorf("vault sign: the request has no signed CSR: %w", ca.ErrInvalidSignRequest)
	}
	op := "sign"
	if u.cfg.SignVerbatim {
		op = "sign-verbatim"
	}
	path := u.cfg.Mount + "/" + op + "/" + u.cfg.Role
	if u.cfg.Issuer != "" {
		path = u.cfg.Mount + "/issuer/" + u.cfg.Issuer + "/" + op + "/" + u.cfg.Role
	}
	ttl := req.NotAfter.Sub(u.now()).Round(time.Second)
	if ttl < time.Second {
		return nil, fmt.Errorf("vault sign: NotAfter %s is in the past: %w", req.NotAfter, ca.ErrInvalidSignRequest)
	}
	data := map[string]any{
		"csr":                  string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: req.CSR.Raw})),
		"ttl":                  strconv.Itoa(int(ttl.Seconds())) + "s",
		"format":               "pem",
		"exclude_cn_from_sans": true,
	}
	if !u.cfg.SignVerbatim {
		if !req.ID.IsZero() {
			data["uri_sans"] = req.ID.String()
		}
		if len(req.DNSNames) > 0 {
			data["alt_names"] = strings.Join(req.DNSNames, ",")
		}
		if len(req.IPAddresses) > 0 {
			ips := make([]string, len(req.IPAddresses))
			for i, ip := range req.IPAddresses {
				ips[i] = ip.String()
			}
			data["ip_sans"] = strings.Join(ips, ",")
		}
	}
	s, err := u.write(ctx, path, data)
	if err != nil {
		return nil, fmt.Errorf("vault %s: %w", path, err)
	}
	leaf, chain, err := issued(s)
	if err != nil {
		return nil, fmt.Errorf("vault %s: %w: %w", path, err, ca.ErrBackendUnavailable)
	}
	return &ca.UpstreamLeaf{Leaf: leaf, Chain: chain}, nil
}

// MintCA has Vault sign meshca's intermediate: root/sign-intermediate, or
// the configured issuer's sign-intermediate, with path length 0.
func (a *Authority) MintCA(ctx context.Context, req ca.MintRequest) (*ca.MintedCA, error) {
	path := a.cfg.Mount + "/root/sign-intermediate"
	if a.cfg.Issuer != "" {
		path = a.cfg.Mount + "/issuer/" + a.cfg.Issuer + "/sign-intermediate"
	}
	s, err := a.write(ctx, path, map[string]any{
		"csr":                  string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: req.CSR.Raw})),
		"common_name":          req.CSR.Subject.CommonName,
		"use_csr_values":       true,
		"ttl":                  strconv.Itoa(int(req.TTL.Seconds())) + "s",
		"max_path_length":      0,
		"exclude_cn_from_sans": true,
		"format":               "pem",
	})
	if err != nil {
		return nil, fmt.Errorf("vault %s: %w", path, err)
	}
	cert, chain, err := issued(s)
	if err != nil {
		return nil, fmt.Errorf("vault %s: %w: %w", path, err, ca.ErrBackendUnavailable)
	}
	if !cert.IsCA {
		return nil, fmt.Errorf("vault %s: the certificate Vault returned is not a CA certificate: %w", path, ca.ErrBackendUnavailable)
	}
	if len(chain) == 0 {
		return nil, fmt.Errorf("vault %s: the answer holds no CA chain: %w", path, ca.ErrBackendUnavailable)
	}
	return &ca.MintedCA{Cert: cert, Chain: chain, Roots: rootsOf(chain)}, nil
}

// issued parses a sign answer: the certificate, and the chain above it.
func issued(s *api.Secret) (*x509.Certificate, []*x509.Certificate, error) {
	if s == nil {
		return nil, nil, errors.New("empty answer")
	}
	certs, err := certsField(s.Data, "certificate")
	if err != nil || len(certs) == 0 {
		return nil, nil, fmt.Errorf("no certificate in the answer: %v", err)
	}
	leaf := certs[0]
	chain, err := certsField(s.Data, "ca_chain")
	if err != nil || len(chain) == 0 {
		chain, err = certsField(s.Data, "issuing_ca")
	}
	if err != nil {
		return nil, nil, err
	}
	var above []*x509.Certificate
	for _, c := range chain {
		if !c.Equal(leaf) {
			above = append(above, c)
		}
	}
	return leaf, above, nil
}

// certsField parses a PEM string, or a list of them, from data[key].
func certsField(data map[string]any, key string) ([]*x509.Certificate, error) {
	var blobs []string
	switch v := data[key].(type) {
	case nil:
		return nil, nil
	case string:
		blobs = []string{v}
	case []any:
		for _, e := range v {
			s, ok := e.(string)
			if !ok {
				return nil, fmt.Errorf("%s: want PEM strings, got %T", key, e)
			}
			blobs = append(blobs, s)
		}
	default:
		return nil, fmt.Errorf("%s: want PEM, got %T", key, v)
	}
	var certs []*x509.Certificate
	for _, blob := range blobs {
		c, err := ca.ParseCertificatesPEM([]byte(blob))
		if err != nil {
			return nil, fmt.Errorf("%s: %w", key, err)
		}
		certs = append(certs, c...)
	}
	return certs, nil
}

// rootsOf returns the self-signed certificates of chain, or its last one
// when none is (the root is kept outside Vault).
func rootsOf(chain []*x509.Certificate) []*x509.Certificate {
	var roots []*x509.Certificate
	for _, c := range chain {
		if c.CheckSignatureFrom(c) == nil && string(c.RawIssuer) == string(c.RawSubject) {
			roots = append(roots, c)
		}
	}
	if len(roots) == 0 && len(chain) > 0 {
		roots = chain[len(chain)-1:]
	}
	return roots
}

// checkRole validates the direct mode's role: it exists, allows URI SANs of
// the trust domain, and its max_ttl covers the policy's longest maxTTL.
func (b *backend) checkRole(ctx context.Context, maxLeafTTL time.Duration) error {
	path := b.cfg.Mount + "/roles/" + b.cfg.Role
	s, err := b.read(ctx, path)
	if err != nil {
		return fmt.Errorf("%srole: cannot read %s (meshca's Vault policy needs read on it): %w", configPath, path, err)
	}
	if s == nil {
		return fmt.Errorf("%srole: role %q does not exist on mount %q", configPath, b.cfg.Role, b.cfg.Mount)
	}
	if !b.cfg.SignVerbatim && b.cfg.TrustDomain != "" {
		probe := "spiffe://" + b.cfg.TrustDomain + "/ns/probe/sa/probe"
		templated, _ := s.Data["allowed_uri_sans_template"].(bool)
		allowed := stringsField(s.Data, "allowed_uri_sans")
		ok := templated
		for _, pattern := range allowed {
			if glob.Glob(pattern, probe) {
				ok = true
			}
		}
		if !ok {
			return fmt.Errorf("%srole: role %q does not allow URI SANs of trust domain %q (allowed_uri_sans %q); add spiffe://%s/* to it",
				configPath, b.cfg.Role, b.cfg.TrustDomain, allowed, b.cfg.TrustDomain)
		}
	}
	if kt, _ := s.Data["key_type"].(string); kt != "any" {
		b.log.Warn("the Vault role accepts one key type only; CSRs of other types the policy allows will fail", "role", b.cfg.Role, "key_type", kt)
	}
	if maxLeafTTL > 0 {
		roleMax := durationField(s.Data, "max_ttl")
		what := fmt.Sprintf("role %q's max_ttl", b.cfg.Role)
		if roleMax == 0 {
			roleMax, err = b.mountMaxTTL(ctx)
			if err != nil {
				b.log.Warn("cannot read the mount's max_lease_ttl; the role's TTL bound is not checked", "err", err)
				return nil
			}
			what = fmt.Sprintf("mount %q's max_lease_ttl (role %q sets no max_ttl)", b.cfg.Mount, b.cfg.Role)
		}
		if roleMax < maxLeafTTL {
			return fmt.Errorf("%srole: %s is %s, shorter than the policy's longest maxTTL %s: raise it in Vault or lower policy maxTTL",
				configPath, what, roleMax, maxLeafTTL)
		}
	}
	return nil
}

// checkMountTTL refuses an intermediateTTL the mount would cut.
func (b *backend) checkMountTTL(ctx context.Context) error {
	max, err := b.mountMaxTTL(ctx)
	if err != nil {
		b.log.Warn("cannot read the mount's max_lease_ttl; intermediateTTL is not checked against it", "err", err)
		return nil
	}
	if max > 0 && max < b.cfg.IntermediateTTL {
		return fmt.Errorf("%sintermediateTTL: %s exceeds mount %q's max_lease_ttl %s: lower it, or tune the mount", configPath, b.cfg.IntermediateTTL, b.cfg.Mount, max)
	}
	return nil
}

func (b *backend) mountMaxTTL(ctx context.Context) (time.Duration, error) {
	s, err := b.read(ctx, "sys/mounts/"+b.cfg.Mount+"/tune")
	if err != nil {
		return 0, err
	}
	if s == nil {
		return 0, errors.New("empty answer")
	}
	return durationField(s.Data, "max_lease_ttl"), nil
}

func stringsField(data map[string]any, key string) []string {
	var out []string
	if l, ok := data[key].([]any); ok {
		for _, e := range l {
			if s, ok := e.(string); ok {
				out = append(out, s)
			}
		}
	}
	return out
}

// durationField reads a TTL in seconds, as Vault writes it.
func durationField(data map[string]any, key string) time.Duration {
	switch v := data[key].(type) {
	case json.Number:
		n, _ := v.Int64()
		return time.Duration(n) * time.Second
	case float64:
		return time.Duration(v) * time.Second
	case string:
		if n, err := strconv.ParseInt(v, 10, 64); err == nil {
			return time.Duration(n) * time.Second
		}
		d, _ := time.ParseDuration(v)
		return d
	}
	return 0
}

// isForbidden reports a 403 from Vault.
func isForbidden(err error) bool {
	var re *api.ResponseError
	return errors.As(err, &re) && re.StatusCode == http.StatusForbidden
}

// classify marks errors a retry may cure (no answer, 5xx, 429) with
// ca.ErrBackendUnavailable. 4xx answers say what Vault refused.
func classify(err error) error {
	if err == nil {
		return nil
	}
	var re *api.ResponseError
	if errors.As(err, &re) {
		if re.StatusCode >= 500 || re.StatusCode == http.StatusTooManyRequests {
			return fmt.Errorf("%w: %w", ca.ErrBackendUnavailable, err)
		}
		return err
	}
	return fmt.Errorf("%w: %w", ca.ErrBackendUnavailable, err)
}
