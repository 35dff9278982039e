package awspca

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/x509"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"strings"
	"sync"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	awsmiddleware "github.com/aws/aws-sdk-go-v2/aws/middleware"
	"github.com/aws/aws-sdk-go-v2/aws/ratelimit"
	"github.com/aws/aws-sdk-go-v2/aws/retry"
	awsconfig "github.com/aws/aws-sdk-go-v2/config"
	"github.com/aws/aws-sdk-go-v2/service/acmpca"
	"github.com/aws/aws-sdk-go-v2/service/acmpca/types"
	"github.com/aws/smithy-go"
	"github.com/aws/smithy-go/middleware"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promauto"
	"golang.org/x/time/rate"

	"github.com/meshca/meshca/ca"
)

const (
	// maxAttempts is high on purpose: IssueTimeout, not a count, ends the
	// retries of a throttled or failing call.
	maxAttempts = 100
	// maxBackoff caps the SDK's exponential backoff between retries.
	maxBackoff = 5 * time.Second
	// waiterMinDelay and waiterMaxDelay pace the GetCertificate polls
	// while AWS answers RequestInProgressException. AWS usually issues
	// within a second; the SDK's 1s-60s default would make a leaf wait.
	waiterMinDelay = 200 * time.Millisecond
	waiterMaxDelay = 2 * time.Second
)

// acmAPI is what the backend calls of the AWS SDK's client.
type acmAPI interface {
	DescribeCertificateAuthority(context.Context, *acmpca.DescribeCertificateAuthorityInput, ...func(*acmpca.Options)) (*acmpca.DescribeCertificateAuthorityOutput, error)
	GetCertificateAuthorityCertificate(context.Context, *acmpca.GetCertificateAuthorityCertificateInput, ...func(*acmpca.Options)) (*acmpca.GetCertificateAuthorityCertificateOutput, error)
	IssueCertificate(context.Context, *acmpca.IssueCertificateInput, ...func(*acmpca.Options)) (*acmpca.IssueCertificateOutput, error)
	acmpca.GetCertificateAPIClient
}

// pca is the client both modes share.
type pca struct {
	cfg     Config
	api     acmAPI
	log     *slog.Logger
	now     func() time.Time
	metrics *metrics
	limiter *rate.Limiter
	sigAlg  types.SigningAlgorithm
	usage   types.CertificateAuthorityUsageMode

	mu     sync.Mutex
	caCert *x509.Certificate
	roots  []*x509.Certificate
}

type metrics struct {
	requests *prometheus.CounterVec
	issue    *prometheus.HistogramVec
}

func newMetrics(reg prometheus.Registerer) *metrics {
	f := promauto.With(reg)
	return &metrics{
		requests: f.NewCounterVec(prometheus.CounterOpts{
			Name: "meshca_awspca_requests_total",
			Help: "HTTP attempts to AWS Private CA, retries and waiter polls included, by operation and result (success, throttled, in_progress, rejected, unreachable, rate_limited).",
		}, []string{"operation", "result"}),
		issue: f.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "meshca_awspca_issue_duration_seconds",
			Help:    "Time to have AWS Private CA issue one certificate (IssueCertificate, retries and the wait for GetCertificate), by kind (leaf, intermediate) and result (success, failure).",
			Buckets: []float64{.05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60},
		}, []string{"kind", "result"}),
	}
}

