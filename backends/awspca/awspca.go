// Package awspca is the backend that has AWS Private CA (ACM PCA) sign.
// In intermediate mode (the default) it is a ca.Authority: AWS signs the
// intermediate whose key the CA core generates and keeps in memory, and
// leaves are signed locally. In direct mode it is a ca.Upstream: AWS signs
// every leaf, for audit regimes that want each certificate recorded there.
//
// Credentials come from the AWS SDK's default chain (environment, IRSA web
// identity, instance profile), never from meshca's configuration.
package awspca

import (
	"context"
	"crypto"
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"fmt"
	"log/slog"
	"net/url"
	"regexp"
	"slices"
	"strings"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/service/acmpca/types"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/meshca/meshca/ca"
)

// Modes for Config.Mode.
const (
	ModeIntermediate = "intermediate"
	ModeDirect       = "direct"
)

// Template names (the part of a template ARN after "template/") that
// meshca uses by default.
const (
	TemplateEndEntity               = "EndEntityCertificate/V1"
	TemplateEndEntityAPIPassthrough = "EndEntityCertificate_APIPassthrough/V1"
	TemplateSubordinatePathLen0     = "SubordinateCACertificate_PathLen0/V1"
)

// Defaults for the zero fields of Config.
const (
	DefaultMode                      = ModeIntermediate
	DefaultIntermediateTTL           = ca.DefaultIntermediateTTL
	DefaultIntermediateRenewFraction = ca.DefaultIntermediateRenewFraction
	DefaultIntermediateKeyType       = ca.KeyECDSAP256
	DefaultRequestsPerSecond         = 20
	DefaultBurst                     = 1
	DefaultIssueTimeout              = 30 * time.Second
	DefaultOrganization              = "meshca"
)

// MinIntermediateTTL is the shortest IntermediateTTL Validate accepts.
const MinIntermediateTTL = ca.MinIntermediateTTL

// ShortLivedMaxValidity is the longest validity a CA in
// SHORT_LIVED_CERTIFICATE usage mode issues.
const ShortLivedMaxValidity = 7 * 24 * time.Hour

const (
	// configPath prefixes Validate's and New's error paths.
	configPath = "backend.awsPCA."
	// caBackdate moves an intermediate's NotBefore into the past, so that
	// relying parties whose clocks lag accept it at once.
	caBackdate = 5 * time.Minute
)

// ErrCAUnusable is wrapped by New's errors about the CA itself or the
// settings that point at it: no CA at caARN, a CA that is not ACTIVE, a key
// that does not fit signingAlgorithm, a usage mode that does not fit mode.
// The message names the setting to fix. A CA that cannot be reached at all
// is ca.ErrBackendUnavailable instead.
var ErrCAUnusable = errors.New("AWS Private CA unusable")

var (
	caARNPattern       = regexp.MustCompile(`^arn:(aws[a-z-]*):acm-pca:([a-z0-9-]+):([0-9]{12}):certificate-authority/[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$`)
	templateARNPattern = regexp.MustCompile(`^arn:aws[a-z-]*:acm-pca:::template/([A-Za-z0-9_]+)/V[0-9]+$`)
	regionPattern      = regexp.MustCompile(`^[a-z]{2}(-[a-z]+)+-[0-9]+$`)
)

// signingAlgorithms are the signing algorithms meshca can verify, with the
// key family of the CA each fits.
var signingAlgorithms = map[types.SigningAlgorithm]string{
	types.SigningAlgorithmSha256withecdsa:  "EC",
	types.SigningAlgorithmSha384withecdsa:  "EC",
	types.SigningAlgorithmSha512withecdsa:  "EC",
	types.SigningAlgorithmSha256withrsa:    "RSA",
	types.SigningAlgorithmSha384withrsa:    "RSA",
	types.SigningAlgorithmSha512withrsa:    "RSA",
	types.SigningAlgorithmSha256withrsaPss: "RSA",
	types.SigningAlgorithmSha384withrsaPss: "RSA",
	types.SigningAlgorithmSha512withrsaPss: "RSA",
}

