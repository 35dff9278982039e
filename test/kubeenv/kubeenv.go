// Package kubeenv runs a real etcd and kube-apiserver on loopback for Go
// tests, and offers the few object helpers meshca's tests need: namespaces,
// service accounts, pods and TokenRequest tokens.
//
// The servers are built by test/tools/build.sh into $MESHCA_BIN or
// <repo root>/.cache/bin. There is no controller-manager and no kubelet: a
// new namespace gets no "default" service account, and pods stay Pending.
// Each Env has its own servers on free ports, so test packages that run in
// parallel do not share a cluster.
package kubeenv

import (
	"context"
	"crypto/rand"
	"crypto/rsa"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
	clientcmdapi "k8s.io/client-go/tools/clientcmd/api"

	"github.com/meshca/meshca/test/internal/proc"
)

// Issuer is the --service-account-issuer of every Env. It is also the only
// entry of --api-audiences, so it is the audience of a token requested
// without audiences.
const Issuer = "https://kubernetes.default.svc.cluster.local"

const (
	readyTimeout = 60 * time.Second
	// startAttempts bounds the restarts after a free port was taken by
	// another process between being chosen and being bound.
	startAttempts = 3
	stopGrace     = 5 * time.Second
)

// Env is a running etcd + kube-apiserver pair. Its fields are read-only.
// The servers and Dir belong to the Env; they are removed when the test
// ends (Start) or when the stop function is called (StartMain).
type Env struct {
	// Config holds admin credentials (group system:masters) and the CA
	// that the apiserver's serving certificate chains to.
	Config *rest.Config
	// Client is a clientset built from Config.
	Client kubernetes.Interface
	// Kubeconfig is the path of a kubeconfig file with the admin
	// credentials of Config.
	Kubeconfig string
	// Issuer is the apiserver's --service-account-issuer (the constant
	// Issuer).
	Issuer string
	// Host is the apiserver's URL, https://127.0.0.1:PORT.
	Host string
	// Dir is the Env's working directory, holding etcd.log and
	// kube-apiserver.log.
	Dir string

	etcd, apiserver *proc.Process
}

// SkipIfShort skips the test under go test -short (make test-unit): it
// needs the real servers that test/tools/build.sh builds. Start and the
// other harnesses under test/ call it, so a test that starts a server
// through them need not.
func SkipIfShort(t testing.TB) {
	t.Helper()
	if testing.Short() {
		t.Skip("needs real servers (etcd, kube-apiserver, pilot-agent or helm): skipped under -short")
	}
}

// Start starts etcd and kube-apiserver for the test and stops them, and
// removes Dir, in t.Cleanup. It fails the test if the binaries are missing
// (run test/tools/build.sh) or the apiserver is not ready within 60s. Under
// go test -short it skips the test instead (SkipIfShort).
func Start(t testing.TB) *Env {
	t.Helper()
	SkipIfShort(t)
	e, stop, err := StartMain()
	if err != nil {
		t.Fatalf("kubeenv: %v", err)
	}
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("kubeenv: last lines of %s:\n%s", e.apiserver.LogPath(), e.apiserver.LogTail(15))
		}
		stop()
	})
	t.Logf("kubeenv: kube-apiserver at %s, logs in %s", e.Host, e.Dir)
	return e
}

// StartMain is Start for TestMain, where no testing.TB exists; it does not
// look at -short, which its caller checks (see SkipIfShort). The caller
// must call stop (which stops the servers and removes Dir) once, after
// m.Run; on error nothing is left running.
func StartMain() (env *Env, stop func(), err error) {
	binDir, err := BinDir()
	if err != nil {
		return nil, nil, err
	}
	etcdBin, err := findBinary(binDir, "etcd")
	if err != nil {
		return nil, nil, err
	}
	kasBin, err := findBinary(binDir, "kube-apiserver")
	if err != nil {
		return nil, nil, err
	}
	for attempt := 1; ; attempt++ {
		e, err := start(etcdBin, kasBin)
		if err == nil {
			return e, e.stop, nil
		}
		if !errors.Is(err, errPortTaken) || attempt == startAttempts {
			return nil, nil, err
		}
	}
}