func newPCA(ctx context.Context, cfg Config, deps Deps) (*pca, error) {
	if deps.Log == nil {
		deps.Log = slog.New(slog.DiscardHandler)
	}
	if deps.Now == nil {
		deps.Now = time.Now
	}
	p := &pca{cfg: cfg, log: deps.Log, now: deps.Now, metrics: newMetrics(deps.Registerer),
		limiter: rate.NewLimiter(rate.Limit(cfg.RequestsPerSecond), cfg.Burst)}

	opts := []func(*awsconfig.LoadOptions) error{awsconfig.WithRegion(cfg.Region)}
	if deps.HTTPClient != nil {
		opts = append(opts, awsconfig.WithHTTPClient(deps.HTTPClient))
	}
	awsCfg, err := awsconfig.LoadDefaultConfig(ctx, opts...)
	if err != nil {
		return nil, fmt.Errorf("load the AWS SDK configuration (environment, shared config files): %w", err)
	}
	p.api = acmpca.NewFromConfig(awsCfg, func(o *acmpca.Options) {
		if cfg.Endpoint != "" {
			o.BaseEndpoint = aws.String(cfg.Endpoint)
		}
		o.Retryer = retry.NewStandard(func(so *retry.StandardOptions) {
			so.MaxAttempts = maxAttempts
			so.MaxBackoff = maxBackoff
			// meshca's own limiter paces every attempt; the SDK's retry
			// quota would only fail calls the deadline still allows.
			so.RateLimiter = ratelimit.None
		})
		o.APIOptions = append(o.APIOptions, p.addAttemptMiddleware)
	})
	if err := p.check(ctx); err != nil {
		return nil, err
	}
	return p, nil
}

// addAttemptMiddleware puts the rate limiter and the request counter on
// every HTTP attempt: after the SDK's retry loop, before signing.
func (p *pca) addAttemptMiddleware(stack *middleware.Stack) error {
	return stack.Finalize.Insert(middleware.FinalizeMiddlewareFunc("meshcaAWSPCAAttempt",
		func(ctx context.Context, in middleware.FinalizeInput, next middleware.FinalizeHandler) (middleware.FinalizeOutput, middleware.Metadata, error) {
			op := awsmiddleware.GetOperationName(ctx)
			if err := p.limiter.Wait(ctx); err != nil {
				p.metrics.requests.WithLabelValues(op, "rate_limited").Inc()
				return middleware.FinalizeOutput{}, middleware.Metadata{}, fmt.Errorf("waiting for the client-side rate limit (%srequestsPerSecond %v): %w",
					configPath, p.cfg.RequestsPerSecond, err)
			}
			out, md, err := next.HandleFinalize(ctx, in)
			p.metrics.requests.WithLabelValues(op, attemptResult(err)).Inc()
			return out, md, err
		}), "Retry", middleware.After)
}

func attemptResult(err error) string {
	var apiErr smithy.APIError
	switch {
	case err == nil:
		return "success"
	case errors.As(err, &apiErr) && apiErr.ErrorCode() == "ThrottlingException":
		return "throttled"
	case errors.As(err, &apiErr) && apiErr.ErrorCode() == "RequestInProgressException":
		return "in_progress"
	case errors.As(err, &apiErr) && apiErr.ErrorFault() != smithy.FaultServer && !isServerError(err):
		return "rejected"
	}
	return "unreachable"
}

func isServerError(err error) bool {
	var re interface{ HTTPStatusCode() int }
	return errors.As(err, &re) && re.HTTPStatusCode() >= 500
}