// Template families each mode accepts: the template name before "/V".
var (
	directTemplates = []string{"EndEntityCertificate", "EndEntityCertificate_APIPassthrough",
		"EndEntityCertificate_CSRPassthrough", "EndEntityCertificate_APICSRPassthrough"}
	intermediateTemplates = []string{"SubordinateCACertificate_PathLen0", "SubordinateCACertificate_PathLen0_APIPassthrough",
		"SubordinateCACertificate_PathLen0_CSRPassthrough", "SubordinateCACertificate_PathLen0_APICSRPassthrough"}
)

// Config configures the awspca backend. Region and CAARN are required.
// There are no credentials here: the AWS SDK's default chain finds them.
type Config struct {
	// Mode is "intermediate" (default: AWS signs meshca's in-memory
	// intermediate, leaves are signed locally) or "direct" (AWS signs
	// every leaf).
	Mode string `yaml:"mode"`
	// Region is the CA's AWS region; it must be the region in CAARN.
	// Required.
	Region string `yaml:"region"`
	// CAARN is the CA's ARN,
	// arn:aws:acm-pca:<region>:<account>:certificate-authority/<id>.
	// Required.
	CAARN string `yaml:"caARN"`
	// SigningAlgorithm is the algorithm AWS signs with, such as
	// SHA256WITHECDSA or SHA256WITHRSA. It must fit the CA's key. Empty:
	// derived from the CA's key algorithm at start (SHA256WITHECDSA for
	// EC_prime256v1, SHA384WITHECDSA for EC_secp384r1, SHA512WITHECDSA for
	// EC_secp521r1, SHA256WITHRSA for RSA keys).
	SigningAlgorithm string `yaml:"signingAlgorithm"`
	// TemplateARN is the AWS certificate template. Empty: the mode's
	// default, arn:aws:acm-pca:::template/EndEntityCertificate/V1 (direct;
	// AWS copies the CSR's names) or
	// arn:aws:acm-pca:::template/SubordinateCACertificate_PathLen0/V1
	// (intermediate). With an APIPassthrough template meshca passes the
	// names itself.
	TemplateARN string `yaml:"templateARN"`
	// Endpoint overrides the AWS Private CA endpoint (a VPC endpoint, or a
	// test emulator). Empty: the SDK's endpoint for Region.
	Endpoint string `yaml:"endpoint"`
	// IntermediateSettings shape the intermediate (intermediate mode);
	// AWS caps its lifetime at the CA's NotAfter.
	ca.IntermediateSettings `yaml:",inline"`
	// RequestsPerSecond bounds meshca's calls to AWS Private CA, retries and
	// waiter polls included, to stay under the account's quota. Default 20.
	RequestsPerSecond float64 `yaml:"requestsPerSecond"`
	// Burst is how many calls may go at once above RequestsPerSecond.
	// Default 1.
	Burst int `yaml:"burst"`
	// IssueTimeout bounds one issuance (IssueCertificate, retries and the
	// wait for GetCertificate) and each other call. Default 30s.
	IssueTimeout time.Duration `yaml:"issueTimeout"`
	// TrustDomain, if set, is named in the intermediate's common name. It
	// has no other effect.
	TrustDomain string `yaml:"trustDomain"`
}

// Deps are the runtime inputs of the backend, apart from its configuration.
type Deps struct {
	// Log receives operational logs. Default: discard.
	Log *slog.Logger
	// Now is the clock for the validity meshca asks for. Default time.Now.
	Now func() time.Time
	// Registerer registers the backend's metrics. Optional.
	Registerer prometheus.Registerer
	// HTTPClient carries the SDK's requests. Optional: the SDK's default.
	HTTPClient aws.HTTPClient
}

