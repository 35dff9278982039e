package plugged_test

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/rsa"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"log/slog"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"testing/synctest"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/stretchr/testify/require"

	"github.com/meshca/meshca/backends/backendtest"
	"github.com/meshca/meshca/backends/plugged"
	"github.com/meshca/meshca/ca"
	"github.com/meshca/meshca/ca/catest"
	"github.com/meshca/meshca/ca/reload"
)

var _ ca.Holder = (*plugged.Backend)(nil)

var testID = spiffeid.RequireFromString("spiffe://cluster.local/ns/default/sa/web")

// ca3 is a three-tier PKI: root -> inter -> leafCA, plus a second root.
type ca3 struct {
	root, inter, leafCA, otherRoot *x509.Certificate
	rootKey, interKey, leafCAKey   crypto.Signer
}

func newCA3(t *testing.T) ca3 {
	t.Helper()
	now := time.Now()
	p := ca3{rootKey: catest.Key(t, "P-256"), interKey: catest.Key(t, "P-256"), leafCAKey: catest.Key(t, "P-256")}
	p.root = catest.Issue(t, catest.CATemplate("root", now.Add(-time.Hour), now.Add(365*24*time.Hour)), p.rootKey, nil, nil)
	p.otherRoot = catest.Issue(t, catest.CATemplate("other root", now.Add(-time.Hour), now.Add(365*24*time.Hour)), catest.Key(t, "P-256"), nil, nil)
	p.inter = catest.Issue(t, catest.CATemplate("intermediate", now.Add(-time.Hour), now.Add(90*24*time.Hour)), p.interKey, p.root, p.rootKey)
	p.leafCA = catest.Issue(t, catest.CATemplate("cluster CA", now.Add(-time.Hour), now.Add(30*24*time.Hour)), p.leafCAKey, p.inter, p.interKey)
	return p
}

func certsPEM(certs ...*x509.Certificate) []byte {
	var out []byte
	for _, c := range certs {
		out = append(out, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: c.Raw})...)
	}
	return out
}

func pkcs8PEM(t *testing.T, key crypto.Signer) []byte {
	t.Helper()
	der, err := x509.MarshalPKCS8PrivateKey(key)
	require.NoError(t, err)
	return pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der})
}

// writeFiles makes dir hold exactly files.
func writeFiles(t *testing.T, dir string, files map[string][]byte) {
	t.Helper()
	for _, name := range []string{plugged.CACertFile, plugged.CAKeyFile, plugged.RootCertFile, plugged.CertChainFile} {
		path := filepath.Join(dir, name)
		data, ok := files[name]
		if !ok {
			require.NoError(t, os.RemoveAll(path))
			continue
		}
		require.NoError(t, os.WriteFile(path, data, 0o600))
	}
}

// istioFiles is the usual cacerts layout for a two-tier PKI: ca-cert is
// issued by the root and cert-chain.pem is ca-cert then the root.
func istioFiles(t *testing.T, caCert *x509.Certificate, caKey crypto.Signer, root *x509.Certificate) map[string][]byte {
	t.Helper()
	return map[string][]byte{
		plugged.CACertFile:    certsPEM(caCert),
		plugged.CAKeyFile:     pkcs8PEM(t, caKey),
		plugged.RootCertFile:  certsPEM(root),
		plugged.CertChainFile: certsPEM(caCert, root),
	}
}

func signLeaf(t *testing.T, b held) (*x509.Certificate, []string) {
	t.Helper()
	now := time.Now()
	resp, err := b.Sign(t.Context(), ca.SignRequest{CSR: catest.CSR(t, catest.Key(t, "P-256")), ID: testID, NotBefore: now, NotAfter: now.Add(time.Hour)})
	require.NoError(t, err)
	leaf, err := x509.ParseCertificate(resp.Leaf)
	require.NoError(t, err)
	return leaf, resp.ChainPEM
}

