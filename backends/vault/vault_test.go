package vault_test

import (
	"context"
	"crypto/x509"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/stretchr/testify/require"

	"github.com/meshca/meshca/backends/backendtest"
	"github.com/meshca/meshca/backends/vault"
	"github.com/meshca/meshca/ca"
	"github.com/meshca/meshca/ca/catest"
	"github.com/meshca/meshca/test/kubeenv"
	"github.com/meshca/meshca/test/vaultenv"
)

const trustDomain = "cluster.local"

var workload = spiffeid.RequireFromString("spiffe://cluster.local/ns/backendtest/sa/workload")

// fixture is a real Vault with a PKI mount, a role and a signer policy.
type fixture struct {
	env *vaultenv.Env
	pki vaultenv.PKI
}

func newFixture(t *testing.T) *fixture {
	t.Helper()
	env := vaultenv.Start(t)
	pki := env.EnablePKI(t, "pki")
	env.WriteRole(t, "pki", "mesh", trustDomain, 48*time.Hour, nil)
	env.WritePolicy(t, "meshca", vaultenv.SignerPolicy("pki"))
	return &fixture{env: env, pki: pki}
}

// tokenFile writes a new token with the signer policy to a file.
func (f *fixture) tokenFile(t *testing.T, ttl time.Duration) (path, accessor string) {
	t.Helper()
	tok, acc := f.env.Token(t, "meshca", ttl)
	path = filepath.Join(t.TempDir(), "token")
	require.NoError(t, os.WriteFile(path, []byte(tok+"\n"), 0o600))
	return path, acc
}

// appRoleConfig enables AppRole with a role holding the signer policy,
// whose tokens live tokenTTL, and returns a Config that logs in with it,
// and the secret ID.
func (f *fixture) appRoleConfig(t *testing.T, mode string, tokenTTL time.Duration) (vault.Config, string) {
	t.Helper()
	roleID, secretID := f.env.EnableAppRole(t, "meshca", "meshca", tokenTTL)
	sf := filepath.Join(t.TempDir(), "secret-id")
	require.NoError(t, os.WriteFile(sf, []byte(secretID), 0o600))
	cfg := f.config(t, mode)
	cfg.Auth = vault.Auth{Method: vault.AuthAppRole, AppRole: vault.AppRoleAuth{RoleID: roleID, SecretIDFile: sf}}
	return cfg, secretID
}

func (f *fixture) config(t *testing.T, mode string) vault.Config {
	t.Helper()
	tf, _ := f.tokenFile(t, time.Hour)
	return vault.Config{Mode: mode, Address: f.env.Addr, Role: "mesh", TrustDomain: trustDomain,
		Auth: vault.Auth{Method: vault.AuthToken, TokenFile: tf}}
}

func newBackend(t *testing.T, cfg vault.Config, deps vault.Deps) ca.Backend {
	t.Helper()
	b, err := vault.New(t.Context(), cfg, deps)
	require.NoError(t, err)
	return b
}

func sign(t *testing.T, c *ca.CA, ctx context.Context) (*ca.SignResponse, error) {
	t.Helper()
	now := time.Now()
	return c.Sign(ctx, ca.SignRequest{CSR: catest.CSR(t, catest.Key(t, "P-256")), ID: workload, NotBefore: now.Add(-30 * time.Second), NotAfter: now.Add(time.Hour)})
}