// Validate reports every problem with c, each prefixed with its dotted
// configuration path, joined with errors.Join. It calls no AWS API.
func (c Config) Validate() error {
	var errs []error
	bad := func(field, format string, args ...any) {
		errs = append(errs, fmt.Errorf("%s%s: %s", configPath, field, fmt.Sprintf(format, args...)))
	}
	if c.Mode != "" && c.Mode != ModeIntermediate && c.Mode != ModeDirect {
		bad("mode", "unknown mode %q, want %s or %s", c.Mode, ModeIntermediate, ModeDirect)
	}
	switch {
	case c.Region == "":
		bad("region", "is required (the CA's region, e.g. us-east-1)")
	case !regionPattern.MatchString(c.Region):
		bad("region", "%q is not an AWS region name such as us-east-1", c.Region)
	}
	switch m := caARNPattern.FindStringSubmatch(c.CAARN); {
	case c.CAARN == "":
		bad("caARN", "is required (arn:aws:acm-pca:<region>:<account>:certificate-authority/<id>)")
	case m == nil:
		bad("caARN", "%q is not a CA ARN of the form arn:aws:acm-pca:<region>:<account>:certificate-authority/<id>", c.CAARN)
	case c.Region != "" && m[2] != c.Region:
		bad("region", "%q is not the CA's region %q (from caARN); a CA is reached in its own region", c.Region, m[2])
	}
	if c.SigningAlgorithm != "" {
		if _, ok := signingAlgorithms[types.SigningAlgorithm(c.SigningAlgorithm)]; !ok {
			bad("signingAlgorithm", "unknown signing algorithm %q, want one of %s (or empty to follow the CA's key)", c.SigningAlgorithm, signingAlgorithmList())
		}
	}
	if c.TemplateARN != "" {
		m := templateARNPattern.FindStringSubmatch(c.TemplateARN)
		mode := c.withDefaults().Mode
		want := intermediateTemplates
		if mode == ModeDirect {
			want = directTemplates
		}
		switch {
		case m == nil:
			bad("templateARN", "%q is not a template ARN of the form arn:aws:acm-pca:::template/<name>/V<n>", c.TemplateARN)
		case !slices.Contains(want, m[1]):
			bad("templateARN", "template %s does not fit mode %s; use one of %s (or empty for the default)", m[1], mode, strings.Join(want, ", "))
		}
	}
	if c.Endpoint != "" {
		if u, err := url.Parse(c.Endpoint); err != nil || (u.Scheme != "https" && u.Scheme != "http") || u.Host == "" {
			bad("endpoint", "%q is not an http(s) URL", c.Endpoint)
		}
	}
	errs = append(errs, c.IntermediateSettings.Validate(configPath)...)
	if c.RequestsPerSecond < 0 {
		bad("requestsPerSecond", "must not be negative (0 means the default, %d)", DefaultRequestsPerSecond)
	}
	if c.Burst < 0 {
		bad("burst", "must not be negative (0 means the default, %d)", DefaultBurst)
	}
	if c.IssueTimeout < 0 {
		bad("issueTimeout", "must not be negative (0 means the default, %s)", DefaultIssueTimeout)
	} else if c.IssueTimeout > 0 && c.IssueTimeout < time.Second {
		bad("issueTimeout", "must be at least 1s, got %s", c.IssueTimeout)
	}
	if c.TrustDomain != "" {
		if _, err := spiffeid.TrustDomainFromString(c.TrustDomain); err != nil {
			bad("trustDomain", "%q is not a valid trust domain name", c.TrustDomain)
		}
	}
	return errors.Join(errs...)
}

// withDefaults returns c with its zero fields defaulted. The template's
// default depends on the CA ARN's partition.
func (c Config) withDefaults() Config {
	if c.Mode == "" {
		c.Mode = DefaultMode
	}
	if c.TemplateARN == "" {
		partition := "aws"
		if m := caARNPattern.FindStringSubmatch(c.CAARN); m != nil {
			partition = m[1]
		}
		name := TemplateSubordinatePathLen0
		if c.Mode == ModeDirect {
			name = TemplateEndEntity
		}
		c.TemplateARN = "arn:" + partition + ":acm-pca:::template/" + name
	}
	c.IntermediateSettings = c.IntermediateSettings.WithDefaults()
	if c.RequestsPerSecond == 0 {
		c.RequestsPerSecond = DefaultRequestsPerSecond
	}
	if c.Burst == 0 {
		c.Burst = DefaultBurst
	}
	if c.IssueTimeout == 0 {
		c.IssueTimeout = DefaultIssueTimeout
	}
	return c
}

