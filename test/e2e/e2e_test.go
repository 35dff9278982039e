package e2e

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rsa"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	jose "github.com/go-jose/go-jose/v4"
	"github.com/go-jose/go-jose/v4/jwt"
	"github.com/stretchr/testify/require"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/status"
	pb "istio.io/api/security/v1alpha1"

	"github.com/meshca/meshca/ca/catest"
	"github.com/meshca/meshca/test/pilotagent"
)

// authnModes are the two ways meshca checks a token against the cluster.
var authnModes = []struct {
	name string
	yaml string
}{
	{"jwt", "authn:\n  chain: [clientcert, jwt]\n  kubeconfig: %s\n"},
	{"tokenreview", "authn:\n  chain: [clientcert, tokenreview]\n  kubeconfig: %s\n"},
}

// TestPilotAgentGetsCertificate points Istio's real node agent at meshca
// (CA_ADDR) with a pod-bound token from the real TokenRequest API.
func TestPilotAgentGetsCertificate(t *testing.T) {
	for _, mode := range authnModes {
		for _, useECDSA := range []bool{false, true} {
			t.Run(fmt.Sprintf("%s/ecdsa=%v", mode.name, useECDSA), func(t *testing.T) {
				m := startMeshca(t, fmt.Sprintf(mode.yaml, meshcaKubeconfig(t)))
				ns, sa, podName := uniqueNS("agent-"+mode.name), fmt.Sprintf("web-%v", useECDSA), fmt.Sprintf("web-%v-0", useECDSA)
				env.CreateServiceAccount(t, ns, sa)
				pod := env.CreatePod(t, ns, podName, sa)
				tok := env.Token(t, ns, sa, []string{"istio-ca"}, time.Hour, pod)

				agent := pilotagent.Start(t, pilotagent.Config{
					CAAddr: m.grpcAddr, RootCertPEM: m.rootPEM, Token: tok,
					Namespace: ns, ServiceAccount: sa, PodName: podName,
					SecretTTL: 2 * time.Hour, ECDSA: useECDSA,
				})
				chainPEM, _, rootPEM := agent.WaitForCerts(t, 30*time.Second)
				certs := parseCerts(t, []string{string(chainPEM)})
				require.GreaterOrEqual(t, len(certs), 2)
				leaf := certs[0]
				require.Len(t, leaf.URIs, 1)
				require.Equal(t, spiffeID(ns, sa), leaf.URIs[0].String())
				require.InDelta(t, (2*time.Hour + 30*time.Second).Seconds(), leaf.NotAfter.Sub(leaf.NotBefore).Seconds(), 5, "SECRET_TTL honoured")
				// The leaf carries the key the agent generated:
				// ECC_SIGNATURE_ALGORITHM=ECDSA means P-256, else RSA-2048.
				if useECDSA {
					pub, ok := leaf.PublicKey.(*ecdsa.PublicKey)
					require.True(t, ok, "leaf key is %T, want ECDSA", leaf.PublicKey)
					require.Equal(t, elliptic.P256(), pub.Curve)
				} else {
					pub, ok := leaf.PublicKey.(*rsa.PublicKey)
					require.True(t, ok, "leaf key is %T, want RSA", leaf.PublicKey)
					require.Equal(t, 2048, pub.N.BitLen())
				}
				require.Equal(t, strings.TrimSpace(string(m.rootPEM)), strings.TrimSpace(string(rootPEM)))
				inter := x509.NewCertPool()
				for _, c := range certs[1:] {
					inter.AddCert(c)
				}
				_, err := leaf.Verify(x509.VerifyOptions{Roots: m.roots, Intermediates: inter, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}})
				require.NoError(t, err)

				issued := m.audit(t)
				require.NotEmpty(t, issued)
				last := issued[len(issued)-1]
				require.Equal(t, "issued", last["result"])
				require.Equal(t, mode.name, last["authenticator"])
				require.Equal(t, ns+"/"+podName, last["pod"], "the pod the token is bound to")
				require.NotContains(t, readFile(t, m.auditPath), tok)
				require.NotContains(t, readFile(t, m.logPath), tok)
			})
		}
	}
}

func readFile(t *testing.T, path string) string {
	t.Helper()
	b, err := os.ReadFile(path)
	require.NoError(t, err)
	return string(b)
}