func verifyLeaf(t *testing.T, b held, leaf *x509.Certificate, chainPEM []string) {
	t.Helper()
	bundle, err := b.TrustBundle(t.Context())
	require.NoError(t, err)
	roots := x509.NewCertPool()
	for _, r := range bundle {
		roots.AddCert(r)
	}
	inter := x509.NewCertPool()
	for _, p := range chainPEM {
		require.True(t, inter.AppendCertsFromPEM([]byte(p)))
	}
	_, err = leaf.Verify(x509.VerifyOptions{Roots: roots, Intermediates: inter, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}})
	require.NoError(t, err)
}

type held = backendtest.Held

// newHeld loads a plugged backend from cfg and puts it under a CA.
func newHeld(t *testing.T, cfg plugged.Config, deps plugged.Deps) (held, error) {
	t.Helper()
	b, err := plugged.New(cfg, deps)
	if err != nil {
		return held{}, err
	}
	return backendtest.NewHeld(t, b, ca.Config{Now: deps.Now}), nil
}

func TestConformance(t *testing.T) {
	p := newCA3(t)
	backendtest.Run(t, func(t *testing.T) ca.Backend {
		dir := t.TempDir()
		writeFiles(t, dir, map[string][]byte{
			plugged.CACertFile:    certsPEM(p.leafCA),
			plugged.CAKeyFile:     pkcs8PEM(t, p.leafCAKey),
			plugged.RootCertFile:  certsPEM(p.root),
			plugged.CertChainFile: certsPEM(p.leafCA, p.inter, p.root),
		})
		b, err := plugged.New(plugged.Config{Dir: dir}, plugged.Deps{})
		require.NoError(t, err)
		return b
	})
}

func TestConfigValidate(t *testing.T) {
	for _, tc := range []struct {
		name      string
		cfg       plugged.Config
		wantPaths []string // each must appear in the error; none means valid
	}{
		{name: "dir only", cfg: plugged.Config{Dir: "/etc/cacerts"}},
		{name: "no dir", wantPaths: []string{"backend.plugged.dir: is required"}},
		{name: "negative interval", cfg: plugged.Config{Dir: "/x", ReloadInterval: -time.Second}, wantPaths: []string{"backend.plugged.reloadInterval"}},
		{name: "tiny interval", cfg: plugged.Config{Dir: "/x", ReloadInterval: time.Millisecond}, wantPaths: []string{"backend.plugged.reloadInterval"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := tc.cfg.Validate()
			if len(tc.wantPaths) == 0 {
				require.NoError(t, err)
				return
			}
			for _, p := range tc.wantPaths {
				require.ErrorContains(t, err, p)
			}
		})
	}
}

