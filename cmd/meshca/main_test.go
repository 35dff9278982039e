package main

import (
	"bytes"
	"context"
	"flag"
	"os"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/require"
)

// These tests drive meshca through run, its entry point, with arguments
// and files only: what an operator types and writes.

// runMeshca runs meshca with args in a fresh working directory, with a
// context that is already cancelled, so that a command that wrongly went
// on to serve would stop at once instead of hanging the test.
func runMeshca(t *testing.T, args ...string) (stdout, stderr string, err error) {
	t.Helper()
	t.Chdir(t.TempDir())
	ctx, cancel := context.WithCancel(t.Context())
	cancel()
	var out, errOut bytes.Buffer
	err = run(ctx, args, &out, &errOut)
	return out.String(), errOut.String(), err
}

// writeFile writes content to name in a new temporary directory and
// returns its path.
func writeFile(t *testing.T, name, content string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), name)
	require.NoError(t, os.WriteFile(p, []byte(content), 0o600))
	return p
}

func TestRunUsage(t *testing.T) {
	_, stderr, err := runMeshca(t)
	require.ErrorIs(t, err, flag.ErrHelp, "no command")
	require.Contains(t, stderr, "meshca serve")

	stdout, _, err := runMeshca(t, "help")
	require.NoError(t, err)
	require.Contains(t, stdout, "meshca config check")

	_, _, err = runMeshca(t, "frobnicate")
	require.ErrorContains(t, err, "frobnicate")
}

func TestRunRefusesBadFlagsAndArguments(t *testing.T) {
	tests := []struct {
		name string
		args []string
		want string // the error names it
	}{
		{name: "serve: unknown flag", args: []string{"serve", "--dev", "--no-such-flag"}, want: "no-such-flag"},
		{name: "config check: unknown flag", args: []string{"config", "check", "--no-such-flag"}, want: "no-such-flag"},
		{name: "policy explain: unknown flag", args: []string{"policy", "explain", "--no-such-flag", "a/b"}, want: "no-such-flag"},
		// Ports and cwd are private, so a serve that wrongly ignored the
		// argument would not disturb anything; the cancelled context stops it.
		{name: "serve: positional argument", args: []string{"serve", "--dev", "--grpc-address", "127.0.0.1:0", "--admin-address", "127.0.0.1:0", "stray-arg"}, want: "stray-arg"},
		{name: "serve: --config and --dev", args: []string{"serve", "--dev", "--config", "meshca.yaml"}, want: "--dev"},
		{name: "serve: neither --config nor --dev", args: []string{"serve"}, want: "--config"},
		{name: "config: unknown subcommand", args: []string{"config", "lint"}, want: "config"},
		{name: "config check: no --config", args: []string{"config", "check"}, want: "--config"},
		{name: "policy: unknown subcommand", args: []string{"policy", "show"}, want: "policy"},
		{name: "policy explain: not NS/SA", args: []string{"policy", "explain", "--dev", "just-a-name"}, want: "just-a-name"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, stderr, err := runMeshca(t, tt.args...)
			require.Error(t, err)
			require.NotErrorIs(t, err, flag.ErrHelp)
			// The flag package reports an unknown flag on stderr too.
			require.Contains(t, err.Error()+stderr, tt.want)
		})
	}
}

func TestConfigCheck(t *testing.T) {
	tests := []struct {
		name  string
		yaml  string
		paths []string // dotted paths the error must name; none for a valid file
	}{
		{name: "minimal", yaml: "authn:\n  kubeconfig: /etc/meshca/kubeconfig\n"},
		{
			name: "jwt with a JWKS file",
			yaml: "authn:\n  chain: [clientcert, jwt]\n  issuer: https://kubernetes.default.svc\n  jwt:\n    jwksFile: /etc/meshca/jwks.json\n",
		},
		{name: "unknown key", yaml: "authn:\n  jwt:\n    jwksFil: /x\n", paths: []string{"authn.jwt.jwksFil"}},
		{name: "bad duration", yaml: "server:\n  servingTTL: 1 day\n", paths: []string{"server.servingTTL"}},
		{
			name:  "every problem at once",
			yaml:  "server:\n  servingTTL: 1m\nauthn:\n  chain: [jwt, magic]\nlog:\n  level: loud\n",
			paths: []string{"server.servingTTL", "authn.chain[1]", "log.level"},
		},
		{name: "not YAML", yaml: "authn: [\n", paths: []string{}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			path := writeFile(t, "meshca.yaml", tt.yaml)
			stdout, _, err := runMeshca(t, "config", "check", "--config", path)
			if tt.paths == nil {
				require.NoError(t, err)
				require.Contains(t, stdout, "valid")
				return
			}
			require.Error(t, err)
			require.ErrorContains(t, err, path, "the error names the file")
			for _, p := range tt.paths {
				require.ErrorContains(t, err, p)
			}
		})
	}

	t.Run("missing file", func(t *testing.T) {
		_, _, err := runMeshca(t, "config", "check", "--config", filepath.Join(t.TempDir(), "absent.yaml"))
		require.ErrorIs(t, err, os.ErrNotExist)
	})

	t.Run("policy file it names", func(t *testing.T) {
		pol := writeFile(t, "policy.yaml", "default:\n  maxTTL: 1m\n  defaultTTL: 2m\n")
		path := writeFile(t, "meshca.yaml", "authn:\n  kubeconfig: /k\npolicy:\n  file: "+pol+"\n")
		_, _, err := runMeshca(t, "config", "check", "--config", path)
		require.ErrorContains(t, err, pol)
	})

	t.Run("intermediate too short for the policy", func(t *testing.T) {
		pol := writeFile(t, "policy.yaml", "default:\n  maxTTL: 72h\n")
		path := writeFile(t, "meshca.yaml", "authn:\n  kubeconfig: /k\npolicy:\n  file: "+pol+
			"\nbackend:\n  type: vault\n  vault:\n    address: https://vault:8200\n    intermediateTTL: 168h\n    auth:\n      method: approle\n      appRole: {roleID: r, secretIDFile: /s}\n")
		_, _, err := runMeshca(t, "config", "check", "--config", path)
		require.ErrorContains(t, err, "backend.vault.intermediateTTL (168h0m0s) must be at least 3 × policy maxTTL (72h0m0s, from default)")
	})
}

// TestConfigDevChecks: what `config dev` prints is a configuration that
// `config check` accepts, so an operator can start from it.
func TestConfigDevChecks(t *testing.T) {
	stdout, _, err := runMeshca(t, "config", "dev")
	require.NoError(t, err)
	require.Contains(t, stdout, "dev:")
	path := writeFile(t, "dev.yaml", stdout)
	out, _, err := runMeshca(t, "config", "check", "--config", path)
	require.NoError(t, err)
	require.Contains(t, out, "valid")
}
