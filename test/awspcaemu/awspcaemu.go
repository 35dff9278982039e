// Package awspcaemu is an emulator of the AWS Private CA API (ACM PCA), for
// tests: AWS itself cannot be reached from where meshca's tests run. It is
// not AWS and never talks to AWS.
//
// It speaks the awsJson1_1 protocol the real
// github.com/aws/aws-sdk-go-v2/service/acmpca client speaks (POST /, header
// X-Amz-Target: ACMPrivateCA.<Operation>, errors as HTTP 4xx/5xx with a
// {"__type","message"} body), for the operations meshca calls:
// DescribeCertificateAuthority, GetCertificateAuthorityCertificate,
// IssueCertificate and GetCertificate. It signs with real keys, and honours
// what AWS documents for them: the templates EndEntityCertificate/V1,
// EndEntityCertificate_APIPassthrough/V1 and
// SubordinateCACertificate_PathLen0/V1; the validity types END_DATE,
// ABSOLUTE, DAYS, MONTHS and YEARS and ValidityNotBefore; validity past the
// CA's NotAfter; the signing algorithm against the CA's key; the CA's
// status and usage mode; idempotency tokens.
//
// A test switches faults on at run time (see Emulator's methods): throttle,
// answer RequestInProgressException, delay, be down, or issue a wrong
// certificate. Calls are counted per operation.
//
// Requests must carry a SigV4 Authorization header for the emulator's
// region and the acm-pca service; the signature itself is not checked.
package awspcaemu

import (
	"bytes"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha1"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/asn1"
	"encoding/hex"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"math/big"
	"net"
	"net/http"
	"net/url"
	"strings"
	"sync"
	"time"
)

// Key algorithms (the CA's KeyAlgorithm), as AWS names them.
const (
	KeyECPrime256v1 = "EC_prime256v1"
	KeyECSecp384r1  = "EC_secp384r1"
	KeyRSA2048      = "RSA_2048"
	KeyRSA3072      = "RSA_3072"
	KeyRSA4096      = "RSA_4096"
)

// CA statuses and usage modes, as AWS names them.
const (
	StatusActive   = "ACTIVE"
	StatusDisabled = "DISABLED"
	StatusExpired  = "EXPIRED"

	UsageGeneralPurpose = "GENERAL_PURPOSE"
	UsageShortLived     = "SHORT_LIVED_CERTIFICATE"
)

// Template names the emulator honours (the part after "template/" in the
// template ARN).
const (
	TemplateEndEntity            = "EndEntityCertificate/V1"
	TemplateEndEntityPassthrough = "EndEntityCertificate_APIPassthrough/V1"
	TemplateSubordinatePathLen0  = "SubordinateCACertificate_PathLen0/V1"
)

// shortLivedMax is the longest validity a SHORT_LIVED_CERTIFICATE CA
// issues. The emulator counts it from the time of issue: AWS documents "a
// maximum validity period of seven days" without saying whether a
// back-dated NotBefore counts.
const shortLivedMax = 7 * 24 * time.Hour

// defaultNotBeforeBackdate is how far AWS back-dates NotBefore when the
// request has no ValidityNotBefore.
const defaultNotBeforeBackdate = time.Hour

// idempotencyWindow is how long AWS remembers an IssueCertificate
// idempotency token.
const idempotencyWindow = 5 * time.Minute

// Config shapes the emulated CA. The zero value is valid: an ACTIVE,
// GENERAL_PURPOSE, EC_prime256v1 root CA in us-east-1, valid for a year,
// issuing at once.
type Config struct {
	// Region is the region of the CA's ARN, which requests must be signed
	// for. Default us-east-1.
	Region string
	// AccountID is the account of the CA's ARN. Default 111122223333.
	AccountID string
	// KeyAlgorithm is the CA's key algorithm (Key* constants). Default
	// EC_prime256v1. The emulator's root has a key of the same algorithm.
	KeyAlgorithm string
	// Subordinate makes the CA behind the ARN a subordinate (path length 1)
	// of the emulator's root; else the CA is the root itself.
	Subordinate bool
	// Status is the CA's initial status. Default ACTIVE.
	Status string
	// UsageMode is the CA's usage mode. Default GENERAL_PURPOSE.
	UsageMode string
	// CAValidity is how long the CA certificate stays valid from now.
	// Default one year. The root outlives a subordinate by a year.
	CAValidity time.Duration
	// IssueDelay is how long after IssueCertificate GetCertificate answers
	// RequestInProgressException. Default 0: issued at once.
	IssueDelay time.Duration
	// Now is the clock. Default time.Now.
	Now func() time.Time
}

