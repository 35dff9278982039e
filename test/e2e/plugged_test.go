package e2e

import (
	"crypto"
	"crypto/x509"
	"encoding/pem"
	"fmt"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	pb "istio.io/api/security/v1alpha1"

	"github.com/meshca/meshca/ca/catest"
)

func certPEM(c *x509.Certificate) []byte {
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: c.Raw})
}

// writeCacerts writes Istio's plugged-in CA layout for an intermediate.
func writeCacerts(t *testing.T, dir string, root, inter *x509.Certificate, interKey crypto.Signer) {
	t.Helper()
	der, err := x509.MarshalPKCS8PrivateKey(interKey)
	require.NoError(t, err)
	files := map[string][]byte{
		"ca-key.pem":     pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der}),
		"ca-cert.pem":    certPEM(inter),
		"root-cert.pem":  certPEM(root),
		"cert-chain.pem": append(certPEM(inter), certPEM(root)...),
	}
	for name, data := range files {
		tmp := filepath.Join(dir, "."+name)
		require.NoError(t, os.WriteFile(tmp, data, 0o600))
		require.NoError(t, os.Rename(tmp, filepath.Join(dir, name)))
	}
}

// TestPluggedCARotatesWithoutRestart rotates Istio's cacerts under a
// running meshca: new leaves come from the new intermediate, a broken set
// is refused and counted, and the last good one keeps signing.
func TestPluggedCARotatesWithoutRestart(t *testing.T) {
	rootKey, k1, k2 := catest.Key(t, "P-256"), catest.Key(t, "P-256"), catest.Key(t, "P-256")
	now := time.Now()
	notBefore, notAfter := now.Add(-time.Hour), now.Add(30*24*time.Hour)
	root := catest.Issue(t, catest.CATemplate("e2e root", notBefore, notAfter), rootKey, nil, nil)
	inter1 := catest.Issue(t, catest.CATemplate("intermediate one", notBefore, notAfter), k1, root, rootKey)
	inter2 := catest.Issue(t, catest.CATemplate("intermediate two", notBefore, notAfter), k2, root, rootKey)
	dir := t.TempDir()
	writeCacerts(t, dir, root, inter1, k1)

	m := startMeshca(t, fmt.Sprintf("authn:\n  chain: [jwt]\n  kubeconfig: %s\nbackend:\n  type: plugged\n  plugged:\n    dir: %s\n    reloadInterval: 200ms\n", meshcaKubeconfig(t), dir))
	m.roots = x509.NewCertPool()
	m.roots.AddCert(root)
	ns := uniqueNS("plugged")
	env.CreateServiceAccount(t, ns, "web")
	tok := env.Token(t, ns, "web", []string{"istio-ca"}, time.Hour, nil)
	client := m.client(t)
	csr := csrPEM(t, catest.Key(t, "P-256"), spiffeID(ns, "web"))
	issuer := func() string {
		t.Helper()
		resp, err := client.CreateCertificate(withToken(t.Context(), tok), &pb.IstioCertificateRequest{Csr: csr})
		require.NoError(t, err)
		certs := parseCerts(t, resp.CertChain)
		require.Equal(t, root.Raw, certs[len(certs)-1].Raw, "the root stays last")
		return certs[0].Issuer.CommonName
	}
	var first string
	require.Eventually(t, func() bool { // once meshca's watch has seen the new service account
		resp, err := client.CreateCertificate(withToken(t.Context(), tok), &pb.IstioCertificateRequest{Csr: csr})
		if err == nil {
			first = parseCerts(t, resp.CertChain)[0].Issuer.CommonName
		}
		return err == nil
	}, 20*time.Second, 50*time.Millisecond)
	require.Equal(t, "intermediate one", first)

	writeCacerts(t, dir, root, inter2, k2)
	require.Eventually(t, func() bool { return issuer() == "intermediate two" }, 10*time.Second, 100*time.Millisecond)
	require.GreaterOrEqual(t, m.metric(t, `meshca_reloads_total{result="success",what="backend"}`), 1.0)
	require.Equal(t, float64(inter2.NotAfter.Unix()), m.metric(t, fmt.Sprintf(`meshca_ca_cert_expiry_timestamp_seconds{role="signing",serial=%q}`, inter2.SerialNumber.Text(16))))

	// A key that does not match its certificate is refused; inter2 signs on.
	failures := m.metric(t, `meshca_reloads_total{result="failure",what="backend"}`)
	writeCacerts(t, dir, root, inter1, k2)
	require.Eventually(t, func() bool {
		return m.metric(t, `meshca_reloads_total{result="failure",what="backend"}`) > failures
	}, 10*time.Second, 100*time.Millisecond)
	require.Equal(t, "intermediate two", issuer())
	require.NotContains(t, readFile(t, m.logPath), "PRIVATE KEY")
}
