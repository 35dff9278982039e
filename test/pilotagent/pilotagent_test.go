package pilotagent_test

import (
	"bytes"
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"math/big"
	"net"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	securityv1alpha1 "istio.io/api/security/v1alpha1"

	"github.com/meshca/meshca/test/pilotagent"
)

func TestMain(m *testing.M) {
	pilotagent.ReexecInNetNS(m)
}

func TestAgentGetsCertificate(t *testing.T) {
	tests := []struct {
		name        string
		cfg         pilotagent.Config
		wantSPIFFE  string
		wantTTL     time.Duration
		wantCluster string
		wantKey     any
	}{
		{
			name:        "defaults",
			cfg:         pilotagent.Config{Namespace: "demo", ServiceAccount: "workload", PodName: "p1"},
			wantSPIFFE:  "spiffe://cluster.local/ns/demo/sa/workload",
			wantTTL:     time.Hour,
			wantCluster: "Kubernetes",
			wantKey:     &rsa.PublicKey{},
		},
		{
			name: "ecdsa and custom identity",
			cfg: pilotagent.Config{
				Namespace: "shop", ServiceAccount: "cart", PodName: "cart-1",
				TrustDomain: "example.org", SecretTTL: 2 * time.Hour, ClusterID: "east", ECDSA: true,
			},
			wantSPIFFE:  "spiffe://example.org/ns/shop/sa/cart",
			wantTTL:     2 * time.Hour,
			wantCluster: "east",
			wantKey:     &ecdsa.PublicKey{},
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel() // each agent has its own status port
			ca := startFakeCA(t)
			cfg := tc.cfg
			cfg.CAAddr = ca.addr
			cfg.RootCertPEM = ca.rootPEM
			cfg.Token = "not-a-real-jwt-" + tc.name

			t0 := time.Now()
			agent := pilotagent.Start(t, cfg)
			chain, key, root := agent.WaitForCerts(t, 30*time.Second)
			t.Logf("first certificate after %v", time.Since(t0))

			req := ca.firstRequest(t)
			require.Equal(t, []string{"Bearer " + cfg.Token}, req.authorization)
			require.Equal(t, []string{tc.wantCluster}, req.clusterID)
			require.Equal(t, int64(tc.wantTTL/time.Second), req.validitySeconds)
			// Istio puts an empty O= attribute in the subject, and no CN.
			require.Empty(t, req.csr.Subject.CommonName)
			require.Len(t, req.csr.URIs, 1)
			require.Equal(t, tc.wantSPIFFE, req.csr.URIs[0].String())
			require.IsType(t, tc.wantKey, req.csr.PublicKey)

			pair, err := tls.X509KeyPair(chain, key)
			require.NoError(t, err)
			leaf, err := x509.ParseCertificate(pair.Certificate[0])
			require.NoError(t, err)
			require.Equal(t, tc.wantSPIFFE, leaf.URIs[0].String())
			// The agent drops the trailing newline.
			require.Equal(t, string(bytes.TrimSpace(ca.rootPEM)), string(bytes.TrimSpace(root)))
			require.NotEmpty(t, agent.Log())
		})
	}
}

// fakeCA is a stand-in for meshca used ONLY to test this harness: a minimal
// Istio CertificateService over TLS that records what pilot-agent sends and
// signs any CSR with a throwaway root, without authenticating anyone. The
// real CA is tested against the real agent elsewhere.
type fakeCA struct {
	securityv1alpha1.UnimplementedIstioCertificateServiceServer

	addr    string
	root    *x509.Certificate
	rootKey crypto.Signer
	rootPEM []byte

	mu   sync.Mutex
	seen []seenRequest
}

// seenRequest is what the fake recorded of one CreateCertificate call.
type seenRequest struct {
	authorization   []string
	clusterID       []string
	validitySeconds int64
	csr             *x509.CertificateRequest
}