// check validates the CA at start: it exists, is ACTIVE, its key fits the
// signing algorithm and its usage mode fits the mode; and it loads the CA
// certificate and root.
func (p *pca) check(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, p.cfg.IssueTimeout)
	defer cancel()
	out, err := p.api.DescribeCertificateAuthority(ctx, &acmpca.DescribeCertificateAuthorityInput{CertificateAuthorityArn: aws.String(p.cfg.CAARN)})
	if err != nil {
		return p.startupErr("DescribeCertificateAuthority", err)
	}
	desc := out.CertificateAuthority
	if desc == nil || desc.CertificateAuthorityConfiguration == nil {
		return fmt.Errorf("DescribeCertificateAuthority for %scaARN %s returned no CA configuration: %w", configPath, p.cfg.CAARN, ca.ErrBackendUnavailable)
	}
	if desc.Status != types.CertificateAuthorityStatusActive {
		return fmt.Errorf("%scaARN: the CA %s is %s, not ACTIVE; enable it in AWS Private CA or point caARN at an ACTIVE CA: %w",
			configPath, p.cfg.CAARN, desc.Status, ErrCAUnusable)
	}
	keyAlg := desc.CertificateAuthorityConfiguration.KeyAlgorithm
	family := keyFamily(keyAlg)
	if family == "" {
		return fmt.Errorf("%scaARN: the CA's key algorithm %s is not one meshca can verify (EC_prime256v1, EC_secp384r1, EC_secp521r1, RSA_2048, RSA_3072, RSA_4096): %w",
			configPath, keyAlg, ErrCAUnusable)
	}
	p.sigAlg = types.SigningAlgorithm(p.cfg.SigningAlgorithm)
	if p.sigAlg == "" {
		p.sigAlg = defaultSigningAlgorithm(keyAlg)
	} else if signingAlgorithms[p.sigAlg] != family {
		return fmt.Errorf("%ssigningAlgorithm: %s does not fit the CA's key algorithm %s; use one for %s keys, or leave it empty to use %s: %w",
			configPath, p.sigAlg, keyAlg, family, defaultSigningAlgorithm(keyAlg), ErrCAUnusable)
	}
	p.usage = desc.UsageMode
	if p.usage == types.CertificateAuthorityUsageModeShortLivedCertificate && p.cfg.Mode == ModeIntermediate {
		// AWS: a short-lived CA issues certificates of at most 7 days and
		// must be the last CA in its hierarchy, so it cannot sign a CA.
		return fmt.Errorf("%smode: the CA %s is in SHORT_LIVED_CERTIFICATE usage mode, which issues certificates of at most 7 days "+
			"(intermediateTTL is %s) and no CA certificates; use mode: %s with this CA, or a GENERAL_PURPOSE CA for mode: %s: %w",
			configPath, p.cfg.CAARN, p.cfg.IntermediateTTL, ModeDirect, ModeIntermediate, ErrCAUnusable)
	}
	if _, err := p.fetchCA(ctx); err != nil {
		return err
	}
	p.log.Info("AWS Private CA ready", "ca_arn", p.cfg.CAARN, "mode", p.cfg.Mode, "usage_mode", string(p.usage),
		"key_algorithm", string(keyAlg), "signing_algorithm", string(p.sigAlg), "template", p.cfg.TemplateARN,
		"ca_not_after", p.caNotAfter())
	return nil
}

// startupErr explains a failed start-up call with the setting to fix.
func (p *pca) startupErr(op string, err error) error {
	var apiErr smithy.APIError
	if errors.As(err, &apiErr) {
		switch apiErr.ErrorCode() {
		case "ResourceNotFoundException", "InvalidArnException":
			return fmt.Errorf("%scaARN: no CA %s in region %s (%s): check caARN and region: %w",
				configPath, p.cfg.CAARN, p.cfg.Region, apiErr.ErrorCode(), ErrCAUnusable)
		case "AccessDeniedException", "UnrecognizedClientException", "InvalidSignatureException", "ExpiredTokenException":
			return fmt.Errorf("%s on %scaARN %s was refused (%s): the AWS credentials from the default chain (environment, IRSA, instance profile) "+
				"need acm-pca:DescribeCertificateAuthority, GetCertificateAuthorityCertificate, IssueCertificate and GetCertificate on the CA: %w",
				op, configPath, p.cfg.CAARN, apiErr.ErrorCode(), ErrCAUnusable)
		}
	}
	if strings.Contains(err.Error(), "failed to retrieve credentials") || strings.Contains(err.Error(), "no EC2 IMDS role found") {
		return fmt.Errorf("%s: no AWS credentials found; provide them through the environment, IRSA (a service-account role) or an instance profile: %w: %w",
			op, err, ca.ErrBackendUnavailable)
	}
	return p.callErr(op, err)
}

