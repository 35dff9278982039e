package e2e

import (
	"context"
	"crypto/x509"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	pb "istio.io/api/security/v1alpha1"

	"github.com/meshca/meshca/ca/catest"

	"github.com/meshca/meshca/test/awspcaemu"
	"github.com/meshca/meshca/test/pilotagent"
	"github.com/meshca/meshca/test/vaultenv"
)

// agentGetsUpstreamCert runs Istio's real pilot-agent against m and checks
// that its certificate chains to root, through an intermediate meshca holds
// (intermediate mode) or directly under the upstream's CA (direct mode).
func agentGetsUpstreamCert(t *testing.T, m *meshca, root *x509.Certificate, direct bool, upstreamIssuer string) {
	t.Helper()
	m.rootPEM = certPEM(root)
	m.roots = x509.NewCertPool()
	m.roots.AddCert(root)
	ns, sa, pod := uniqueNS("upstream"), "web", "web-0"
	env.CreateServiceAccount(t, ns, sa)
	p := env.CreatePod(t, ns, pod, sa)
	agent := pilotagent.Start(t, pilotagent.Config{
		CAAddr: m.grpcAddr, RootCertPEM: m.rootPEM, Token: env.Token(t, ns, sa, []string{"istio-ca"}, time.Hour, p),
		Namespace: ns, ServiceAccount: sa, PodName: pod, SecretTTL: 2 * time.Hour, ECDSA: true,
	})
	chainPEM, _, rootPEM := agent.WaitForCerts(t, 30*time.Second)
	certs := parseCerts(t, []string{string(chainPEM)})
	leaf := certs[0]
	require.Equal(t, spiffeID(ns, sa), leaf.URIs[0].String())
	require.False(t, leaf.IsCA)
	require.InDelta(t, (2*time.Hour + 30*time.Second).Seconds(), leaf.NotAfter.Sub(leaf.NotBefore).Seconds(), 60, "SECRET_TTL honoured")
	require.Equal(t, strings.TrimSpace(string(certPEM(root))), strings.TrimSpace(string(rootPEM)), "the agent's root is the upstream's")
	inter := x509.NewCertPool()
	for _, c := range certs[1:] {
		inter.AddCert(c)
	}
	_, err := leaf.Verify(x509.VerifyOptions{Roots: m.roots, Intermediates: inter, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}})
	require.NoError(t, err, "the leaf chains to the upstream's root")
	if direct {
		require.Equal(t, upstreamIssuer, leaf.Issuer.CommonName, "direct mode: the upstream signed the leaf")
	} else {
		require.Contains(t, leaf.Issuer.CommonName, "meshca intermediate", "intermediate mode: meshca's intermediate signed the leaf")
		require.Equal(t, upstreamIssuer, certs[1].Issuer.CommonName, "and the upstream signed the intermediate")
	}
	audit := m.audit(t)
	require.Equal(t, "issued", audit[len(audit)-1]["result"])
}