// TestBadCredentials walks the bad-input table for tokens, against
// both authentication modes, with real cluster tokens.
func TestBadCredentials(t *testing.T) {
	for _, mode := range authnModes {
		t.Run(mode.name, func(t *testing.T) {
			m := startMeshca(t, fmt.Sprintf(mode.yaml, meshcaKubeconfig(t)))
			client := m.client(t)
			ns := uniqueNS("bad-" + mode.name)
			env.CreateServiceAccount(t, ns, "web")
			key := catest.Key(t, "P-256")
			goodCSR := csrPEM(t, key, spiffeID(ns, "web"))
			good := env.Token(t, ns, "web", []string{"istio-ca"}, time.Hour, nil)

			// meshca learns of service accounts through a watch: wait until it
			// has seen "web" (the first good request succeeds), and until it
			// has seen "gone" deleted.
			require.Eventually(t, func() bool {
				_, err := client.CreateCertificate(withToken(t.Context(), good), &pb.IstioCertificateRequest{Csr: goodCSR})
				return err == nil
			}, 20*time.Second, 50*time.Millisecond)
			env.CreateServiceAccount(t, ns, "gone")
			goneTok := env.Token(t, ns, "gone", []string{"istio-ca"}, time.Hour, nil)
			goneCSR := csrPEM(t, key, spiffeID(ns, "gone"))
			env.DeleteServiceAccount(t, ns, "gone")
			require.Eventually(t, func() bool {
				_, err := client.CreateCertificate(withToken(t.Context(), goneTok), &pb.IstioCertificateRequest{Csr: goneCSR})
				return status.Code(err) == codes.Unauthenticated
			}, 20*time.Second, 50*time.Millisecond)
			okBefore := m.metric(t, `meshca_requests_total{code="OK",service="istio"}`)

			now := time.Now()
			kubeClaim := map[string]any{"kubernetes.io": map[string]any{
				"namespace": ns, "serviceaccount": map[string]any{"name": "web", "uid": "00000000-0000-0000-0000-000000000000"},
			}}
			expired := forgeClusterToken(t, jwt.Claims{
				Issuer: env.Issuer, Subject: "system:serviceaccount:" + ns + ":web", Audience: jwt.Audience{"istio-ca"},
				IssuedAt: jwt.NewNumericDate(now.Add(-2 * time.Hour)), NotBefore: jwt.NewNumericDate(now.Add(-2 * time.Hour)),
				Expiry: jwt.NewNumericDate(now.Add(-time.Hour)),
			}, kubeClaim)
			otherIssuer := forgeClusterToken(t, jwt.Claims{
				Issuer: "https://evil.example", Subject: "system:serviceaccount:" + ns + ":web", Audience: jwt.Audience{"istio-ca"},
				IssuedAt: jwt.NewNumericDate(now), NotBefore: jwt.NewNumericDate(now), Expiry: jwt.NewNumericDate(now.Add(time.Hour)),
			}, kubeClaim)

			tests := []struct {
				name       string
				token      string
				csr        string
				wantCode   codes.Code
				wantReason string // the audit line's reason; "a|b" accepts either
			}{
				{"no token", "", goodCSR, codes.Unauthenticated, "no_credentials"},
				{"malformed token", "not.a.jwt", goodCSR, codes.Unauthenticated, "malformed"},
				{"expired token", expired, goodCSR, codes.Unauthenticated, "expired"},
				{"wrong audience", env.Token(t, ns, "web", []string{"some-other-api"}, time.Hour, nil), goodCSR, codes.Unauthenticated, "wrong_audience"},
				{"wrong issuer", otherIssuer, goodCSR, codes.Unauthenticated, "unknown_issuer"},
				{"deleted service account", goneTok, goneCSR, codes.Unauthenticated, map[string]string{
					"jwt": "service_account_deleted",
					// The apiserver refuses it (rejected), unless its own view
					// still lags and meshca's watch refuses it first.
					"tokenreview": "rejected|service_account_deleted",
				}[mode.name]},
				{"CSR for another service account", good, csrPEM(t, key, spiffeID(ns, "admin")), codes.PermissionDenied, "identity_mismatch"},
				{"CSR for another namespace", good, csrPEM(t, key, spiffeID("kube-system", "web")), codes.PermissionDenied, "identity_mismatch"},
				{"CSR with extra DNS SAN", good, csrPEM(t, key, spiffeID(ns, "web"), "bank.example"), codes.PermissionDenied, "identity_mismatch"},
				{"CSR not PEM", good, "garbage", codes.InvalidArgument, "not_pem"},
				{"empty CSR", good, "", codes.InvalidArgument, "empty"},
			}
			for _, tc := range tests {
				t.Run(tc.name, func(t *testing.T) {
					ctx := t.Context()
					if tc.token != "" {
						ctx = withToken(ctx, tc.token)
					}
					before := len(m.audit(t))
					_, err := client.CreateCertificate(ctx, &pb.IstioCertificateRequest{Csr: tc.csr})
					st := status.Convert(err)
					require.Equal(t, tc.wantCode, st.Code(), st.Message())
					if tc.token != "" {
						require.NotContains(t, st.Message(), tc.token, "the answer never echoes the token")
					}
					lines := m.audit(t)
					require.Len(t, lines, before+1)
					require.Equal(t, "refused", lines[before]["result"])
					require.Contains(t, strings.Split(tc.wantReason, "|"), lines[before]["reason"], st.Message())
					// The server keeps serving good requests.
					resp, err := client.CreateCertificate(withToken(t.Context(), good), &pb.IstioCertificateRequest{Csr: goodCSR})
					require.NoError(t, err)
					require.Equal(t, spiffeID(ns, "web"), parseCerts(t, resp.CertChain)[0].URIs[0].String())
				})
			}
			require.Equal(t, 1.0, m.metric(t, fmt.Sprintf(`meshca_authn_failures_total{authenticator=%q,reason="expired"}`, mode.name)))
			require.Equal(t, 3.0, m.metric(t, `meshca_csr_rejections_total{reason="identity_mismatch"}`))
			require.Equal(t, 3.0, m.metric(t, `meshca_requests_total{code="PermissionDenied",service="istio"}`))
			require.Equal(t, okBefore+float64(len(tests)), m.metric(t, `meshca_requests_total{code="OK",service="istio"}`))
			// Beyond the 64 KiB CSR limit the handler answers; beyond gRPC's
			// own 256 KiB message limit gRPC does. Either way meshca goes on.
			for size, want := range map[int]codes.Code{100 << 10: codes.InvalidArgument, 300 << 10: codes.ResourceExhausted} {
				_, err := client.CreateCertificate(withToken(t.Context(), good), &pb.IstioCertificateRequest{Csr: strings.Repeat("A", size)})
				require.Equal(t, want, status.Code(err), "CSR of %d bytes", size)
			}
			require.Equal(t, 1.0, m.metric(t, `meshca_csr_rejections_total{reason="too_large"}`), "gRPC refuses the 300 KiB one before meshca sees it")
			_, err := client.CreateCertificate(withToken(t.Context(), good), &pb.IstioCertificateRequest{Csr: goodCSR})
			require.NoError(t, err)
			for _, tc := range tests {
				if tc.token != "" {
					require.NotContains(t, readFile(t, m.auditPath), tc.token)
					require.NotContains(t, readFile(t, m.logPath), tc.token)
				}
			}
		})
	}
}

