package e2e

import (
	"context"
	"crypto"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"github.com/spiffe/go-spiffe/v2/workloadapi"
	"github.com/stretchr/testify/require"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
	pb "istio.io/api/security/v1alpha1"

	"github.com/meshca/meshca/ca/catest"
	"github.com/meshca/meshca/sds/sdstest"
)

// bearer sends a workload's token with each SDS stream, as Envoy's
// file_based_metadata credentials do.
type bearer string

func (b bearer) GetRequestMetadata(context.Context, ...string) (map[string]string, error) {
	return map[string]string{"authorization": "Bearer " + string(b)}, nil
}

func (bearer) RequireTransportSecurity() bool { return true }

// sdsConn dials meshca's gRPC port over TLS, with a client certificate if
// one is given.
func (m *meshca) sdsConn(t *testing.T, cert *tls.Certificate) *grpc.ClientConn {
	t.Helper()
	cfg := &tls.Config{RootCAs: m.roots, ServerName: "meshca.istio-system.svc", MinVersion: tls.VersionTLS12}
	if cert != nil {
		cfg.Certificates = []tls.Certificate{*cert}
	}
	conn, err := grpc.NewClient(m.grpcAddr, grpc.WithTransportCredentials(credentials.NewTLS(cfg)))
	require.NoError(t, err)
	t.Cleanup(func() { conn.Close() })
	return conn
}

// envoy runs an Envoy-like SDS client until the test ends.
func envoy(t *testing.T, conn grpc.ClientConnInterface, tok string, names ...string) *sdstest.Client {
	t.Helper()
	cfg := sdstest.Config{Conn: conn, Names: names, Node: &core.Node{Id: "sidecar~10.0.0.1~web.e2e", Cluster: "e2e"},
		BackoffBase: 50 * time.Millisecond, BackoffMax: 500 * time.Millisecond}
	if tok != "" {
		cfg.CallOptions = []grpc.CallOption{grpc.PerRPCCredentials(bearer(tok))}
	}
	c, err := sdstest.New(cfg)
	require.NoError(t, err)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { _ = c.Run(ctx); close(done) }()
	t.Cleanup(func() { cancel(); <-done })
	return c
}

func waitState(t *testing.T, c *sdstest.Client, what string, timeout time.Duration, cond func(sdstest.State) bool) sdstest.State {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	st, err := c.WaitFor(ctx, cond)
	require.NoError(t, err, "waiting for %s: %s", what, c.State())
	return st
}

func hasSecrets(names ...string) func(sdstest.State) bool {
	return func(s sdstest.State) bool {
		for _, n := range names {
			if _, ok := s.Secrets[n]; !ok {
				return false
			}
		}
		return true
	}
}

// checkSDSLeaf verifies the certificate pushed as name against the bundle
// pushed as bundle on the same client, and returns its chain.
func checkSDSLeaf(t *testing.T, st sdstest.State, name, bundle, id string) []*x509.Certificate {
	t.Helper()
	chain, key, err := sdstest.ParseTLSCertificate(st.Secrets[name].Secret)
	require.NoError(t, err)
	require.True(t, key.Public().(interface{ Equal(crypto.PublicKey) bool }).Equal(chain[0].PublicKey))
	roots, err := sdstest.ParseValidationContext(st.Secrets[bundle].Secret)
	require.NoError(t, err)
	pool, inter := x509.NewCertPool(), x509.NewCertPool()
	for _, r := range roots {
		pool.AddCert(r)
	}
	for _, c := range chain[1:] {
		inter.AddCert(c)
	}
	_, err = chain[0].Verify(x509.VerifyOptions{Roots: pool, Intermediates: inter, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}})
	require.NoError(t, err)
	require.Len(t, chain[0].URIs, 1)
	require.Equal(t, id, chain[0].URIs[0].String())
	return chain
}

