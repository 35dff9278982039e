package main

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/base64"
	"encoding/json"
	"encoding/pem"
	"flag"
	"math/big"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/meshca/meshca/backends/plugged"
	"github.com/meshca/meshca/sds"
)

// These tests drive meshctl through run, its entry point, with arguments
// and files only.

func runMeshctl(t *testing.T, args ...string) (stdout, stderr string, err error) {
	t.Helper()
	var out, errOut bytes.Buffer
	err = run(t.Context(), args, &out, &errOut)
	return out.String(), errOut.String(), err
}

func writeFile(t *testing.T, name, content string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), name)
	require.NoError(t, os.WriteFile(p, []byte(content), 0o600))
	return p
}

// fakeToken is a JWT-shaped token naming service account ns/sa. meshctl
// only reads its subject; meshca would verify it.
func fakeToken(ns, sa string) string {
	enc := base64.RawURLEncoding.EncodeToString
	return enc([]byte(`{"alg":"ES256"}`)) + "." +
		enc([]byte(`{"sub":"system:serviceaccount:`+ns+`:`+sa+`"}`)) + "." + enc([]byte("sig"))
}

// rootPEM writes a self-signed certificate for --ca-cert.
func rootPEM(t *testing.T) string {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	require.NoError(t, err)
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "test root"},
		NotBefore: time.Now().Add(-time.Minute), NotAfter: time.Now().Add(time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	require.NoError(t, err)
	return writeFile(t, "root-cert.pem", string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})))
}

// closedAddr returns a loopback address nothing listens on.
func closedAddr(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	addr := l.Addr().String()
	require.NoError(t, l.Close())
	return addr
}

func TestRunUsage(t *testing.T) {
	_, stderr, err := runMeshctl(t)
	require.ErrorIs(t, err, flag.ErrHelp, "no command")
	require.Contains(t, stderr, "meshctl issue")

	stdout, _, err := runMeshctl(t, "--help")
	require.NoError(t, err)
	require.Contains(t, stdout, "meshctl dev-token")

	_, _, err = runMeshctl(t, "frobnicate")
	require.ErrorContains(t, err, "frobnicate")
}

func TestRunRefusesBadFlags(t *testing.T) {
	tests := []struct {
		name string
		args []string
		want string // the error (or the flag package's stderr) names it
	}{
		{name: "issue: unknown flag", args: []string{"issue", "--no-such-flag"}, want: "no-such-flag"},
		{name: "dev-token: unknown flag", args: []string{"dev-token", "--no-such-flag"}, want: "no-such-flag"},
		{name: "bench: unknown flag", args: []string{"bench", "--no-such-flag"}, want: "no-such-flag"},
		{name: "bench-sds: unknown flag", args: []string{"bench-sds", "--no-such-flag"}, want: "no-such-flag"},
		{name: "bench-sds: no connections", args: []string{"bench-sds", "--conns", "0"}, want: "--conns"},
		{name: "bench-sds: positional argument", args: []string{"bench-sds", "stray"}, want: "stray"},
		{name: "dev-token: no --sa", args: []string{"dev-token", "--ns", "demo"}, want: "--sa"},
		{name: "dev-token: negative ttl", args: []string{"dev-token", "--ns", "demo", "--sa", "web", "--ttl", "-1h"}, want: "--ttl"},
		{name: "issue: no token", args: []string{"issue"}, want: "--token"},
		{name: "issue: token not a JWT", args: []string{"issue", "--token", "opaque"}, want: "JWT"},
		{name: "issue: unknown key type", args: []string{"issue", "--token", fakeToken("demo", "web"), "--key", "dsa"}, want: "dsa"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, stderr, err := runMeshctl(t, tt.args...)
			require.Error(t, err)
			require.NotErrorIs(t, err, flag.ErrHelp)
			require.Contains(t, err.Error()+stderr, tt.want)
		})
	}
}

// TestDevTokenRefusesNonDevConfig: dev-token mints tokens only for a dev
// configuration; a production one (here: the defaults plus a kubeconfig)
// is refused before any key is looked for.
func TestDevTokenRefusesNonDevConfig(t *testing.T) {
	prod := writeFile(t, "meshca.yaml", "authn:\n  kubeconfig: /etc/meshca/kubeconfig\n")
	stdout, _, err := runMeshctl(t, "dev-token", "--config", prod, "--ns", "demo", "--sa", "web")
	require.ErrorContains(t, err, "not in dev mode")
	require.Empty(t, stdout, "no token printed")

	bad := writeFile(t, "meshca.yaml", "authn:\n  chain: [magic]\n")
	_, _, err = runMeshctl(t, "dev-token", "--config", bad, "--ns", "demo", "--sa", "web")
	require.ErrorContains(t, err, "authn.chain[0]", "a broken config is reported by its dotted path")
}

