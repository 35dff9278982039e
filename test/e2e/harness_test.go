// Package e2e runs the meshca binary against a real etcd + kube-apiserver
// and Istio's real pilot-agent, inside a private network namespace (the
// agent's status port listens on every interface).
package e2e

import (
	"bufio"
	"context"
	"crypto"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"encoding/pem"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	jose "github.com/go-jose/go-jose/v4"
	"github.com/go-jose/go-jose/v4/jwt"
	"github.com/stretchr/testify/require"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/metadata"
	pb "istio.io/api/security/v1alpha1"
	rbacv1 "k8s.io/api/rbac/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/tools/clientcmd"
	clientcmdapi "k8s.io/client-go/tools/clientcmd/api"

	"github.com/meshca/meshca/ca/catest"
	"github.com/meshca/meshca/test/kubeenv"
	"github.com/meshca/meshca/test/pilotagent"
)

var (
	env     *kubeenv.Env
	binDir  string // holds the meshca and meshctl binaries built for this run
	meshKey string // kubeconfig of meshca's own service account
)

// binDirEnv passes binDir from the process that built the binaries to the
// one that TestMain re-executes inside the network namespace.
const binDirEnv = "MESHCA_E2E_BIN"

func TestMain(m *testing.M) {
	flag.Parse()
	if testing.Short() {
		// Every test here runs meshca against the real servers that
		// TestMain starts; make test-unit runs none of them.
		fmt.Println("e2e: skipped under -short: needs etcd, kube-apiserver and pilot-agent")
		os.Exit(0)
	}
	if pilotagent.InNetNS() {
		binDir = os.Getenv(binDirEnv)
		os.Exit(setupAndRun(m))
	}
	// Build before entering the namespace: in there nothing off this
	// machine can be reached, so with a cold module cache go build would
	// fail to download the modules.
	dir, err := buildBinaries()
	if err != nil {
		fmt.Fprintln(os.Stderr, "e2e:", err)
		os.Exit(1)
	}
	os.Setenv(binDirEnv, dir) // inherited by the test binary run inside
	code := pilotagent.RunInNetNS(m)
	os.RemoveAll(dir)
	os.Exit(code)
}

// buildBinaries builds meshca and meshctl into a new temporary directory.
func buildBinaries() (string, error) {
	dir, err := os.MkdirTemp("", "meshca-e2e-bin")
	if err != nil {
		return "", err
	}
	for _, cmd := range []string{"meshca", "meshctl"} {
		out, err := exec.Command("go", "build", "-o", filepath.Join(dir, cmd), "github.com/meshca/meshca/cmd/"+cmd).CombinedOutput()
		if err != nil {
			os.RemoveAll(dir)
			return "", fmt.Errorf("build %s: %w\n%s", cmd, err, out)
		}
	}
	return dir, nil
}

func setupAndRun(m *testing.M) int {
	if binDir == "" {
		fmt.Fprintln(os.Stderr, "e2e: "+binDirEnv+" is not set: TestMain builds the binaries before entering the network namespace")
		return 1
	}
	var (
		stop func()
		err  error
	)
	env, stop, err = kubeenv.StartMain()
	if err != nil {
		fmt.Fprintln(os.Stderr, "e2e: start kube-apiserver:", err)
		return 1
	}
	defer stop()
	return m.Run()
}

// grantMeshcaRBAC creates meshca's own service account with the least
// RBAC it needs, and writes a kubeconfig for it.
func meshcaKubeconfig(t *testing.T) string {
	t.Helper()
	if meshKey != "" {
		return meshKey
	}
	ctx := t.Context()
	env.CreateServiceAccount(t, "istio-system", "meshca")
	subject := []rbacv1.Subject{{Kind: "ServiceAccount", Name: "meshca", Namespace: "istio-system"}}
	// The chart's roles: the service-account watch, and the pod watch of
	// the node authorizer (authn.trustedNodeAgents, on by default).
	for _, resource := range []string{"serviceaccounts", "pods"} {
		_, err := env.Client.RbacV1().ClusterRoles().Create(ctx, &rbacv1.ClusterRole{
			ObjectMeta: metav1.ObjectMeta{Name: "meshca-" + resource},
			Rules:      []rbacv1.PolicyRule{{APIGroups: []string{""}, Resources: []string{resource}, Verbs: []string{"list", "watch"}}},
		}, metav1.CreateOptions{})
		require.NoError(t, err)
	}
	for _, role := range []string{"system:auth-delegator", "system:service-account-issuer-discovery", "meshca-serviceaccounts", "meshca-pods"} {
		_, err := env.Client.RbacV1().ClusterRoleBindings().Create(ctx, &rbacv1.ClusterRoleBinding{
			ObjectMeta: metav1.ObjectMeta{Name: "meshca-" + strings.ReplaceAll(role, ":", "-")},
			RoleRef:    rbacv1.RoleRef{APIGroup: "rbac.authorization.k8s.io", Kind: "ClusterRole", Name: role},
			Subjects:   subject,
		}, metav1.CreateOptions{})
		require.NoError(t, err)
	}
	rc := env.ServiceAccountConfig(t, "istio-system", "meshca")
	kc := clientcmdapi.NewConfig()
	kc.Clusters["c"] = &clientcmdapi.Cluster{Server: rc.Host, CertificateAuthorityData: rc.TLSClientConfig.CAData, CertificateAuthority: rc.TLSClientConfig.CAFile}
	kc.AuthInfos["meshca"] = &clientcmdapi.AuthInfo{Token: rc.BearerToken}
	kc.Contexts["c"] = &clientcmdapi.Context{Cluster: "c", AuthInfo: "meshca"}
	kc.CurrentContext = "c"
	dir, err := os.MkdirTemp("", "meshca-kubeconfig")
	require.NoError(t, err)
	meshKey = filepath.Join(dir, "kubeconfig")
	require.NoError(t, clientcmd.WriteToFile(*kc, meshKey))
	return meshKey
}

