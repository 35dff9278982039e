// Package plugged is the backend for an operator-provided CA in Istio's
// "plugged-in certificates" layout (the cacerts secret). It is a ca.Holder:
// the CA core signs leaves in process with ca-cert.pem and ca-key.pem, and
// Watch reloads the directory when its contents change, so rotating the
// intermediate (or adding a root) needs no restart.
package plugged

import (
	"bytes"
	"context"
	"crypto"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"path/filepath"
	"time"

	"github.com/meshca/meshca/ca"
	"github.com/meshca/meshca/ca/reload"
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
	// ReloadInterval is how often Watch reads the files. A change is
	// loaded once two checks in a row read the same new contents (package
	// reload). Default 5s.
	ReloadInterval time.Duration `yaml:"reloadInterval"`
}

// Deps are the runtime inputs of the backend, apart from its configuration.
type Deps struct {
	// Log receives operational logs. Default: discard. Key material is
	// never logged.
	Log *slog.Logger
	// Now is the clock. Default time.Now.
	Now func() time.Time
	// Reloads counts reloads as what="backend". Optional.
	Reloads *reload.Metrics
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

// Backend is the plugged backend, a ca.Holder. Watch must be called at
// most once.
type Backend struct {
	cfg  Config
	deps Deps
	// first is the set New loaded, and baseline its file contents.
	first    ca.State
	baseline reload.Snapshot
}

// New validates cfg and loads the files in cfg.Dir. It fails if they are
// not a valid set; the error wraps ErrInvalidFiles and names the file.
func New(cfg Config, deps Deps) (*Backend, error) {
	if err := cfg.Validate(); err != nil {
		return nil, fmt.Errorf("plugged: %w", err)
	}
	if cfg.ReloadInterval == 0 {
		cfg.ReloadInterval = DefaultReloadInterval
	}
	if deps.Log == nil {
		deps.Log = slog.New(slog.DiscardHandler)
	}
	if deps.Now == nil {
		deps.Now = time.Now
	}
	b := &Backend{cfg: cfg, deps: deps}
	b.baseline = reload.Read(b.paths()...)
	st, err := b.load(b.baseline)
	if err != nil {
		return nil, fmt.Errorf("plugged: %w", err)
	}
	b.first = st
	b.logLoaded("loaded plugged CA", st)
	return b, nil
}

// paths are the files, in a fixed order.
func (b *Backend) paths() []string {
	var ps []string
	for _, name := range []string{CACertFile, CAKeyFile, RootCertFile, CertChainFile} {
		ps = append(ps, filepath.Join(b.cfg.Dir, name))
	}
	return ps
}

// Current implements ca.Holder: the set New loaded. Later sets reach the
// CA through Watch.
func (b *Backend) Current() ca.State { return b.first }

// Watch implements ca.Holder. It checks the files every ReloadInterval
// until ctx is done, then returns nil. A settled, valid new set is
// published; an invalid one is logged and counted, and the last good set
// stays in use. An expired set is invalid: meshca keeps signing with the
// last good one until it, too, expires (then signing fails as
// Unavailable).
func (b *Backend) Watch(ctx context.Context, publish func(ca.State)) error {
	p := &reload.Poller{
		Paths: b.paths(), Interval: b.cfg.ReloadInterval, What: "backend",
		Metrics: b.deps.Reloads, Log: b.deps.Log,
		Apply: func(snap reload.Snapshot) error {
			st, err := b.load(snap)
			if err != nil {
				return err
			}
			publish(st)
			b.logLoaded("reloaded plugged CA", st)
			return nil
		},
	}
	return p.Run(ctx, b.baseline)
}

func (b *Backend) logLoaded(msg string, st ca.State) {
	c := st.Signing.Certificate()
	b.deps.Log.Info(msg, "dir", b.cfg.Dir, "subject", c.Subject.String(), "serial", fmt.Sprintf("%x", c.SerialNumber),
		"notAfter", c.NotAfter, "root", st.Signing.Root().Subject.String(), "roots", len(st.Roots))
}

// load parses and checks a snapshot. Errors wrap ErrInvalidFiles and never
// include key material.
func (b *Backend) load(snap reload.Snapshot) (ca.State, error) {
	fail := func(file, format string, args ...any) error {
		return fmt.Errorf("load %s: %s: %w", filepath.Join(b.cfg.Dir, file), fmt.Sprintf(format, args...), ErrInvalidFiles)
	}
	read := func(name string, optional bool) ([]byte, error) {
		fc := snap.Files[filepath.Join(b.cfg.Dir, name)]
		switch {
		case fc.Err == nil:
			return fc.Data, nil
		case optional && errors.Is(fc.Err, fs.ErrNotExist):
			return nil, nil
		}
		return nil, fmt.Errorf("load %s: %w: %w", name, fc.Err, ErrInvalidFiles)
	}

	data, err := read(CACertFile, false)
	if err != nil {
		return ca.State{}, err
	}
	caCerts, err := parseCerts(data)
	if err != nil || len(caCerts) == 0 {
		return ca.State{}, fail(CACertFile, "want a PEM certificate: %v", orNone(err))
	}
	caCert := caCerts[0]
	if !caCert.BasicConstraintsValid || !caCert.IsCA || caCert.KeyUsage&x509.KeyUsageCertSign == 0 {
		return ca.State{}, fail(CACertFile, "certificate %q is not a CA allowed to sign certificates", caCert.Subject)
	}

	data, err = read(CAKeyFile, false)
	if err != nil {
		return ca.State{}, err
	}
	key, err := parseKey(data)
	if err != nil {
		return ca.State{}, fail(CAKeyFile, "%v", err)
	}
	if pub, ok := key.Public().(interface{ Equal(crypto.PublicKey) bool }); !ok || !pub.Equal(caCert.PublicKey) {
		return ca.State{}, fail(CAKeyFile, "key does not match the certificate in %s", CACertFile)
	}

	data, err = read(RootCertFile, false)
	if err != nil {
		return ca.State{}, err
	}
	roots, err := parseCerts(data)
	if err != nil || len(roots) == 0 {
		return ca.State{}, fail(RootCertFile, "want one or more PEM certificates: %v", orNone(err))
	}

	data, err = read(CertChainFile, true)
	if err != nil {
		return ca.State{}, err
	}
	between, err := parseCerts(data)
	if err != nil {
		return ca.State{}, fail(CertChainFile, "%v", err)
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
		return ca.State{}, fail(CertChainFile, "%s and the chain in %s do not lead to a certificate in %s", CACertFile, CertChainFile, RootCertFile)
	}
	root := roots[anchor]

	now := b.deps.Now()
	expired := func(file string, c *x509.Certificate) error {
		if now.Before(c.NotAfter) {
			return nil
		}
		return fail(file, "certificate %q expired at %s", c.Subject, c.NotAfter.Format(time.RFC3339))
	}
	if err := expired(CACertFile, caCert); err != nil {
		return ca.State{}, err
	}
	for _, c := range between {
		if err := expired(CertChainFile, c); err != nil {
			return ca.State{}, err
		}
	}
	if err := expired(RootCertFile, root); err != nil {
		return ca.State{}, err
	}

	var chain []*x509.Certificate // above ca-cert, root last; none if ca-cert is the root
	if !root.Equal(caCert) {
		chain = append(between, root)
	}
	s, err := ca.NewSigningCA(caCert, key, chain)
	if err != nil {
		return ca.State{}, fail(CertChainFile, "%s does not chain to %s through it: %v", CACertFile, RootCertFile, err)
	}
	ordered := append([]*x509.Certificate{root}, roots[:anchor]...)
	ordered = append(ordered, roots[anchor+1:]...)
	return ca.State{Signing: s, Roots: ordered}, nil
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