func startFakeCA(t *testing.T) *fakeCA {
	t.Helper()
	rootKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	require.NoError(t, err)
	now := time.Now()
	rootDER, err := x509.CreateCertificate(rand.Reader, &x509.Certificate{
		SerialNumber:          randomSerial(t),
		Subject:               pkix.Name{CommonName: "fake test root"},
		NotBefore:             now.Add(-time.Minute),
		NotAfter:              now.Add(24 * time.Hour),
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageCertSign,
	}, &x509.Certificate{Subject: pkix.Name{CommonName: "fake test root"}}, rootKey.Public(), rootKey)
	require.NoError(t, err)
	root, err := x509.ParseCertificate(rootDER)
	require.NoError(t, err)
	ca := &fakeCA{root: root, rootKey: rootKey, rootPEM: pemCert(rootDER)}

	servingKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	require.NoError(t, err)
	servingDER, err := x509.CreateCertificate(rand.Reader, &x509.Certificate{
		SerialNumber: randomSerial(t),
		NotBefore:    now.Add(-time.Minute),
		NotAfter:     now.Add(time.Hour),
		IPAddresses:  []net.IP{net.IPv4(127, 0, 0, 1)},
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}, root, servingKey.Public(), rootKey)
	require.NoError(t, err)

	lis, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	ca.addr = lis.Addr().String()
	srv := grpc.NewServer(grpc.Creds(credentials.NewTLS(&tls.Config{
		Certificates: []tls.Certificate{{Certificate: [][]byte{servingDER}, PrivateKey: servingKey}},
		MinVersion:   tls.VersionTLS12,
	})))
	securityv1alpha1.RegisterIstioCertificateServiceServer(srv, ca)
	go func() { _ = srv.Serve(lis) }()
	t.Cleanup(srv.Stop)
	return ca
}

// CreateCertificate records the call and signs the CSR's public key and
// URIs for the requested lifetime.
func (f *fakeCA) CreateCertificate(ctx context.Context, req *securityv1alpha1.IstioCertificateRequest) (*securityv1alpha1.IstioCertificateResponse, error) {
	md, _ := metadata.FromIncomingContext(ctx)
	block, _ := pem.Decode([]byte(req.GetCsr()))
	if block == nil {
		return nil, status.Error(codes.InvalidArgument, "csr is not PEM")
	}
	csr, err := x509.ParseCertificateRequest(block.Bytes)
	if err != nil {
		return nil, status.Error(codes.InvalidArgument, "parse csr")
	}
	if err := csr.CheckSignature(); err != nil {
		return nil, status.Error(codes.InvalidArgument, "csr signature")
	}
	f.mu.Lock()
	f.seen = append(f.seen, seenRequest{
		authorization:   md.Get("authorization"),
		clusterID:       md.Get("clusterid"),
		validitySeconds: req.GetValidityDuration(),
		csr:             csr,
	})
	f.mu.Unlock()

	serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 128))
	if err != nil {
		return nil, status.Error(codes.Internal, "serial")
	}
	now := time.Now()
	leafDER, err := x509.CreateCertificate(rand.Reader, &x509.Certificate{
		SerialNumber: serial,
		NotBefore:    now.Add(-time.Minute),
		NotAfter:     now.Add(time.Duration(req.GetValidityDuration()) * time.Second),
		URIs:         csr.URIs,
		KeyUsage:     x509.KeyUsageDigitalSignature | x509.KeyUsageKeyEncipherment,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
	}, f.root, csr.PublicKey, f.rootKey)
	if err != nil {
		return nil, status.Error(codes.Internal, "sign")
	}
	// pilot-agent wants the leaf first and the root last.
	return &securityv1alpha1.IstioCertificateResponse{
		CertChain: []string{string(pemCert(leafDER)), string(f.rootPEM)},
	}, nil
}

func (f *fakeCA) firstRequest(t *testing.T) seenRequest {
	t.Helper()
	f.mu.Lock()
	defer f.mu.Unlock()
	require.NotEmpty(t, f.seen)
	return f.seen[0]
}

func randomSerial(t *testing.T) *big.Int {
	t.Helper()
	n, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 128))
	require.NoError(t, err)
	return n
}

func pemCert(der []byte) []byte {
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})
}
