// Package selfsigned is the backend that is its own root: it generates a
// self-signed root (or reloads one from a directory). Without an
// intermediate it is a ca.Holder whose root signs leaves; with one it is a
// ca.Authority that mints, from the root, the intermediates the CA core
// generates and rotates.
package selfsigned

import (
	"bytes"
	"context"
	"crypto"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"math/big"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/google/renameio/v2"
	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/meshca/meshca/ca"
)

// Defaults for the zero fields of Config.
const (
	DefaultKeyType                   = ca.KeyECDSAP256
	DefaultRootTTL                   = 10 * 365 * 24 * time.Hour
	DefaultIntermediateTTL           = ca.DefaultIntermediateTTL
	DefaultIntermediateRenewFraction = ca.DefaultIntermediateRenewFraction
	DefaultOrganization              = "meshca"
)

// File names in Config.Dir.
const (
	RootCertFile = "root-cert.pem"
	RootKeyFile  = "root-key.pem"
)

// MinIntermediateTTL is the shortest IntermediateTTL Validate accepts.
const MinIntermediateTTL = ca.MinIntermediateTTL

const (
	// caBackdate moves CA certificates' NotBefore into the past, so that
	// relying parties whose clocks lag still accept a new intermediate.
	caBackdate = 5 * time.Minute
	// configPath prefixes Validate's error paths.
	configPath = "backend.selfSigned."
)

// ErrInvalidRoot is wrapped by New's errors about the root files in Dir:
// one of them missing, unreadable, malformed, mismatched or expired.
var ErrInvalidRoot = errors.New("invalid root files")

// Config configures the selfsigned backend. The zero value is valid: an
// ECDSA P-256 root valid for ten years, kept in memory, signing leaves
// itself.
type Config struct {
	// KeyType is the type of the root's and the intermediate's keys:
	// ECDSA-P256 (default), ECDSA-P384, RSA-2048, RSA-3072 or RSA-4096.
	// A root reloaded from Dir keeps the key it has.
	KeyType ca.KeyType `yaml:"keyType"`
	// RootTTL is the lifetime of a newly generated root. Default 10 years.
	// meshca does not rotate the root.
	RootTTL time.Duration `yaml:"rootTTL"`
	// Intermediate makes the backend sign leaves with an intermediate kept
	// only in memory, minted from the root at start and again whenever
	// Run reaches its renewal point, instead of with the root itself.
	Intermediate bool `yaml:"intermediate"`
	// IntermediateTTL is the intermediate's lifetime, capped at the
	// root's NotAfter. Default 30 days; at least MinIntermediateTTL.
	// Leaves are capped at the intermediate's NotAfter, so it should be
	// well above the longest leaf lifetime divided by (1 - fraction).
	IntermediateTTL time.Duration `yaml:"intermediateTTL"`
	// IntermediateRenewFraction is the fraction of its lifetime after
	// which the intermediate is replaced, in (0, 1). Default 0.5.
	IntermediateRenewFraction float64 `yaml:"intermediateRenewFraction"`
	// Dir keeps the root: RootCertFile and RootKeyFile (PKCS#8, mode
	// 0600). When both exist they are loaded; when neither does a root is
	// generated and written there (the directory is created, mode 0700);
	// when only one does, New fails. "" keeps the root in memory only, so
	// every start makes a new root.
	Dir string `yaml:"dir"`
	// Organization is the O of the CA certificates' subjects. Default
	// "meshca".
	Organization string `yaml:"organization"`
	// TrustDomain, if set, is named in the CA certificates' common names
	// ("meshca root for cluster.local"). It has no other effect.
	TrustDomain string `yaml:"trustDomain"`
}

// Deps are the runtime inputs of the backend, apart from its configuration.
type Deps struct {
	// Log receives operational logs. Default: discard.
	Log *slog.Logger
	// Now is the clock. Default time.Now.
	Now func() time.Time
}

// Validate reports every problem with c, each prefixed with its dotted
// configuration path, joined with errors.Join. It does not touch Dir.
func (c Config) Validate() error {
	var errs []error
	bad := func(field, format string, args ...any) {
		errs = append(errs, fmt.Errorf("%s%s: %s", configPath, field, fmt.Sprintf(format, args...)))
	}
	if c.KeyType != "" && !slices.Contains(ca.CAKeyTypes, c.KeyType) {
		bad("keyType", "unknown key type %q, want %s", c.KeyType, keyTypeList())
	}
	if c.RootTTL < 0 {
		bad("rootTTL", "must not be negative (0 means the default, %s)", DefaultRootTTL)
	}
	if c.IntermediateTTL < 0 {
		bad("intermediateTTL", "must not be negative (0 means the default, %s)", DefaultIntermediateTTL)
	} else if c.IntermediateTTL > 0 && c.IntermediateTTL < MinIntermediateTTL {
		bad("intermediateTTL", "must be at least %s, got %s", MinIntermediateTTL, c.IntermediateTTL)
	}
	if f := c.IntermediateRenewFraction; f < 0 || f >= 1 {
		bad("intermediateRenewFraction", "must be in (0, 1) (0 means the default, %v), got %v", DefaultIntermediateRenewFraction, f)
	}
	if d := c.withDefaults(); c.Intermediate && c.RootTTL >= 0 && d.IntermediateTTL >= d.RootTTL {
		bad("intermediateTTL", "must be shorter than rootTTL (%s), got %s", d.RootTTL, d.IntermediateTTL)
	}
	if c.TrustDomain != "" {
		if _, err := spiffeid.TrustDomainFromString(c.TrustDomain); err != nil {
			bad("trustDomain", "%q is not a valid trust domain name", c.TrustDomain)
		}
	}
	return errors.Join(errs...)
}