// start makes one attempt at starting both servers on fresh ports.
func start(etcdBin, kasBin string) (e *Env, err error) {
	dir, err := os.MkdirTemp("", "kubeenv-")
	if err != nil {
		return nil, fmt.Errorf("make working dir: %w", err)
	}
	e = &Env{Dir: dir, Issuer: Issuer}
	defer func() {
		if err != nil {
			e.stop()
		}
	}()

	token, err := e.writeFiles()
	if err != nil {
		return e, err
	}
	ports := make([]int, 3)
	for i := range ports {
		if ports[i], err = freePort(); err != nil {
			return e, err
		}
	}
	etcdPort, peerPort, kasPort := ports[0], ports[1], ports[2]

	// etcd must be ours before the apiserver starts: if another test's
	// etcd took the port, the apiserver would silently share its data.
	etcdName := "kubeenv-" + randomHex(8)
	etcdURL := "http://127.0.0.1:" + strconv.Itoa(etcdPort)
	peerURL := "http://127.0.0.1:" + strconv.Itoa(peerPort)
	e.etcd, err = proc.Start(proc.Config{Name: "etcd", Path: etcdBin, Args: []string{
		"--name=" + etcdName,
		"--data-dir=" + filepath.Join(dir, "etcd-data"),
		"--listen-client-urls=" + etcdURL,
		"--advertise-client-urls=" + etcdURL,
		"--listen-peer-urls=" + peerURL,
		"--initial-advertise-peer-urls=" + peerURL,
		"--initial-cluster=" + etcdName + "=" + peerURL,
		"--unsafe-no-fsync",
		"--quota-backend-bytes=" + strconv.Itoa(512<<20),
		"--log-level=warn",
	}, Dir: dir, LogPath: filepath.Join(dir, "etcd.log")})
	if err != nil {
		return e, err
	}
	ctx, cancel := context.WithTimeout(context.Background(), readyTimeout)
	defer cancel()
	if err := waitEtcd(ctx, e.etcd, etcdURL, etcdName); err != nil {
		return e, err
	}

	e.Host = "https://127.0.0.1:" + strconv.Itoa(kasPort)
	certDir := filepath.Join(dir, "kas-certs")
	e.apiserver, err = proc.Start(proc.Config{Name: "kube-apiserver", Path: kasBin, Args: []string{
		"--etcd-servers=" + etcdURL,
		"--bind-address=127.0.0.1",
		"--advertise-address=127.0.0.1",
		"--secure-port=" + strconv.Itoa(kasPort),
		"--cert-dir=" + certDir,
		"--service-cluster-ip-range=10.0.0.0/24",
		"--authorization-mode=RBAC",
		"--token-auth-file=" + filepath.Join(dir, "tokens.csv"),
		"--service-account-issuer=" + Issuer,
		"--api-audiences=" + Issuer,
		"--service-account-key-file=" + filepath.Join(dir, "sa.pub"),
		"--service-account-signing-key-file=" + filepath.Join(dir, "sa.key"),
		"--endpoint-reconciler-type=none",
		"--enable-priority-and-fairness=false",
	}, Dir: dir, LogPath: filepath.Join(dir, "kube-apiserver.log")})
	if err != nil {
		return e, err
	}
	if err := waitAPIServer(ctx, e.apiserver, e.Host, token); err != nil {
		return e, err
	}

	// The apiserver wrote its self-signed serving certificate, followed by
	// the CA that signed it, before it began serving.
	caPEM, err := os.ReadFile(filepath.Join(certDir, "apiserver.crt"))
	if err != nil {
		return e, fmt.Errorf("read apiserver certificate: %w", err)
	}
	e.Config = &rest.Config{
		Host:            e.Host,
		BearerToken:     token,
		TLSClientConfig: rest.TLSClientConfig{CAData: caPEM},
		QPS:             -1, // tests create objects in bursts; the apiserver is theirs alone
	}
	if e.Client, err = kubernetes.NewForConfig(e.Config); err != nil {
		return e, fmt.Errorf("make admin client: %w", err)
	}
	e.Kubeconfig = filepath.Join(dir, "kubeconfig")
	if err := writeKubeconfig(e.Kubeconfig, e.Host, caPEM, token); err != nil {
		return e, err
	}
	return e, nil
}

// writeFiles writes the service-account key pair and the static token file,
// and returns the admin token.
func (e *Env) writeFiles() (string, error) {
	key, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		return "", fmt.Errorf("generate service-account key: %w", err)
	}
	pub, err := x509.MarshalPKIXPublicKey(&key.PublicKey)
	if err != nil {
		return "", fmt.Errorf("marshal service-account public key: %w", err)
	}
	token := randomHex(16)
	files := map[string][]byte{
		"sa.key":     pem.EncodeToMemory(&pem.Block{Type: "RSA PRIVATE KEY", Bytes: x509.MarshalPKCS1PrivateKey(key)}),
		"sa.pub":     pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: pub}),
		"tokens.csv": fmt.Appendf(nil, "%s,admin,admin-uid,\"system:masters\"\n", token),
	}
	for name, b := range files {
		if err := os.WriteFile(filepath.Join(e.Dir, name), b, 0o600); err != nil {
			return "", fmt.Errorf("write %s: %w", name, err)
		}
	}
	return token, nil
}