// TestCentralSDS serves SDS on meshca's CreateCertificate port to streams
// authenticated with real cluster tokens and with client certificates.
func TestCentralSDS(t *testing.T) {
	for _, mode := range authnModes {
		t.Run(mode.name, func(t *testing.T) {
			m := startMeshca(t, fmt.Sprintf(mode.yaml, meshcaKubeconfig(t))+"sds:\n  recheckInterval: 1s\n")
			ns := uniqueNS("sds-" + mode.name)
			env.CreateServiceAccount(t, ns, "web")
			env.CreateServiceAccount(t, ns, "db")
			web := env.Token(t, ns, "web", []string{"istio-ca"}, time.Hour, nil)
			conn := m.sdsConn(t, nil)

			// A token: default and ROOTCA, for the token's identity.
			p := envoy(t, conn, web, "default", "ROOTCA")
			st := waitState(t, p, "default and ROOTCA", 30*time.Second, hasSecrets("default", "ROOTCA"))
			checkSDSLeaf(t, st, "default", "ROOTCA", spiffeID(ns, "web"))

			// Asking for another workload's identity gets nothing for it.
			q := envoy(t, conn, web, spiffeID(ns, "db"), "ROOTCA")
			st = waitState(t, q, "ROOTCA", 30*time.Second, hasSecrets("ROOTCA"))
			require.NotContains(t, st.Secrets, spiffeID(ns, "db"))
			require.Eventually(t, func() bool {
				return m.metric(t, `meshca_sds_refusals_total{reason="not_authorized"}`) >= 1
			}, 10*time.Second, 100*time.Millisecond)

			// A client certificate issued by this CA, and no token.
			key := catest.Key(t, "P-256")
			resp, err := m.client(t).CreateCertificate(withToken(t.Context(), web), &pb.IstioCertificateRequest{Csr: csrPEM(t, key, spiffeID(ns, "web"))})
			require.NoError(t, err)
			certs := parseCerts(t, resp.CertChain)
			tc := &tls.Certificate{PrivateKey: key, Leaf: certs[0]}
			for _, c := range certs[:len(certs)-1] {
				tc.Certificate = append(tc.Certificate, c.Raw)
			}
			r := envoy(t, m.sdsConn(t, tc), "", "default", "ROOTCA")
			st = waitState(t, r, "default by client certificate", 30*time.Second, hasSecrets("default", "ROOTCA"))
			checkSDSLeaf(t, st, "default", "ROOTCA", spiffeID(ns, "web"))

			// Audit and metrics record SDS issuance as for CreateCertificate.
			var sdsIssued int
			for _, l := range m.audit(t) {
				if l["service"] == "sds" && l["result"] == "issued" {
					sdsIssued++
					require.Equal(t, spiffeID(ns, "web"), l["identity"])
				}
			}
			require.GreaterOrEqual(t, sdsIssued, 2)
			require.GreaterOrEqual(t, m.metric(t, `meshca_requests_total{code="OK",service="sds"}`), 2.0)
			require.GreaterOrEqual(t, m.metric(t, `meshca_sds_streams{mode="central"}`), 3.0)
			out, err := exec.Command(filepath.Join(binDir, "meshctl"), "proxies", "--admin", m.adminURL).CombinedOutput()
			require.NoError(t, err, string(out))
			require.Contains(t, string(out), spiffeID(ns, "web"))
			require.Contains(t, string(out), "sidecar~10.0.0.1~web.e2e")

			// The account is deleted: its token streams end with
			// Unauthenticated within the recheck interval, and the proxy
			// keeps the certificate it holds.
			env.DeleteServiceAccount(t, ns, "web")
			st = waitState(t, p, "the stream to end", 30*time.Second, func(s sdstest.State) bool {
				return s.LastError != nil && s.LastError.Code() == codes.Unauthenticated
			})
			require.Contains(t, st.Secrets, "default")
			require.NotContains(t, readFile(t, m.logPath), web)
			require.NotContains(t, readFile(t, m.logPath), "PRIVATE KEY")
		})
	}
}