// callErr wraps a failed call: a request AWS refuses as malformed is
// ca.ErrInvalidSignRequest; everything else (throttling past the deadline,
// a CA not ACTIVE, network and server errors, timeouts) is
// ca.ErrBackendUnavailable, which a retry, perhaps after the operator's
// fix, may cure.
func (p *pca) callErr(op string, err error) error {
	var apiErr smithy.APIError
	if errors.As(err, &apiErr) {
		switch apiErr.ErrorCode() {
		case "MalformedCSRException", "InvalidArgsException", "ValidationException", "InvalidRequestException":
			return fmt.Errorf("%s: AWS Private CA refused the request: %w: %w", op, err, ca.ErrInvalidSignRequest)
		case "InvalidStateException":
			return fmt.Errorf("%s: the CA %s is not ACTIVE: %w: %w", op, p.cfg.CAARN, err, ca.ErrBackendUnavailable)
		case "ThrottlingException":
			return fmt.Errorf("%s: AWS Private CA kept throttling for %sissueTimeout (%s); lower the request rate or raise the account's quota: %w: %w",
				op, configPath, p.cfg.IssueTimeout, err, ca.ErrBackendUnavailable)
		case "RequestInProgressException":
			return fmt.Errorf("%s: AWS Private CA did not issue within %sissueTimeout (%s): %w: %w",
				op, configPath, p.cfg.IssueTimeout, err, ca.ErrBackendUnavailable)
		}
	}
	var netErr net.Error
	if errors.Is(err, context.DeadlineExceeded) || (errors.As(err, &netErr) && netErr.Timeout()) {
		return fmt.Errorf("%s: AWS Private CA did not answer within %sissueTimeout (%s): it was throttling, slow or unreachable "+
			"(meshca_awspca_requests_total says which; check %sendpoint, %sregion and the network): %w: %w",
			op, configPath, p.cfg.IssueTimeout, configPath, configPath, err, ca.ErrBackendUnavailable)
	}
	return fmt.Errorf("%s: AWS Private CA unreachable or failing (check %sendpoint, %sregion and the network): %w: %w",
		op, configPath, configPath, err, ca.ErrBackendUnavailable)
}

// fetchCA loads the CA certificate and its root from
// GetCertificateAuthorityCertificate, and returns the roots.
func (p *pca) fetchCA(ctx context.Context) ([]*x509.Certificate, error) {
	out, err := p.api.GetCertificateAuthorityCertificate(ctx, &acmpca.GetCertificateAuthorityCertificateInput{CertificateAuthorityArn: aws.String(p.cfg.CAARN)})
	if err != nil {
		return nil, p.callErr("GetCertificateAuthorityCertificate", err)
	}
	certs, err := parsePEMs(aws.ToString(out.Certificate))
	if err != nil || len(certs) != 1 {
		return nil, fmt.Errorf("GetCertificateAuthorityCertificate: the CA certificate does not parse: %w", ca.ErrBackendUnavailable)
	}
	above, err := parsePEMs(aws.ToString(out.CertificateChain))
	if err != nil {
		return nil, fmt.Errorf("GetCertificateAuthorityCertificate: the CA's chain does not parse: %w", ca.ErrBackendUnavailable)
	}
	caCert := certs[0]
	chain := orderChain(caCert, above)
	top := caCert
	if len(chain) > 0 {
		top = chain[len(chain)-1]
	}
	if !bytes.Equal(top.RawIssuer, top.RawSubject) || top.CheckSignatureFrom(top) != nil {
		return nil, fmt.Errorf("GetCertificateAuthorityCertificate: the chain of %scaARN %s does not reach a self-signed root (%q is issued by %q): %w",
			configPath, p.cfg.CAARN, top.Subject, top.Issuer, ca.ErrBackendUnavailable)
	}
	if !p.now().Before(caCert.NotAfter) {
		return nil, fmt.Errorf("%scaARN: the CA certificate expired at %s; renew it in AWS Private CA: %w",
			configPath, caCert.NotAfter.UTC().Format(time.RFC3339), ca.ErrBackendUnavailable)
	}
	roots := []*x509.Certificate{top}
	p.mu.Lock()
	p.caCert, p.roots = caCert, roots
	p.mu.Unlock()
	return roots, nil
}

