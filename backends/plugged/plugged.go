// Package plugged is the backend for an operator-provided CA in Istio's
// "plugged-in certificates" layout (the cacerts secret): it signs leaves in
// process with ca-cert.pem and ca-key.pem, and reloads the directory when
// its contents change, so rotating the intermediate needs no restart.
package plugged

import (
	"bytes"
	"context"
	"crypto"
	"crypto/sha256"
	"crypto/x509"
	"encoding/binary"
	"encoding/pem"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"sync/atomic"
	"time"

	"github.com/meshca/meshca/ca"
)

// File names in Config.Dir, as in Istio's cacerts secret.
const (
	// CACertFile is the signing certificate: the first certificate in it
	// is used.
	CACertFile = "ca-cert.pem"
	// CAKeyFile is the signing key: PKCS#8 ("PRIVATE KEY"), PKCS#1 ("RSA
	// PRIVATE KEY") or SEC1 ("EC PRIVATE KEY"), unencrypted. Other PEM
	// blocks, such as OpenSSL's "EC PARAMETERS", are skipped.
	CAKeyFile = "ca-key.pem"
	// RootCertFile holds the trust anchors: one or more self-signed roots,
	// all of which TrustBundle returns (several during a root migration).
	RootCertFile = "root-cert.pem"
	// CertChainFile is the chain above the leaf as Istio writes it:
	// ca-cert first (optional here), then intermediates, then optionally
	// the root. It may be absent when ca-cert is issued by a root directly.
	CertChainFile = "cert-chain.pem"
)

// DefaultReloadInterval is how often the directory is checked when
// Config.ReloadInterval is zero.
const DefaultReloadInterval = 5 * time.Second

// MinReloadInterval is the shortest ReloadInterval Validate accepts.
const MinReloadInterval = 100 * time.Millisecond

// configPath prefixes Validate's error paths.
const configPath = "backend.plugged."

// ErrInvalidFiles is wrapped by every error about the files in Config.Dir:
// missing, unreadable, malformed, mismatched, not chaining to
// root-cert.pem, or expired. The message names the file.
var ErrInvalidFiles = errors.New("invalid plugged CA files")

// Config configures the plugged backend.
type Config struct {
	// Dir holds CACertFile, CAKeyFile, RootCertFile and, optionally,
	// CertChainFile. Required.
	Dir string `yaml:"dir"`
	// ReloadInterval is how often Run reads the files and compares their
	// content hash with the last one seen; a change triggers a reload.
	// Polling contents (not modification times or inotify) also works for
	// Kubernetes secret mounts, which swap a symlink. Default 5s.
	ReloadInterval time.Duration `yaml:"reloadInterval"`
	// OnReload, if set, is called by Run after each attempt to load
	// changed files: with nil when the new set is in use, with the error
	// (wrapping ErrInvalidFiles) when the last good set stays. It must not
	// block; the CA core uses it to count reloads.
	OnReload func(err error) `yaml:"-"`
	// Log receives operational logs. Default: discard. Key material is
	// never logged.
	Log *slog.Logger `yaml:"-"`
	// Now is the clock. Default time.Now.
	Now func() time.Time `yaml:"-"`
}

// Validate reports every problem with c, each prefixed with its dotted
// configuration path, joined with errors.Join. It does not touch Dir.
func (c Config) Validate() error {
	var errs []error
	if c.Dir == "" {
		errs = append(errs, fmt.Errorf("%sdir: is required", configPath))
	}
	if c.ReloadInterval < 0 || (c.ReloadInterval > 0 && c.ReloadInterval < MinReloadInterval) {
		errs = append(errs, fmt.Errorf("%sreloadInterval: must be at least %s (0 means the default, %s), got %s",
			configPath, MinReloadInterval, DefaultReloadInterval, c.ReloadInterval))
	}
	return errors.Join(errs...)
}

// Backend is the plugged backend. It implements ca.Backend, ca.Inspector
// and ca.Runner, and is safe for concurrent use; Run must be called at
// most once.
type Backend struct {
	cfg Config
	cur atomic.Pointer[loaded]
}

// loaded is one valid set of files.
type loaded struct {
	signing *ca.SigningCA
	roots   []*x509.Certificate // the signing chain's root first
	hash    [sha256.Size]byte
}