// TestServingAndHealth checks meshca's own serving certificate and gRPC
// health on the CA port, and the admin endpoints.
func TestServingAndHealth(t *testing.T) {
	m := startMeshca(t, fmt.Sprintf("authn:\n  chain: [jwt]\n  kubeconfig: %s\n", meshcaKubeconfig(t)))
	conn, err := tls.Dial("tcp", m.grpcAddr, &tls.Config{RootCAs: m.roots, ServerName: "meshca.istio-system.svc", NextProtos: []string{"h2"}})
	require.NoError(t, err)
	leaf := conn.ConnectionState().PeerCertificates[0]
	conn.Close()
	require.Contains(t, leaf.DNSNames, "meshca.istio-system.svc")
	require.Equal(t, "127.0.0.1", leaf.IPAddresses[0].String())

	gc, err := grpc.NewClient(m.grpcAddr, grpc.WithTransportCredentials(credentials.NewTLS(&tls.Config{RootCAs: m.roots, ServerName: "127.0.0.1"})))
	require.NoError(t, err)
	defer gc.Close()
	resp, err := healthpb.NewHealthClient(gc).Check(t.Context(), &healthpb.HealthCheckRequest{})
	require.NoError(t, err)
	require.Equal(t, healthpb.HealthCheckResponse_SERVING, resp.Status)

	require.Greater(t, m.metric(t, fmt.Sprintf(`meshca_ca_cert_expiry_timestamp_seconds{role="serving",serial=%q}`, leaf.SerialNumber.Text(16))), float64(time.Now().Unix()))
	require.Greater(t, m.metric(t, "process_resident_memory_bytes"), 0.0)

	// SIGTERM: a clean shutdown and exit status 0.
	require.NoError(t, m.stop(t))
	require.Contains(t, readFile(t, m.logPath), `"msg":"meshca stopped"`)
}