// TestConformance runs the backend suite against a real Vault, in both
// modes: leaves chain to Vault's root.
func TestConformance(t *testing.T) {
	f := newFixture(t)
	for _, mode := range []string{vault.ModeDirect, vault.ModeIntermediate} {
		t.Run(mode, func(t *testing.T) {
			cfg := f.config(t, mode)
			backendtest.Run(t, func(t *testing.T) ca.Backend { return newBackend(t, cfg, vault.Deps{}) })
		})
	}
	t.Run("intermediate/shape", func(t *testing.T) {
		cfg := f.config(t, vault.ModeIntermediate)
		b := newBackend(t, cfg, vault.Deps{})
		c, err := ca.New(t.Context(), ca.Config{Backend: b, Intermediate: cfg.IntermediateConfig()})
		require.NoError(t, err)
		inter := c.State().Signing.Certificate()
		require.True(t, inter.IsCA)
		require.True(t, inter.MaxPathLenZero && inter.MaxPathLen == 0, "path length 0")
		require.NoError(t, inter.CheckSignatureFrom(f.pki.Root))
		require.Equal(t, []*x509.Certificate{f.pki.Root}, c.State().Roots, "the bundle is Vault's root")
		require.WithinDuration(t, time.Now().Add(vault.DefaultIntermediateTTL), inter.NotAfter, 2*time.Minute)
		require.Contains(t, inter.Subject.CommonName, "meshca intermediate for cluster.local")
	})
	t.Run("direct/verbatim and issuer", func(t *testing.T) {
		for _, cfg := range []vault.Config{
			func() vault.Config { c := f.config(t, vault.ModeDirect); c.SignVerbatim = true; return c }(),
			func() vault.Config { c := f.config(t, vault.ModeDirect); c.Issuer = "root"; return c }(),
		} {
			c, err := ca.New(t.Context(), ca.Config{Backend: newBackend(t, cfg, vault.Deps{})})
			require.NoError(t, err)
			now := time.Now()
			key := catest.Key(t, "P-256")
			csr := catest.CSRDER(t, key, nil, workload.String())
			parsed, err := x509.ParseCertificateRequest(csr)
			require.NoError(t, err)
			resp, err := c.Sign(t.Context(), ca.SignRequest{CSR: parsed, ID: workload, NotBefore: now, NotAfter: now.Add(time.Hour)})
			require.NoError(t, err, "verbatim=%v issuer=%q", cfg.SignVerbatim, cfg.Issuer)
			leaf, err := x509.ParseCertificate(resp.Leaf)
			require.NoError(t, err)
			require.Equal(t, workload.String(), leaf.URIs[0].String())
		}
	})
}

// TestAuthMethods logs in with AppRole and with Kubernetes (against a real
// kube-apiserver) and signs.
func TestAuthMethods(t *testing.T) {
	f := newFixture(t)
	t.Run("approle", func(t *testing.T) {
		cfg, _ := f.appRoleConfig(t, vault.ModeDirect, time.Hour)
		c, err := ca.New(t.Context(), ca.Config{Backend: newBackend(t, cfg, vault.Deps{})})
		require.NoError(t, err)
		_, err = sign(t, c, t.Context())
		require.NoError(t, err)
	})
	t.Run("kubernetes", func(t *testing.T) {
		k := kubeenv.Start(t)
		k.CreateNamespace(t, "vault")
		k.CreateNamespace(t, "istio-system")
		k.CreateServiceAccount(t, "vault", "reviewer")
		k.BindClusterRole(t, "system:auth-delegator", "vault", "reviewer")
		k.CreateServiceAccount(t, "istio-system", "meshca")
		reviewer := k.Token(t, "vault", "reviewer", nil, time.Hour, nil)
		f.env.EnableKubernetes(t, k, reviewer, "meshca", "istio-system", "meshca", "meshca")
		tf := filepath.Join(t.TempDir(), "sa-token")
		require.NoError(t, os.WriteFile(tf, []byte(k.Token(t, "istio-system", "meshca", []string{"vault"}, time.Hour, nil)), 0o600))
		cfg := f.config(t, vault.ModeIntermediate)
		cfg.Auth = vault.Auth{Method: vault.AuthKubernetes, Kubernetes: vault.KubernetesAuth{Role: "meshca", TokenFile: tf}}
		c, err := ca.New(t.Context(), ca.Config{Backend: newBackend(t, cfg, vault.Deps{}), Intermediate: cfg.IntermediateConfig()})
		require.NoError(t, err)
		_, err = sign(t, c, t.Context())
		require.NoError(t, err)

		// A token of another account is refused by Vault's role, and the
		// error says which setting to look at.
		other := filepath.Join(t.TempDir(), "other-token")
		k.CreateServiceAccount(t, "istio-system", "intruder")
		require.NoError(t, os.WriteFile(other, []byte(k.Token(t, "istio-system", "intruder", []string{"vault"}, time.Hour, nil)), 0o600))
		cfg.Auth.Kubernetes.TokenFile = other
		_, err = vault.New(t.Context(), cfg, vault.Deps{})
		require.ErrorContains(t, err, "backend.vault.auth")
		require.NotContains(t, err.Error(), "eyJ", "no token in the error")
	})
}