func TestNew_Layouts(t *testing.T) {
	p := newCA3(t)
	twoTierKey := catest.Key(t, "P-256")
	twoTier := catest.Issue(t, catest.CATemplate("two-tier CA", time.Now().Add(-time.Hour), time.Now().Add(24*time.Hour)), twoTierKey, p.root, p.rootKey)

	rsaKey := catest.Key(t, "RSA-2048").(*rsa.PrivateKey)
	rsaCA := catest.Issue(t, catest.CATemplate("RSA CA", time.Now().Add(-time.Hour), time.Now().Add(24*time.Hour)), rsaKey, p.root, p.rootKey)
	ecKey := twoTierKey.(*ecdsa.PrivateKey)
	sec1, err := x509.MarshalECPrivateKey(ecKey)
	require.NoError(t, err)
	ecParams := "-----BEGIN EC PARAMETERS-----\nBggqhkjOPQMBBw==\n-----END EC PARAMETERS-----\n"

	for _, tc := range []struct {
		name      string
		files     map[string][]byte
		wantChain []*x509.Certificate
		wantRoots []*x509.Certificate
	}{
		{name: "istio two-tier", files: istioFiles(t, twoTier, twoTierKey, p.root),
			wantChain: []*x509.Certificate{twoTier, p.root}, wantRoots: []*x509.Certificate{p.root}},
		{name: "chain is ca-cert only", files: map[string][]byte{
			plugged.CACertFile: certsPEM(twoTier), plugged.CAKeyFile: pkcs8PEM(t, twoTierKey),
			plugged.RootCertFile: certsPEM(p.root), plugged.CertChainFile: certsPEM(twoTier)},
			wantChain: []*x509.Certificate{twoTier, p.root}, wantRoots: []*x509.Certificate{p.root}},
		{name: "no cert-chain.pem", files: map[string][]byte{
			plugged.CACertFile: certsPEM(twoTier), plugged.CAKeyFile: pkcs8PEM(t, twoTierKey), plugged.RootCertFile: certsPEM(p.root)},
			wantChain: []*x509.Certificate{twoTier, p.root}, wantRoots: []*x509.Certificate{p.root}},
		{name: "three tier, chain ends with root", files: map[string][]byte{
			plugged.CACertFile: certsPEM(p.leafCA), plugged.CAKeyFile: pkcs8PEM(t, p.leafCAKey),
			plugged.RootCertFile: certsPEM(p.root), plugged.CertChainFile: certsPEM(p.leafCA, p.inter, p.root)},
			wantChain: []*x509.Certificate{p.leafCA, p.inter, p.root}, wantRoots: []*x509.Certificate{p.root}},
		{name: "three tier, chain without root", files: map[string][]byte{
			plugged.CACertFile: certsPEM(p.leafCA), plugged.CAKeyFile: pkcs8PEM(t, p.leafCAKey),
			plugged.RootCertFile: certsPEM(p.root), plugged.CertChainFile: certsPEM(p.leafCA, p.inter)},
			wantChain: []*x509.Certificate{p.leafCA, p.inter, p.root}, wantRoots: []*x509.Certificate{p.root}},
		{name: "three tier, chain without ca-cert", files: map[string][]byte{
			plugged.CACertFile: certsPEM(p.leafCA), plugged.CAKeyFile: pkcs8PEM(t, p.leafCAKey),
			plugged.RootCertFile: certsPEM(p.root), plugged.CertChainFile: certsPEM(p.inter, p.root)},
			wantChain: []*x509.Certificate{p.leafCA, p.inter, p.root}, wantRoots: []*x509.Certificate{p.root}},
		{name: "ca-cert is the root", files: map[string][]byte{
			plugged.CACertFile: certsPEM(p.root), plugged.CAKeyFile: pkcs8PEM(t, p.rootKey),
			plugged.RootCertFile: certsPEM(p.root), plugged.CertChainFile: certsPEM(p.root)},
			wantChain: []*x509.Certificate{p.root}, wantRoots: []*x509.Certificate{p.root}},
		{name: "two roots, signing root listed second", files: map[string][]byte{
			plugged.CACertFile: certsPEM(twoTier), plugged.CAKeyFile: pkcs8PEM(t, twoTierKey),
			plugged.RootCertFile: certsPEM(p.otherRoot, p.root), plugged.CertChainFile: certsPEM(twoTier, p.root)},
			wantChain: []*x509.Certificate{twoTier, p.root}, wantRoots: []*x509.Certificate{p.root, p.otherRoot}},
		{name: "PKCS#1 RSA key", files: map[string][]byte{
			plugged.CACertFile:   certsPEM(rsaCA),
			plugged.CAKeyFile:    pem.EncodeToMemory(&pem.Block{Type: "RSA PRIVATE KEY", Bytes: x509.MarshalPKCS1PrivateKey(rsaKey)}),
			plugged.RootCertFile: certsPEM(p.root), plugged.CertChainFile: certsPEM(rsaCA, p.root)},
			wantChain: []*x509.Certificate{rsaCA, p.root}, wantRoots: []*x509.Certificate{p.root}},
		{name: "SEC1 EC key after EC PARAMETERS", files: map[string][]byte{
			plugged.CACertFile:   certsPEM(twoTier),
			plugged.CAKeyFile:    append([]byte(ecParams), pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: sec1})...),
			plugged.RootCertFile: certsPEM(p.root), plugged.CertChainFile: certsPEM(twoTier, p.root)},
			wantChain: []*x509.Certificate{twoTier, p.root}, wantRoots: []*x509.Certificate{p.root}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			writeFiles(t, dir, tc.files)
			b, err := newHeld(t, plugged.Config{Dir: dir}, plugged.Deps{})
			require.NoError(t, err)
			require.Equal(t, tc.wantChain, b.SigningChain())
			bundle, err := b.TrustBundle(t.Context())
			require.NoError(t, err)
			require.Equal(t, tc.wantRoots, bundle)

			leaf, chainPEM := signLeaf(t, b)
			require.Len(t, chainPEM, len(tc.wantChain))
			require.NoError(t, leaf.CheckSignatureFrom(tc.wantChain[0]))
			verifyLeaf(t, b, leaf, chainPEM)
		})
	}
}