// DownMode says how an emulator that is down fails.
type DownMode int

// DownModes.
const (
	// Up answers normally.
	Up DownMode = iota
	// Down500 answers HTTP 500 InternalFailure.
	Down500
	// DownClose closes the connection without an answer.
	DownClose
)

// WrongCert is a way to issue a wrong certificate.
type WrongCert int

// WrongCerts.
const (
	// RightCert issues what was asked for.
	RightCert WrongCert = iota
	// WrongURI replaces the URI SANs with another identity.
	WrongURI
	// WrongCA issues a CA certificate instead of an end-entity one.
	WrongCA
	// WrongShortLifetime issues a certificate that expires a minute after
	// it is issued, whatever was asked.
	WrongShortLifetime
)

// WrongURIValue is the URI SAN a WrongURI certificate carries.
const WrongURIValue = "spiffe://emulator.invalid/wrong"

// Operation names the emulator answers.
const (
	OpDescribeCertificateAuthority       = "DescribeCertificateAuthority"
	OpGetCertificateAuthorityCertificate = "GetCertificateAuthorityCertificate"
	OpIssueCertificate                   = "IssueCertificate"
	OpGetCertificate                     = "GetCertificate"
)

// Call is one request the emulator received.
type Call struct {
	Op string
	At time.Time
}

// Emulator is an emulator of one AWS Private CA, served over HTTP. It is
// safe for concurrent use; fault switches take effect for the next request.
type Emulator struct {
	cfg    Config
	arn    string
	root   *x509.Certificate
	caCert *x509.Certificate
	caKey  crypto.Signer
	// chainAbove is the PEM of the certificates above caCert, root last;
	// empty when the CA is the root.
	chainAbove []*x509.Certificate

	url string

	mu        sync.Mutex
	status    string
	usageMode string
	certs     map[string]*issued  // by certificate ARN
	tokens    map[string]tokenUse // by idempotency token
	calls     []Call
	throttleN int
	throttleT time.Time
	inProgN   int
	delay     time.Duration
	down      DownMode
	wrong     WrongCert
}

type issued struct {
	der     []byte
	readyAt time.Time
}

type tokenUse struct {
	certARN string
	at      time.Time
}