// withDefaults returns c with its zero fields defaulted.
func (c Config) withDefaults() Config {
	if c.KeyType == "" {
		c.KeyType = DefaultKeyType
	}
	if c.RootTTL <= 0 {
		c.RootTTL = DefaultRootTTL
	}
	if c.IntermediateTTL <= 0 {
		c.IntermediateTTL = DefaultIntermediateTTL
	}
	if c.IntermediateRenewFraction <= 0 {
		c.IntermediateRenewFraction = DefaultIntermediateRenewFraction
	}
	if c.Organization == "" {
		c.Organization = DefaultOrganization
	}
	return c
}

// Intermediate returns the shape of the intermediates the CA core should
// generate, for when c.Intermediate is set.
func (c Config) IntermediateConfig() ca.IntermediateConfig {
	d := c.withDefaults()
	return ca.IntermediateConfig{
		TTL: d.IntermediateTTL, RenewFraction: d.IntermediateRenewFraction, KeyType: d.KeyType,
		Subject: d.subject("intermediate"),
	}
}

// subject names a CA certificate of the given role.
func (c Config) subject(role string) pkix.Name {
	cn := "meshca " + role
	if c.TrustDomain != "" {
		cn += " for " + c.TrustDomain
	}
	return pkix.Name{CommonName: cn, Organization: []string{c.Organization}}
}

func keyTypeList() string {
	names := make([]string, len(ca.CAKeyTypes))
	for i, k := range ca.CAKeyTypes {
		names[i] = string(k)
	}
	return strings.Join(names, ", ")
}

// Root is the root, loaded or generated. As a ca.Holder it signs leaves
// itself; meshca does not rotate it.
type Root struct {
	cfg   Config
	log   *slog.Logger
	now   func() time.Time
	cert  *x509.Certificate
	key   crypto.Signer
	state ca.State
}

// Authority mints intermediates from the Root, for the CA core's keys.
type Authority struct {
	root *Root
}

// New validates cfg and loads or generates the root. It returns a *Root
// (a ca.Holder) or, when cfg.Intermediate is set, an *Authority (a
// ca.Authority; the CA core then needs cfg.IntermediateConfig()). Errors about
// the files in cfg.Dir wrap ErrInvalidRoot and name the file.
func New(cfg Config, deps Deps) (ca.Backend, error) {
	r, err := NewRoot(cfg, deps)
	if err != nil {
		return nil, err
	}
	if cfg.Intermediate {
		return &Authority{root: r}, nil
	}
	return r, nil
}

// NewRoot is New without the choice: the Root, whatever cfg.Intermediate
// says.
func NewRoot(cfg Config, deps Deps) (*Root, error) {
	if err := cfg.Validate(); err != nil {
		return nil, fmt.Errorf("selfsigned: %w", err)
	}
	if deps.Log == nil {
		deps.Log = slog.New(slog.DiscardHandler)
	}
	if deps.Now == nil {
		deps.Now = time.Now
	}
	b := &Root{cfg: cfg.withDefaults(), log: deps.Log, now: deps.Now}

	var err error
	if cfg.Dir == "" {
		b.cert, b.key, err = b.newRoot()
		if err != nil {
			return nil, fmt.Errorf("selfsigned: %w", err)
		}
		b.log.Info("generated in-memory root; it lasts until restart", "subject", b.cert.Subject.String(),
			"serial", fmt.Sprintf("%x", b.cert.SerialNumber), "notAfter", b.cert.NotAfter)
	} else if b.cert, b.key, err = b.loadOrCreateRoot(); err != nil {
		return nil, fmt.Errorf("selfsigned: %w", err)
	}
	s, err := ca.NewSigningCA(b.cert, b.key, nil)
	if err != nil {
		return nil, fmt.Errorf("selfsigned: %w", err)
	}
	b.state = ca.State{Signing: s, Roots: []*x509.Certificate{b.cert}}
	return b, nil
}