func TestNew_InvalidFiles(t *testing.T) {
	p := newCA3(t)
	good := func() map[string][]byte { return istioFiles(t, p.inter, p.interKey, p.root) }
	with := func(name string, data []byte) map[string][]byte {
		f := good()
		if data == nil {
			delete(f, name)
		} else {
			f[name] = data
		}
		return f
	}
	notCATmpl := catest.CATemplate("not a CA", time.Now().Add(-time.Hour), time.Now().Add(time.Hour))
	notCATmpl.IsCA = false
	notCATmpl.KeyUsage = x509.KeyUsageDigitalSignature
	notCAKey := catest.Key(t, "P-256")
	notCA := catest.Issue(t, notCATmpl, notCAKey, p.root, p.rootKey)
	expiredKey := catest.Key(t, "P-256")
	expired := catest.Issue(t, catest.CATemplate("expired", time.Now().Add(-2*time.Hour), time.Now().Add(-time.Hour)), expiredKey, p.root, p.rootKey)

	for _, tc := range []struct {
		name     string
		files    map[string][]byte
		wantFile string
	}{
		{name: "key of another certificate", files: with(plugged.CAKeyFile, pkcs8PEM(t, p.leafCAKey)), wantFile: plugged.CAKeyFile},
		{name: "no key file", files: with(plugged.CAKeyFile, nil), wantFile: plugged.CAKeyFile},
		{name: "encrypted key", files: with(plugged.CAKeyFile, pem.EncodeToMemory(&pem.Block{Type: "ENCRYPTED PRIVATE KEY", Bytes: []byte{1}})), wantFile: plugged.CAKeyFile},
		{name: "no root file", files: with(plugged.RootCertFile, nil), wantFile: plugged.RootCertFile},
		{name: "no ca-cert file", files: with(plugged.CACertFile, nil), wantFile: plugged.CACertFile},
		{name: "garbage ca-cert", files: with(plugged.CACertFile, []byte("not PEM")), wantFile: plugged.CACertFile},
		{name: "chain leads to another root", files: with(plugged.RootCertFile, certsPEM(p.otherRoot)), wantFile: plugged.CertChainFile},
		{name: "chain ends with a root not in root-cert.pem", files: with(plugged.CertChainFile, certsPEM(p.inter, p.otherRoot)), wantFile: plugged.CertChainFile},
		{name: "chain out of order", files: map[string][]byte{
			plugged.CACertFile: certsPEM(p.leafCA), plugged.CAKeyFile: pkcs8PEM(t, p.leafCAKey),
			plugged.RootCertFile: certsPEM(p.root), plugged.CertChainFile: certsPEM(p.leafCA, p.root, p.inter)}, wantFile: plugged.CertChainFile},
		{name: "missing intermediate", files: map[string][]byte{
			plugged.CACertFile: certsPEM(p.leafCA), plugged.CAKeyFile: pkcs8PEM(t, p.leafCAKey),
			plugged.RootCertFile: certsPEM(p.root), plugged.CertChainFile: certsPEM(p.leafCA, p.root)}, wantFile: plugged.CertChainFile},
		{name: "ca-cert not a CA", files: istioFiles(t, notCA, notCAKey, p.root), wantFile: plugged.CACertFile},
		{name: "ca-cert expired", files: istioFiles(t, expired, expiredKey, p.root), wantFile: plugged.CACertFile},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			writeFiles(t, dir, tc.files)
			_, err := plugged.New(plugged.Config{Dir: dir}, plugged.Deps{})
			require.ErrorIs(t, err, plugged.ErrInvalidFiles)
			require.ErrorContains(t, err, tc.wantFile)
		})
	}
}