// New makes the emulated CA: its keys and certificates.
func New(cfg Config) (*Emulator, error) {
	if cfg.Region == "" {
		cfg.Region = "us-east-1"
	}
	if cfg.AccountID == "" {
		cfg.AccountID = "111122223333"
	}
	if cfg.KeyAlgorithm == "" {
		cfg.KeyAlgorithm = KeyECPrime256v1
	}
	if cfg.Status == "" {
		cfg.Status = StatusActive
	}
	if cfg.UsageMode == "" {
		cfg.UsageMode = UsageGeneralPurpose
	}
	if cfg.CAValidity == 0 {
		cfg.CAValidity = 365 * 24 * time.Hour
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	e := &Emulator{cfg: cfg, status: cfg.Status, usageMode: cfg.UsageMode,
		certs: map[string]*issued{}, tokens: map[string]tokenUse{}}
	id := make([]byte, 16)
	_, _ = rand.Read(id)
	h := hex.EncodeToString(id)
	e.arn = fmt.Sprintf("arn:aws:acm-pca:%s:%s:certificate-authority/%s-%s-%s-%s-%s",
		cfg.Region, cfg.AccountID, h[0:8], h[8:12], h[12:16], h[16:20], h[20:32])

	now := cfg.Now()
	rootKey, err := generateKey(cfg.KeyAlgorithm)
	if err != nil {
		return nil, err
	}
	rootLife := cfg.CAValidity
	if cfg.Subordinate {
		rootLife += 365 * 24 * time.Hour
	}
	rootTmpl := caTemplate("AWS Private CA emulator root", now.Add(-time.Hour), now.Add(rootLife))
	rootTmpl.MaxPathLen = 2
	if e.root, err = sign(rootTmpl, rootTmpl, rootKey.Public(), rootKey); err != nil {
		return nil, err
	}
	if !cfg.Subordinate {
		e.caCert, e.caKey = e.root, rootKey
		return e, nil
	}
	if e.caKey, err = generateKey(cfg.KeyAlgorithm); err != nil {
		return nil, err
	}
	subTmpl := caTemplate("AWS Private CA emulator subordinate", now.Add(-time.Hour), now.Add(cfg.CAValidity))
	subTmpl.MaxPathLen = 1
	if e.caCert, err = sign(subTmpl, e.root, e.caKey.Public(), rootKey); err != nil {
		return nil, err
	}
	e.chainAbove = []*x509.Certificate{e.root}
	return e, nil
}

// URL is the emulator's endpoint, for the SDK's BaseEndpoint, when Start
// served it; "" otherwise.
func (e *Emulator) URL() string { return e.url }

// ARN is the emulated CA's ARN.
func (e *Emulator) ARN() string { return e.arn }

// Region is the emulated CA's region.
func (e *Emulator) Region() string { return e.cfg.Region }

// Root is the emulator's root certificate: the top of every chain.
func (e *Emulator) Root() *x509.Certificate { return e.root }

// CACertificate is the certificate of the CA behind ARN (the root itself,
// unless Config.Subordinate).
func (e *Emulator) CACertificate() *x509.Certificate { return e.caCert }

// SetStatus changes the CA's status (ACTIVE, DISABLED, ...).
func (e *Emulator) SetStatus(s string) { e.mu.Lock(); e.status = s; e.mu.Unlock() }

// SetUsageMode changes the CA's usage mode.
func (e *Emulator) SetUsageMode(m string) { e.mu.Lock(); e.usageMode = m; e.mu.Unlock() }

// Throttle answers the next n requests with ThrottlingException.
func (e *Emulator) Throttle(n int) { e.mu.Lock(); e.throttleN = n; e.mu.Unlock() }

// ThrottleFor answers every request with ThrottlingException for d from now.
func (e *Emulator) ThrottleFor(d time.Duration) {
	e.mu.Lock()
	e.throttleT = e.cfg.Now().Add(d)
	e.mu.Unlock()
}

// InProgress answers the next n GetCertificate requests with
// RequestInProgressException, whatever the issue delay.
func (e *Emulator) InProgress(n int) { e.mu.Lock(); e.inProgN = n; e.mu.Unlock() }

// SetDelay delays every answer by d (0: none). A request whose client gives
// up first gets no answer.
func (e *Emulator) SetDelay(d time.Duration) { e.mu.Lock(); e.delay = d; e.mu.Unlock() }

// SetDown makes the emulator fail every request in the given way, or
// answer again with Up.
func (e *Emulator) SetDown(m DownMode) { e.mu.Lock(); e.down = m; e.mu.Unlock() }

// SetWrongCert makes IssueCertificate issue wrong certificates of the given
// kind from now on, or right ones again with RightCert.
func (e *Emulator) SetWrongCert(w WrongCert) { e.mu.Lock(); e.wrong = w; e.mu.Unlock() }

// Calls returns how many requests for op arrived, faulted ones included.
func (e *Emulator) Calls(op string) int {
	e.mu.Lock()
	defer e.mu.Unlock()
	n := 0
	for _, c := range e.calls {
		if c.Op == op {
			n++
		}
	}
	return n
}

// CallLog returns every request that arrived, in order.
func (e *Emulator) CallLog() []Call {
	e.mu.Lock()
	defer e.mu.Unlock()
	return append([]Call(nil), e.calls...)
}

// apiError is an error answer in awsJson1_1's shape.
type apiError struct {
	status int
	typ    string
	msg    string
}

func (a *apiError) Error() string { return a.typ + ": " + a.msg }

func errf(status int, typ, format string, args ...any) *apiError {
	return &apiError{status: status, typ: typ, msg: fmt.Sprintf(format, args...)}
}

func validation(format string, args ...any) *apiError {
	return errf(http.StatusBadRequest, "ValidationException", format, args...)
}

// ServeHTTP answers one awsJson1_1 request.
func (e *Emulator) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	target := r.Header.Get("X-Amz-Target")
	op, _ := strings.CutPrefix(target, "ACMPrivateCA.")

	e.mu.Lock()
	now := e.cfg.Now()
	e.calls = append(e.calls, Call{Op: op, At: now})
	down, delay := e.down, e.delay
	throttled := false
	switch {
	case e.throttleN > 0:
		e.throttleN--
		throttled = true
	case now.Before(e.throttleT):
		throttled = true
	}
	e.mu.Unlock()

	switch down {
	case Down500:
		writeErr(w, errf(http.StatusInternalServerError, "InternalFailure", "the AWS Private CA emulator is down"))
		return
	case DownClose:
		if hj, ok := w.(http.Hijacker); ok {
			if conn, _, err := hj.Hijack(); err == nil {
				_ = conn.Close()
				return
			}
		}
		panic(http.ErrAbortHandler)
	}
	if delay > 0 {
		t := time.NewTimer(delay)
		select {
		case <-t.C:
		case <-r.Context().Done():
			t.Stop()
			return
		}
	}
	if err := e.checkRequest(r, target); err != nil {
		writeErr(w, err)
		return
	}
	if throttled {
		writeErr(w, errf(http.StatusBadRequest, "ThrottlingException", "Rate exceeded (emulated)"))
		return
	}
	var body bytes.Buffer
	if _, err := body.ReadFrom(r.Body); err != nil {
		writeErr(w, errf(http.StatusBadRequest, "SerializationException", "read body: %v", err))
		return
	}
	var out any
	var aerr *apiError
	switch op {
	case OpDescribeCertificateAuthority:
		out, aerr = e.describe(body.Bytes())
	case OpGetCertificateAuthorityCertificate:
		out, aerr = e.getCACert(body.Bytes())
	case OpIssueCertificate:
		out, aerr = e.issue(body.Bytes())
	case OpGetCertificate:
		out, aerr = e.getCert(body.Bytes())
	default:
		aerr = errf(http.StatusBadRequest, "UnknownOperationException", "the AWS Private CA emulator does not implement %q", target)
	}
	if aerr != nil {
		writeErr(w, aerr)
		return
	}
	b, err := json.Marshal(out)
	if err != nil {
		writeErr(w, errf(http.StatusInternalServerError, "InternalFailure", "encode: %v", err))
		return
	}
	w.Header().Set("Content-Type", "application/x-amz-json-1.1")
	_, _ = w.Write(b)
}

