// Package pilotagent runs Istio's real node agent, pilot-agent, without
// Envoy, as a client of a CA under test: it authenticates with a token file,
// sends a CSR over gRPC TLS to the Istio CertificateService, and writes what
// it gets back to a folder (OUTPUT_CERTS).
//
// The binary is built by test/tools/build.sh into $MESHCA_BIN or
// <repo root>/.cache/bin. pilot-agent's status server listens on all
// interfaces, so a test package using this must call ReexecInNetNS from
// TestMain; the CA and any kube-apiserver then run in the same private
// network namespace.
package pilotagent

import (
	"bytes"
	"crypto/tls"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/meshca/meshca/test/internal/proc"
	"github.com/meshca/meshca/test/kubeenv"
)

// Config says how to run one pilot-agent. CAAddr, RootCertPEM, Token,
// Namespace, ServiceAccount and PodName are required.
type Config struct {
	// CAAddr is host:port of the CA's gRPC TLS port. The host is also the
	// TLS server name, so for 127.0.0.1 the CA's serving certificate needs
	// the IP SAN 127.0.0.1.
	CAAddr string
	// RootCertPEM is the root that the CA's serving certificate chains to.
	// It is written to ./var/run/secrets/istio/root-cert.pem.
	RootCertPEM []byte
	// Token is the credential, normally a service-account token with
	// audience istio-ca. It is written to
	// ./var/run/secrets/tokens/istio-token, which the agent reads for each
	// request. The agent sends it as "authorization: Bearer <Token>".
	Token string
	// Namespace, ServiceAccount and PodName are the workload's identity as
	// the agent states it (POD_NAMESPACE, SERVICE_ACCOUNT, POD_NAME).
	Namespace, ServiceAccount, PodName string
	// TrustDomain goes into the CSR's SPIFFE ID. Default cluster.local.
	TrustDomain string
	// SecretTTL is the requested certificate lifetime, sent as
	// validity_duration. Default 1h.
	SecretTTL time.Duration
	// ECDSA makes the agent use a P-256 key instead of RSA-2048.
	ECDSA bool
	// ClusterID is sent as "clusterid" gRPC metadata. Default Kubernetes.
	ClusterID string
}

// Agent is a running pilot-agent. It is stopped, and its directory removed,
// when the test ends.
type Agent struct {
	// Dir is the agent's working directory; the token and root files live
	// under Dir/var/run/secrets and may be rewritten by the test.
	Dir string
	// CertDir is the OUTPUT_CERTS folder, where the agent writes
	// cert-chain.pem, key.pem and root-cert.pem.
	CertDir string

	proc *proc.Process
}

const stopGrace = 5 * time.Second