// New validates cfg and loads the files in cfg.Dir. It fails if they are
// not a valid set; the error wraps ErrInvalidFiles and names the file.
func New(cfg Config) (*Backend, error) {
	if err := cfg.Validate(); err != nil {
		return nil, fmt.Errorf("plugged: %w", err)
	}
	if cfg.ReloadInterval == 0 {
		cfg.ReloadInterval = DefaultReloadInterval
	}
	if cfg.Log == nil {
		cfg.Log = slog.New(slog.DiscardHandler)
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	b := &Backend{cfg: cfg}
	snap := readSnapshot(cfg.Dir)
	l, err := b.load(snap)
	if err != nil {
		return nil, fmt.Errorf("plugged: %w", err)
	}
	b.cur.Store(l)
	b.logLoaded("loaded plugged CA", l)
	return b, nil
}

// Sign issues a leaf with the current signing certificate. Once that has
// expired (and no valid replacement was loaded) it fails with an error
// wrapping ca.ErrBackendUnavailable.
func (b *Backend) Sign(ctx context.Context, req ca.SignRequest) (*ca.SignResponse, error) {
	if err := ctx.Err(); err != nil {
		return nil, fmt.Errorf("sign: %w", err)
	}
	s := b.cur.Load().signing
	if na := s.Certificate().NotAfter; !b.cfg.Now().Before(na) {
		return nil, fmt.Errorf("sign: %s in %s expired at %s: %w", CACertFile, b.cfg.Dir, na.Format(time.RFC3339), ca.ErrBackendUnavailable)
	}
	return s.Sign(req)
}

// TrustBundle returns the roots in root-cert.pem, the one the signing
// certificate chains to first. It never fails.
func (b *Backend) TrustBundle(context.Context) ([]*x509.Certificate, error) {
	roots := b.cur.Load().roots
	return append([]*x509.Certificate(nil), roots...), nil
}

// SigningChain returns ca-cert, the intermediates above it and the root it
// chains to, as loaded last.
func (b *Backend) SigningChain() []*x509.Certificate {
	return b.cur.Load().signing.Chain()
}

// Run checks the files every ReloadInterval until ctx is done, then returns
// nil. When their contents change, a valid new set replaces the current
// one atomically; an invalid one is logged and reported to OnReload, and
// the last good set stays in use. A set that changes while being read is
// left for the next check.
func (b *Backend) Run(ctx context.Context) error {
	seen := b.cur.Load().hash
	ticker := time.NewTicker(b.cfg.ReloadInterval)
	defer ticker.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-ticker.C:
		}
		snap := readSnapshot(b.cfg.Dir)
		if snap.hash == seen {
			continue
		}
		// Read again: a writer replacing files one by one (or a reader
		// racing a secret update) could have shown a torn set.
		if again := readSnapshot(b.cfg.Dir); again.hash != snap.hash {
			continue
		}
		seen = snap.hash
		l, err := b.load(snap)
		if err != nil {
			b.cfg.Log.Error("plugged CA files changed but are invalid; keeping the last good set", "dir", b.cfg.Dir, "err", err)
		} else {
			b.cur.Store(l)
			b.logLoaded("reloaded plugged CA", l)
		}
		if b.cfg.OnReload != nil {
			b.cfg.OnReload(err)
		}
	}
}

func (b *Backend) logLoaded(msg string, l *loaded) {
	c := l.signing.Certificate()
	b.cfg.Log.Info(msg, "dir", b.cfg.Dir, "subject", c.Subject.String(), "serial", fmt.Sprintf("%x", c.SerialNumber),
		"notAfter", c.NotAfter, "root", l.signing.Root().Subject.String(), "roots", len(l.roots))
}

// snapshot is the raw contents of the four files, read once.
type snapshot struct {
	files map[string]fileContent
	hash  [sha256.Size]byte
}

type fileContent struct {
	data []byte
	err  error // fs.ErrNotExist for a missing file
}

// readSnapshot reads the files in dir. Read errors are recorded, not
// returned: they are part of what changed.
func readSnapshot(dir string) snapshot {
	s := snapshot{files: map[string]fileContent{}}
	h := sha256.New()
	for _, name := range []string{CACertFile, CAKeyFile, RootCertFile, CertChainFile} {
		data, err := os.ReadFile(filepath.Join(dir, name))
		s.files[name] = fileContent{data: data, err: err}
		status := "ok"
		if err != nil {
			status = err.Error()
		}
		for _, part := range [][]byte{[]byte(name), []byte(status), data} {
			h.Write(binary.BigEndian.AppendUint64(nil, uint64(len(part))))
			h.Write(part)
		}
	}
	h.Sum(s.hash[:0])
	return s
}