// checkRequest checks the protocol and the SigV4 header's shape.
func (e *Emulator) checkRequest(r *http.Request, target string) *apiError {
	if r.Method != http.MethodPost || r.URL.Path != "/" {
		return errf(http.StatusBadRequest, "UnknownOperationException", "want POST /, got %s %s", r.Method, r.URL.Path)
	}
	if ct := r.Header.Get("Content-Type"); ct != "application/x-amz-json-1.1" {
		return errf(http.StatusBadRequest, "SerializationException", "Content-Type %q, want application/x-amz-json-1.1", ct)
	}
	if !strings.HasPrefix(target, "ACMPrivateCA.") {
		return errf(http.StatusBadRequest, "UnknownOperationException", "X-Amz-Target %q", target)
	}
	auth := r.Header.Get("Authorization")
	if auth == "" {
		return errf(http.StatusForbidden, "MissingAuthenticationTokenException", "Missing Authentication Token")
	}
	// AWS4-HMAC-SHA256 Credential=AKID/20240101/us-east-1/acm-pca/aws4_request, SignedHeaders=..., Signature=...
	rest, ok := strings.CutPrefix(auth, "AWS4-HMAC-SHA256 Credential=")
	if !ok || !strings.Contains(auth, "Signature=") || r.Header.Get("X-Amz-Date") == "" {
		return errf(http.StatusBadRequest, "IncompleteSignatureException", "Authorization header is not SigV4")
	}
	cred, _, _ := strings.Cut(rest, ",")
	parts := strings.Split(cred, "/")
	if len(parts) != 5 || parts[0] == "" || parts[4] != "aws4_request" {
		return errf(http.StatusBadRequest, "IncompleteSignatureException", "malformed credential scope %q", cred)
	}
	if parts[2] != e.cfg.Region || parts[3] != "acm-pca" {
		return errf(http.StatusForbidden, "InvalidSignatureException",
			"credential scope is for %s/%s; this CA is in %s/acm-pca", parts[2], parts[3], e.cfg.Region)
	}
	return nil
}

func writeErr(w http.ResponseWriter, a *apiError) {
	w.Header().Set("Content-Type", "application/x-amz-json-1.1")
	w.WriteHeader(a.status)
	b, _ := json.Marshal(map[string]string{"__type": a.typ, "message": a.msg})
	_, _ = w.Write(b)
}

// checkARN checks a CA ARN in a request.
func (e *Emulator) checkARN(arn string) *apiError {
	switch {
	case arn == "":
		return validation("CertificateAuthorityArn is required")
	case !strings.HasPrefix(arn, "arn:") || !strings.Contains(arn, ":acm-pca:") || !strings.Contains(arn, ":certificate-authority/"):
		return errf(http.StatusBadRequest, "InvalidArnException", "%q is not a valid certificate authority ARN", arn)
	case arn != e.arn:
		return errf(http.StatusBadRequest, "ResourceNotFoundException", "Could not find certificate authority %s", arn)
	}
	return nil
}