func TestSign_ExpiredSigningCertIsUnavailable(t *testing.T) {
	p := newCA3(t)
	dir := t.TempDir()
	writeFiles(t, dir, istioFiles(t, p.inter, p.interKey, p.root))
	var now time.Time
	b, err := newHeld(t, plugged.Config{Dir: dir}, plugged.Deps{Now: func() time.Time { return now }})
	require.NoError(t, err)
	now = p.inter.NotAfter
	_, err = b.Sign(t.Context(), ca.SignRequest{})
	require.ErrorIs(t, err, ca.ErrBackendUnavailable)
}

// reloads records the outcome of each reload Watch attempts, as its log
// reports them: nil for a set put in use, the error for one refused.
type reloads struct {
	mu   sync.Mutex
	errs []error
}

func (r *reloads) Enabled(context.Context, slog.Level) bool { return true }
func (r *reloads) WithAttrs([]slog.Attr) slog.Handler       { return r }
func (r *reloads) WithGroup(string) slog.Handler            { return r }

func (r *reloads) Handle(_ context.Context, rec slog.Record) error {
	var err error
	rec.Attrs(func(a slog.Attr) bool {
		if e, ok := a.Value.Any().(error); ok && a.Key == "err" {
			err = e
		}
		return true
	})
	r.mu.Lock()
	defer r.mu.Unlock()
	switch {
	case rec.Message == "reloaded changed files":
		r.errs = append(r.errs, nil)
	case err != nil:
		r.errs = append(r.errs, err)
	}
	return nil
}

func (r *reloads) get() []error {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]error(nil), r.errs...)
}

func TestRun_Reloads(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		// Made inside the bubble, so that they are valid at its fake time.
		p := newCA3(t)
		newInterKey := catest.Key(t, "P-256")
		newInter := catest.Issue(t, catest.CATemplate("intermediate 2", time.Now().Add(-time.Minute), time.Now().Add(60*24*time.Hour)), newInterKey, p.root, p.rootKey)
		dir := t.TempDir()
		writeFiles(t, dir, istioFiles(t, p.inter, p.interKey, p.root))
		var got reloads
		metrics := reload.NewMetrics(nil)
		b, err := newHeld(t, plugged.Config{Dir: dir, ReloadInterval: time.Second}, plugged.Deps{Log: slog.New(&got), Reloads: metrics})
		require.NoError(t, err)
		ctx, cancel := context.WithCancel(t.Context())
		done := make(chan error, 1)
		go func() { done <- b.Run(ctx) }()

		// Two checks: one sees a change, the next finds it settled.
		tick := func() {
			t.Helper()
			time.Sleep(2 * time.Second)
			synctest.Wait()
		}

		// Unchanged files: nothing happens.
		tick()
		tick()
		require.Empty(t, got.get())
		oldLeaf, oldChain := signLeaf(t, b)
		require.NoError(t, oldLeaf.CheckSignatureFrom(p.inter))

		// A rotated intermediate is picked up; new leaves come from it and
		// old ones still verify against the unchanged root.
		writeFiles(t, dir, istioFiles(t, newInter, newInterKey, p.root))
		tick()
		require.Equal(t, []error{nil}, got.get())
		require.Equal(t, newInter, b.SigningChain()[0])
		leaf, chain := signLeaf(t, b)
		require.NoError(t, leaf.CheckSignatureFrom(newInter))
		verifyLeaf(t, b, leaf, chain)
		verifyLeaf(t, b, oldLeaf, oldChain)

		// A broken set (key of another certificate) is reported once and
		// the last good set stays in use.
		writeFiles(t, dir, istioFiles(t, p.inter, newInterKey, p.root))
		tick()
		tick()
		errs := got.get()
		require.Len(t, errs, 2)
		require.ErrorIs(t, errs[1], plugged.ErrInvalidFiles)
		require.Equal(t, newInter, b.SigningChain()[0])
		leaf, _ = signLeaf(t, b)
		require.NoError(t, leaf.CheckSignatureFrom(newInter))

		// Missing files likewise.
		require.NoError(t, os.Remove(filepath.Join(dir, plugged.CAKeyFile)))
		tick()
		errs = got.get()
		require.Len(t, errs, 3)
		require.True(t, errors.Is(errs[2], plugged.ErrInvalidFiles))
		require.Equal(t, newInter, b.SigningChain()[0])

		// Fixing the files recovers.
		writeFiles(t, dir, istioFiles(t, p.inter, p.interKey, p.root))
		tick()
		require.Len(t, got.get(), 4)
		require.NoError(t, got.get()[3])
		require.Equal(t, p.inter, b.SigningChain()[0])
		require.Equal(t, 2.0, testutil.ToFloat64(metrics.Reloads.WithLabelValues("backend", "success")))
		require.Equal(t, 2.0, testutil.ToFloat64(metrics.Reloads.WithLabelValues("backend", "failure")))

		cancel()
		synctest.Wait()
		require.NoError(t, <-done)
	})
}