// IntermediateConfig returns the shape of the intermediates the CA core
// should generate in intermediate mode.
func (c Config) IntermediateConfig() ca.IntermediateConfig {
	cn := "meshca intermediate"
	if c.TrustDomain != "" {
		cn += " for " + c.TrustDomain
	}
	return c.IntermediateSettings.Config(pkix.Name{CommonName: cn, Organization: []string{DefaultOrganization}})
}

// passthrough says whether the template takes names from ApiPassthrough.
func (c Config) passthrough() bool {
	return strings.Contains(c.TemplateARN, "_APIPassthrough/") || strings.Contains(c.TemplateARN, "_APICSRPassthrough/")
}

func signingAlgorithmList() string {
	names := make([]string, 0, len(signingAlgorithms))
	for a := range signingAlgorithms {
		names = append(names, string(a))
	}
	slices.Sort(names)
	return strings.Join(names, ", ")
}

// Authority is the intermediate-mode backend: a ca.Authority whose
// TrustBundle the CA core may poll for the CA's current roots.
type Authority struct{ p *pca }

// Upstream is the direct-mode backend: a ca.Upstream.
type Upstream struct{ p *pca }

// New validates cfg, builds the AWS client from the SDK's default
// credential chain, and checks the CA with DescribeCertificateAuthority
// and GetCertificateAuthorityCertificate: that it exists, is ACTIVE, has a
// key that fits the signing algorithm and a usage mode that fits the mode.
// It returns an *Authority (intermediate mode; the CA core then needs
// cfg.IntermediateConfig()) or an *Upstream (direct mode). Errors about the
// CA wrap ErrCAUnusable and name the setting to fix; a CA that cannot be
// reached is ca.ErrBackendUnavailable. ctx bounds the start-up calls.
func New(ctx context.Context, cfg Config, deps Deps) (ca.Backend, error) {
	if err := cfg.Validate(); err != nil {
		return nil, fmt.Errorf("awspca: %w", err)
	}
	p, err := newPCA(ctx, cfg.withDefaults(), deps)
	if err != nil {
		return nil, fmt.Errorf("awspca: %w", err)
	}
	if p.cfg.Mode == ModeDirect {
		return &Upstream{p: p}, nil
	}
	return &Authority{p: p}, nil
}

// MintCA implements ca.Authority: AWS signs req.CSR with the subordinate
// template, valid from a little before now for req.TTL, capped at the CA's
// NotAfter. Chain runs from the CA up to the root.
func (a *Authority) MintCA(ctx context.Context, req ca.MintRequest) (*ca.MintedCA, error) {
	if req.CSR == nil || len(req.CSR.Raw) == 0 {
		return nil, fmt.Errorf("awspca: mint intermediate: no signed CSR: %w", ca.ErrInvalidSignRequest)
	}
	p := a.p
	now := p.now()
	notAfter := now.Add(req.TTL)
	if caNotAfter := p.caNotAfter(); notAfter.After(caNotAfter) {
		notAfter = caNotAfter
	}
	cert, chain, err := p.issue(ctx, "intermediate", issueRequest{csr: req.CSR.Raw, notBefore: now.Add(-caBackdate), notAfter: notAfter})
	if err != nil {
		return nil, fmt.Errorf("awspca: mint intermediate: %w", err)
	}
	if pub, ok := cert.PublicKey.(interface{ Equal(crypto.PublicKey) bool }); !ok || !pub.Equal(req.CSR.PublicKey) || !cert.IsCA {
		return nil, fmt.Errorf("awspca: mint intermediate: AWS Private CA returned a certificate that is not a CA certificate for the CSR's key; check %stemplateARN (%s): %w",
			configPath, p.cfg.TemplateARN, ca.ErrBackendUnavailable)
	}
	roots := p.rootsFor(chain)
	if len(roots) == 0 {
		return nil, fmt.Errorf("awspca: mint intermediate: the certificate's chain does not end in a root: %w", ca.ErrBackendUnavailable)
	}
	if top := chain[len(chain)-1]; !top.Equal(roots[0]) {
		chain = append(chain, roots[0])
	}
	return &ca.MintedCA{Cert: cert, Chain: chain, Roots: roots}, nil
}