func writeKubeconfig(path, host string, caPEM []byte, token string) error {
	cfg := clientcmdapi.NewConfig()
	cfg.Clusters["kubeenv"] = &clientcmdapi.Cluster{Server: host, CertificateAuthorityData: caPEM}
	cfg.AuthInfos["admin"] = &clientcmdapi.AuthInfo{Token: token}
	cfg.Contexts["kubeenv"] = &clientcmdapi.Context{Cluster: "kubeenv", AuthInfo: "admin"}
	cfg.CurrentContext = "kubeenv"
	if err := clientcmd.WriteToFile(*cfg, path); err != nil {
		return fmt.Errorf("write kubeconfig: %w", err)
	}
	return nil
}

// stop stops the servers, apiserver first, and removes Dir. It is safe on a
// partly started Env.
func (e *Env) stop() {
	if e.apiserver != nil {
		e.apiserver.Stop(stopGrace)
	}
	if e.etcd != nil {
		e.etcd.Stop(stopGrace)
	}
	_ = os.RemoveAll(e.Dir)
}

// waitEtcd waits until the etcd at url answers and is the member named name,
// that is, the process p and not another test's etcd on the same port.
func waitEtcd(ctx context.Context, p *proc.Process, url, name string) error {
	client := &http.Client{Timeout: 2 * time.Second}
	for {
		if p.Exited() {
			return exitError(p)
		}
		if ok, err := etcdHasMember(ctx, client, url, name); err == nil && ok {
			return nil
		} else if err == nil {
			return fmt.Errorf("etcd at %s is not ours: %w", url, errPortTaken)
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("etcd not ready after %v; last lines of %s:\n%s", readyTimeout, p.LogPath(), p.LogTail(30))
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// etcdHasMember lists the members through etcd's JSON gateway.
func etcdHasMember(ctx context.Context, client *http.Client, url, name string) (bool, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, url+"/v3/cluster/member/list", strings.NewReader("{}"))
	if err != nil {
		return false, err
	}
	resp, err := client.Do(req)
	if err != nil {
		return false, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return false, fmt.Errorf("member list: %s", resp.Status)
	}
	var list struct {
		Members []struct {
			Name string `json:"name"`
		} `json:"members"`
	}
	if err := json.NewDecoder(resp.Body).Decode(&list); err != nil {
		return false, fmt.Errorf("decode member list: %w", err)
	}
	for _, m := range list.Members {
		if m.Name == name {
			return true, nil
		}
	}
	return false, nil
}

// waitAPIServer polls /readyz with the admin token. The token is random per
// Env, so another test's apiserver on the same port never answers "ok".
func waitAPIServer(ctx context.Context, p *proc.Process, host, token string) error {
	client := &http.Client{
		Timeout: 2 * time.Second,
		// The serving certificate does not exist yet when polling begins;
		// what is checked here is the answer to our token, not the peer.
		Transport: &http.Transport{TLSClientConfig: &tls.Config{InsecureSkipVerify: true}}, //nolint:gosec // readiness probe only
	}
	defer client.CloseIdleConnections()
	for {
		if p.Exited() {
			return exitError(p)
		}
		if readyz(ctx, client, host, token) {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("kube-apiserver not ready after %v; last lines of %s:\n%s", readyTimeout, p.LogPath(), p.LogTail(30))
		case <-time.After(100 * time.Millisecond):
		}
	}
}

func readyz(ctx context.Context, client *http.Client, host, token string) bool {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, host+"/readyz", nil)
	if err != nil {
		return false
	}
	req.Header.Set("Authorization", "Bearer "+token)
	resp, err := client.Do(req)
	if err != nil {
		return false
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(io.LimitReader(resp.Body, 64))
	return resp.StatusCode == http.StatusOK && strings.TrimSpace(string(b)) == "ok"
}

func randomHex(n int) string {
	b := make([]byte, n)
	_, _ = rand.Read(b) // crypto/rand.Read never fails
	return hex.EncodeToString(b)
}