// TestPluggedRootRotationReachesSDSBundleFirst replaces Istio's cacerts
// with a new root under a running meshca: every stream gets a bundle with
// both roots, and only then a leaf under the new one.
func TestPluggedRootRotationReachesSDSBundleFirst(t *testing.T) {
	now := time.Now()
	mk := func(name string) (*x509.Certificate, *x509.Certificate, crypto.Signer) {
		rk, ik := catest.Key(t, "P-256"), catest.Key(t, "P-256")
		root := catest.Issue(t, catest.CATemplate(name+" root", now.Add(-time.Hour), now.Add(30*24*time.Hour)), rk, nil, nil)
		inter := catest.Issue(t, catest.CATemplate(name+" intermediate", now.Add(-time.Hour), now.Add(30*24*time.Hour)), ik, root, rk)
		return root, inter, ik
	}
	root1, inter1, k1 := mk("one")
	root2, inter2, k2 := mk("two")
	dir := t.TempDir()
	writeCacerts(t, dir, root1, inter1, k1)
	m := startMeshca(t, fmt.Sprintf("authn:\n  chain: [jwt]\n  kubeconfig: %s\nbackend:\n  type: plugged\n  plugged:\n    dir: %s\n    reloadInterval: 200ms\n", meshcaKubeconfig(t), dir))
	m.roots = x509.NewCertPool()
	m.roots.AddCert(root1)
	m.roots.AddCert(root2)
	ns := uniqueNS("sds-rotate")
	var clients []*sdstest.Client
	for i := range 3 {
		sa := fmt.Sprintf("w%d", i)
		env.CreateServiceAccount(t, ns, sa)
		tok := env.Token(t, ns, sa, []string{"istio-ca"}, time.Hour, nil)
		c := envoy(t, m.sdsConn(t, nil), tok, "default", "ROOTCA")
		waitState(t, c, "first secrets", 30*time.Second, hasSecrets("default", "ROOTCA"))
		clients = append(clients, c)
	}
	writeCacerts(t, dir, root2, inter2, k2)
	for i, c := range clients {
		st := waitState(t, c, "a leaf under the new root", 30*time.Second, func(s sdstest.State) bool {
			chain, _, err := sdstest.ParseTLSCertificate(s.Secrets["default"].Secret)
			return err == nil && chain[0].Issuer.CommonName == "two intermediate"
		})
		roots, err := sdstest.ParseValidationContext(st.Secrets["ROOTCA"].Secret)
		require.NoError(t, err)
		require.Len(t, roots, 2, "while leaves under the old root live, the bundle holds both")
		require.True(t, roots[0].Equal(root2) && roots[1].Equal(root1))
		checkSDSLeaf(t, st, "default", "ROOTCA", spiffeID(ns, fmt.Sprintf("w%d", i)))
		// The bundle's version moved before the leaf's: the response that
		// carried the new leaf was not the first after the rotation.
		require.NotEqual(t, st.Secrets["ROOTCA"].Version, st.Secrets["default"].Version)
	}
}