type caRequest struct {
	CertificateAuthorityArn string
}

func (e *Emulator) describe(body []byte) (any, *apiError) {
	var req caRequest
	if err := json.Unmarshal(body, &req); err != nil {
		return nil, errf(http.StatusBadRequest, "SerializationException", "%v", err)
	}
	if err := e.checkARN(req.CertificateAuthorityArn); err != nil {
		return nil, err
	}
	e.mu.Lock()
	status, usage := e.status, e.usageMode
	e.mu.Unlock()
	typ := "ROOT"
	if e.cfg.Subordinate {
		typ = "SUBORDINATE"
	}
	c := e.caCert
	return map[string]any{"CertificateAuthority": map[string]any{
		"Arn":               e.arn,
		"OwnerAccount":      e.cfg.AccountID,
		"CreatedAt":         epoch(c.NotBefore),
		"LastStateChangeAt": epoch(c.NotBefore),
		"Type":              typ,
		"Serial":            c.SerialNumber.Text(16),
		"Status":            status,
		"NotBefore":         epoch(c.NotBefore),
		"NotAfter":          epoch(c.NotAfter),
		"CertificateAuthorityConfiguration": map[string]any{
			"KeyAlgorithm":     e.cfg.KeyAlgorithm,
			"SigningAlgorithm": defaultSigningAlgorithm(e.cfg.KeyAlgorithm),
			"Subject":          map[string]any{"CommonName": c.Subject.CommonName, "Organization": firstOr(c.Subject.Organization)},
		},
		"KeyStorageSecurityStandard": "FIPS_140_2_LEVEL_3_OR_HIGHER",
		"UsageMode":                  usage,
	}}, nil
}

func (e *Emulator) getCACert(body []byte) (any, *apiError) {
	var req caRequest
	if err := json.Unmarshal(body, &req); err != nil {
		return nil, errf(http.StatusBadRequest, "SerializationException", "%v", err)
	}
	if err := e.checkARN(req.CertificateAuthorityArn); err != nil {
		return nil, err
	}
	out := map[string]any{"Certificate": pemOf(e.caCert)}
	if len(e.chainAbove) > 0 {
		out["CertificateChain"] = pemChain(e.chainAbove)
	}
	return out, nil
}

type validity struct {
	Type  string
	Value *int64
}

type generalName struct {
	DnsName                   string `json:",omitempty"`
	UniformResourceIdentifier string `json:",omitempty"`
	IpAddress                 string `json:",omitempty"`
	Rfc822Name                string `json:",omitempty"`
}

type issueRequest struct {
	CertificateAuthorityArn string
	Csr                     []byte // base64 in JSON, as awsJson blobs are
	SigningAlgorithm        string
	TemplateArn             string
	Validity                *validity
	ValidityNotBefore       *validity
	IdempotencyToken        string
	ApiPassthrough          *struct {
		Extensions *struct {
			SubjectAlternativeNames []generalName
		}
	}
}