var nsSeq atomic.Int64

// uniqueNS names a namespace no other test (or -count repetition) in this
// process uses: the apiserver lives for the whole run.
func uniqueNS(base string) string {
	return fmt.Sprintf("%s-%d", base, nsSeq.Add(1))
}

// freePorts returns two distinct loopback ports that were free a moment
// ago. Both listeners are held until both are chosen, so the kernel cannot
// hand out the same port twice.
func freePorts(t *testing.T) (int, int) {
	t.Helper()
	var ports [2]int
	for i := range ports {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		require.NoError(t, err)
		defer l.Close()
		ports[i] = l.Addr().(*net.TCPAddr).Port
	}
	return ports[0], ports[1]
}

// meshca is one running meshca process.
type meshca struct {
	dir       string
	grpcAddr  string
	adminURL  string
	rootPEM   []byte
	roots     *x509.CertPool
	auditPath string
	logPath   string
	cmd       *exec.Cmd
	exited    chan error
	exitErr   error
	stopped   bool
	logged    bool
}

// stop sends SIGTERM and returns how the process exited. It is idempotent.
func (m *meshca) stop(t *testing.T) error {
	t.Helper()
	if m.stopped {
		return m.exitErr
	}
	m.stopped = true
	_ = m.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case m.exitErr = <-m.exited:
	case <-time.After(15 * time.Second):
		_ = m.cmd.Process.Kill()
		<-m.exited
		t.Errorf("meshca did not stop within 15s of SIGTERM")
		m.exitErr = errors.New("killed")
	}
	return m.exitErr
}

// startMeshca runs the meshca binary with the given YAML (server addresses,
// backend dir and audit file are filled in) and waits until it is ready.
func startMeshca(t *testing.T, yaml string) *meshca {
	t.Helper()
	m := launchMeshca(t, yaml)
	m.waitReady(t, 30*time.Second)
	return m
}

// launchMeshca is startMeshca without waiting for readiness.
func launchMeshca(t *testing.T, yaml string) *meshca {
	t.Helper()
	dir := t.TempDir()
	grpcPort, adminPort := freePorts(t)
	m := &meshca{
		dir:       dir,
		grpcAddr:  fmt.Sprintf("127.0.0.1:%d", grpcPort),
		adminURL:  fmt.Sprintf("http://127.0.0.1:%d", adminPort),
		auditPath: filepath.Join(dir, "audit.log"),
		logPath:   filepath.Join(dir, "meshca.log"),
	}
	full := fmt.Sprintf(`server:
  grpcAddress: %s
  adminAddress: %s
  dnsNames: [meshca.istio-system.svc]
  ipAddresses: [127.0.0.1]
audit:
  file: %s
%s`, m.grpcAddr, strings.TrimPrefix(m.adminURL, "http://"), m.auditPath, yaml)
	if !strings.Contains(yaml, "backend:") {
		full += fmt.Sprintf("backend:\n  type: selfsigned\n  selfSigned:\n    dir: %s\n    intermediate: true\n", filepath.Join(dir, "ca"))
	}
	require.NoError(t, os.WriteFile(filepath.Join(dir, "meshca.yaml"), []byte(full), 0o600))
	m.exec(t)
	if !strings.Contains(yaml, "backend:") {
		// The selfsigned root is written before meshca listens.
		require.Eventually(t, func() bool {
			var err error
			m.rootPEM, err = os.ReadFile(filepath.Join(dir, "ca", "root-cert.pem"))
			return err == nil
		}, 30*time.Second, 20*time.Millisecond)
		m.roots = x509.NewCertPool()
		require.True(t, m.roots.AppendCertsFromPEM(m.rootPEM))
	}
	return m
}

// exec starts the meshca process on m's configuration.
func (m *meshca) exec(t *testing.T) {
	t.Helper()
	logf, err := os.OpenFile(m.logPath, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o600)
	require.NoError(t, err)
	cmd := exec.Command(filepath.Join(binDir, "meshca"), "serve", "--config", filepath.Join(m.dir, "meshca.yaml"))
	cmd.Dir = m.dir
	cmd.Stdout, cmd.Stderr = logf, logf
	require.NoError(t, cmd.Start())
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	m.cmd, m.exited, m.stopped, m.exitErr = cmd, exited, false, nil
	t.Cleanup(func() {
		_ = m.stop(t)
		logf.Close()
		if t.Failed() && !m.logged {
			m.logged = true
			b, _ := os.ReadFile(m.logPath)
			t.Logf("meshca log:\n%s", b)
		}
	})
}

