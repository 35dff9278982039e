// Package selfsigned is the backend that is its own root: it generates a
// self-signed root (or reloads one from a directory) and signs leaves in
// process, directly with the root or with an in-memory intermediate that
// Run replaces before it expires.
package selfsigned

import (
	"bytes"
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
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
	"sync/atomic"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/meshca/meshca/ca"
)

// Key types for Config.KeyType.
const (
	KeyECDSAP256 = "ECDSA-P256"
	KeyECDSAP384 = "ECDSA-P384"
	KeyRSA2048   = "RSA-2048"
	KeyRSA3072   = "RSA-3072"
	KeyRSA4096   = "RSA-4096"
)

// Defaults for the zero fields of Config.
const (
	DefaultKeyType                   = KeyECDSAP256
	DefaultRootTTL                   = 10 * 365 * 24 * time.Hour
	DefaultIntermediateTTL           = 30 * 24 * time.Hour
	DefaultIntermediateRenewFraction = 0.5
	DefaultOrganization              = "meshca"
)

// File names in Config.Dir.
const (
	RootCertFile = "root-cert.pem"
	RootKeyFile  = "root-key.pem"
)

// MinIntermediateTTL is the shortest IntermediateTTL Validate accepts.
const MinIntermediateTTL = 10 * time.Minute

const (
	// caBackdate moves CA certificates' NotBefore into the past, so that
	// relying parties whose clocks lag still accept a new intermediate.
	caBackdate = 5 * time.Minute
	// minRotationWait is the least time between intermediate rotations
	// and the wait after a failed one, so that an intermediate squeezed by
	// an expiring root cannot make Run spin.
	minRotationWait = time.Minute
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
	KeyType string `yaml:"keyType"`
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
	// Log receives operational logs. Default: discard.
	Log *slog.Logger `yaml:"-"`
	// Now is the clock. Default time.Now.
	Now func() time.Time `yaml:"-"`
}

// Validate reports every problem with c, each prefixed with its dotted
// configuration path, joined with errors.Join. It does not touch Dir.
func (c Config) Validate() error {
	var errs []error
	bad := func(field, format string, args ...any) {
		errs = append(errs, fmt.Errorf("%s%s: %s", configPath, field, fmt.Sprintf(format, args...)))
	}
	switch c.KeyType {
	case "", KeyECDSAP256, KeyECDSAP384, KeyRSA2048, KeyRSA3072, KeyRSA4096:
	default:
		bad("keyType", "unknown key type %q, want %s, %s, %s, %s or %s", c.KeyType,
			KeyECDSAP256, KeyECDSAP384, KeyRSA2048, KeyRSA3072, KeyRSA4096)
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
	if c.Log == nil {
		c.Log = slog.New(slog.DiscardHandler)
	}
	if c.Now == nil {
		c.Now = time.Now
	}
	return c
}

// Backend is the selfsigned backend. It implements ca.Backend, ca.Inspector
// and ca.Runner, and is safe for concurrent use.
type Backend struct {
	cfg     Config
	root    *x509.Certificate
	rootKey crypto.Signer
	signing atomic.Pointer[ca.SigningCA]
}

// New validates cfg, loads or generates the root and, if
// cfg.Intermediate, mints the first intermediate. Errors about the files in
// cfg.Dir wrap ErrInvalidRoot and name the file.
func New(cfg Config) (*Backend, error) {
	if err := cfg.Validate(); err != nil {
		return nil, fmt.Errorf("selfsigned: %w", err)
	}
	cfg = cfg.withDefaults()
	b := &Backend{cfg: cfg}

	var err error
	if cfg.Dir == "" {
		b.root, b.rootKey, err = b.newRoot()
		if err != nil {
			return nil, fmt.Errorf("selfsigned: %w", err)
		}
		cfg.Log.Info("generated in-memory root; it lasts until restart", "subject", b.root.Subject.String(),
			"serial", fmt.Sprintf("%x", b.root.SerialNumber), "notAfter", b.root.NotAfter)
	} else if b.root, b.rootKey, err = b.loadOrCreateRoot(); err != nil {
		return nil, fmt.Errorf("selfsigned: %w", err)
	}

	if !cfg.Intermediate {
		s, err := ca.NewSigningCA(b.root, b.rootKey, nil)
		if err != nil {
			return nil, fmt.Errorf("selfsigned: %w", err)
		}
		b.signing.Store(s)
		return b, nil
	}
	if err := b.rotate(); err != nil {
		return nil, fmt.Errorf("selfsigned: %w", err)
	}
	return b, nil
}

// Sign issues a leaf with the current signing CA. It does not block.
func (b *Backend) Sign(ctx context.Context, req ca.SignRequest) (*ca.SignResponse, error) {
	if err := ctx.Err(); err != nil {
		return nil, fmt.Errorf("sign: %w", err)
	}
	return b.signing.Load().Sign(req)
}

// TrustBundle returns the root. It never fails.
func (b *Backend) TrustBundle(context.Context) ([]*x509.Certificate, error) {
	return []*x509.Certificate{b.root}, nil
}

// SigningChain returns the certificate leaves are signed with now and the
// certificates above it, root last.
func (b *Backend) SigningChain() []*x509.Certificate {
	return b.signing.Load().Chain()
}

// Run replaces the intermediate at its renewal point (a fraction of its
// lifetime) until ctx is done, then returns nil. Leaves signed by an older
// intermediate keep verifying: they carry it in their chain and the root is
// unchanged. Without an intermediate Run only waits for ctx. A failed
// rotation is logged and retried a minute later; the old intermediate
// stays in use meanwhile.
func (b *Backend) Run(ctx context.Context) error {
	if !b.cfg.Intermediate {
		<-ctx.Done()
		return nil
	}
	timer := time.NewTimer(b.untilRenewal())
	defer timer.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-timer.C:
		}
		wait := b.untilRenewal()
		if wait <= 0 {
			if err := b.rotate(); err != nil {
				b.cfg.Log.Error("rotate intermediate failed; keeping the current one", "err", err)
				wait = minRotationWait
			} else {
				wait = max(b.untilRenewal(), minRotationWait)
			}
		}
		timer.Reset(wait)
	}
}

