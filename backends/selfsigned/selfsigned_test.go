package selfsigned_test

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/x509"
	"encoding/pem"
	"log/slog"
	"os"
	"path/filepath"
	"testing"
	"testing/synctest"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/stretchr/testify/require"

	"github.com/meshca/meshca/backends/backendtest"
	"github.com/meshca/meshca/backends/selfsigned"
	"github.com/meshca/meshca/ca"
	"github.com/meshca/meshca/ca/catest"
)

var (
	_ ca.Holder    = (*selfsigned.Root)(nil)
	_ ca.Authority = (*selfsigned.Authority)(nil)
)

type held = backendtest.Held

// newHeld builds the backend cfg describes and puts it under a CA.
func newHeld(t *testing.T, cfg selfsigned.Config, deps selfsigned.Deps) (held, error) {
	t.Helper()
	b, err := selfsigned.New(cfg, deps)
	if err != nil {
		return held{}, err
	}
	return backendtest.NewHeld(t, b, ca.Config{Intermediate: cfg.IntermediateConfig(), Now: deps.Now}), nil
}

var testID = spiffeid.RequireFromString("spiffe://cluster.local/ns/default/sa/web")

func TestConformance(t *testing.T) {
	t.Run("root signs", func(t *testing.T) {
		backendtest.Run(t, func(t *testing.T) ca.Backend {
			b, err := selfsigned.New(selfsigned.Config{}, selfsigned.Deps{})
			require.NoError(t, err)
			return b
		})
	})
	t.Run("intermediate signs", func(t *testing.T) {
		backendtest.Run(t, func(t *testing.T) ca.Backend {
			b, err := selfsigned.New(selfsigned.Config{Intermediate: true, Dir: t.TempDir()}, selfsigned.Deps{})
			require.NoError(t, err)
			return b
		})
	})
}

func TestConfigValidate(t *testing.T) {
	for _, tc := range []struct {
		name      string
		cfg       selfsigned.Config
		wantPaths []string // each must appear in the error; none means valid
	}{
		{name: "zero value"},
		{name: "everything set", cfg: selfsigned.Config{KeyType: ca.KeyRSA3072, RootTTL: 24 * time.Hour, Intermediate: true,
			IntermediateTTL: time.Hour, IntermediateRenewFraction: 0.75, Dir: "/var/lib/meshca", Organization: "acme", TrustDomain: "example.org"}},
		{name: "unknown key type", cfg: selfsigned.Config{KeyType: "Ed448"}, wantPaths: []string{"backend.selfSigned.keyType"}},
		{name: "negative durations", cfg: selfsigned.Config{RootTTL: -1, IntermediateTTL: -1},
			wantPaths: []string{"backend.selfSigned.rootTTL", "backend.selfSigned.intermediateTTL"}},
		{name: "intermediate too short", cfg: selfsigned.Config{IntermediateTTL: time.Minute}, wantPaths: []string{"backend.selfSigned.intermediateTTL"}},
		{name: "intermediate outlives root", cfg: selfsigned.Config{Intermediate: true, RootTTL: time.Hour},
			wantPaths: []string{"backend.selfSigned.intermediateTTL: must be shorter than rootTTL"}},
		{name: "fraction out of range", cfg: selfsigned.Config{IntermediateRenewFraction: 1}, wantPaths: []string{"backend.selfSigned.intermediateRenewFraction"}},
		{name: "negative fraction", cfg: selfsigned.Config{IntermediateRenewFraction: -0.5}, wantPaths: []string{"backend.selfSigned.intermediateRenewFraction"}},
		{name: "bad trust domain", cfg: selfsigned.Config{TrustDomain: "Not A Domain"}, wantPaths: []string{"backend.selfSigned.trustDomain"}},
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
			_, err = selfsigned.New(tc.cfg, selfsigned.Deps{})
			require.Error(t, err)
		})
	}
}

func TestNew_KeyTypesAndSubject(t *testing.T) {
	for _, kt := range ca.CAKeyTypes {
		t.Run(string(kt), func(t *testing.T) {
			b, err := newHeld(t, selfsigned.Config{KeyType: kt, TrustDomain: "cluster.local", Intermediate: kt == ca.KeyECDSAP384}, selfsigned.Deps{})
			require.NoError(t, err)
			bundle, err := b.TrustBundle(t.Context())
			require.NoError(t, err)
			require.Len(t, bundle, 1)
			root := bundle[0]
			require.True(t, root.IsCA)
			require.Equal(t, x509.KeyUsageCertSign|x509.KeyUsageCRLSign, root.KeyUsage)
			require.NotEmpty(t, root.SubjectKeyId)
			require.Equal(t, 1, root.MaxPathLen)
			require.Equal(t, "meshca root for cluster.local", root.Subject.CommonName)
			require.Equal(t, []string{"meshca"}, root.Subject.Organization)
			require.LessOrEqual(t, root.SerialNumber.BitLen(), 128)
			require.InDelta(t, float64(selfsigned.DefaultRootTTL), float64(root.NotAfter.Sub(root.NotBefore)), float64(10*time.Minute))

			chain := b.SigningChain()
			require.Equal(t, root, chain[len(chain)-1])
			if kt == ca.KeyECDSAP384 {
				require.Len(t, chain, 2)
				inter := chain[0]
				require.Equal(t, "meshca intermediate for cluster.local", inter.Subject.CommonName)
				require.True(t, inter.MaxPathLenZero)
				require.Equal(t, root.SubjectKeyId, inter.AuthorityKeyId)
			} else {
				require.Len(t, chain, 1)
			}
		})
	}
}