// TestRun_SymlinkSwap mimics a Kubernetes secret volume, whose files are
// symlinks through a "..data" symlink that the kubelet swaps atomically.
func TestRun_SymlinkSwap(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		// Made inside the bubble, so that they are valid at its fake time.
		p := newCA3(t)
		newInterKey := catest.Key(t, "P-256")
		newInter := catest.Issue(t, catest.CATemplate("intermediate 2", time.Now().Add(-time.Minute), time.Now().Add(60*24*time.Hour)), newInterKey, p.root, p.rootKey)
		dir := t.TempDir()
		v1, v2 := filepath.Join(dir, "..v1"), filepath.Join(dir, "..v2")
		require.NoError(t, os.Mkdir(v1, 0o700))
		require.NoError(t, os.Mkdir(v2, 0o700))
		writeFiles(t, v1, istioFiles(t, p.inter, p.interKey, p.root))
		writeFiles(t, v2, istioFiles(t, newInter, newInterKey, p.root))
		require.NoError(t, os.Symlink("..v1", filepath.Join(dir, "..data")))
		for _, name := range []string{plugged.CACertFile, plugged.CAKeyFile, plugged.RootCertFile, plugged.CertChainFile} {
			require.NoError(t, os.Symlink(filepath.Join("..data", name), filepath.Join(dir, name)))
		}

		var got reloads
		b, err := newHeld(t, plugged.Config{Dir: dir}, plugged.Deps{Log: slog.New(&got)})
		require.NoError(t, err)
		require.Equal(t, p.inter, b.SigningChain()[0])
		ctx, cancel := context.WithCancel(t.Context())
		done := make(chan error, 1)
		go func() { done <- b.Run(ctx) }()

		// Swap ..data the way the kubelet does: a new symlink renamed over it.
		require.NoError(t, os.Symlink("..v2", filepath.Join(dir, "..data_tmp")))
		require.NoError(t, os.Rename(filepath.Join(dir, "..data_tmp"), filepath.Join(dir, "..data")))
		time.Sleep(2 * plugged.DefaultReloadInterval)
		synctest.Wait()
		require.Equal(t, []error{nil}, got.get())
		require.Equal(t, newInter, b.SigningChain()[0])

		cancel()
		synctest.Wait()
		require.NoError(t, <-done)
	})
}