// untilRenewal returns how long until the current intermediate should be
// replaced.
func (b *Backend) untilRenewal() time.Duration {
	cert := b.signing.Load().Certificate()
	at := ca.RenewAt(cert.NotBefore, cert.NotAfter, b.cfg.IntermediateRenewFraction, 0)
	return at.Sub(b.cfg.Now())
}

// rotate mints a new intermediate and puts it in use.
func (b *Backend) rotate() error {
	key, err := generateKey(b.cfg.KeyType)
	if err != nil {
		return err
	}
	now := b.cfg.Now()
	notAfter := now.Add(b.cfg.IntermediateTTL)
	if notAfter.After(b.root.NotAfter) {
		notAfter = b.root.NotAfter
	}
	tmpl, err := b.caTemplate("intermediate", now, notAfter)
	if err != nil {
		return err
	}
	tmpl.MaxPathLen, tmpl.MaxPathLenZero = 0, true
	cert, err := createCA(tmpl, b.root, key, b.rootKey)
	if err != nil {
		return fmt.Errorf("create intermediate: %w", err)
	}
	s, err := ca.NewSigningCA(cert, key, []*x509.Certificate{b.root})
	if err != nil {
		return fmt.Errorf("create intermediate: %w", err)
	}
	b.signing.Store(s)
	b.cfg.Log.Info("minted intermediate", "serial", fmt.Sprintf("%x", cert.SerialNumber),
		"notAfter", cert.NotAfter, "renewAt", ca.RenewAt(cert.NotBefore, cert.NotAfter, b.cfg.IntermediateRenewFraction, 0))
	return nil
}

// newRoot generates a root key and self-signed certificate.
func (b *Backend) newRoot() (*x509.Certificate, crypto.Signer, error) {
	key, err := generateKey(b.cfg.KeyType)
	if err != nil {
		return nil, nil, err
	}
	now := b.cfg.Now()
	tmpl, err := b.caTemplate("root", now, now.Add(b.cfg.RootTTL))
	if err != nil {
		return nil, nil, err
	}
	// One intermediate may sit below the root, whether or not this run
	// uses one: the setting can change while the persisted root stays.
	tmpl.MaxPathLen = 1
	cert, err := createCA(tmpl, tmpl, key, key)
	if err != nil {
		return nil, nil, fmt.Errorf("create root: %w", err)
	}
	return cert, key, nil
}

