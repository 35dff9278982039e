package workload_test

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"math/big"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/stretchr/testify/require"
	"google.golang.org/grpc"

	"github.com/meshca/meshca/sds"
	"github.com/meshca/meshca/sds/workload"
)

var (
	td    = spiffeid.RequireTrustDomainFromString("example.org")
	appID = spiffeid.RequireFromString("spiffe://example.org/ns/default/sa/app")
)

// testSource is an in-memory sds.Source whose snapshots the test
// publishes. It counts Watch calls, so a test can tell that a stream has
// looked at a snapshot even when that snapshot sent nothing.
type testSource struct {
	mu      sync.Mutex
	snap    sds.Snapshot
	changed chan struct{}
	watches atomic.Int64
}

func newSource(snap sds.Snapshot) *testSource {
	return &testSource{snap: snap, changed: make(chan struct{})}
}

func (s *testSource) Watch() (sds.Snapshot, <-chan struct{}) {
	s.watches.Add(1)
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.snap, s.changed
}

// Publish puts snap in force and wakes every watcher.
func (s *testSource) Publish(snap sds.Snapshot) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.snap = snap
	close(s.changed)
	s.changed = make(chan struct{})
}

// testCA is a CA certificate and its key; chain is what a leaf it signs
// carries above itself (the intermediates, never the root).
type testCA struct {
	cert  *x509.Certificate
	key   *ecdsa.PrivateKey
	chain []*x509.Certificate
}

func newKey(t *testing.T) *ecdsa.PrivateKey {
	t.Helper()
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	require.NoError(t, err)
	return k
}

func serial(t *testing.T) *big.Int {
	t.Helper()
	n, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	require.NoError(t, err)
	return n
}

func sign(t *testing.T, tmpl, parent *x509.Certificate, pub, parentKey any) *x509.Certificate {
	t.Helper()
	der, err := x509.CreateCertificate(rand.Reader, tmpl, parent, pub, parentKey)
	require.NoError(t, err)
	c, err := x509.ParseCertificate(der)
	require.NoError(t, err)
	return c
}

func caTemplate(t *testing.T, name string) *x509.Certificate {
	now := time.Now()
	return &x509.Certificate{
		SerialNumber:          serial(t),
		Subject:               pkix.Name{Organization: []string{"example.org"}, CommonName: name},
		NotBefore:             now.Add(-time.Hour),
		NotAfter:              now.Add(24 * time.Hour),
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
		URIs:                  []*url.URL{td.ID().URL()},
	}
}

func newRoot(t *testing.T, name string) *testCA {
	t.Helper()
	key := newKey(t)
	tmpl := caTemplate(t, name)
	return &testCA{cert: sign(t, tmpl, tmpl, &key.PublicKey, key), key: key}
}

// intermediate returns a CA below ca.
func (ca *testCA) intermediate(t *testing.T, name string) *testCA {
	t.Helper()
	key := newKey(t)
	c := sign(t, caTemplate(t, name), ca.cert, &key.PublicKey, ca.key)
	return &testCA{cert: c, key: key, chain: append([]*x509.Certificate{c}, ca.chain...)}
}

// leaf issues an X.509-SVID for appID.
func (ca *testCA) leaf(t *testing.T) *sds.Credential {
	t.Helper()
	key := newKey(t)
	now := time.Now()
	tmpl := &x509.Certificate{
		SerialNumber:          serial(t),
		NotBefore:             now.Add(-time.Minute),
		NotAfter:              now.Add(time.Hour),
		KeyUsage:              x509.KeyUsageDigitalSignature,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
		BasicConstraintsValid: true,
		URIs:                  []*url.URL{appID.URL()},
	}
	leaf := sign(t, tmpl, ca.cert, &key.PublicKey, ca.key)
	return &sds.Credential{
		ID:      appID,
		Chain:   append([]*x509.Certificate{leaf}, ca.chain...),
		Key:     key,
		RenewAt: now.Add(30 * time.Minute),
	}
}

func bundleOf(roots ...*testCA) sds.Bundle {
	b := sds.Bundle{TrustDomain: td}
	for _, r := range roots {
		b.Roots = append(b.Roots, r.cert)
	}
	return b
}

// serve starts a Workload API server over src on a Unix socket and returns
// its address for go-spiffe ("unix:///…") and its metrics' registry.
func serve(t *testing.T, src sds.Source, cfg workload.Config) (string, *workload.Metrics) {
	t.Helper()
	// t.TempDir() can exceed the ~107 bytes a socket path may have.
	dir, err := os.MkdirTemp("", "wl")
	require.NoError(t, err)
	t.Cleanup(func() { os.RemoveAll(dir) })
	sock := filepath.Join(dir, "api.sock")
	lis, err := net.Listen("unix", sock)
	require.NoError(t, err)

	cfg.Source = src
	if cfg.Metrics == nil {
		cfg.Metrics = workload.NewMetrics(prometheus.NewRegistry())
	}
	srv, err := workload.New(cfg)
	require.NoError(t, err)
	gs := grpc.NewServer()
	srv.Register(gs)
	done := make(chan struct{})
	go func() {
		defer close(done)
		_ = gs.Serve(lis)
	}()
	t.Cleanup(func() {
		gs.Stop()
		<-done
	})
	return "unix://" + sock, cfg.Metrics
}

// recv returns the next value on ch, failing the test after 10 seconds.
func recv[T any](t *testing.T, ch <-chan T) T {
	t.Helper()
	select {
	case v := <-ch:
		return v
	case <-time.After(10 * time.Second):
		t.Fatal("timed out waiting for an update")
		panic("unreachable")
	}
}

func spiffeTD(t *testing.T, name string) spiffeid.TrustDomain {
	t.Helper()
	d, err := spiffeid.TrustDomainFromString(name)
	require.NoError(t, err)
	return d
}