// TestPolicyReloadAndExplain changes the policy file under a running meshca.
func TestPolicyReloadAndExplain(t *testing.T) {
	ns := uniqueNS("pol")
	policyPath := filepath.Join(t.TempDir(), "policy.yaml")
	write := func(s string) { // as a ConfigMap update does: a complete new file renamed in
		tmp := policyPath + ".new"
		require.NoError(t, os.WriteFile(tmp, []byte(s), 0o644))
		require.NoError(t, os.Rename(tmp, policyPath))
	}
	write(fmt.Sprintf("default:\n  defaultTTL: 12h\nnamespaces:\n  %s:\n    defaultTTL: 3h\n    maxTTL: 4h\n", ns))
	m := startMeshca(t, fmt.Sprintf("authn:\n  chain: [jwt]\n  kubeconfig: %s\npolicy:\n  file: %s\n  reloadInterval: 200ms\n", meshcaKubeconfig(t), policyPath))

	out, err := exec.Command(filepath.Join(binDir, "meshca"), "policy", "explain", "--config", filepath.Join(m.dir, "meshca.yaml"), ns+"/web").CombinedOutput()
	require.NoError(t, err, string(out))
	require.Regexp(t, `defaultTTL\s+3h0m0s\s+namespaces\.`+regexp.QuoteMeta(ns), string(out))
	require.Regexp(t, `minTTL\s+10m0s\s+built-in`, string(out))

	env.CreateServiceAccount(t, ns, "web")
	tok := env.Token(t, ns, "web", []string{"istio-ca"}, time.Hour, nil)
	client := m.client(t)
	csr := csrPEM(t, catest.Key(t, "P-256"), spiffeID(ns, "web"))
	life := func(validity int64) time.Duration {
		t.Helper()
		resp, err := client.CreateCertificate(withToken(t.Context(), tok), &pb.IstioCertificateRequest{Csr: csr, ValidityDuration: validity})
		require.NoError(t, err)
		leaf := parseCerts(t, resp.CertChain)[0]
		return leaf.NotAfter.Sub(leaf.NotBefore).Truncate(time.Minute)
	}
	require.Eventually(t, func() bool { // once meshca's watch has seen the service account
		_, err := client.CreateCertificate(withToken(t.Context(), tok), &pb.IstioCertificateRequest{Csr: csr})
		return err == nil
	}, 20*time.Second, 50*time.Millisecond)
	require.Equal(t, 3*time.Hour, life(0))
	require.Equal(t, 4*time.Hour, life(int64((90 * 24 * time.Hour).Seconds())), "clamped to maxTTL")
	require.Equal(t, 1.0, m.metric(t, `meshca_ttl_clamps_total{bound="max"}`))

	write(fmt.Sprintf("default:\n  defaultTTL: 12h\nnamespaces:\n  %s:\n    defaultTTL: 1h\n", ns))
	require.Eventually(t, func() bool { return life(0) == time.Hour }, 10*time.Second, 100*time.Millisecond)
	require.Equal(t, 1.0, m.metric(t, `meshca_reloads_total{result="success",what="policy"}`))

	write("default:\n  renewFraction: 9\n")
	require.Eventually(t, func() bool {
		return m.metric(t, `meshca_reloads_total{result="failure",what="policy"}`) == 1
	}, 10*time.Second, 100*time.Millisecond)
	require.Equal(t, time.Hour, life(0), "the last good policy stays in force")
	require.Contains(t, readFile(t, m.logPath), "renewFraction")
}