// TestStartupValidation: each misconfiguration fails New with the setting
// to fix.
func TestStartupValidation(t *testing.T) {
	f := newFixture(t)
	f.env.WriteRole(t, "pki", "other-domain", "example.org", 48*time.Hour, nil)
	f.env.WriteRole(t, "pki", "short", trustDomain, time.Hour, nil)
	badToken := filepath.Join(t.TempDir(), "bad")
	require.NoError(t, os.WriteFile(badToken, []byte("hvs.not-a-token"), 0o600))
	for _, tc := range []struct {
		name   string
		edit   func(*vault.Config)
		maxTTL time.Duration
		want   []string
	}{
		{name: "unreachable", edit: func(c *vault.Config) { c.Address = "http://127.0.0.1:1" }, want: []string{"backend.vault.address", "not reachable"}},
		{name: "bad token", edit: func(c *vault.Config) { c.Auth.TokenFile = badToken }, want: []string{"backend.vault.auth", "does not work"}},
		{name: "missing token file", edit: func(c *vault.Config) { c.Auth.TokenFile = "/nonexistent/token" }, want: []string{"backend.vault.auth.tokenFile"}},
		{name: "no such mount", edit: func(c *vault.Config) { c.Mount = "nope" }, want: []string{"backend.vault.mount"}},
		{name: "no such issuer", edit: func(c *vault.Config) { c.Issuer = "nope" }, want: []string{"backend.vault.issuer"}},
		{name: "no such role", edit: func(c *vault.Config) { c.Role = "nope" }, want: []string{"backend.vault.role", `"nope" does not exist`}},
		{name: "role of another trust domain", edit: func(c *vault.Config) { c.Role = "other-domain" }, want: []string{"backend.vault.role", "does not allow URI SANs", "cluster.local"}},
		{name: "role max_ttl below policy", edit: func(c *vault.Config) { c.Role = "short" }, maxTTL: 24 * time.Hour, want: []string{"backend.vault.role", "max_ttl is 1h0m0s", "maxTTL 24h0m0s"}},
		{name: "intermediate beyond mount", edit: func(c *vault.Config) {
			c.Mode = vault.ModeIntermediate
			c.IntermediateTTL = 100000 * time.Hour
		}, want: []string{"backend.vault.intermediateTTL", "max_lease_ttl"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg := f.config(t, vault.ModeDirect)
			tc.edit(&cfg)
			_, err := vault.New(t.Context(), cfg, vault.Deps{MaxLeafTTL: tc.maxTTL})
			require.Error(t, err)
			for _, w := range tc.want {
				require.ErrorContains(t, err, w)
			}
		})
	}
	t.Run("role max_ttl covers policy", func(t *testing.T) {
		cfg := f.config(t, vault.ModeDirect)
		_, err := vault.New(t.Context(), cfg, vault.Deps{MaxLeafTTL: 24 * time.Hour})
		require.NoError(t, err)
	})
}

// TestTokenRevokedLogsInAgain: a revoked token makes Vault refuse the next
// request; meshca logs in again (AppRole) and the request succeeds. With
// token auth a rotated token file is read again.
func TestTokenRevokedLogsInAgain(t *testing.T) {
	f := newFixture(t)
	t.Run("approle", func(t *testing.T) {
		cfg, _ := f.appRoleConfig(t, vault.ModeDirect, time.Hour)
		reg := prometheus.NewRegistry()
		b := newBackend(t, cfg, vault.Deps{Registerer: reg, MinLoginInterval: time.Millisecond})
		c, err := ca.New(t.Context(), ca.Config{Backend: b})
		require.NoError(t, err)
		_, err = sign(t, c, t.Context())
		require.NoError(t, err)

		// Revoke every token of the role.
		revokeAll(t, f.env, "auth/approle/login")
		_, err = sign(t, c, t.Context())
		require.NoError(t, err, "meshca logs in again after its token was revoked")
		require.Equal(t, 2.0, counter(t, reg, "meshca_vault_logins_total", "approle", "success"))
	})
	t.Run("token file rotated", func(t *testing.T) {
		cfg := f.config(t, vault.ModeDirect)
		tf, acc := f.tokenFile(t, time.Hour)
		cfg.Auth.TokenFile = tf
		b := newBackend(t, cfg, vault.Deps{MinLoginInterval: time.Millisecond})
		c, err := ca.New(t.Context(), ca.Config{Backend: b})
		require.NoError(t, err)
		next, _ := f.env.Token(t, "meshca", time.Hour)
		require.NoError(t, os.WriteFile(tf, []byte(next), 0o600))
		f.env.RevokeAccessor(t, acc)
		_, err = sign(t, c, t.Context())
		require.NoError(t, err)
	})
	t.Run("a refused token does not storm logins", func(t *testing.T) {
		cfg := f.config(t, vault.ModeDirect)
		tf, acc := f.tokenFile(t, time.Hour)
		cfg.Auth.TokenFile = tf
		reg := prometheus.NewRegistry()
		b := newBackend(t, cfg, vault.Deps{Registerer: reg, MinLoginInterval: time.Hour})
		c, err := ca.New(t.Context(), ca.Config{Backend: b})
		require.NoError(t, err)
		f.env.RevokeAccessor(t, acc)
		for range 20 {
			_, err = sign(t, c, t.Context())
			require.ErrorIs(t, err, ca.ErrBackendUnavailable)
		}
		require.Equal(t, 1.0, counter(t, reg, "meshca_vault_logins_total", "token", "success"), "no login within the minimum interval")
	})
}