func (p *pca) trustBundle(ctx context.Context) ([]*x509.Certificate, error) {
	ctx, cancel := context.WithTimeout(ctx, p.cfg.IssueTimeout)
	defer cancel()
	roots, err := p.fetchCA(ctx)
	if err != nil {
		return nil, fmt.Errorf("awspca: trust bundle: %w", err)
	}
	return roots, nil
}

func (p *pca) caNotAfter() time.Time {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.caCert.NotAfter
}

// rootsFor returns the trust bundle for an issued certificate's chain: the
// known root, if the chain ends at or under it.
func (p *pca) rootsFor(chain []*x509.Certificate) []*x509.Certificate {
	p.mu.Lock()
	roots := p.roots
	p.mu.Unlock()
	if len(chain) == 0 {
		return nil
	}
	top := chain[len(chain)-1]
	for _, r := range roots {
		if top.Equal(r) || top.CheckSignatureFrom(r) == nil {
			return roots
		}
	}
	if bytes.Equal(top.RawIssuer, top.RawSubject) && top.CheckSignatureFrom(top) == nil {
		return []*x509.Certificate{top}
	}
	return nil
}

// issueRequest is one certificate to have AWS issue. The CSR's bytes go to
// AWS only; they never enter an error or a log.
type issueRequest struct {
	csr                 []byte
	notBefore, notAfter time.Time
	uris, dnsNames      []string
	ips                 []net.IP
}

// issue has AWS issue r and returns the certificate and the chain above
// it, ordered up to the top AWS returned. The whole of it, retries and the
// wait included, is bounded by IssueTimeout.
func (p *pca) issue(ctx context.Context, kind string, r issueRequest) (cert *x509.Certificate, chain []*x509.Certificate, err error) {
	start := time.Now()
	defer func() {
		result := "success"
		if err != nil {
			result = "failure"
		}
		p.metrics.issue.WithLabelValues(kind, result).Observe(time.Since(start).Seconds())
	}()
	ctx, cancel := context.WithTimeout(ctx, p.cfg.IssueTimeout)
	defer cancel()

	token := make([]byte, 16)
	_, _ = rand.Read(token)
	template := p.cfg.TemplateARN
	in := &acmpca.IssueCertificateInput{
		CertificateAuthorityArn: aws.String(p.cfg.CAARN),
		Csr:                     pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: r.csr}),
		SigningAlgorithm:        p.sigAlg,
		TemplateArn:             aws.String(template),
		// ABSOLUTE, in seconds, is the one validity type that can say
		// "one hour from now"; DAYS cannot express a 1h leaf.
		Validity:          &types.Validity{Type: types.ValidityPeriodTypeAbsolute, Value: aws.Int64(r.notAfter.Unix())},
		ValidityNotBefore: &types.Validity{Type: types.ValidityPeriodTypeAbsolute, Value: aws.Int64(r.notBefore.Unix())},
		// One token per certificate: the SDK's retries of this call then
		// issue one certificate, not one per attempt.
		IdempotencyToken: aws.String(hex.EncodeToString(token)),
	}
	if p.cfg.passthrough() && len(r.uris)+len(r.dnsNames)+len(r.ips) > 0 {
		var names []types.GeneralName
		for _, u := range r.uris {
			names = append(names, types.GeneralName{UniformResourceIdentifier: aws.String(u)})
		}
		for _, d := range r.dnsNames {
			names = append(names, types.GeneralName{DnsName: aws.String(d)})
		}
		for _, ip := range r.ips {
			names = append(names, types.GeneralName{IpAddress: aws.String(ip.String())})
		}
		in.ApiPassthrough = &types.ApiPassthrough{Extensions: &types.Extensions{SubjectAlternativeNames: names}}
	}
	out, err := p.api.IssueCertificate(ctx, in)
	if err != nil {
		return nil, nil, p.callErr("IssueCertificate", err)
	}
	deadline, _ := ctx.Deadline()
	waiter := acmpca.NewCertificateIssuedWaiter(p.api, func(o *acmpca.CertificateIssuedWaiterOptions) {
		o.MinDelay, o.MaxDelay = waiterMinDelay, waiterMaxDelay
	})
	got, err := waiter.WaitForOutput(ctx, &acmpca.GetCertificateInput{
		CertificateAuthorityArn: aws.String(p.cfg.CAARN), CertificateArn: out.CertificateArn,
	}, time.Until(deadline))
	if err != nil {
		if strings.Contains(err.Error(), "exceeded max wait time") {
			err = fmt.Errorf("%w (RequestInProgressException until the deadline)", context.DeadlineExceeded)
		}
		return nil, nil, p.callErr("GetCertificate", err)
	}
	certs, err := parsePEMs(aws.ToString(got.Certificate))
	if err != nil || len(certs) != 1 {
		return nil, nil, fmt.Errorf("GetCertificate: the certificate %s does not parse: %w", aws.ToString(out.CertificateArn), ca.ErrBackendUnavailable)
	}
	above, err := parsePEMs(aws.ToString(got.CertificateChain))
	if err != nil {
		return nil, nil, fmt.Errorf("GetCertificate: the chain of %s does not parse: %w", aws.ToString(out.CertificateArn), ca.ErrBackendUnavailable)
	}
	return certs[0], orderChain(certs[0], above), nil
}