// TestDevTokenNeedsRunningDevMeshca: in dev mode the key is the one a dev
// meshca created; without it the error says how to get one.
func TestDevTokenNeedsRunningDevMeshca(t *testing.T) {
	t.Chdir(t.TempDir())
	_, _, err := runMeshctl(t, "dev-token", "--ns", "demo", "--sa", "web")
	require.ErrorContains(t, err, "meshca serve --dev")
}

// TestIssueUnreachable: a meshca that is not there is reported as such,
// naming the address, not as a refusal.
func TestIssueUnreachable(t *testing.T) {
	addr := closedAddr(t)
	start := time.Now()
	_, _, err := runMeshctl(t, "issue", "--addr", addr, "--ca-cert", rootPEM(t), "--token", fakeToken("demo", "web"))
	require.ErrorContains(t, err, "could not reach")
	require.ErrorContains(t, err, addr)
	require.NotContains(t, err.Error(), "meshca refused")
	require.Less(t, time.Since(start), 20*time.Second, "fails fast, not at the 30s deadline")

	t.Run("token from a file", func(t *testing.T) {
		tok := writeFile(t, "token", fakeToken("demo", "web")+"\n")
		_, _, err := runMeshctl(t, "issue", "--addr", addr, "--ca-cert", rootPEM(t), "--token", "@"+tok)
		require.ErrorContains(t, err, "could not reach")
	})
	t.Run("missing --ca-cert", func(t *testing.T) {
		_, _, err := runMeshctl(t, "issue", "--addr", addr, "--ca-cert", filepath.Join(t.TempDir(), "absent.pem"), "--token", fakeToken("demo", "web"))
		require.ErrorIs(t, err, os.ErrNotExist)
	})
}

func TestProxiesPrintsTheAdminListing(t *testing.T) {
	na := time.Now().Add(90 * time.Minute)
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		require.Equal(t, "/proxies", r.URL.Path)
		_ = json.NewEncoder(w).Encode([]sds.Proxy{{
			Identity: "spiffe://cluster.local/ns/shop/sa/web", Node: "sidecar~10.0.0.1~web", Mode: sds.ModeCentral, Protocol: "sotw",
			Resources: []string{"ROOTCA", "default"}, Serial: "0123456789abcdef", NotAfter: &na, BundleCurrent: true,
		}})
	}))
	defer srv.Close()
	out, _, err := runMeshctl(t, "proxies", "--admin", srv.URL)
	require.NoError(t, err)
	require.Contains(t, out, "spiffe://cluster.local/ns/shop/sa/web")
	require.Contains(t, out, "central/sotw")
	require.Contains(t, out, "ROOTCA,default")
	require.Contains(t, out, "0123456789ab")
	require.Regexp(t, `1h(29m5\d|30m0)s`, out)
	require.Contains(t, out, "1 proxies")

	bad := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) { http.Error(w, "nope", http.StatusNotFound) }))
	defer bad.Close()
	_, _, err = runMeshctl(t, "proxies", "--admin", bad.URL)
	require.ErrorContains(t, err, "404")
}

// TestBenchSDSInitCA: --init-ca writes a CA the plugged backend loads, and
// the rotation bench-sds makes later is a new root that the backend loads
// too.
func TestBenchSDSInitCA(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "cacerts")
	cfg := writeFile(t, "meshca.yaml", "backend:\n  type: plugged\n  plugged:\n    dir: "+dir+"\n")
	stdout, _, err := runMeshctl(t, "bench-sds", "--config", cfg, "--init-ca")
	require.NoError(t, err)
	require.Contains(t, stdout, dir)
	b, err := plugged.New(plugged.Config{Dir: dir}, plugged.Deps{})
	require.NoError(t, err)
	first := b.Current()
	require.NotEqual(t, first.Signing.Root(), first.Signing.Certificate(), "leaves are signed by an intermediate")

	interPEM, err := writePluggedCA(dir, "rotated")
	require.NoError(t, err)
	b, err = plugged.New(plugged.Config{Dir: dir}, plugged.Deps{})
	require.NoError(t, err)
	next := b.Current()
	require.False(t, next.Roots[0].Equal(first.Roots[0]), "a new root")
	require.Equal(t, string(interPEM), string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: next.Signing.Certificate().Raw})))

	selfSigned := writeFile(t, "meshca.yaml", "backend:\n  type: selfsigned\n")
	_, _, err = runMeshctl(t, "bench-sds", "--config", selfSigned, "--init-ca")
	require.ErrorContains(t, err, "plugged")
}