// load parses and checks a snapshot. Errors wrap ErrInvalidFiles and never
// include key material.
func (b *Backend) load(snap snapshot) (*loaded, error) {
	fail := func(file, format string, args ...any) error {
		return fmt.Errorf("load %s: %s: %w", filepath.Join(b.cfg.Dir, file), fmt.Sprintf(format, args...), ErrInvalidFiles)
	}
	read := func(name string, optional bool) ([]byte, error) {
		fc := snap.files[name]
		switch {
		case fc.err == nil:
			return fc.data, nil
		case optional && errors.Is(fc.err, fs.ErrNotExist):
			return nil, nil
		}
		return nil, fmt.Errorf("load %s: %w: %w", name, fc.err, ErrInvalidFiles)
	}

	data, err := read(CACertFile, false)
	if err != nil {
		return nil, err
	}
	caCerts, err := parseCerts(data)
	if err != nil || len(caCerts) == 0 {
		return nil, fail(CACertFile, "want a PEM certificate: %v", orNone(err))
	}
	caCert := caCerts[0]
	if !caCert.BasicConstraintsValid || !caCert.IsCA || caCert.KeyUsage&x509.KeyUsageCertSign == 0 {
		return nil, fail(CACertFile, "certificate %q is not a CA allowed to sign certificates", caCert.Subject)
	}

	data, err = read(CAKeyFile, false)
	if err != nil {
		return nil, err
	}
	key, err := parseKey(data)
	if err != nil {
		return nil, fail(CAKeyFile, "%v", err)
	}
	if pub, ok := key.Public().(interface{ Equal(crypto.PublicKey) bool }); !ok || !pub.Equal(caCert.PublicKey) {
		return nil, fail(CAKeyFile, "key does not match the certificate in %s", CACertFile)
	}

	data, err = read(RootCertFile, false)
	if err != nil {
		return nil, err
	}
	roots, err := parseCerts(data)
	if err != nil || len(roots) == 0 {
		return nil, fail(RootCertFile, "want one or more PEM certificates: %v", orNone(err))
	}

	data, err = read(CertChainFile, true)
	if err != nil {
		return nil, err
	}
	between, err := parseCerts(data)
	if err != nil {
		return nil, fail(CertChainFile, "%v", err)
	}
	// Istio's cert-chain.pem starts with ca-cert and may end with the root.
	if len(between) > 0 && between[0].Equal(caCert) {
		between = between[1:]
	}
	// The anchor is the root in root-cert.pem that the chain leads to:
	// cert-chain.pem's last certificate, or the issuer of its last
	// intermediate (or of ca-cert), or ca-cert itself.
	top := caCert
	if n := len(between); n > 0 {
		top = between[n-1]
	}
	anchor := -1
	if i := indexCert(roots, top); i >= 0 {
		anchor = i
		if top != caCert {
			between = between[:len(between)-1]
		}
	} else {
		for i, r := range roots {
			if bytes.Equal(top.RawIssuer, r.RawSubject) && top.CheckSignatureFrom(r) == nil {
				anchor = i
				break
			}
		}
	}
	if anchor < 0 {
		return nil, fail(CertChainFile, "%s and the chain in %s do not lead to a certificate in %s", CACertFile, CertChainFile, RootCertFile)
	}
	root := roots[anchor]

	now := b.cfg.Now()
	expired := func(file string, c *x509.Certificate) error {
		if now.Before(c.NotAfter) {
			return nil
		}
		return fail(file, "certificate %q expired at %s", c.Subject, c.NotAfter.Format(time.RFC3339))
	}
	if err := expired(CACertFile, caCert); err != nil {
		return nil, err
	}
	for _, c := range between {
		if err := expired(CertChainFile, c); err != nil {
			return nil, err
		}
	}
	if err := expired(RootCertFile, root); err != nil {
		return nil, err
	}

	var chain []*x509.Certificate // above ca-cert, root last; none if ca-cert is the root
	if !root.Equal(caCert) {
		chain = append(between, root)
	}
	s, err := ca.NewSigningCA(caCert, key, chain)
	if err != nil {
		return nil, fail(CertChainFile, "%s does not chain to %s through it: %v", CACertFile, RootCertFile, err)
	}
	ordered := append([]*x509.Certificate{root}, roots[:anchor]...)
	ordered = append(ordered, roots[anchor+1:]...)
	return &loaded{signing: s, roots: ordered, hash: snap.hash}, nil
}

// parseCerts parses every CERTIFICATE block in data.
func parseCerts(data []byte) ([]*x509.Certificate, error) {
	var certs []*x509.Certificate
	for {
		var block *pem.Block
		block, data = pem.Decode(data)
		if block == nil {
			return certs, nil
		}
		if block.Type != "CERTIFICATE" {
			return nil, fmt.Errorf("unexpected PEM block %q", block.Type)
		}
		c, err := x509.ParseCertificate(block.Bytes)
		if err != nil {
			return nil, fmt.Errorf("parse certificate %d: %w", len(certs)+1, err)
		}
		certs = append(certs, c)
	}
}

// parseKey returns the first private key in data. Its errors never
// include key bytes.
func parseKey(data []byte) (crypto.Signer, error) {
	for {
		var block *pem.Block
		block, data = pem.Decode(data)
		if block == nil {
			return nil, errors.New("no PEM private key (PRIVATE KEY, RSA PRIVATE KEY or EC PRIVATE KEY)")
		}
		var k any
		var err error
		switch block.Type {
		case "PRIVATE KEY":
			k, err = x509.ParsePKCS8PrivateKey(block.Bytes)
		case "RSA PRIVATE KEY":
			k, err = x509.ParsePKCS1PrivateKey(block.Bytes)
		case "EC PRIVATE KEY":
			k, err = x509.ParseECPrivateKey(block.Bytes)
		case "ENCRYPTED PRIVATE KEY":
			return nil, errors.New("encrypted private keys are not supported")
		default:
			continue
		}
		if err != nil {
			return nil, fmt.Errorf("malformed %s block", block.Type)
		}
		s, ok := k.(crypto.Signer)
		if !ok {
			return nil, fmt.Errorf("key of type %T cannot sign", k)
		}
		return s, nil
	}
}

func indexCert(certs []*x509.Certificate, c *x509.Certificate) int {
	for i, x := range certs {
		if x.Equal(c) {
			return i
		}
	}
	return -1
}

func orNone(err error) any {
	if err == nil {
		return "none found"
	}
	return err
}