func TestRun_RotatesIntermediate(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		start := time.Now()
		b, err := newHeld(t, selfsigned.Config{Intermediate: true, IntermediateTTL: 24 * time.Hour}, selfsigned.Deps{})
		require.NoError(t, err)
		roots, err := b.TrustBundle(t.Context())
		require.NoError(t, err)
		first := b.SigningChain()[0]
		oldLeaf := signLeaf(t, b, 20*time.Hour)

		ctx, cancel := context.WithCancel(t.Context())
		done := make(chan error, 1)
		go func() { done <- b.Run(ctx) }()

		// The intermediate is backdated 5m, so half its life ends at
		// start + (24h+5m)/2 - 5m = start + 11h57m30s.
		time.Sleep(11*time.Hour + 57*time.Minute)
		synctest.Wait()
		require.Equal(t, first, b.SigningChain()[0], "rotated early")

		time.Sleep(time.Minute)
		synctest.Wait()
		second := b.SigningChain()[0]
		require.NotEqual(t, first.SerialNumber, second.SerialNumber, "not rotated at the renewal point")
		require.True(t, start.Add(11*time.Hour+57*time.Minute+30*time.Second-5*time.Minute).Equal(second.NotBefore), "NotBefore %s", second.NotBefore)
		require.Equal(t, roots[0], b.SigningChain()[1])

		// Old leaves still chain (the root is unchanged); new ones come from
		// the new intermediate.
		verifyAt(t, oldLeaf, roots, time.Now())
		newLeaf := signLeaf(t, b, time.Hour)
		require.NoError(t, newLeaf.leaf.CheckSignatureFrom(second))
		verifyAt(t, newLeaf, roots, time.Now())

		time.Sleep(12 * time.Hour)
		synctest.Wait()
		require.NotEqual(t, second.SerialNumber, b.SigningChain()[0].SerialNumber, "second rotation missed")

		cancel()
		synctest.Wait()
		require.NoError(t, <-done)
	})
}

func TestRun_WithoutIntermediateWaits(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		b, err := newHeld(t, selfsigned.Config{}, selfsigned.Deps{})
		require.NoError(t, err)
		before := b.SigningChain()
		ctx, cancel := context.WithCancel(t.Context())
		done := make(chan error, 1)
		go func() { done <- b.Run(ctx) }()
		time.Sleep(365 * 24 * time.Hour)
		synctest.Wait()
		require.Equal(t, before, b.SigningChain())
		cancel()
		synctest.Wait()
		require.NoError(t, <-done)
	})
}

func TestPersistence(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "ca")
	b1, err := newHeld(t, selfsigned.Config{Dir: dir, Intermediate: true}, selfsigned.Deps{})
	require.NoError(t, err)
	root1, err := b1.TrustBundle(t.Context())
	require.NoError(t, err)

	st, err := os.Stat(filepath.Join(dir, selfsigned.RootKeyFile))
	require.NoError(t, err)
	require.Equal(t, os.FileMode(0o600), st.Mode().Perm())
	entries, err := os.ReadDir(dir)
	require.NoError(t, err)
	var names []string
	for _, e := range entries {
		names = append(names, e.Name())
	}
	require.ElementsMatch(t, []string{selfsigned.RootCertFile, selfsigned.RootKeyFile}, names, "no temporary files left behind")

	keyPEM, err := os.ReadFile(filepath.Join(dir, selfsigned.RootKeyFile))
	require.NoError(t, err)
	block, _ := pem.Decode(keyPEM)
	require.Equal(t, "PRIVATE KEY", block.Type)
	_, err = x509.ParsePKCS8PrivateKey(block.Bytes)
	require.NoError(t, err)

	// A restart (with another key type configured) reloads the same root
	// and mints a new intermediate from it.
	b2, err := newHeld(t, selfsigned.Config{Dir: dir, Intermediate: true, KeyType: ca.KeyECDSAP384}, selfsigned.Deps{})
	require.NoError(t, err)
	root2, err := b2.TrustBundle(t.Context())
	require.NoError(t, err)
	require.True(t, root1[0].Equal(root2[0]))
	require.NotEqual(t, b1.SigningChain()[0].SerialNumber, b2.SigningChain()[0].SerialNumber)
	verifyAt(t, signLeaf(t, b1, time.Hour), root2, time.Now())
}