// Certificate returns the root certificate. Callers must not modify it.
func (b *Root) Certificate() *x509.Certificate { return b.cert }

// Current implements ca.Holder: the root signs.
func (b *Root) Current() ca.State { return b.state }

// Watch implements ca.Holder. The root never changes while meshca runs.
func (b *Root) Watch(ctx context.Context, _ func(ca.State)) error {
	<-ctx.Done()
	return nil
}

// MintCA implements ca.Authority: it signs an intermediate for req.CSR's
// key with the root, named by the CSR's subject, valid from a little
// before now for req.TTL but never past the root, with path length 0.
func (a *Authority) MintCA(ctx context.Context, req ca.MintRequest) (*ca.MintedCA, error) {
	if err := ctx.Err(); err != nil {
		return nil, fmt.Errorf("mint intermediate: %w", err)
	}
	r := a.root
	if req.CSR == nil {
		return nil, errors.New("mint intermediate: no CSR")
	}
	if err := req.CSR.CheckSignature(); err != nil {
		return nil, fmt.Errorf("mint intermediate: CSR signature: %w", err)
	}
	now := r.now()
	notAfter := now.Add(req.TTL)
	if notAfter.After(r.cert.NotAfter) {
		notAfter = r.cert.NotAfter
	}
	serial, err := ca.RandomSerial()
	if err != nil {
		return nil, err
	}
	tmpl := caTemplate(serial, req.CSR.Subject, now, notAfter)
	tmpl.MaxPathLen, tmpl.MaxPathLenZero = 0, true
	der, err := x509.CreateCertificate(rand.Reader, tmpl, r.cert, req.CSR.PublicKey, r.key)
	if err != nil {
		return nil, fmt.Errorf("mint intermediate: %w", err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, fmt.Errorf("mint intermediate: %w", err)
	}
	return &ca.MintedCA{Cert: cert, Chain: []*x509.Certificate{r.cert}, Roots: []*x509.Certificate{r.cert}}, nil
}

// newRoot generates a root key and self-signed certificate.
func (b *Root) newRoot() (*x509.Certificate, crypto.Signer, error) {
	key, err := ca.GenerateKey(b.cfg.KeyType)
	if err != nil {
		return nil, nil, err
	}
	serial, err := ca.RandomSerial()
	if err != nil {
		return nil, nil, err
	}
	now := b.now()
	tmpl := caTemplate(serial, b.cfg.subject("root"), now, now.Add(b.cfg.RootTTL))
	// One intermediate may sit below the root, whether or not this run
	// uses one: the setting can change while the persisted root stays.
	tmpl.MaxPathLen = 1
	cert, err := createCA(tmpl, tmpl, key, key)
	if err != nil {
		return nil, nil, fmt.Errorf("create root: %w", err)
	}
	return cert, key, nil
}

// caTemplate returns a CA certificate template for subject, valid from a
// little before now until notAfter.
func caTemplate(serial *big.Int, subject pkix.Name, now, notAfter time.Time) *x509.Certificate {
	return &x509.Certificate{
		SerialNumber:          serial,
		Subject:               subject,
		NotBefore:             now.Add(-caBackdate),
		NotAfter:              notAfter,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
		BasicConstraintsValid: true,
		IsCA:                  true,
		// SubjectKeyId is derived from the key by x509.CreateCertificate.
	}
}

// createCA signs tmpl (with key's public key) by parent and parses it.
func createCA(tmpl, parent *x509.Certificate, key, parentKey crypto.Signer) (*x509.Certificate, error) {
	der, err := x509.CreateCertificate(rand.Reader, tmpl, parent, key.Public(), parentKey)
	if err != nil {
		return nil, err
	}
	return x509.ParseCertificate(der)
}

// loadOrCreateRoot loads the root from cfg.Dir, or generates and writes one
// if neither file exists.
func (b *Root) loadOrCreateRoot() (*x509.Certificate, crypto.Signer, error) {
	certPath := filepath.Join(b.cfg.Dir, RootCertFile)
	keyPath := filepath.Join(b.cfg.Dir, RootKeyFile)
	certExists, err := exists(certPath)
	if err != nil {
		return nil, nil, err
	}
	keyExists, err := exists(keyPath)
	if err != nil {
		return nil, nil, err
	}
	switch {
	case certExists && keyExists:
		return b.loadRoot(certPath, keyPath)
	case certExists:
		return nil, nil, fmt.Errorf("load root: %s exists but %s does not; restore it, or remove both to generate a new root: %w",
			certPath, keyPath, ErrInvalidRoot)
	case keyExists:
		return nil, nil, fmt.Errorf("load root: %s exists but %s does not; restore it, or remove both to generate a new root: %w",
			keyPath, certPath, ErrInvalidRoot)
	}

	cert, key, err := b.newRoot()
	if err != nil {
		return nil, nil, err
	}
	keyDER, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return nil, nil, fmt.Errorf("encode root key: %w", err)
	}
	if err := os.MkdirAll(b.cfg.Dir, 0o700); err != nil {
		return nil, nil, fmt.Errorf("create root directory: %w", err)
	}
	// The key goes first: a crash between the two leaves only the key,
	// which New reports rather than silently replacing.
	// renameio writes a synced temporary file and renames it over the
	// path: a crash leaves the old contents or all of the new.
	if err := renameio.WriteFile(keyPath, pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: keyDER}), 0o600); err != nil {
		return nil, nil, fmt.Errorf("write %s: %w", keyPath, err)
	}
	if err := renameio.WriteFile(certPath, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: cert.Raw}), 0o644); err != nil {
		return nil, nil, fmt.Errorf("write %s: %w", certPath, err)
	}
	b.log.Info("generated root", "dir", b.cfg.Dir, "subject", cert.Subject.String(),
		"serial", fmt.Sprintf("%x", cert.SerialNumber), "notAfter", cert.NotAfter)
	return cert, key, nil
}