// TestDevTour runs the README's three-command tour: serve --dev, mint a
// token, issue.
func TestDevTour(t *testing.T) {
	dir := t.TempDir()
	grpcPort, adminPort := freePorts(t)
	grpcAddr := fmt.Sprintf("127.0.0.1:%d", grpcPort)
	adminAddr := fmt.Sprintf("127.0.0.1:%d", adminPort)
	cmd := exec.Command(filepath.Join(binDir, "meshca"), "serve", "--dev", "--grpc-address", grpcAddr, "--admin-address", adminAddr)
	cmd.Dir = dir
	var logs strings.Builder
	cmd.Stdout, cmd.Stderr = &logs, &logs
	require.NoError(t, cmd.Start())
	t.Cleanup(func() { _ = cmd.Process.Kill(); _ = cmd.Wait() })
	require.Eventually(t, func() bool {
		_, err := os.Stat(filepath.Join(dir, ".meshca-dev", "root-cert.pem"))
		return err == nil
	}, 20*time.Second, 50*time.Millisecond)

	meshctl := func(args ...string) (string, error) {
		c := exec.Command(filepath.Join(binDir, "meshctl"), args...)
		c.Dir = dir
		out, err := c.CombinedOutput()
		return string(out), err
	}
	tok, err := meshctl("dev-token", "--ns", "demo", "--sa", "web")
	require.NoError(t, err, tok)
	var out string
	require.Eventually(t, func() bool {
		out, err = meshctl("issue", "--addr", grpcAddr, "--token", strings.TrimSpace(tok))
		return err == nil
	}, 10*time.Second, 100*time.Millisecond, "issue: %s\nmeshca: %s", out, &logs)
	require.Contains(t, out, "identity:   spiffe://cluster.local/ns/demo/sa/web")
	require.Regexp(t, `serial:\s+[0-9a-f]{20,}`, out)
	require.Contains(t, out, "(24h0m30s)")

	// A second dev meshca on the same ports fails before touching the
	// first one's files, and the first keeps serving.
	rootBefore := readFile(t, filepath.Join(dir, ".meshca-dev", "root-cert.pem"))
	second := exec.Command(filepath.Join(binDir, "meshca"), "serve", "--dev", "--grpc-address", grpcAddr, "--admin-address", adminAddr)
	second.Dir = dir
	secondOut, err := second.CombinedOutput()
	require.Error(t, err)
	require.Contains(t, string(secondOut), "listen gRPC")
	require.Equal(t, rootBefore, readFile(t, filepath.Join(dir, ".meshca-dev", "root-cert.pem")))
	out, err = meshctl("issue", "--addr", grpcAddr, "--token", strings.TrimSpace(tok))
	require.NoError(t, err, out)

	// dev-token refuses a configuration that is not in dev mode.
	prod := filepath.Join(dir, "prod.yaml")
	require.NoError(t, os.WriteFile(prod, []byte("authn:\n  kubeconfig: /nonexistent\n"), 0o600))
	out, err = meshctl("dev-token", "--config", prod, "--ns", "demo", "--sa", "web")
	require.Error(t, err)
	require.Contains(t, out, "not in dev mode")
}

// TestConfigErrors checks that meshca refuses a bad configuration with the
// dotted path of what to fix.
func TestConfigErrors(t *testing.T) {
	cfg := filepath.Join(t.TempDir(), "bad.yaml")
	require.NoError(t, os.WriteFile(cfg, []byte("authn:\n  jwt:\n    jwksFil: /x\nbackend:\n  type: hsm\n"), 0o600))
	out, err := exec.Command(filepath.Join(binDir, "meshca"), "serve", "--config", cfg).CombinedOutput()
	require.Error(t, err)
	require.Contains(t, string(out), "authn.jwt.jwksFil: unknown key")
}

// TestReadinessWaitsForKeys starts meshca with a JWKS file that does not
// exist yet: it must say so on /readyz and in gRPC health, and become ready
// once the file appears, without a restart.
func TestReadinessWaitsForKeys(t *testing.T) {
	jwks := filepath.Join(t.TempDir(), "jwks.json")
	m := launchMeshca(t, fmt.Sprintf("authn:\n  chain: [jwt]\n  checkServiceAccounts: false\n  trustedNodeAgents: []\n  issuer: https://issuer.invalid\n  jwt:\n    jwksFile: %s\n    refetchInterval: 1s\n", jwks))
	require.Eventually(t, func() bool {
		code, body := m.readyz()
		return code == http.StatusServiceUnavailable && strings.Contains(body, "jwt keys")
	}, 20*time.Second, 50*time.Millisecond)
	// The cause (the missing file's path) is logged, not served.
	_, body := m.readyz()
	require.NotContains(t, body, jwks)
	require.Eventually(t, func() bool { return strings.Contains(readFile(t, m.logPath), jwks) }, 10*time.Second, 50*time.Millisecond)

	gc, err := grpc.NewClient(m.grpcAddr, grpc.WithTransportCredentials(credentials.NewTLS(&tls.Config{RootCAs: m.roots, ServerName: "127.0.0.1"})))
	require.NoError(t, err)
	defer gc.Close()
	resp, err := healthpb.NewHealthClient(gc).Check(t.Context(), &healthpb.HealthCheckRequest{})
	require.NoError(t, err)
	require.Equal(t, healthpb.HealthCheckResponse_NOT_SERVING, resp.Status)

	key := catest.Key(t, "P-256")
	data, err := json.Marshal(jose.JSONWebKeySet{Keys: []jose.JSONWebKey{{Key: key.Public(), KeyID: "k1", Algorithm: "ES256", Use: "sig"}}})
	require.NoError(t, err)
	require.NoError(t, os.WriteFile(jwks, data, 0o644))
	m.waitReady(t, 20*time.Second)
	resp, err = healthpb.NewHealthClient(gc).Check(t.Context(), &healthpb.HealthCheckRequest{})
	require.NoError(t, err)
	require.Equal(t, healthpb.HealthCheckResponse_SERVING, resp.Status)
}