// TestLoosePermissionsWarn: a root key others can read loads, with a
// warning that says how to fix it.
func TestLoosePermissionsWarn(t *testing.T) {
	dir := t.TempDir()
	_, err := selfsigned.New(selfsigned.Config{Dir: dir}, selfsigned.Deps{})
	require.NoError(t, err)
	var logs bytes.Buffer
	log := slog.New(slog.NewTextHandler(&logs, nil))
	_, err = selfsigned.New(selfsigned.Config{Dir: dir}, selfsigned.Deps{Log: log})
	require.NoError(t, err)
	require.NotContains(t, logs.String(), "readable by group or others")
	require.NoError(t, os.Chmod(filepath.Join(dir, selfsigned.RootKeyFile), 0o644))
	_, err = selfsigned.New(selfsigned.Config{Dir: dir}, selfsigned.Deps{Log: log})
	require.NoError(t, err)
	require.Contains(t, logs.String(), "readable by group or others; run chmod 600")
	require.NotContains(t, logs.String(), "PRIVATE KEY")
}

func TestPersistence_Errors(t *testing.T) {
	// A valid root to break in various ways.
	good := t.TempDir()
	_, err := selfsigned.New(selfsigned.Config{Dir: good}, selfsigned.Deps{})
	require.NoError(t, err)
	goodCert := readFile(t, good, selfsigned.RootCertFile)
	goodKey := readFile(t, good, selfsigned.RootKeyFile)

	otherKey := catest.Key(t, "P-256").(*ecdsa.PrivateKey)
	otherKeyDER, err := x509.MarshalPKCS8PrivateKey(otherKey)
	require.NoError(t, err)
	otherKeyPEM := pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: otherKeyDER})
	sec1DER, err := x509.MarshalECPrivateKey(otherKey)
	require.NoError(t, err)
	sec1PEM := pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: sec1DER})

	for _, tc := range []struct {
		name     string
		files    map[string][]byte
		now      func() time.Time
		wantFile string
	}{
		{name: "only cert", files: map[string][]byte{selfsigned.RootCertFile: goodCert}, wantFile: selfsigned.RootCertFile},
		{name: "only key", files: map[string][]byte{selfsigned.RootKeyFile: goodKey}, wantFile: selfsigned.RootKeyFile},
		{name: "key of another cert", files: map[string][]byte{selfsigned.RootCertFile: goodCert, selfsigned.RootKeyFile: otherKeyPEM}, wantFile: selfsigned.RootKeyFile},
		{name: "key not PKCS#8", files: map[string][]byte{selfsigned.RootCertFile: goodCert, selfsigned.RootKeyFile: sec1PEM}, wantFile: selfsigned.RootKeyFile},
		{name: "truncated key", files: map[string][]byte{selfsigned.RootCertFile: goodCert, selfsigned.RootKeyFile: goodKey[:len(goodKey)/2]}, wantFile: selfsigned.RootKeyFile},
		{name: "garbage cert", files: map[string][]byte{selfsigned.RootCertFile: []byte("hello"), selfsigned.RootKeyFile: goodKey}, wantFile: selfsigned.RootCertFile},
		{name: "expired root", files: map[string][]byte{selfsigned.RootCertFile: goodCert, selfsigned.RootKeyFile: goodKey},
			now: func() time.Time { return time.Now().Add(11 * 365 * 24 * time.Hour) }, wantFile: selfsigned.RootCertFile},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			for name, data := range tc.files {
				require.NoError(t, os.WriteFile(filepath.Join(dir, name), data, 0o600))
			}
			_, err := selfsigned.New(selfsigned.Config{Dir: dir}, selfsigned.Deps{Now: tc.now})
			require.ErrorIs(t, err, selfsigned.ErrInvalidRoot)
			require.ErrorContains(t, err, tc.wantFile)
			// Nothing was overwritten.
			for name, data := range tc.files {
				require.Equal(t, data, readFile(t, dir, name))
			}
		})
	}
}

type signed struct {
	leaf     *x509.Certificate
	chainPEM []string
}

func signLeaf(t *testing.T, b held, ttl time.Duration) signed {
	t.Helper()
	now := time.Now()
	resp, err := b.Sign(t.Context(), ca.SignRequest{CSR: catest.CSR(t, catest.Key(t, "P-256")), ID: testID, NotBefore: now, NotAfter: now.Add(ttl)})
	require.NoError(t, err)
	leaf, err := x509.ParseCertificate(resp.Leaf)
	require.NoError(t, err)
	return signed{leaf: leaf, chainPEM: resp.ChainPEM}
}

func verifyAt(t *testing.T, s signed, roots []*x509.Certificate, at time.Time) {
	t.Helper()
	rootPool := x509.NewCertPool()
	for _, r := range roots {
		rootPool.AddCert(r)
	}
	inter := x509.NewCertPool()
	for _, p := range s.chainPEM {
		require.True(t, inter.AppendCertsFromPEM([]byte(p)))
	}
	_, err := s.leaf.Verify(x509.VerifyOptions{Roots: rootPool, Intermediates: inter, CurrentTime: at,
		KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}})
	require.NoError(t, err)
}

func readFile(t *testing.T, dir, name string) []byte {
	t.Helper()
	data, err := os.ReadFile(filepath.Join(dir, name))
	require.NoError(t, err)
	return data
}