// Start runs pilot-agent in a new working directory and stops it in
// t.Cleanup. It fails the test if the binary is missing, Config is
// incomplete, or the process is not inside ReexecInNetNS's namespace. Under
// go test -short it skips the test instead.
func Start(t testing.TB, cfg Config) *Agent {
	t.Helper()
	kubeenv.SkipIfShort(t)
	if !InNetNS() {
		t.Fatal("pilotagent: pilot-agent listens on all interfaces; call pilotagent.ReexecInNetNS(m) from TestMain")
	}
	for _, f := range []struct {
		name  string
		empty bool
	}{
		{"CAAddr", cfg.CAAddr == ""}, {"RootCertPEM", len(cfg.RootCertPEM) == 0}, {"Token", cfg.Token == ""},
		{"Namespace", cfg.Namespace == ""}, {"ServiceAccount", cfg.ServiceAccount == ""}, {"PodName", cfg.PodName == ""},
	} {
		if f.empty {
			t.Fatalf("pilotagent: Config.%s is required", f.name)
		}
	}
	if cfg.TrustDomain == "" {
		cfg.TrustDomain = "cluster.local"
	}
	if cfg.SecretTTL == 0 {
		cfg.SecretTTL = time.Hour
	}
	if cfg.ClusterID == "" {
		cfg.ClusterID = "Kubernetes"
	}
	binDir, err := kubeenv.BinDir()
	if err != nil {
		t.Fatalf("pilotagent: %v", err)
	}
	bin := filepath.Join(binDir, "pilot-agent")
	if st, err := os.Stat(bin); err != nil || st.Mode()&0o111 == 0 {
		t.Fatalf("pilotagent: pilot-agent not found in %s: run test/tools/build.sh (or set MESHCA_BIN to the folder holding it)", binDir)
	}

	dir := t.TempDir()
	a := &Agent{Dir: dir, CertDir: filepath.Join(dir, "out")}
	files := map[string][]byte{
		"var/run/secrets/istio/root-cert.pem": cfg.RootCertPEM,
		"var/run/secrets/tokens/istio-token":  []byte(cfg.Token),
	}
	for name, b := range files {
		p := filepath.Join(dir, filepath.FromSlash(name))
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatalf("pilotagent: %v", err)
		}
		if err := os.WriteFile(p, b, 0o600); err != nil {
			t.Fatalf("pilotagent: %v", err)
		}
	}
	// The agent does not create OUTPUT_CERTS itself.
	if err := os.Mkdir(a.CertDir, 0o755); err != nil {
		t.Fatalf("pilotagent: %v", err)
	}

	// A free status port instead of the fixed 15020 lets several agents
	// share one network namespace.
	statusPort, err := freePort()
	if err != nil {
		t.Fatalf("pilotagent: %v", err)
	}
	proxyConfig, err := json.Marshal(map[string]any{"discoveryAddress": cfg.CAAddr, "statusPort": statusPort})
	if err != nil {
		t.Fatalf("pilotagent: %v", err)
	}
	env := []string{
		"PATH=/usr/bin:/bin",
		"HOME=" + dir,
		"DISABLE_ENVOY=true",
		"CA_ADDR=" + cfg.CAAddr,
		"POD_NAME=" + cfg.PodName,
		"POD_NAMESPACE=" + cfg.Namespace,
		"SERVICE_ACCOUNT=" + cfg.ServiceAccount,
		"INSTANCE_IP=127.0.0.1",
		"ISTIO_META_CLUSTER_ID=" + cfg.ClusterID,
		"TRUST_DOMAIN=" + cfg.TrustDomain,
		"SECRET_TTL=" + cfg.SecretTTL.String(),
		"OUTPUT_CERTS=" + a.CertDir,
		"PROXY_CONFIG=" + string(proxyConfig),
	}
	if cfg.ECDSA {
		env = append(env, "ECC_SIGNATURE_ALGORITHM=ECDSA")
	}

	a.proc, err = proc.Start(proc.Config{
		Name:    "pilot-agent",
		Path:    bin,
		Args:    []string{"proxy", "sidecar"},
		Env:     env,
		Dir:     dir, // the agent resolves ./var/run/secrets/... against it
		LogPath: filepath.Join(dir, "pilot-agent.log"),
	})
	if err != nil {
		t.Fatalf("pilotagent: %v", err)
	}
	t.Cleanup(func() {
		a.proc.Stop(stopGrace)
		if t.Failed() {
			t.Logf("pilotagent: log of pilot-agent:\n%s", a.Log())
		}
	})
	return a
}

// WaitForCerts waits until the agent has written cert-chain.pem, key.pem
// and root-cert.pem to CertDir, with a key that matches the chain's leaf, and
// returns their contents. It fails the test, showing the agent's log, if
// that takes longer than timeout or the agent exits.
func (a *Agent) WaitForCerts(t testing.TB, timeout time.Duration) (chain, key, root []byte) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		chain, key, root, ok := a.readCerts()
		if ok {
			return chain, key, root
		}
		if a.proc.Exited() {
			t.Fatalf("pilotagent: pilot-agent exited (%v) before writing certificates; log:\n%s", a.proc.ProcessState(), a.Log())
		}
		if time.Now().After(deadline) {
			t.Fatalf("pilotagent: no certificates in %s after %v; log:\n%s", a.CertDir, timeout, a.Log())
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// readCerts returns the three files once they are complete and consistent;
// the agent writes them one by one, so a poll can land in between.
func (a *Agent) readCerts() (chain, key, root []byte, ok bool) {
	read := func(name string) []byte {
		b, _ := os.ReadFile(filepath.Join(a.CertDir, name))
		return b
	}
	chain, key, root = read("cert-chain.pem"), read("key.pem"), read("root-cert.pem")
	if !allPEM(chain) || !allPEM(key) || !allPEM(root) {
		return nil, nil, nil, false
	}
	if _, err := tls.X509KeyPair(chain, key); err != nil {
		return nil, nil, nil, false
	}
	return chain, key, root, true
}

// allPEM reports whether b is one or more PEM blocks and nothing else.
func allPEM(b []byte) bool {
	n := 0
	for {
		var block *pem.Block
		block, b = pem.Decode(b)
		if block == nil {
			return n > 0 && len(bytes.TrimSpace(b)) == 0
		}
		n++
	}
}

// Log returns what the agent has logged so far.
func (a *Agent) Log() string {
	return a.proc.Log()
}

// freePort returns a loopback TCP port that was free a moment ago.
func freePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, fmt.Errorf("find free port: %w", err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}