// loadRoot reads and checks a persisted root.
func (b *Root) loadRoot(certPath, keyPath string) (*x509.Certificate, crypto.Signer, error) {
	certPEM, err := os.ReadFile(certPath)
	if err != nil {
		return nil, nil, fmt.Errorf("load root: %w: %w", err, ErrInvalidRoot)
	}
	block, _ := pem.Decode(certPEM)
	if block == nil || block.Type != "CERTIFICATE" {
		return nil, nil, fmt.Errorf("load root: %s: no CERTIFICATE PEM block: %w", certPath, ErrInvalidRoot)
	}
	cert, err := x509.ParseCertificate(block.Bytes)
	if err != nil {
		return nil, nil, fmt.Errorf("load root: %s: parse certificate: %w: %w", certPath, err, ErrInvalidRoot)
	}
	keyPEM, err := os.ReadFile(keyPath)
	if err != nil {
		return nil, nil, fmt.Errorf("load root: %w: %w", err, ErrInvalidRoot)
	}
	if fi, err := os.Stat(keyPath); err == nil && fi.Mode().Perm()&0o077 != 0 {
		b.log.Warn("the root key file is readable by group or others; run chmod 600 on it", "path", keyPath, "mode", fi.Mode().Perm().String())
	}
	// Never put key bytes into an error.
	block, _ = pem.Decode(keyPEM)
	if block == nil || block.Type != "PRIVATE KEY" {
		return nil, nil, fmt.Errorf("load root: %s: no PKCS#8 PRIVATE KEY PEM block: %w", keyPath, ErrInvalidRoot)
	}
	parsed, err := x509.ParsePKCS8PrivateKey(block.Bytes)
	if err != nil {
		return nil, nil, fmt.Errorf("load root: %s: malformed PKCS#8 key: %w", keyPath, ErrInvalidRoot)
	}
	key, ok := parsed.(crypto.Signer)
	if !ok {
		return nil, nil, fmt.Errorf("load root: %s: key of type %T cannot sign: %w", keyPath, parsed, ErrInvalidRoot)
	}
	if pub, ok := key.Public().(interface{ Equal(crypto.PublicKey) bool }); !ok || !pub.Equal(cert.PublicKey) {
		return nil, nil, fmt.Errorf("load root: %s does not hold the key of %s: %w", keyPath, certPath, ErrInvalidRoot)
	}
	if !cert.IsCA || !bytes.Equal(cert.RawIssuer, cert.RawSubject) {
		return nil, nil, fmt.Errorf("load root: %s is not a self-signed CA certificate: %w", certPath, ErrInvalidRoot)
	}
	if now := b.now(); !now.Before(cert.NotAfter) {
		return nil, nil, fmt.Errorf("load root: %s expired at %s; remove both root files to generate a new root (every workload must then trust it): %w",
			certPath, cert.NotAfter.Format(time.RFC3339), ErrInvalidRoot)
	}
	// NewSigningCA checks the rest (key usage, self-signature).
	if _, err := ca.NewSigningCA(cert, key, nil); err != nil {
		return nil, nil, fmt.Errorf("load root: %s: %w: %w", certPath, err, ErrInvalidRoot)
	}
	b.log.Info("loaded root", "dir", b.cfg.Dir, "subject", cert.Subject.String(),
		"serial", fmt.Sprintf("%x", cert.SerialNumber), "notAfter", cert.NotAfter)
	return cert, key, nil
}

func exists(path string) (bool, error) {
	_, err := os.Stat(path)
	switch {
	case err == nil:
		return true, nil
	case errors.Is(err, fs.ErrNotExist):
		return false, nil
	}
	return false, fmt.Errorf("check root file: %w: %w", err, ErrInvalidRoot)
}