// TestAgent runs meshca agent against meshca with a real projected token:
// go-spiffe's own Workload API client and an Envoy-like SDS client on the
// agent's socket see rotations; the agent keeps serving while meshca is
// down and recovers when it returns.
func TestAgent(t *testing.T) {
	policy := filepath.Join(t.TempDir(), "policy.yaml")
	require.NoError(t, os.WriteFile(policy, []byte("default:\n  defaultTTL: 8s\n  minTTL: 2s\n  renewFraction: 0.25\n  renewJitter: 0s\n"), 0o600))
	m := startMeshca(t, fmt.Sprintf("authn:\n  chain: [jwt]\n  kubeconfig: %s\npolicy:\n  file: %s\n", meshcaKubeconfig(t), policy))
	ns := uniqueNS("agent")
	env.CreateServiceAccount(t, ns, "web")
	pod := env.CreatePod(t, ns, "web-0", "web")
	dir, err := os.MkdirTemp("", "ag")
	require.NoError(t, err)
	t.Cleanup(func() { os.RemoveAll(dir) })
	tokenFile, rootsFile, socket := filepath.Join(dir, "token"), filepath.Join(dir, "root.pem"), filepath.Join(dir, "s", "socket")
	require.NoError(t, os.WriteFile(tokenFile, []byte(env.Token(t, ns, "web", []string{"istio-ca"}, time.Hour, pod)), 0o600))
	require.NoError(t, os.WriteFile(rootsFile, m.rootPEM, 0o600))
	adminPort, _ := freePorts(t)
	admin := fmt.Sprintf("127.0.0.1:%d", adminPort)
	logf, err := os.Create(filepath.Join(dir, "agent.log"))
	require.NoError(t, err)
	cmd := exec.Command(filepath.Join(binDir, "meshca"), "agent", "--ca-address", m.grpcAddr, "--server-name", "meshca.istio-system.svc",
		"--ca-roots", rootsFile, "--token-file", tokenFile, "--socket", socket, "--admin-address", admin,
		"--retry-min", "200ms", "--retry-max", "1s", "--log-format", "text")
	cmd.Stdout, cmd.Stderr = logf, logf
	require.NoError(t, cmd.Start())
	t.Cleanup(func() {
		_ = cmd.Process.Signal(os.Interrupt)
		_ = cmd.Wait()
		logf.Close()
		if t.Failed() {
			b, _ := os.ReadFile(filepath.Join(dir, "agent.log"))
			t.Logf("agent log:\n%s", b)
		}
	})
	agentReady := func() int {
		resp, err := http.Get("http://" + admin + "/readyz")
		if err != nil {
			return 0
		}
		resp.Body.Close()
		return resp.StatusCode
	}
	require.Eventually(t, func() bool { return agentReady() == http.StatusOK }, 30*time.Second, 50*time.Millisecond)

	// go-spiffe's own client watches X.509 contexts: at least 3 rotations,
	// each verifying against the bundle that came with it.
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	wl, err := workloadapi.New(ctx, workloadapi.WithAddr("unix://"+socket))
	require.NoError(t, err)
	defer wl.Close()
	w := &svidWatcher{updates: make(chan *workloadapi.X509Context, 16)}
	go func() { _ = wl.WatchX509Context(ctx, w) }()
	serials := map[string]bool{}
	for len(serials) < 4 {
		select {
		case x := <-w.updates:
			svid := x.DefaultSVID()
			require.Equal(t, spiffeID(ns, "web"), svid.ID.String())
			_, _, err := x509svid.Verify(svid.Certificates, x.Bundles)
			require.NoError(t, err)
			serials[svid.Certificates[0].SerialNumber.String()] = true
		case <-ctx.Done():
			t.Fatalf("saw %d SVIDs, want 4 (3 rotations)", len(serials))
		}
	}

	// Envoy's SDS on the same socket.
	uconn, err := grpc.NewClient("unix://"+socket, grpc.WithTransportCredentials(insecure.NewCredentials()))
	require.NoError(t, err)
	defer uconn.Close()
	p := envoy(t, uconn, "", "default", "ROOTCA")
	st := waitState(t, p, "agent SDS", 20*time.Second, hasSecrets("default", "ROOTCA"))
	checkSDSLeaf(t, st, "default", "ROOTCA", spiffeID(ns, "web"))

	// meshca goes down: the agent keeps serving its still-valid SVID and
	// stays ready while it is valid.
	require.NoError(t, m.stop(t))
	agentMetric := func(name string) string {
		resp, err := http.Get("http://" + admin + "/metrics")
		if err != nil {
			return ""
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		for _, l := range strings.Split(string(b), "\n") {
			if strings.HasPrefix(l, name+" ") {
				return strings.TrimPrefix(l, name+" ")
			}
		}
		return ""
	}
	require.Eventually(t, func() bool {
		v := agentMetric(`meshca_agent_renewals_total{result="failure"}`)
		return v != "" && v != "0"
	}, 20*time.Second, 100*time.Millisecond, "the agent tried and failed while meshca was down")
	x, err := wl.FetchX509Context(ctx)
	require.NoError(t, err)
	held := x.DefaultSVID().Certificates[0]
	require.True(t, time.Now().Before(held.NotAfter))
	require.Equal(t, http.StatusOK, agentReady())
	// meshca comes back on the same address: the agent recovers by itself.
	m.restart(t)
	require.Eventually(t, func() bool {
		x, err := wl.FetchX509Context(ctx)
		return err == nil && x.DefaultSVID().Certificates[0].SerialNumber.Cmp(held.SerialNumber) != 0
	}, 30*time.Second, 100*time.Millisecond)
	b, _ := os.ReadFile(filepath.Join(dir, "agent.log"))
	require.True(t, strings.Contains(string(b), "renewal failed"), "the outage was logged")
	require.Equal(t, http.StatusOK, agentReady())
}

type svidWatcher struct{ updates chan *workloadapi.X509Context }

func (w *svidWatcher) OnX509ContextUpdate(x *workloadapi.X509Context) { w.updates <- x }
func (w *svidWatcher) OnX509ContextWatchError(error)                  {}

// TestClientCertOfARecreatedAccountIsRefused: a certificate issued before
// its service account was deleted and re-created under the same name no
// longer renews by itself; a token of the new account does.
func TestClientCertOfARecreatedAccountIsRefused(t *testing.T) {
	m := startMeshca(t, fmt.Sprintf("authn:\n  chain: [clientcert, jwt]\n  kubeconfig: %s\n", meshcaKubeconfig(t)))
	ns := uniqueNS("recreated")
	env.CreateServiceAccount(t, ns, "web")
	tok := env.Token(t, ns, "web", []string{"istio-ca"}, time.Hour, nil)
	key := catest.Key(t, "P-256")
	csr := csrPEM(t, key, spiffeID(ns, "web"))
	var certs []*x509.Certificate
	require.Eventually(t, func() bool {
		resp, err := m.client(t).CreateCertificate(withToken(t.Context(), tok), &pb.IstioCertificateRequest{Csr: csr})
		if err == nil {
			certs = parseCerts(t, resp.CertChain)
		}
		return err == nil
	}, 20*time.Second, 100*time.Millisecond)
	tc := &tls.Certificate{PrivateKey: key, Leaf: certs[0]}
	for _, c := range certs[:len(certs)-1] {
		tc.Certificate = append(tc.Certificate, c.Raw)
	}
	byCert := pb.NewIstioCertificateServiceClient(m.sdsConn(t, tc))
	_, err := byCert.CreateCertificate(t.Context(), &pb.IstioCertificateRequest{Csr: csr})
	require.NoError(t, err, "the certificate renews its own identity")

	env.DeleteServiceAccount(t, ns, "web")
	time.Sleep(2 * time.Second) // creation timestamps have whole seconds
	env.CreateServiceAccount(t, ns, "web")
	require.Eventually(t, func() bool {
		_, err := byCert.CreateCertificate(t.Context(), &pb.IstioCertificateRequest{Csr: csr})
		return status.Code(err) == codes.Unauthenticated && strings.Contains(err.Error(), "issued before service account")
	}, 20*time.Second, 100*time.Millisecond)
	newTok := env.Token(t, ns, "web", []string{"istio-ca"}, time.Hour, nil)
	_, err = m.client(t).CreateCertificate(withToken(t.Context(), newTok), &pb.IstioCertificateRequest{Csr: csr})
	require.NoError(t, err, "the new account's token works")
}

// TestHostileClientChainRefusedInHandshake: a client that sends a long
// chain of made-up CA certificates (each costing a signature check) is
// refused in the TLS handshake, before meshca verifies anything; a real
// chain still works on the next connection.
func TestHostileClientChainRefusedInHandshake(t *testing.T) {
	m := startMeshca(t, fmt.Sprintf("authn:\n  chain: [clientcert, jwt]\n  kubeconfig: %s\n", meshcaKubeconfig(t)))
	now := time.Now()
	caKey := catest.Key(t, "P-384")
	tc := &tls.Certificate{PrivateKey: catest.Key(t, "P-256")}
	leafTmpl := &x509.Certificate{NotBefore: now.Add(-time.Hour), NotAfter: now.Add(time.Hour), ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}}
	u, err := url.Parse(spiffeID("demo", "web"))
	require.NoError(t, err)
	leafTmpl.URIs = []*url.URL{u}
	fake := catest.Issue(t, catest.CATemplate("fake ca", now.Add(-time.Hour), now.Add(time.Hour)), caKey, nil, nil)
	tc.Certificate = [][]byte{catest.Issue(t, leafTmpl, tc.PrivateKey.(crypto.Signer), fake, caKey).Raw}
	for range 40 {
		tc.Certificate = append(tc.Certificate, catest.Issue(t, catest.CATemplate("fake ca", now.Add(-time.Hour), now.Add(time.Hour)), caKey, nil, nil).Raw)
	}
	conn, err := tls.Dial("tcp", m.grpcAddr, &tls.Config{RootCAs: m.roots, ServerName: "meshca.istio-system.svc", Certificates: []tls.Certificate{*tc}, NextProtos: []string{"h2"}})
	if err == nil {
		// TLS 1.3: the client finishes first; the server's refusal arrives
		// with the first read.
		_, err = conn.Read(make([]byte, 1))
		conn.Close()
	}
	require.Error(t, err)
	require.Contains(t, err.Error(), "bad certificate")
	// The server is unharmed.
	code, _ := m.readyz()
	require.Equal(t, http.StatusOK, code)
}