// restart stops meshca and starts it again on the same configuration,
// addresses and CA directory, and waits until it is ready.
func (m *meshca) restart(t *testing.T) {
	t.Helper()
	_ = m.stop(t)
	m.exec(t)
	m.waitReady(t, 30*time.Second)
}

// readyz returns the admin endpoint's status code and body (0 when down).
func (m *meshca) readyz() (int, string) {
	resp, err := http.Get(m.adminURL + "/readyz")
	if err != nil {
		return 0, ""
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

func (m *meshca) waitReady(t *testing.T, timeout time.Duration) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		if code, _ := m.readyz(); code == http.StatusOK {
			return
		}
		select {
		case err := <-m.exited:
			m.stopped, m.exitErr = true, err
			b, _ := os.ReadFile(m.logPath)
			t.Fatalf("meshca exited before ready: %v\n%s", err, b)
		default:
		}
		if time.Now().After(deadline) {
			b, _ := os.ReadFile(m.logPath)
			t.Fatalf("meshca not ready in %s\n%s", timeout, b)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func (m *meshca) client(t *testing.T) pb.IstioCertificateServiceClient {
	t.Helper()
	conn, err := grpc.NewClient(m.grpcAddr, grpc.WithTransportCredentials(credentials.NewTLS(&tls.Config{
		RootCAs: m.roots, ServerName: "meshca.istio-system.svc",
	})))
	require.NoError(t, err)
	t.Cleanup(func() { conn.Close() })
	return pb.NewIstioCertificateServiceClient(conn)
}

// audit returns the audit lines written so far.
func (m *meshca) audit(t *testing.T) []map[string]any {
	t.Helper()
	f, err := os.Open(m.auditPath)
	require.NoError(t, err)
	defer f.Close()
	var out []map[string]any
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		line := map[string]any{}
		require.NoError(t, json.Unmarshal(sc.Bytes(), &line))
		out = append(out, line)
	}
	return out
}

// metric returns the value of the sample whose line starts with prefix
// (name and labels as exposed), or 0.
func (m *meshca) metric(t *testing.T, prefix string) float64 {
	t.Helper()
	resp, err := http.Get(m.adminURL + "/metrics")
	require.NoError(t, err)
	defer resp.Body.Close()
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		if line := sc.Text(); strings.HasPrefix(line, prefix+" ") {
			v, err := strconv.ParseFloat(line[len(prefix)+1:], 64)
			require.NoError(t, err)
			return v
		}
	}
	return 0
}

func withToken(ctx context.Context, tok string) context.Context {
	return metadata.AppendToOutgoingContext(ctx, "authorization", "Bearer "+tok)
}

// csrPEM is catest.CSRPEM for one SPIFFE ID and some DNS names, as the
// string the Istio API carries.
func csrPEM(t *testing.T, key crypto.Signer, uri string, dns ...string) string {
	t.Helper()
	return string(catest.CSRPEM(t, key, func(r *x509.CertificateRequest) { r.DNSNames = dns }, uri))
}

func spiffeID(ns, sa string) string { return "spiffe://cluster.local/ns/" + ns + "/sa/" + sa }

func parseCerts(t *testing.T, pems []string) []*x509.Certificate {
	t.Helper()
	var out []*x509.Certificate
	for _, p := range pems {
		rest := []byte(p)
		for {
			var b *pem.Block
			b, rest = pem.Decode(rest)
			if b == nil {
				break
			}
			c, err := x509.ParseCertificate(b.Bytes)
			require.NoError(t, err)
			out = append(out, c)
		}
	}
	return out
}

// forgeClusterToken signs claims with the apiserver's own service-account
// key, as the apiserver would, to make tokens the TokenRequest API will
// not: already expired, or naming another issuer.
func forgeClusterToken(t *testing.T, claims jwt.Claims, extra map[string]any) string {
	t.Helper()
	data, err := os.ReadFile(filepath.Join(env.Dir, "sa.key"))
	require.NoError(t, err)
	b, _ := pem.Decode(data)
	require.NotNil(t, b)
	key, err := x509.ParsePKCS1PrivateKey(b.Bytes)
	require.NoError(t, err)
	spki, err := x509.MarshalPKIXPublicKey(key.Public())
	require.NoError(t, err)
	sum := sha256.Sum256(spki)
	kid := base64.RawURLEncoding.EncodeToString(sum[:]) // the apiserver's key ID scheme
	sig, err := jose.NewSigner(jose.SigningKey{Algorithm: jose.RS256, Key: (*rsa.PrivateKey)(key)},
		(&jose.SignerOptions{}).WithType("JWT").WithHeader("kid", kid))
	require.NoError(t, err)
	tok, err := jwt.Signed(sig).Claims(claims).Claims(extra).Serialize()
	require.NoError(t, err)
	return tok
}