// TestTokenKeptAlive: a short-lived renewable token is renewed by the
// lifetime watcher, and signing keeps working past its first TTL.
func TestTokenKeptAlive(t *testing.T) {
	f := newFixture(t)
	cfg, _ := f.appRoleConfig(t, vault.ModeDirect, 3*time.Second)
	reg := prometheus.NewRegistry()
	b := newBackend(t, cfg, vault.Deps{Registerer: reg, MinLoginInterval: time.Hour})
	c, err := ca.New(t.Context(), ca.Config{Backend: b})
	require.NoError(t, err)
	ctx, cancel := context.WithCancel(t.Context())
	defer cancel()
	go func() { _ = b.(ca.Runner).Run(ctx) }()
	time.Sleep(7 * time.Second)
	_, err = sign(t, c, t.Context())
	require.NoError(t, err)
	require.GreaterOrEqual(t, counter(t, reg, "meshca_vault_token_renewals_total", "success"), 1.0)
	require.Equal(t, 1.0, counter(t, reg, "meshca_vault_logins_total", "approle", "success"), "renewed, not logged in again")
	require.NoError(t, b.(interface{ Status() error }).Status())
}

// TestLoginRetryBacksOff: when logging in keeps failing, Run retries with
// growing waits instead of spinning, and reports the failure.
func TestLoginRetryBacksOff(t *testing.T) {
	f := newFixture(t)
	cfg, secretID := f.appRoleConfig(t, vault.ModeIntermediate, 2*time.Second)
	reg := prometheus.NewRegistry()
	b := newBackend(t, cfg, vault.Deps{Registerer: reg})
	// The secret ID is destroyed: once the token's max TTL ends, no login
	// works.
	f.env.Write(t, "auth/approle/role/meshca/secret-id/destroy", map[string]any{"secret_id": secretID})
	f.env.Write(t, "auth/approle/role/meshca", map[string]any{"token_policies": []string{"meshca"}, "token_ttl": "2s", "token_max_ttl": "2s"})
	revokeAll(t, f.env, "auth/approle/login")
	ctx, cancel := context.WithCancel(t.Context())
	defer cancel()
	go func() { _ = b.(ca.Runner).Run(ctx) }()
	time.Sleep(6 * time.Second)
	fails := counter(t, reg, "meshca_vault_logins_total", "approle", "failure")
	require.GreaterOrEqual(t, fails, 2.0)
	require.LessOrEqual(t, fails, 4.0, "waits of about 1s, 2s, 4s: no spinning")
	require.Error(t, b.(interface{ Status() error }).Status())
	require.Equal(t, 0.0, gauge(t, reg, "meshca_vault_authenticated"))
}