func (e *Emulator) issue(body []byte) (any, *apiError) {
	var req issueRequest
	if err := json.Unmarshal(body, &req); err != nil {
		return nil, errf(http.StatusBadRequest, "SerializationException", "%v", err)
	}
	if err := e.checkARN(req.CertificateAuthorityArn); err != nil {
		return nil, err
	}
	e.mu.Lock()
	status, usage, wrong := e.status, e.usageMode, e.wrong
	now := e.cfg.Now()
	if u, ok := e.tokens[req.IdempotencyToken]; ok && req.IdempotencyToken != "" && now.Sub(u.at) < idempotencyWindow {
		e.mu.Unlock()
		return map[string]any{"CertificateArn": u.certARN}, nil
	}
	e.mu.Unlock()

	if status != StatusActive {
		return nil, errf(http.StatusBadRequest, "InvalidStateException", "The certificate authority %s is in the %s state and cannot issue certificates", e.arn, status)
	}
	if len(req.Csr) == 0 {
		return nil, validation("Csr is required")
	}
	if req.Validity == nil {
		return nil, validation("Validity is required")
	}
	if req.SigningAlgorithm == "" {
		return nil, validation("SigningAlgorithm is required")
	}
	sigAlg, ok := signingAlgorithms[req.SigningAlgorithm]
	if !ok || sigAlg.keyFamily != keyFamily(e.cfg.KeyAlgorithm) {
		return nil, errf(http.StatusBadRequest, "InvalidArgsException",
			"Signing algorithm %s is not compatible with the CA's key algorithm %s", req.SigningAlgorithm, e.cfg.KeyAlgorithm)
	}
	block, _ := pem.Decode(req.Csr)
	der := req.Csr
	if block != nil {
		der = block.Bytes
	}
	csr, err := x509.ParseCertificateRequest(der)
	if err != nil || csr.CheckSignature() != nil {
		return nil, errf(http.StatusBadRequest, "MalformedCSRException", "The certificate signing request is malformed or its signature does not verify")
	}

	template := "EndEntityCertificate/V1"
	if req.TemplateArn != "" {
		_, name, ok := strings.Cut(req.TemplateArn, ":template/")
		if !ok || !strings.HasPrefix(req.TemplateArn, "arn:") {
			return nil, errf(http.StatusBadRequest, "InvalidArnException", "%q is not a template ARN", req.TemplateArn)
		}
		template = name
	}
	notAfter, aerr := validityEnd(req.Validity, now)
	if aerr != nil {
		return nil, aerr
	}
	notBefore := now.Add(-defaultNotBeforeBackdate)
	explicitNotBefore := req.ValidityNotBefore != nil
	if explicitNotBefore {
		if req.ValidityNotBefore.Type != "ABSOLUTE" || req.ValidityNotBefore.Value == nil {
			return nil, validation("ValidityNotBefore must be of type ABSOLUTE")
		}
		notBefore = time.Unix(*req.ValidityNotBefore.Value, 0)
	}
	switch {
	case !notAfter.After(notBefore):
		return nil, validation("The certificate's end of validity %s is not after its start %s", notAfter.UTC().Format(time.RFC3339), notBefore.UTC().Format(time.RFC3339))
	case notAfter.After(e.caCert.NotAfter):
		return nil, validation("The certificate's validity ends at %s, after the CA's, %s", notAfter.UTC().Format(time.RFC3339), e.caCert.NotAfter.UTC().Format(time.RFC3339))
	case usage == UsageShortLived && notAfter.Sub(now) > shortLivedMax:
		return nil, validation("A CA in SHORT_LIVED_CERTIFICATE mode issues certificates valid for at most 7 days")
	}

	serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	if err != nil {
		return nil, errf(http.StatusInternalServerError, "InternalFailure", "serial: %v", err)
	}
	tmpl := &x509.Certificate{
		SerialNumber:          serial,
		Subject:               csr.Subject,
		NotBefore:             notBefore,
		NotAfter:              notAfter,
		BasicConstraintsValid: true,
		SignatureAlgorithm:    sigAlg.x509,
		SubjectKeyId:          subjectKeyID(csr.RawSubjectPublicKeyInfo),
	}
	switch template {
	case TemplateEndEntity, TemplateEndEntityPassthrough:
		tmpl.DNSNames, tmpl.IPAddresses, tmpl.EmailAddresses, tmpl.URIs = csr.DNSNames, csr.IPAddresses, csr.EmailAddresses, csr.URIs
		tmpl.KeyUsage = x509.KeyUsageDigitalSignature | x509.KeyUsageKeyEncipherment
		tmpl.ExtKeyUsage = []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth}
		if template == TemplateEndEntityPassthrough && req.ApiPassthrough != nil && req.ApiPassthrough.Extensions != nil &&
			len(req.ApiPassthrough.Extensions.SubjectAlternativeNames) > 0 {
			// API passthrough values take precedence over the CSR's.
			if aerr := applySANs(tmpl, req.ApiPassthrough.Extensions.SubjectAlternativeNames); aerr != nil {
				return nil, aerr
			}
		}
	case TemplateSubordinatePathLen0:
		if usage == UsageShortLived {
			return nil, validation("A CA in SHORT_LIVED_CERTIFICATE mode must be the last CA in the hierarchy; it cannot issue CA certificates")
		}
		tmpl.IsCA, tmpl.MaxPathLen, tmpl.MaxPathLenZero = true, 0, true
		tmpl.KeyUsage = x509.KeyUsageCertSign | x509.KeyUsageCRLSign | x509.KeyUsageDigitalSignature
	default:
		return nil, errf(http.StatusBadRequest, "InvalidArgsException", "The AWS Private CA emulator does not implement template %q", template)
	}
	switch wrong {
	case WrongURI:
		u, _ := url.Parse(WrongURIValue)
		tmpl.URIs = []*url.URL{u}
	case WrongCA:
		tmpl.IsCA, tmpl.MaxPathLen, tmpl.MaxPathLenZero = true, 0, true
		tmpl.KeyUsage |= x509.KeyUsageCertSign
	case WrongShortLifetime:
		tmpl.NotAfter = now.Add(time.Minute)
	}
	cert, err := sign(tmpl, e.caCert, csr.PublicKey, e.caKey)
	if err != nil {
		return nil, errf(http.StatusBadRequest, "InvalidArgsException", "cannot issue: %v", err)
	}

	certARN := fmt.Sprintf("%s/certificate/%s", e.arn, hex.EncodeToString(serial.Bytes()))
	e.mu.Lock()
	defer e.mu.Unlock()
	e.certs[certARN] = &issued{der: cert.Raw, readyAt: now.Add(e.cfg.IssueDelay)}
	if req.IdempotencyToken != "" {
		e.tokens[req.IdempotencyToken] = tokenUse{certARN: certARN, at: now}
	}
	return map[string]any{"CertificateArn": certARN}, nil
}