// TrustBundle returns the root the CA chains to, fetched afresh from
// GetCertificateAuthorityCertificate, so that a renewed CA certificate
// reaches the bundle without a restart.
func (a *Authority) TrustBundle(ctx context.Context) ([]*x509.Certificate, error) {
	return a.p.trustBundle(ctx)
}

// SignLeaf implements ca.Upstream: AWS issues the leaf over req.CSR's key,
// valid from req.NotBefore to req.NotAfter capped at the CA's NotAfter.
// With the default EndEntityCertificate/V1 template AWS copies the CSR's
// names, so the CSR must carry exactly the names asked for; an
// APIPassthrough template passes them explicitly. The CA core checks the
// answer.
func (u *Upstream) SignLeaf(ctx context.Context, req ca.SignRequest) (*ca.UpstreamLeaf, error) {
	p := u.p
	if req.CSR == nil || len(req.CSR.Raw) == 0 {
		return nil, fmt.Errorf("awspca: sign leaf: AWS Private CA needs the signed CSR, and this request has none (a key meshca generated itself cannot be signed in direct mode): %w",
			ca.ErrInvalidSignRequest)
	}
	var uris []string
	if !req.ID.IsZero() {
		uris = []string{req.ID.String()}
	}
	if !p.cfg.passthrough() && !sameNames(req.CSR, uris, req) {
		return nil, fmt.Errorf("awspca: sign leaf: %stemplateARN %s copies the CSR's names, and the CSR's names are not the ones asked for; use %s so meshca passes them: %w",
			configPath, p.cfg.TemplateARN, TemplateEndEntityAPIPassthrough, ca.ErrInvalidSignRequest)
	}
	notAfter := req.NotAfter
	if caNotAfter := p.caNotAfter(); notAfter.After(caNotAfter) {
		notAfter = caNotAfter
	}
	if p.usage == types.CertificateAuthorityUsageModeShortLivedCertificate && notAfter.Sub(p.now()) > ShortLivedMaxValidity {
		return nil, fmt.Errorf("awspca: sign leaf: the CA is in SHORT_LIVED_CERTIFICATE usage mode, which issues certificates of at most 7 days; lower the policy's maxTTL: %w",
			ca.ErrInvalidSignRequest)
	}
	leaf, chain, err := p.issue(ctx, "leaf", issueRequest{
		csr: req.CSR.Raw, notBefore: req.NotBefore, notAfter: notAfter,
		uris: uris, dnsNames: req.DNSNames, ips: req.IPAddresses,
	})
	if err != nil {
		return nil, fmt.Errorf("awspca: sign leaf: %w", err)
	}
	return &ca.UpstreamLeaf{Leaf: leaf, Chain: chain}, nil
}

// TrustBundle implements ca.Upstream: the root the CA chains to, fetched
// afresh from GetCertificateAuthorityCertificate.
func (u *Upstream) TrustBundle(ctx context.Context) ([]*x509.Certificate, error) {
	return u.p.trustBundle(ctx)
}

// sameNames says whether the CSR asks for exactly the names of req.
func sameNames(csr *x509.CertificateRequest, uris []string, req ca.SignRequest) bool {
	if len(csr.URIs) != len(uris) || len(csr.DNSNames) != len(req.DNSNames) ||
		len(csr.IPAddresses) != len(req.IPAddresses) || len(csr.EmailAddresses) != 0 {
		return false
	}
	for i, u := range csr.URIs {
		if u.String() != uris[i] {
			return false
		}
	}
	for i, d := range csr.DNSNames {
		if d != req.DNSNames[i] {
			return false
		}
	}
	for i, ip := range csr.IPAddresses {
		if !ip.Equal(req.IPAddresses[i]) {
			return false
		}
	}
	return true
}