// TestVaultDown: in intermediate mode, leaves are signed while Vault does
// not answer and the backend shows degraded; in direct mode requests fail
// with Unavailable within the upstream timeout. Both recover when Vault
// answers again.
func TestVaultDown(t *testing.T) {
	f := newFixture(t)
	inter := f.config(t, vault.ModeIntermediate)
	inter.RequestTimeout = time.Second
	direct := f.config(t, vault.ModeDirect)
	direct.RequestTimeout = time.Second
	m := ca.NewMetrics(nil)
	ci, err := ca.New(t.Context(), ca.Config{Backend: newBackend(t, inter, vault.Deps{}), Intermediate: inter.IntermediateConfig(),
		BundleRefresh: 200 * time.Millisecond, UpstreamTimeout: 2 * time.Second, Metrics: m})
	require.NoError(t, err)
	cd, err := ca.New(t.Context(), ca.Config{Backend: newBackend(t, direct, vault.Deps{}), UpstreamTimeout: 2 * time.Second})
	require.NoError(t, err)
	ctx, cancel := context.WithCancel(t.Context())
	defer cancel()
	go func() { _ = ci.Run(ctx) }()

	f.env.Pause(t)
	resumed := false
	defer func() {
		if !resumed {
			f.env.Resume(t)
		}
	}()
	_, err = sign(t, ci, t.Context())
	require.NoError(t, err, "the intermediate signs while Vault is down")
	require.Eventually(t, func() bool { return ci.Health().Degraded }, 10*time.Second, 50*time.Millisecond)
	require.Equal(t, 1.0, testutil.ToFloat64(m.Degraded))

	start := time.Now()
	_, err = sign(t, cd, t.Context())
	require.ErrorIs(t, err, ca.ErrBackendUnavailable)
	require.Less(t, time.Since(start), 5*time.Second, "bounded by the upstream timeout")
	require.True(t, cd.Health().Degraded)

	f.env.Resume(t)
	resumed = true
	require.Eventually(t, func() bool { return !ci.Health().Degraded }, 10*time.Second, 50*time.Millisecond)
	require.Eventually(t, func() bool { _, err := sign(t, cd, t.Context()); return err == nil }, 10*time.Second, 100*time.Millisecond)
	require.False(t, cd.Health().Degraded)
}

// TestBundleFollowsVault: a new default issuer in the mount reaches the
// trust bundle through the refresh, without a restart; the old root stays
// beside it.
func TestBundleFollowsVault(t *testing.T) {
	f := newFixture(t)
	cfg := f.config(t, vault.ModeDirect)
	c, err := ca.New(t.Context(), ca.Config{Backend: newBackend(t, cfg, vault.Deps{}), BundleRefresh: 100 * time.Millisecond})
	require.NoError(t, err)
	ctx, cancel := context.WithCancel(t.Context())
	defer cancel()
	go func() { _ = c.Run(ctx) }()
	f.env.Write(t, "pki/root/rotate/internal", map[string]any{"common_name": "vaultenv root 2", "key_type": "ec", "issuer_name": "next"})
	f.env.Write(t, "pki/config/issuers", map[string]any{"default": "next"})
	require.Eventually(t, func() bool {
		roots := c.State().Roots
		return len(roots) == 2 && roots[0].Subject.CommonName == "vaultenv root 2"
	}, 10*time.Second, 50*time.Millisecond)
	require.True(t, c.State().Roots[1].Equal(f.pki.Root), "the old root stays while leaves under it may live")
	resp, err := sign(t, c, t.Context())
	require.NoError(t, err)
	leaf, err := x509.ParseCertificate(resp.Leaf)
	require.NoError(t, err)
	require.Equal(t, "vaultenv root 2", leaf.Issuer.CommonName)
}

// revokeAll revokes every token created by logins at path.
func revokeAll(t *testing.T, env *vaultenv.Env, path string) {
	t.Helper()
	s, err := env.Client.Logical().List("auth/token/accessors")
	require.NoError(t, err)
	for _, a := range s.Data["keys"].([]any) {
		acc := a.(string)
		info, err := env.Client.Auth().Token().LookupAccessor(acc)
		if err != nil {
			continue
		}
		if p, _ := info.Data["path"].(string); strings.HasPrefix(p, path) {
			env.RevokeAccessor(t, acc)
		}
	}
}

func counter(t *testing.T, reg *prometheus.Registry, name string, labels ...string) float64 {
	t.Helper()
	mfs, err := reg.Gather()
	require.NoError(t, err)
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
	next:
		for _, m := range mf.GetMetric() {
			for i, l := range m.GetLabel() {
				if i >= len(labels) || l.GetValue() != labels[i] {
					continue next
				}
			}
			return m.GetCounter().GetValue()
		}
	}
	return 0
}

func gauge(t *testing.T, reg *prometheus.Registry, name string) float64 {
	t.Helper()
	mfs, err := reg.Gather()
	require.NoError(t, err)
	for _, mf := range mfs {
		if mf.GetName() == name {
			return mf.GetMetric()[0].GetGauge().GetValue()
		}
	}
	return -1
}