// orderChain returns the certificates of pool that lie above c, each
// issued by the next, whatever order AWS listed them in.
func orderChain(c *x509.Certificate, pool []*x509.Certificate) []*x509.Certificate {
	var chain []*x509.Certificate
	used := make([]bool, len(pool))
	for cur := c; ; {
		if bytes.Equal(cur.RawIssuer, cur.RawSubject) && cur.CheckSignatureFrom(cur) == nil {
			return chain
		}
		next := -1
		for i, cand := range pool {
			if !used[i] && bytes.Equal(cur.RawIssuer, cand.RawSubject) && cur.CheckSignatureFrom(cand) == nil {
				next = i
				break
			}
		}
		if next < 0 {
			return chain
		}
		used[next] = true
		chain = append(chain, pool[next])
		cur = pool[next]
	}
}

// parsePEMs parses every CERTIFICATE block of s; "" is no certificates.
func parsePEMs(s string) ([]*x509.Certificate, error) {
	certs, err := ca.ParseCertificatesPEM([]byte(s))
	if err != nil {
		return nil, err
	}
	if len(certs) == 0 && strings.TrimSpace(s) != "" {
		return nil, errors.New("no PEM certificate")
	}
	return certs, nil
}

func keyFamily(k types.KeyAlgorithm) string {
	switch k {
	case types.KeyAlgorithmEcPrime256v1, types.KeyAlgorithmEcSecp384r1, types.KeyAlgorithmEcSecp521r1:
		return "EC"
	case types.KeyAlgorithmRsa2048, types.KeyAlgorithmRsa3072, types.KeyAlgorithmRsa4096:
		return "RSA"
	}
	return ""
}

func defaultSigningAlgorithm(k types.KeyAlgorithm) types.SigningAlgorithm {
	switch k {
	case types.KeyAlgorithmEcPrime256v1:
		return types.SigningAlgorithmSha256withecdsa
	case types.KeyAlgorithmEcSecp384r1:
		return types.SigningAlgorithmSha384withecdsa
	case types.KeyAlgorithmEcSecp521r1:
		return types.SigningAlgorithmSha512withecdsa
	}
	return types.SigningAlgorithmSha256withrsa
}