// validityEnd computes NotAfter from a Validity as AWS documents it.
func validityEnd(v *validity, now time.Time) (time.Time, *apiError) {
	if v.Value == nil || *v.Value <= 0 {
		return time.Time{}, validation("Validity.Value must be a positive number")
	}
	n := *v.Value
	switch v.Type {
	case "ABSOLUTE":
		return time.Unix(n, 0), nil
	case "DAYS":
		return now.AddDate(0, 0, int(n)), nil
	case "MONTHS":
		return now.AddDate(0, int(n), 0), nil
	case "YEARS":
		return now.AddDate(int(n), 0, 0), nil
	case "END_DATE":
		s := fmt.Sprint(n)
		switch len(s) {
		case 12: // UTCTime YYMMDDHHMMSS; YY >= 50 is 19YY
			t, err := time.Parse("060102150405", s)
			if err != nil {
				return time.Time{}, validation("Validity END_DATE %s is not YYMMDDHHMMSS", s)
			}
			if t.Year() >= 2050 {
				t = t.AddDate(-100, 0, 0)
			}
			return t, nil
		case 14: // GeneralizedTime YYYYMMDDHHMMSS
			t, err := time.Parse("20060102150405", s)
			if err != nil {
				return time.Time{}, validation("Validity END_DATE %s is not YYYYMMDDHHMMSS", s)
			}
			return t, nil
		}
		return time.Time{}, validation("Validity END_DATE %s is neither YYMMDDHHMMSS nor YYYYMMDDHHMMSS", s)
	}
	return time.Time{}, validation("Validity.Type %q is not one of END_DATE, ABSOLUTE, DAYS, MONTHS, YEARS", v.Type)
}

func applySANs(tmpl *x509.Certificate, names []generalName) *apiError {
	tmpl.DNSNames, tmpl.IPAddresses, tmpl.EmailAddresses, tmpl.URIs = nil, nil, nil, nil
	for _, n := range names {
		switch {
		case n.UniformResourceIdentifier != "":
			u, err := url.Parse(n.UniformResourceIdentifier)
			if err != nil {
				return validation("UniformResourceIdentifier %q is not a URI", n.UniformResourceIdentifier)
			}
			tmpl.URIs = append(tmpl.URIs, u)
		case n.DnsName != "":
			tmpl.DNSNames = append(tmpl.DNSNames, n.DnsName)
		case n.IpAddress != "":
			ip := net.ParseIP(n.IpAddress)
			if ip == nil {
				return validation("IpAddress %q is not an IP address", n.IpAddress)
			}
			tmpl.IPAddresses = append(tmpl.IPAddresses, ip)
		case n.Rfc822Name != "":
			tmpl.EmailAddresses = append(tmpl.EmailAddresses, n.Rfc822Name)
		default:
			return errf(http.StatusBadRequest, "InvalidArgsException", "The AWS Private CA emulator supports DnsName, UniformResourceIdentifier, IpAddress and Rfc822Name general names only")
		}
	}
	return nil
}

type getCertRequest struct {
	CertificateAuthorityArn string
	CertificateArn          string
}

