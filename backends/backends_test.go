package backends_test

import (
	"log/slog"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/meshca/meshca/backends"
	"github.com/meshca/meshca/backends/plugged"
	"github.com/meshca/meshca/backends/selfsigned"
	"github.com/meshca/meshca/backends/vault"
	"github.com/meshca/meshca/ca"
)

var upstream = backends.Upstream{BundleRefreshInterval: time.Minute, Timeout: 10 * time.Second, MaxInFlight: 8}

func TestValidate(t *testing.T) {
	for _, tc := range []struct {
		name      string
		cfg       backends.Config
		wantPaths []string // each must appear in the error; none means valid
	}{
		{name: "selfsigned defaults", cfg: backends.Config{Type: backends.TypeSelfSigned}},
		{name: "selfsigned ignores plugged section", cfg: backends.Config{Type: backends.TypeSelfSigned, Plugged: plugged.Config{ReloadInterval: -1}}},
		{name: "selfsigned invalid", cfg: backends.Config{Type: backends.TypeSelfSigned, SelfSigned: selfsigned.Config{KeyType: "DSA"}},
			wantPaths: []string{"backend.selfSigned.keyType"}},
		{name: "plugged", cfg: backends.Config{Type: backends.TypePlugged, Plugged: plugged.Config{Dir: "/etc/cacerts"}}},
		{name: "plugged without dir", cfg: backends.Config{Type: backends.TypePlugged}, wantPaths: []string{"backend.plugged.dir"}},
		{name: "unknown type", cfg: backends.Config{Type: "hsm"}, wantPaths: []string{"backend.type", `"hsm"`, "selfsigned, plugged, vault, awspca"}},
		{name: "vault without address or auth", cfg: backends.Config{Type: backends.TypeVault, Upstream: upstream},
			wantPaths: []string{"backend.vault.address", "backend.vault.auth.method"}},
		{name: "vault", cfg: backends.Config{Type: backends.TypeVault, Upstream: upstream,
			Vault: vault.Config{Address: "https://vault:8200", Auth: vault.Auth{Method: vault.AuthKubernetes, Kubernetes: vault.KubernetesAuth{Role: "meshca"}}}}},
		{name: "vault with unbounded upstream", cfg: backends.Config{Type: backends.TypeVault,
			Vault: vault.Config{Address: "https://vault:8200", Auth: vault.Auth{Method: vault.AuthKubernetes, Kubernetes: vault.KubernetesAuth{Role: "meshca"}}}},
			wantPaths: []string{"backend.upstream.bundleRefreshInterval", "backend.upstream.timeout", "backend.upstream.maxInFlight"}},
		{name: "awspca without CA", cfg: backends.Config{Type: backends.TypeAWSPCA, Upstream: upstream}, wantPaths: []string{"backend.awsPCA.caARN"}},
		{name: "empty type", wantPaths: []string{"backend.type"}},
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

func TestNew(t *testing.T) {
	deps := backends.Deps{Log: slog.New(slog.DiscardHandler)}

	b, err := backends.New(t.Context(), backends.Config{Type: backends.TypeSelfSigned}, deps)
	require.NoError(t, err)
	require.IsType(t, &selfsigned.Root{}, b)
	require.Implements(t, (*ca.Holder)(nil), b)

	cfg := backends.Config{Type: backends.TypeSelfSigned, SelfSigned: selfsigned.Config{Intermediate: true, IntermediateTTL: time.Hour}}
	b, err = backends.New(t.Context(), cfg, deps)
	require.NoError(t, err)
	require.Implements(t, (*ca.Authority)(nil), b)
	require.Equal(t, time.Hour, cfg.IntermediateConfig().TTL)

	b, err = backends.New(t.Context(), backends.Config{Type: backends.TypePlugged, Plugged: plugged.Config{Dir: t.TempDir()}}, deps)
	require.ErrorIs(t, err, plugged.ErrInvalidFiles)
	require.Nil(t, b) // an untyped nil, not a nil *plugged.Backend

	b, err = backends.New(t.Context(), backends.Config{Type: "hsm"}, deps)
	require.ErrorContains(t, err, "backend.type")
	require.Nil(t, b)
}