// TestVaultBackend runs meshca serve on a real Vault in both modes, logged
// in with the Kubernetes auth method against the real kube-apiserver, and
// the real pilot-agent gets a certificate that chains to Vault's root.
func TestVaultBackend(t *testing.T) {
	v := vaultenv.Start(t)
	pki := v.EnablePKI(t, "pki")
	v.WriteRole(t, "pki", "mesh", "cluster.local", 8*24*time.Hour, nil) // covers the default policy's 7-day maxTTL
	v.WritePolicy(t, "meshca", vaultenv.SignerPolicy("pki"))
	env.CreateNamespace(t, "vault")
	env.CreateServiceAccount(t, "vault", "reviewer")
	env.BindClusterRole(t, "system:auth-delegator", "vault", "reviewer")
	meshcaKubeconfig(t) // creates istio-system/meshca
	v.EnableKubernetes(t, env, env.Token(t, "vault", "reviewer", nil, time.Hour, nil), "meshca", "istio-system", "meshca", "meshca")
	tokenFile := filepath.Join(t.TempDir(), "vault-token")
	require.NoError(t, os.WriteFile(tokenFile, []byte(env.Token(t, "istio-system", "meshca", []string{"vault"}, time.Hour, nil)), 0o600))

	for _, mode := range []string{"intermediate", "direct"} {
		t.Run(mode, func(t *testing.T) {
			m := startMeshca(t, fmt.Sprintf(`authn:
  chain: [jwt]
  kubeconfig: %s
backend:
  type: vault
  vault:
    mode: %s
    address: %s
    role: mesh
    auth:
      method: kubernetes
      kubernetes:
        role: meshca
        tokenFile: %s
`, meshcaKubeconfig(t), mode, v.Addr, tokenFile))
			agentGetsUpstreamCert(t, m, pki.Root, mode == "direct", pki.Root.Subject.CommonName)

			// Central SDS: meshca generates the key; in direct mode Vault
			// signs the CSR meshca makes with it.
			ns := uniqueNS("vault-sds")
			env.CreateServiceAccount(t, ns, "web")
			p := envoy(t, m.sdsConn(t, nil), env.Token(t, ns, "web", []string{"istio-ca"}, time.Hour, nil), "default", "ROOTCA")
			st := waitState(t, p, "default and ROOTCA", 30*time.Second, hasSecrets("default", "ROOTCA"))
			chain := checkSDSLeaf(t, st, "default", "ROOTCA", spiffeID(ns, "web"))
			if mode == "direct" {
				require.Equal(t, pki.Root.Subject.CommonName, chain[0].Issuer.CommonName, "Vault signed the SDS leaf")
			}
			require.Equal(t, 1.0, m.metric(t, `meshca_vault_logins_total{method="kubernetes",result="success"}`))
			require.Equal(t, 1.0, m.metric(t, "meshca_vault_authenticated"))
			if mode == "direct" {
				require.GreaterOrEqual(t, m.metric(t, `meshca_backend_upstream_calls_total{operation="sign",result="success"}`), 3.0, "the serving certificate, the agent's and the SDS leaf")
			} else {
				require.Equal(t, 1.0, m.metric(t, `meshca_backend_upstream_calls_total{operation="mint",result="success"}`))
			}
		})
	}

	// Vault stops answering (SIGSTOP: connections hang, the worst case).
	// Intermediate mode keeps issuing and stays ready, marked degraded;
	// direct mode answers Unavailable within backend.upstream.timeout.
	// Both recover when Vault does, without a restart.
	t.Run("outage", func(t *testing.T) {
		ms := map[string]*meshca{}
		for _, mode := range []string{"intermediate", "direct"} {
			ms[mode] = startMeshca(t, fmt.Sprintf(`authn:
  chain: [jwt]
  kubeconfig: %s
backend:
  type: vault
  upstream: {bundleRefreshInterval: 1s, timeout: 2s}
  vault:
    mode: %s
    address: %s
    role: mesh
    requestTimeout: 1s
    auth: {method: kubernetes, kubernetes: {role: meshca, tokenFile: %s}}
`, meshcaKubeconfig(t), mode, v.Addr, tokenFile))
			ms[mode].roots = x509.NewCertPool()
			ms[mode].roots.AddCert(pki.Root)
		}
		ns := uniqueNS("vault-outage")
		env.CreateServiceAccount(t, ns, "web")
		tok := env.Token(t, ns, "web", []string{"istio-ca"}, time.Hour, nil)
		csr := csrPEM(t, catest.Key(t, "P-256"), spiffeID(ns, "web"))
		issue := func(m *meshca) error {
			ctx, cancel := context.WithTimeout(withToken(t.Context(), tok), 10*time.Second)
			defer cancel()
			_, err := m.client(t).CreateCertificate(ctx, &pb.IstioCertificateRequest{Csr: csr})
			return err
		}
		for _, m := range ms {
			require.Eventually(t, func() bool { return issue(m) == nil }, 20*time.Second, 100*time.Millisecond)
		}

		v.Pause(t)
		paused := true
		defer func() {
			if paused {
				v.Resume(t)
			}
		}()
		inter, direct := ms["intermediate"], ms["direct"]
		require.NoError(t, issue(inter), "the intermediate signs while Vault is down")
		require.Eventually(t, func() bool {
			code, body := inter.readyz()
			return code == 200 && strings.Contains(body, "degraded") && inter.metric(t, "meshca_backend_degraded") == 1
		}, 15*time.Second, 200*time.Millisecond, "ready, and marked degraded")
		start := time.Now()
		err := issue(direct)
		require.Equal(t, codes.Unavailable, status.Code(err), "direct mode: %v", err)
		require.Contains(t, status.Convert(err).Message(), "signing backend")
		require.Less(t, time.Since(start), 8*time.Second, "bounded by backend.upstream.timeout")
		require.Equal(t, 1.0, direct.metric(t, "meshca_backend_degraded"))

		v.Resume(t)
		paused = false
		require.Eventually(t, func() bool { return issue(direct) == nil }, 20*time.Second, 200*time.Millisecond, "direct mode recovers")
		require.Eventually(t, func() bool {
			_, body := inter.readyz()
			return !strings.Contains(body, "degraded") && inter.metric(t, "meshca_backend_degraded") == 0
		}, 15*time.Second, 200*time.Millisecond, "intermediate mode recovers")
		require.Equal(t, 0.0, direct.metric(t, "meshca_backend_degraded"))
	})
}

// TestAWSPCABackend runs meshca serve on the AWS Private CA emulator (the
// real AWS SDK, over the endpoint override) in both modes; the real
// pilot-agent gets a certificate that chains to the emulated CA's root.
func TestAWSPCABackend(t *testing.T) {
	// meshca finds credentials through the SDK's default chain: here, the
	// environment it inherits.
	awspcaemu.SetCredentials(t)
	for _, mode := range []string{"intermediate", "direct"} {
		t.Run(mode, func(t *testing.T) {
			emu := awspcaemu.Start(t, awspcaemu.Config{Subordinate: true})
			m := startMeshca(t, fmt.Sprintf(`authn:
  chain: [jwt]
  kubeconfig: %s
backend:
  type: awspca
  awsPCA:
    mode: %s
    region: %s
    caARN: %s
    endpoint: %s
`, meshcaKubeconfig(t), mode, emu.Region(), emu.ARN(), emu.URL()))
			agentGetsUpstreamCert(t, m, emu.Root(), mode == "direct", emu.CACertificate().Subject.CommonName)
			if mode == "direct" {
				require.GreaterOrEqual(t, emu.Calls("IssueCertificate"), 2, "the serving certificate and the agent's")
			} else {
				require.Equal(t, 1, emu.Calls("IssueCertificate"), "one intermediate; leaves are signed by meshca")
			}
		})
	}
}