func (e *Emulator) getCert(body []byte) (any, *apiError) {
	var req getCertRequest
	if err := json.Unmarshal(body, &req); err != nil {
		return nil, errf(http.StatusBadRequest, "SerializationException", "%v", err)
	}
	if err := e.checkARN(req.CertificateAuthorityArn); err != nil {
		return nil, err
	}
	e.mu.Lock()
	c, ok := e.certs[req.CertificateArn]
	inProg := false
	if e.inProgN > 0 {
		e.inProgN--
		inProg = true
	}
	now := e.cfg.Now()
	e.mu.Unlock()
	switch {
	case !ok:
		return nil, errf(http.StatusBadRequest, "ResourceNotFoundException", "Could not find certificate %s", req.CertificateArn)
	case inProg || now.Before(c.readyAt):
		return nil, errf(http.StatusBadRequest, "RequestInProgressException", "The request to issue certificate %s is still in progress", req.CertificateArn)
	}
	chain := append([]*x509.Certificate{e.caCert}, e.chainAbove...)
	return map[string]any{
		"Certificate":      string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: c.der})),
		"CertificateChain": pemChain(chain),
	}, nil
}

// signingAlgorithm maps an AWS signing algorithm to x509's.
type signingAlgorithm struct {
	x509      x509.SignatureAlgorithm
	keyFamily string
}

var signingAlgorithms = map[string]signingAlgorithm{
	"SHA256WITHECDSA":   {x509.ECDSAWithSHA256, "EC"},
	"SHA384WITHECDSA":   {x509.ECDSAWithSHA384, "EC"},
	"SHA512WITHECDSA":   {x509.ECDSAWithSHA512, "EC"},
	"SHA256WITHRSA":     {x509.SHA256WithRSA, "RSA"},
	"SHA384WITHRSA":     {x509.SHA384WithRSA, "RSA"},
	"SHA512WITHRSA":     {x509.SHA512WithRSA, "RSA"},
	"SHA256WITHRSA_PSS": {x509.SHA256WithRSAPSS, "RSA"},
	"SHA384WITHRSA_PSS": {x509.SHA384WithRSAPSS, "RSA"},
	"SHA512WITHRSA_PSS": {x509.SHA512WithRSAPSS, "RSA"},
}

func keyFamily(keyAlg string) string {
	if strings.HasPrefix(keyAlg, "EC_") {
		return "EC"
	}
	return "RSA"
}

func defaultSigningAlgorithm(keyAlg string) string {
	switch keyAlg {
	case KeyECPrime256v1:
		return "SHA256WITHECDSA"
	case KeyECSecp384r1:
		return "SHA384WITHECDSA"
	}
	return "SHA256WITHRSA"
}

func generateKey(alg string) (crypto.Signer, error) {
	switch alg {
	case KeyECPrime256v1:
		return ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	case KeyECSecp384r1:
		return ecdsa.GenerateKey(elliptic.P384(), rand.Reader)
	case KeyRSA2048:
		return rsa.GenerateKey(rand.Reader, 2048)
	case KeyRSA3072:
		return rsa.GenerateKey(rand.Reader, 3072)
	case KeyRSA4096:
		return rsa.GenerateKey(rand.Reader, 4096)
	}
	return nil, fmt.Errorf("awspcaemu: key algorithm %q is not emulated", alg)
}

func caTemplate(cn string, notBefore, notAfter time.Time) *x509.Certificate {
	serial, _ := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	return &x509.Certificate{
		SerialNumber:          serial,
		Subject:               pkix.Name{CommonName: cn, Organization: []string{"AWS Private CA emulator"}},
		NotBefore:             notBefore,
		NotAfter:              notAfter,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign | x509.KeyUsageDigitalSignature,
		BasicConstraintsValid: true,
		IsCA:                  true,
	}
}

func sign(tmpl, parent *x509.Certificate, pub crypto.PublicKey, key crypto.Signer) (*x509.Certificate, error) {
	der, err := x509.CreateCertificate(rand.Reader, tmpl, parent, pub, key)
	if err != nil {
		return nil, err
	}
	return x509.ParseCertificate(der)
}

// subjectKeyID is RFC 5280's method 1: SHA-1 of the subjectPublicKey bits.
func subjectKeyID(spki []byte) []byte {
	var info struct {
		Algorithm pkix.AlgorithmIdentifier
		PublicKey asn1.BitString
	}
	if _, err := asn1.Unmarshal(spki, &info); err != nil {
		return nil
	}
	sum := sha1.Sum(info.PublicKey.Bytes)
	return sum[:]
}

func pemOf(c *x509.Certificate) string {
	return string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: c.Raw}))
}

func pemChain(certs []*x509.Certificate) string {
	var b strings.Builder
	for _, c := range certs {
		b.WriteString(pemOf(c))
	}
	return b.String()
}

func epoch(t time.Time) float64 { return float64(t.UnixNano()) / 1e9 }

func firstOr(s []string) string {
	if len(s) == 0 {
		return ""
	}
	return s[0]
}