// caTemplate returns a CA certificate template named for role, valid from
// a little before now until notAfter, with a random serial.
func (b *Backend) caTemplate(role string, now, notAfter time.Time) (*x509.Certificate, error) {
	serial, err := randomSerial()
	if err != nil {
		return nil, err
	}
	cn := "meshca " + role
	if b.cfg.TrustDomain != "" {
		cn += " for " + b.cfg.TrustDomain
	}
	return &x509.Certificate{
		SerialNumber:          serial,
		Subject:               pkix.Name{CommonName: cn, Organization: []string{b.cfg.Organization}},
		NotBefore:             now.Add(-caBackdate),
		NotAfter:              notAfter,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
		BasicConstraintsValid: true,
		IsCA:                  true,
		// SubjectKeyId is derived from the key by x509.CreateCertificate.
	}, nil
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
func (b *Backend) loadOrCreateRoot() (*x509.Certificate, crypto.Signer, error) {
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
	if err := writeFileAtomic(keyPath, pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: keyDER}), 0o600); err != nil {
		return nil, nil, err
	}
	if err := writeFileAtomic(certPath, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: cert.Raw}), 0o644); err != nil {
		return nil, nil, err
	}
	b.cfg.Log.Info("generated root", "dir", b.cfg.Dir, "subject", cert.Subject.String(),
		"serial", fmt.Sprintf("%x", cert.SerialNumber), "notAfter", cert.NotAfter)
	return cert, key, nil
}

// loadRoot reads and checks a persisted root.
func (b *Backend) loadRoot(certPath, keyPath string) (*x509.Certificate, crypto.Signer, error) {
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
	if now := b.cfg.Now(); !now.Before(cert.NotAfter) {
		return nil, nil, fmt.Errorf("load root: %s expired at %s; remove both root files to generate a new root (every workload must then trust it): %w",
			certPath, cert.NotAfter.Format(time.RFC3339), ErrInvalidRoot)
	}
	// NewSigningCA checks the rest (key usage, self-signature).
	if _, err := ca.NewSigningCA(cert, key, nil); err != nil {
		return nil, nil, fmt.Errorf("load root: %s: %w: %w", certPath, err, ErrInvalidRoot)
	}
	b.cfg.Log.Info("loaded root", "dir", b.cfg.Dir, "subject", cert.Subject.String(),
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

// writeFileAtomic writes data to path so that path holds either its old
// contents or all of data, even across a crash: a synced temporary file in
// the same directory is renamed over it, and the directory is synced.
func writeFileAtomic(path string, data []byte, perm os.FileMode) (err error) {
	dir := filepath.Dir(path)
	f, err := os.CreateTemp(dir, "."+filepath.Base(path)+".tmp-*")
	if err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	defer func() {
		if err != nil {
			f.Close()
			os.Remove(f.Name())
		}
	}()
	if err := f.Chmod(perm); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	if _, err := f.Write(data); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	if err := f.Sync(); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	if err := f.Close(); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	if err := os.Rename(f.Name(), path); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	d, err := os.Open(dir)
	if err != nil {
		return fmt.Errorf("write %s: sync directory: %w", path, err)
	}
	defer d.Close()
	if err := d.Sync(); err != nil {
		return fmt.Errorf("write %s: sync directory: %w", path, err)
	}
	return nil
}

// generateKey returns a new key of a Config.KeyType.
func generateKey(keyType string) (crypto.Signer, error) {
	var k crypto.Signer
	var err error
	switch keyType {
	case KeyECDSAP256:
		k, err = ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	case KeyECDSAP384:
		k, err = ecdsa.GenerateKey(elliptic.P384(), rand.Reader)
	case KeyRSA2048:
		k, err = rsa.GenerateKey(rand.Reader, 2048)
	case KeyRSA3072:
		k, err = rsa.GenerateKey(rand.Reader, 3072)
	case KeyRSA4096:
		k, err = rsa.GenerateKey(rand.Reader, 4096)
	default:
		return nil, fmt.Errorf("generate key: unknown key type %q", keyType)
	}
	if err != nil {
		return nil, fmt.Errorf("generate %s key: %w", keyType, err)
	}
	return k, nil
}

// randomSerial returns a random, positive, non-zero 128-bit serial number.
func randomSerial() (*big.Int, error) {
	var buf [16]byte
	for {
		if _, err := rand.Read(buf[:]); err != nil {
			return nil, fmt.Errorf("generate serial: %w", err)
		}
		if n := new(big.Int).SetBytes(buf[:]); n.Sign() > 0 {
			return n, nil
		}
	}
}
