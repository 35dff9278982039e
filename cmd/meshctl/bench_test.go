package main

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"fmt"
	"math/big"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/metadata"
	pb "istio.io/api/security/v1alpha1"

	"github.com/meshca/meshca/cmd/internal/devkey"
)

// fakeCA is a TLS CreateCertificate server that counts what the bench
// does to it: connections accepted, requests, and distinct tokens. Its
// /metrics speaks istiod's success counter, which the bench must read.
type fakeCA struct {
	pb.UnimplementedIstioCertificateServiceServer
	accepted atomic.Int64
	requests atomic.Int64
	mu       sync.Mutex
	tokens   map[string]bool
}

func (f *fakeCA) CreateCertificate(ctx context.Context, req *pb.IstioCertificateRequest) (*pb.IstioCertificateResponse, error) {
	md, _ := metadata.FromIncomingContext(ctx)
	f.mu.Lock()
	f.tokens[strings.Join(md.Get("authorization"), ",")] = true
	f.mu.Unlock()
	if !strings.Contains(req.GetCsr(), "CERTIFICATE REQUEST") {
		return nil, fmt.Errorf("not a CSR")
	}
	f.requests.Add(1)
	return &pb.IstioCertificateResponse{CertChain: []string{"leaf", "root"}}, nil
}

type countingListener struct {
	net.Listener
	n *atomic.Int64
}

func (l countingListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err == nil {
		l.n.Add(1)
	}
	return c, err
}

// startFakeCA serves a fakeCA on loopback with a certificate for
// 127.0.0.1, and returns it, its address, the root file for --ca-cert and
// its /metrics URL.
func startFakeCA(t *testing.T) (f *fakeCA, addr, rootFile, metricsURL string) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	require.NoError(t, err)
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "fake CA"},
		NotBefore: time.Now().Add(-time.Minute), NotAfter: time.Now().Add(time.Hour),
		IPAddresses: []net.IP{net.IPv4(127, 0, 0, 1)}, IsCA: true, BasicConstraintsValid: true,
		KeyUsage: x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	require.NoError(t, err)
	rootFile = writeFile(t, "root-cert.pem", string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})))

	f = &fakeCA{tokens: map[string]bool{}}
	srv := grpc.NewServer(grpc.Creds(credentials.NewTLS(&tls.Config{
		Certificates: []tls.Certificate{{Certificate: [][]byte{der}, PrivateKey: key}}, MinVersion: tls.VersionTLS12,
	})))
	pb.RegisterIstioCertificateServiceServer(srv, f)
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	go func() { _ = srv.Serve(countingListener{lis, &f.accepted}) }()
	t.Cleanup(srv.Stop)

	metrics := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		n := f.requests.Load()
		fmt.Fprintf(w, "# TYPE process_cpu_seconds_total counter\nprocess_cpu_seconds_total %g\nprocess_resident_memory_bytes %d\n", float64(n)*0.0001, 64<<20)
		fmt.Fprintf(w, "citadel_server_success_cert_issuance_count %d\n", n)
	}))
	t.Cleanup(metrics.Close)
	return f, lis.Addr().String(), rootFile, metrics.URL
}

// inDevDir moves the test into a folder holding a dev key, as where
// `meshca serve --dev` runs.
func inDevDir(t *testing.T) {
	t.Helper()
	t.Chdir(t.TempDir())
	_, err := devkey.Ensure(".meshca-dev")
	require.NoError(t, err)
}

func TestBenchOneConnectionPerClient(t *testing.T) {
	inDevDir(t)
	f, addr, root, metrics := startFakeCA(t)
	out, _, err := runMeshctl(t, "bench", "--addr", addr, "--ca-cert", root, "--metrics", metrics,
		"--concurrency", "1,3", "--duration", "200ms", "--warmup", "50ms", "--identities", "4")
	require.NoError(t, err)
	lines := strings.Split(strings.TrimSpace(out), "\n")
	require.Len(t, lines, 3, out)
	require.Regexp(t, `^concurrency +certs/s +p50 +p90 +p99 +server CPU/cert +server RSS +errors$`, lines[0])
	require.Regexp(t, `^ +1 +\d+ .* 100 µs +64 MiB +0$`, lines[1], "CPU per cert from istiod's success counter")
	require.Regexp(t, `^ +3 +\d+ `, lines[2])
	require.EqualValues(t, 3, f.accepted.Load(), "level 1 opens one connection, level 3 two more")

	f.accepted.Store(0)
	_, _, err = runMeshctl(t, "bench", "--addr", addr, "--ca-cert", root, "--metrics", "", "--client", "grpc",
		"--concurrency", "4", "--conns", "2", "--duration", "100ms", "--warmup", "0s", "--identities", "4")
	require.NoError(t, err)
	require.EqualValues(t, 2, f.accepted.Load(), "--conns 2: four clients share two connections")

	_, _, err = runMeshctl(t, "bench", "--addr", addr, "--ca-cert", root, "--metrics", "",
		"--concurrency", "4", "--conns", "2", "--duration", "100ms", "--warmup", "0s", "--identities", "4")
	require.ErrorContains(t, err, "use --client grpc", "h2 connections carry one call at a time")
}

func TestBenchStorm(t *testing.T) {
	inDevDir(t)
	f, addr, root, metrics := startFakeCA(t)
	out, _, err := runMeshctl(t, "bench", "--addr", addr, "--ca-cert", root, "--metrics", metrics,
		"--storm", "5,7", "--warmup", "0s", "--identities", "3")
	require.NoError(t, err)
	lines := strings.Split(strings.TrimSpace(out), "\n")
	require.Len(t, lines, 3, out)
	require.Regexp(t, `^ *conns +handshakes/s +certs/s +handshake p50 +handshake p99 +cert p50 +cert p99 +server CPU/cert +server RSS +errors$`, lines[0])
	require.Regexp(t, `^ +5 +\d+ +\d+ .* 100 µs +64 MiB +0$`, lines[1])
	require.Regexp(t, `^ +7 +\d+ +\d+ .* 0$`, lines[2])
	require.EqualValues(t, 12, f.accepted.Load(), "one new connection per request")
	require.EqualValues(t, 12, f.requests.Load())
	require.Len(t, f.tokens, 12, "every request of a storm has a token of its own")
}

func TestBenchRefusesBadLists(t *testing.T) {
	for _, args := range [][]string{
		{"bench", "--storm", "0"},
		{"bench", "--storm", "10,x"},
		{"bench", "--concurrency", "-1"},
		{"bench", "--conns", "-1"},
		{"bench", "--client", "http1"},
	} {
		_, _, err := runMeshctl(t, args...)
		require.ErrorContains(t, err, args[1], "refused before any key is looked for")
	}
}