// BenchmarkIssue compares a leaf through the CA core in direct mode (Vault
// signs it: one HTTP round trip and Vault's own signing) with intermediate
// mode (signed in process), against a real Vault on loopback, with 8
// requests in flight.
func BenchmarkIssue(b *testing.B) {
	env := vaultenv.Start(b)
	env.EnablePKI(b, "pki")
	env.WriteRole(b, "pki", "mesh", trustDomain, 48*time.Hour, nil)
	env.WritePolicy(b, "meshca", vaultenv.SignerPolicy("pki"))
	tok, _ := env.Token(b, "meshca", time.Hour)
	tf := filepath.Join(b.TempDir(), "token")
	require.NoError(b, os.WriteFile(tf, []byte(tok), 0o600))
	key := catest.Key(b, "P-256")
	csr := catest.CSR(b, key)
	for _, mode := range []string{vault.ModeDirect, vault.ModeIntermediate} {
		b.Run(mode, func(b *testing.B) {
			cfg := vault.Config{Mode: mode, Address: env.Addr, Role: "mesh", TrustDomain: trustDomain,
				Auth: vault.Auth{Method: vault.AuthToken, TokenFile: tf}}
			be, err := vault.New(b.Context(), cfg, vault.Deps{})
			require.NoError(b, err)
			c, err := ca.New(b.Context(), ca.Config{Backend: be, Intermediate: cfg.IntermediateConfig()})
			require.NoError(b, err)
			b.SetParallelism(4) // 8 in flight on 2 cores
			b.ResetTimer()
			b.RunParallel(func(pb *testing.PB) {
				for pb.Next() {
					now := time.Now()
					if _, err := c.Sign(b.Context(), ca.SignRequest{CSR: csr, ID: workload, NotBefore: now, NotAfter: now.Add(time.Hour)}); err != nil {
						b.Error(err)
						return
					}
				}
			})
			b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "certs/s")
		})
	}
}

// TestTLS: meshca reaches a Vault that serves TLS when caCertFile holds
// its CA, and refuses it otherwise (no VAULT_CACERT or VAULT_SKIP_VERIFY
// from the environment is honoured).
func TestTLS(t *testing.T) {
	env := vaultenv.StartWith(t, vaultenv.Options{TLS: true})
	env.EnablePKI(t, "pki")
	env.WriteRole(t, "pki", "mesh", trustDomain, 48*time.Hour, nil)
	env.WritePolicy(t, "meshca", vaultenv.SignerPolicy("pki"))
	tok, _ := env.Token(t, "meshca", time.Hour)
	tf := filepath.Join(t.TempDir(), "token")
	require.NoError(t, os.WriteFile(tf, []byte(tok), 0o600))
	cfg := vault.Config{Mode: vault.ModeDirect, Address: env.Addr, Role: "mesh", TrustDomain: trustDomain,
		Auth: vault.Auth{Method: vault.AuthToken, TokenFile: tf}}

	t.Setenv("VAULT_SKIP_VERIFY", "true")
	t.Setenv("VAULT_CACERT", env.CACertFile)
	_, err := vault.New(t.Context(), cfg, vault.Deps{})
	require.ErrorContains(t, err, "backend.vault.address")
	require.ErrorContains(t, err, "certificate")

	cfg.CACertFile = env.CACertFile
	c, err := ca.New(t.Context(), ca.Config{Backend: newBackend(t, cfg, vault.Deps{})})
	require.NoError(t, err)
	_, err = sign(t, c, t.Context())
	require.NoError(t, err)

	cfg.TLSServerName = "vault.example.org"
	_, err = vault.New(t.Context(), cfg, vault.Deps{})
	require.ErrorContains(t, err, "vault.example.org", "the name checked is tlsServerName")
}

// TestMintRefused: a Vault policy that does not allow signing the
// intermediate fails meshca's start with Vault's refusal and the path,
// not a panic or a hang.
func TestMintRefused(t *testing.T) {
	f := newFixture(t)
	f.env.WritePolicy(t, "leaves-only", `path "pki/sign/*" { capabilities = ["update"] }
path "pki/issuer/+/json" { capabilities = ["read"] }`)
	tok, _ := f.env.Token(t, "leaves-only", time.Hour)
	tf := filepath.Join(t.TempDir(), "token")
	require.NoError(t, os.WriteFile(tf, []byte(tok), 0o600))
	cfg := vault.Config{Address: f.env.Addr, TrustDomain: trustDomain, Auth: vault.Auth{Method: vault.AuthToken, TokenFile: tf}}
	b := newBackend(t, cfg, vault.Deps{MinLoginInterval: time.Hour})
	_, err := ca.New(t.Context(), ca.Config{Backend: b, Intermediate: cfg.IntermediateConfig()})
	require.ErrorContains(t, err, "first intermediate")
	require.ErrorContains(t, err, "pki/root/sign-intermediate")
	require.ErrorContains(t, err, "permission denied")
}
