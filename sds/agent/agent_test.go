package agent_test

import (
	"bytes"
	"context"
	"crypto"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"io"
	"log/slog"
	"math/big"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"testing/synctest"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/stretchr/testify/require"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/grpc/test/bufconn"
	pb "istio.io/api/security/v1alpha1"

	"github.com/meshca/meshca/ca/catest"
	"github.com/meshca/meshca/ca/service"
	"github.com/meshca/meshca/sds"
	"github.com/meshca/meshca/sds/agent"
)

var td = spiffeid.RequireTrustDomainFromString("cluster.local")

const (
	webID      = "spiffe://cluster.local/ns/demo/sa/web"
	serverName = "meshca.test"
)

// testCA is a root with an intermediate below it that signs leaves, made
// at the bubble's time.
type testCA struct {
	root, inter *x509.Certificate
	interKey    crypto.Signer
}

func newTestCA(t *testing.T, name string) *testCA {
	t.Helper()
	now := time.Now()
	rootKey, interKey := catest.Key(t, "P-256"), catest.Key(t, "P-256")
	rt := catest.CATemplate(name+" root", now.Add(-time.Hour), now.Add(365*24*time.Hour))
	rt.MaxPathLen = 1
	root := catest.Issue(t, rt, rootKey, nil, nil)
	it := catest.CATemplate(name+" intermediate", now.Add(-time.Hour), now.Add(365*24*time.Hour))
	it.MaxPathLen, it.MaxPathLenZero = 0, true
	return &testCA{root: root, inter: catest.Issue(t, it, interKey, root, rootKey), interKey: interKey}
}

// issue signs a leaf for pub, valid over [notBefore, notAfter].
func (c *testCA) issue(pub crypto.PublicKey, uris []*url.URL, dnsNames []string, notBefore, notAfter time.Time) (*x509.Certificate, error) {
	tmpl := &x509.Certificate{
		SerialNumber: mustSerial(),
		URIs:         uris,
		DNSNames:     dnsNames,
		NotBefore:    notBefore,
		NotAfter:     notAfter,
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, c.inter, pub, c.interKey)
	if err != nil {
		return nil, err
	}
	return x509.ParseCertificate(der)
}

// serving returns a serving certificate for serverName under c.
func (c *testCA) serving(t *testing.T) *tls.Certificate {
	t.Helper()
	key := catest.Key(t, "P-256")
	now := time.Now()
	leaf, err := c.issue(key.Public(), nil, []string{serverName}, now.Add(-time.Hour), now.Add(365*24*time.Hour))
	require.NoError(t, err)
	return &tls.Certificate{Certificate: [][]byte{leaf.Raw, c.inter.Raw}, PrivateKey: key, Leaf: leaf}
}

func (c *testCA) rootPEM() []byte {
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: c.root.Raw})
}

func mustSerial() *big.Int {
	n, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 128))
	if err != nil {
		panic(err)
	}
	return n
}

func pemOf(certs ...*x509.Certificate) []string {
	out := make([]string, len(certs))
	for i, c := range certs {
		out[i] = string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: c.Raw}))
	}
	return out
}

// Ways fakeMeshca can answer badly.
const (
	answerGood        = ""
	answerWrongID     = "wrong-id"
	answerExtraURI    = "extra-uri"
	answerWrongKey    = "wrong-key"
	answerForeignLeaf = "foreign-leaf"
	answerExpired     = "expired"
	answerNoRoot      = "no-root"
)

// fakeMeshca is an in-process CreateCertificate server: it signs whatever
// the CSR asks for with its testCA, for defaultTTL or the validity asked
// for, backdated 30s as meshca does, and records what it was sent. The
// real service's checks are tested in ca/service.
type fakeMeshca struct {
	pb.UnimplementedIstioCertificateServiceServer
	t *testing.T

	mu sync.Mutex
	ca *testCA
	// servingCert is what the TLS listener presents.
	servingCert *tls.Certificate
	// refuse, if set, is the error every call gets.
	refuse error
	// unreachable makes dials fail.
	unreachable bool
	// header returns the renew-at header's value for a leaf; nil or ""
	// sends none.
	header func(leaf *x509.Certificate) string
	answer string

	tokens   []string
	validity []int64
	calls    []time.Time
}

func newFakeMeshca(t *testing.T) *fakeMeshca {
	c := newTestCA(t, "meshca")
	return &fakeMeshca{t: t, ca: c, servingCert: c.serving(t)}
}

func (f *fakeMeshca) set(fn func(f *fakeMeshca)) {
	f.mu.Lock()
	defer f.mu.Unlock()
	fn(f)
}

func (f *fakeMeshca) getCertificate(*tls.ClientHelloInfo) (*tls.Certificate, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.servingCert, nil
}

func (f *fakeMeshca) CreateCertificate(ctx context.Context, req *pb.IstioCertificateRequest) (*pb.IstioCertificateResponse, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	now := time.Now()
	f.calls = append(f.calls, now)
	f.validity = append(f.validity, req.GetValidityDuration())
	if auth := metadata.ValueFromIncomingContext(ctx, "authorization"); len(auth) == 1 {
		f.tokens = append(f.tokens, strings.TrimPrefix(auth[0], "Bearer "))
	} else {
		f.tokens = append(f.tokens, "")
	}
	if f.refuse != nil {
		return nil, f.refuse
	}
	b, _ := pem.Decode([]byte(req.GetCsr()))
	if b == nil {
		return nil, status.Error(codes.InvalidArgument, "CSR is not PEM")
	}
	csr, err := x509.ParseCertificateRequest(b.Bytes)
	if err != nil || csr.CheckSignature() != nil {
		return nil, status.Error(codes.InvalidArgument, "bad CSR")
	}
	ttl := 24 * time.Hour
	if v := req.GetValidityDuration(); v > 0 {
		ttl = time.Duration(v) * time.Second
	}
	pub, uris := csr.PublicKey, csr.URIs
	notBefore, notAfter := now.Add(-30*time.Second), now.Add(ttl)
	signer := f.ca
	switch f.answer {
	case answerWrongID:
		uris = []*url.URL{{Scheme: "spiffe", Host: "cluster.local", Path: "/ns/demo/sa/admin"}}
	case answerExtraURI:
		uris = append(uris, &url.URL{Scheme: "spiffe", Host: "cluster.local", Path: "/ns/demo/sa/admin"})
	case answerWrongKey:
		pub = catest.Key(f.t, "P-256").Public()
	case answerForeignLeaf:
		signer = newTestCA(f.t, "foreign")
	case answerExpired:
		notBefore, notAfter = now.Add(-2*time.Hour), now.Add(-time.Hour)
	}
	leaf, err := signer.issue(pub, uris, nil, notBefore, notAfter)
	if err != nil {
		return nil, status.Error(codes.Internal, err.Error())
	}
	if f.header != nil {
		if v := f.header(leaf); v != "" {
			if err := grpc.SetHeader(ctx, metadata.Pairs(service.RenewAtHeader, v)); err != nil {
				return nil, err
			}
		}
	}
	chain := pemOf(leaf, f.ca.inter, f.ca.root)
	if f.answer == answerNoRoot {
		chain = chain[:1]
	}
	return &pb.IstioCertificateResponse{CertChain: chain}, nil
}

// callCount, tokensSeen and callTimes read what the server recorded.
func (f *fakeMeshca) callCount() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return len(f.calls)
}

func (f *fakeMeshca) tokensSeen() []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]string(nil), f.tokens...)
}

func (f *fakeMeshca) callTimes() []time.Time {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]time.Time(nil), f.calls...)
}

// syncBuffer collects log output from the keeper's goroutine.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// harness is a keeper running against a fakeMeshca over TLS on an
// in-memory connection, inside a synctest bubble.
type harness struct {
	k         *agent.Keeper
	f         *fakeMeshca
	reg       *prometheus.Registry
	log       *syncBuffer
	tokenFile string
	rootsFile string
}

// start serves f and runs a keeper configured by cfg (Address, files,
// identity, Dial, Log and Registerer are filled in unless set). Call it
// inside a bubble; it stops everything when the test ends.
func start(t *testing.T, f *fakeMeshca, cfg agent.Config) *harness {
	t.Helper()
	lis := bufconn.Listen(1 << 20)
	srv := grpc.NewServer(grpc.Creds(credentials.NewTLS(&tls.Config{GetCertificate: f.getCertificate, MinVersion: tls.VersionTLS12})))
	pb.RegisterIstioCertificateServiceServer(srv, f)
	go srv.Serve(lis)

	dir := t.TempDir()
	h := &harness{f: f, reg: prometheus.NewRegistry(), log: &syncBuffer{},
		tokenFile: filepath.Join(dir, "token"), rootsFile: filepath.Join(dir, "roots.pem")}
	require.NoError(t, os.WriteFile(h.tokenFile, []byte("tok-1\n"), 0o600))
	if cfg.RootsFile == "" {
		require.NoError(t, os.WriteFile(h.rootsFile, f.ca.rootPEM(), 0o644))
		cfg.RootsFile = h.rootsFile
	} else {
		h.rootsFile = cfg.RootsFile
	}
	cfg.Address = serverName + ":15012"
	cfg.TokenFile = h.tokenFile
	cfg.TrustDomain, cfg.Namespace, cfg.ServiceAccount = td, "demo", "web"
	cfg.Dial = func(ctx context.Context, addr string) (net.Conn, error) {
		f.mu.Lock()
		down := f.unreachable
		f.mu.Unlock()
		if down {
			return nil, errors.New("dial tcp 10.0.0.1:15012: connect: connection refused")
		}
		return lis.DialContext(ctx)
	}
	cfg.Log = slog.New(slog.NewTextHandler(h.log, &slog.HandlerOptions{Level: slog.LevelDebug}))
	cfg.Registerer = h.reg
	k, err := agent.New(cfg)
	require.NoError(t, err)
	h.k = k

	ctx, cancel := context.WithCancel(t.Context())
	done := make(chan error, 1)
	go func() { done <- k.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		require.NoError(t, <-done)
		srv.Stop()
		lis.Close()
		// No token ever reaches the log.
		require.NotContains(t, h.log.String(), "tok-")
	})
	synctest.Wait()
	return h
}

// cred returns the credential in force, failing the test if there is none.
func (h *harness) cred(t *testing.T) *sds.Credential {
	t.Helper()
	s, _ := h.k.Watch()
	require.NotNil(t, s.Credential, "a credential is in force; log:\n%s", h.log.String())
	return s.Credential
}

// metric reads one gauge or counter sample from the harness's registry.
func (h *harness) metric(t *testing.T, name string, labels ...string) float64 {
	t.Helper()
	mfs, err := h.reg.Gather()
	require.NoError(t, err)
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
	metrics:
		for _, m := range mf.GetMetric() {
			for i := 0; i+1 < len(labels); i += 2 {
				found := false
				for _, lp := range m.GetLabel() {
					if lp.GetName() == labels[i] && lp.GetValue() == labels[i+1] {
						found = true
					}
				}
				if !found {
					continue metrics
				}
			}
			if g := m.GetGauge(); g != nil {
				return g.GetValue()
			}
			return m.GetCounter().GetValue()
		}
	}
	t.Fatalf("no metric %s%v", name, labels)
	return 0
}

func closed(ch <-chan struct{}) bool {
	select {
	case <-ch:
		return true
	default:
		return false
	}
}

func sameKey(a, b crypto.Signer) bool {
	return a.Public().(interface{ Equal(crypto.PublicKey) bool }).Equal(b.Public())
}

// renewAtFraction is a header function naming fraction of the leaf's life.
func renewAtFraction(fraction float64) func(*x509.Certificate) string {
	return func(leaf *x509.Certificate) string {
		life := leaf.NotAfter.Sub(leaf.NotBefore)
		return leaf.NotBefore.Add(time.Duration(float64(life) * fraction)).UTC().Truncate(time.Second).Format(time.RFC3339)
	}
}

func TestRenewsAtTheHeadersTime(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		f := newFakeMeshca(t)
		f.header = renewAtFraction(0.7)
		h := start(t, f, agent.Config{TTL: 24 * time.Hour})

		snap, changed := h.k.Watch()
		first := snap.Credential
		require.NotNil(t, first, h.log.String())
		require.NoError(t, h.k.Ready())
		leaf := first.Leaf()
		require.Equal(t, webID, first.ID.String())
		require.Equal(t, []string{webID}, []string{leaf.URIs[0].String()})
		require.Len(t, first.Chain, 2, "leaf and intermediate, never the root")
		require.Equal(t, f.ca.inter.Raw, first.Chain[1].Raw)
		require.Equal(t, td, snap.Bundle.TrustDomain)
		require.Len(t, snap.Bundle.Roots, 1)
		require.Equal(t, f.ca.root.Raw, snap.Bundle.Roots[0].Raw)
		wantAt, err := time.Parse(time.RFC3339, renewAtFraction(0.7)(leaf))
		require.NoError(t, err)
		require.Equal(t, wantAt, first.RenewAt, "the header's time, not the fallback's half-life")
		require.Equal(t, []int64{24 * 3600}, f.validity, "validity_duration is the TTL in seconds")
		require.Equal(t, float64(leaf.NotAfter.Unix()), h.metric(t, "meshca_agent_certificate_expiry_timestamp_seconds"))
		require.Equal(t, float64(wantAt.Unix()), h.metric(t, "meshca_agent_certificate_renew_timestamp_seconds"))
		require.Equal(t, 1.0, h.metric(t, "meshca_agent_ready"))
		require.Equal(t, 1.0, h.metric(t, "meshca_agent_renewals_total", "result", "success"))
		require.Equal(t, 1.0, h.metric(t, "meshca_agent_trust_bundle_roots"))

		// Not a moment before the renewal point...
		time.Sleep(time.Until(wantAt) - time.Second)
		synctest.Wait()
		require.Equal(t, 1, f.callCount())
		require.False(t, closed(changed))
		// ...and at it.
		time.Sleep(time.Second)
		synctest.Wait()
		require.Equal(t, 2, f.callCount())
		require.WithinDuration(t, wantAt, f.callTimes()[1], 0, "renewed at the header's time")
		require.True(t, closed(changed), "watchers are told")
		second := h.cred(t)
		require.NotEqual(t, leaf.SerialNumber, second.Leaf().SerialNumber)
		require.False(t, sameKey(first.Key, second.Key), "every renewal has a new key")
		require.True(t, sameKey(second.Key, &pubOnly{second.Leaf().PublicKey}))
		require.Equal(t, 2.0, h.metric(t, "meshca_agent_renewals_total", "result", "success"))
		require.Equal(t, 0.0, h.metric(t, "meshca_agent_renewals_total", "result", "failure"))
	})
}

// pubOnly lets sameKey compare a bare public key.
type pubOnly struct{ pub crypto.PublicKey }

func (p *pubOnly) Public() crypto.PublicKey { return p.pub }
func (p *pubOnly) Sign(io.Reader, []byte, crypto.SignerOpts) ([]byte, error) {
	return nil, errors.New("public only")
}

func TestFallsBackWithoutAUsableHeader(t *testing.T) {
	tests := []struct {
		name   string
		header func(*x509.Certificate) string
	}{
		{"no header", nil},
		{"unreadable header", func(*x509.Certificate) string { return "in a while" }},
		{"header outside the leaf's validity", func(l *x509.Certificate) string {
			return l.NotAfter.Add(time.Hour).UTC().Format(time.RFC3339)
		}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				f := newFakeMeshca(t)
				f.header = tc.header
				h := start(t, f, agent.Config{TTL: 8 * time.Hour, RenewFraction: 0.25})
				first := h.cred(t)
				leaf := first.Leaf()
				life := leaf.NotAfter.Sub(leaf.NotBefore)
				want := leaf.NotBefore.Add(life / 4)
				require.WithinDuration(t, want, first.RenewAt, 0, "a quarter of the life, from RenewFraction")

				time.Sleep(time.Until(want) - time.Second)
				synctest.Wait()
				require.Equal(t, 1, f.callCount(), "not renewed early")
				time.Sleep(time.Second)
				synctest.Wait()
				require.Equal(t, 2, f.callCount(), "renewed at a quarter of the life")
				require.NotEqual(t, leaf.SerialNumber, h.cred(t).Leaf().SerialNumber)
			})
		})
	}
}

func TestJitterMovesTheFallbackEarlier(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		f := newFakeMeshca(t)
		h := start(t, f, agent.Config{TTL: 8 * time.Hour, RenewFraction: 0.5, RenewJitter: time.Hour})
		leaf := h.cred(t).Leaf()
		latest := leaf.NotBefore.Add(leaf.NotAfter.Sub(leaf.NotBefore) / 2)
		at := h.cred(t).RenewAt
		require.False(t, at.After(latest))
		require.True(t, at.After(latest.Add(-time.Hour)))
	})
}

func TestReadsTheTokenAfreshForEveryRequest(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		f := newFakeMeshca(t)
		h := start(t, f, agent.Config{TTL: time.Hour})
		require.Equal(t, []string{"tok-1"}, f.tokensSeen())

		// The kubelet rotates the token.
		require.NoError(t, os.WriteFile(h.tokenFile, []byte("tok-2\n"), 0o600))
		time.Sleep(time.Until(h.cred(t).RenewAt))
		synctest.Wait()
		require.Equal(t, []string{"tok-1", "tok-2"}, f.tokensSeen())

		// A refusal is retried with the token in the file then, and no
		// token shows in Ready's message (nor, checked at cleanup, in the
		// log).
		f.set(func(f *fakeMeshca) { f.refuse = status.Error(codes.Unauthenticated, "token expired") })
		require.NoError(t, os.WriteFile(h.tokenFile, []byte("tok-3"), 0o600))
		time.Sleep(time.Until(h.cred(t).RenewAt))
		synctest.Wait()
		require.NoError(t, os.WriteFile(h.tokenFile, []byte("tok-4"), 0o600))
		f.set(func(f *fakeMeshca) { f.refuse = nil })
		time.Sleep(2 * time.Second) // RetryMin is 1s: the first retry is due
		synctest.Wait()
		require.Equal(t, []string{"tok-1", "tok-2", "tok-3", "tok-4"}, f.tokensSeen())
		require.NoError(t, h.k.Ready())
	})
}

func TestOutage(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		f := newFakeMeshca(t)
		retryMin, retryMax := time.Second, time.Minute
		h := start(t, f, agent.Config{TTL: time.Hour, RetryMin: retryMin, RetryMax: retryMax})
		snap, changed := h.k.Watch()
		held := snap.Credential
		require.NotNil(t, held)
		leaf := held.Leaf()

		// meshca answers Unavailable from the renewal point on.
		f.set(func(f *fakeMeshca) {
			f.refuse = status.Error(codes.Unavailable, "signing backend unavailable, retry later")
		})
		outageStart := held.RenewAt
		time.Sleep(time.Until(outageStart))
		synctest.Wait()
		for time.Now().Before(leaf.NotAfter.Add(-time.Minute)) {
			time.Sleep(10 * time.Second)
			synctest.Wait()
			// The still-valid credential is served and nothing changes.
			s, ch := h.k.Watch()
			require.Same(t, held, s.Credential)
			require.False(t, closed(ch))
			require.NoError(t, h.k.Ready())
			require.Equal(t, 1.0, h.metric(t, "meshca_agent_ready"))
		}
		require.False(t, closed(changed))

		// Retries come with growing, bounded, jittered waits.
		calls := f.callTimes()[1:]
		require.GreaterOrEqual(t, len(calls), 20, "it keeps trying")
		require.WithinDuration(t, outageStart, calls[0], 0, "the first try is at the renewal point")
		var late []time.Duration
		for n := 1; n < len(calls); n++ {
			gap := calls[n].Sub(calls[n-1])
			ceiling := min(retryMax, retryMin<<min(n-1, 30))
			require.GreaterOrEqual(t, gap, retryMin, "never sooner than RetryMin (wait %d)", n)
			require.LessOrEqual(t, gap, ceiling, "wait %d is at most min(RetryMax, RetryMin·2^(n-1))", n)
			if n > 6 {
				late = append(late, gap)
			}
		}
		var sum time.Duration
		for _, g := range late {
			sum += g
		}
		// Uniform over [1s, 60s] averages 30.5s; a backoff that did not grow
		// would average 1s.
		require.Greater(t, sum/time.Duration(len(late)), 10*time.Second, "waits grow towards RetryMax")
		require.Equal(t, float64(len(calls)), h.metric(t, "meshca_agent_renewals_total", "result", "failure"))
		require.Contains(t, h.log.String(), "certificate renewal failed; serving the current certificate")

		// Past NotAfter the keeper says it is not ready, and why.
		time.Sleep(time.Until(leaf.NotAfter) + time.Second)
		synctest.Wait()
		err := h.k.Ready()
		require.Error(t, err)
		require.Contains(t, err.Error(), "certificate expired at "+leaf.NotAfter.UTC().Format(time.RFC3339))
		require.Contains(t, err.Error(), "last attempt failed")
		require.Contains(t, err.Error(), "signing backend unavailable")
		require.Equal(t, 0.0, h.metric(t, "meshca_agent_ready"))

		// meshca comes back: the next retry, at most RetryMax away,
		// recovers without a restart.
		f.set(func(f *fakeMeshca) { f.refuse = nil })
		time.Sleep(retryMax)
		synctest.Wait()
		s, ch := h.k.Watch()
		require.NotSame(t, held, s.Credential)
		require.True(t, s.Credential.Leaf().NotAfter.After(time.Now()))
		require.True(t, closed(changed))
		require.False(t, closed(ch))
		require.NoError(t, h.k.Ready())
		require.Equal(t, 1.0, h.metric(t, "meshca_agent_ready"))
		require.Equal(t, 2.0, h.metric(t, "meshca_agent_renewals_total", "result", "success"))

		// With the failures over, the schedule is the renewal point again.
		n := f.callCount()
		time.Sleep(time.Until(s.Credential.RenewAt) - time.Second)
		synctest.Wait()
		require.Equal(t, n, f.callCount())
	})
}

func TestUnreachableAtStart(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		f := newFakeMeshca(t)
		f.unreachable = true
		h := start(t, f, agent.Config{RetryMin: time.Second, RetryMax: 30 * time.Second})
		snap, changed := h.k.Watch()
		require.Nil(t, snap.Credential)
		require.Empty(t, snap.Bundle.Roots)
		err := h.k.Ready()
		require.Error(t, err)
		require.Contains(t, err.Error(), "no certificate yet: last attempt failed")
		require.Contains(t, err.Error(), "connection refused")
		require.Contains(t, h.log.String(), "no certificate to serve yet")

		time.Sleep(10 * time.Minute)
		synctest.Wait()
		require.False(t, closed(changed))
		attempts := h.metric(t, "meshca_agent_renewals_total", "result", "failure")
		require.GreaterOrEqual(t, attempts, 20.0, "keeps trying")
		require.LessOrEqual(t, attempts, 600.0, "never more often than RetryMin")

		f.set(func(f *fakeMeshca) { f.unreachable = false })
		time.Sleep(30 * time.Second)
		synctest.Wait()
		require.True(t, closed(changed))
		require.NoError(t, h.k.Ready())
		require.Equal(t, webID, h.cred(t).ID.String())
	})
}

func TestRefusesBadAnswers(t *testing.T) {
	tests := []struct {
		answer string
		want   string
	}{
		{answerWrongID, "the leaf names [spiffe://cluster.local/ns/demo/sa/admin]; want exactly " + webID},
		{answerExtraURI, "the leaf names [" + webID + ", spiffe://cluster.local/ns/demo/sa/admin]; want exactly " + webID},
		{answerWrongKey, "the leaf's public key is not the key this agent generated"},
		{answerForeignLeaf, "verify the leaf against the chain's root"},
		{answerExpired, "the leaf expired at"},
		{answerNoRoot, "the chain has 1 certificates; want the leaf and at least the root"},
	}
	for _, tc := range tests {
		t.Run(tc.answer, func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				f := newFakeMeshca(t)
				f.answer = tc.answer
				h := start(t, f, agent.Config{TTL: time.Hour})

				// Refused at the first request: nothing is published.
				snap, changed := h.k.Watch()
				require.Nil(t, snap.Credential)
				require.Empty(t, snap.Bundle.Roots)
				require.False(t, closed(changed))
				err := h.k.Ready()
				require.ErrorContains(t, err, "no certificate yet: last attempt failed: refuse meshca's answer: "+tc.want)
				require.Contains(t, h.log.String(), tc.want, "the log says what was wrong")
				require.Equal(t, 1.0, h.metric(t, "meshca_agent_renewals_total", "result", "failure"))

				// A good answer is taken at the retry.
				f.set(func(f *fakeMeshca) { f.answer = answerGood })
				time.Sleep(time.Second)
				synctest.Wait()
				require.True(t, closed(changed))
				snap, changed = h.k.Watch()
				good := snap.Credential
				require.NotNil(t, good)

				// Refused at renewal: the good credential stays.
				f.set(func(f *fakeMeshca) { f.answer = tc.answer })
				time.Sleep(time.Until(good.RenewAt) + 10*time.Second)
				synctest.Wait()
				require.Greater(t, f.callCount(), 2)
				snap, ch := h.k.Watch()
				require.Same(t, good, snap.Credential)
				require.False(t, closed(changed))
				require.False(t, closed(ch))
				require.NoError(t, h.k.Ready())
			})
		})
	}
}

func TestRootRotation(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		f := newFakeMeshca(t)
		// Renewals at about 10.8h, 21.6h and 32.4h: two before the first
		// leaf expires at 24h, none in the hour around it.
		f.header = renewAtFraction(0.45)
		h := start(t, f, agent.Config{TTL: 24 * time.Hour})
		first := h.cred(t)
		oldRoot := f.ca.root

		// meshca signs under a new root; its serving certificate is still
		// under the old one.
		next := newTestCA(t, "meshca next")
		f.set(func(f *fakeMeshca) { f.ca = next })
		_, changed := h.k.Watch()
		time.Sleep(time.Until(first.RenewAt))
		synctest.Wait()
		require.True(t, closed(changed))
		snap, _ := h.k.Watch()
		require.Equal(t, next.inter.Raw, snap.Credential.Chain[1].Raw)
		require.ElementsMatch(t, [][]byte{oldRoot.Raw, next.root.Raw}, rawOf(snap.Bundle.Roots),
			"the old root stays while peers may hold leaves under it")
		require.Equal(t, 2.0, h.metric(t, "meshca_agent_trust_bundle_roots"))
		require.True(t, bytes.Compare(snap.Bundle.Roots[0].Raw, snap.Bundle.Roots[1].Raw) < 0, "roots in a stable order")

		// meshca's serving certificate moves to the new root. RootsFile
		// still holds only the old one: the learned root verifies it.
		f.set(func(f *fakeMeshca) { f.servingCert = next.serving(t) })
		time.Sleep(time.Until(snap.Credential.RenewAt))
		synctest.Wait()
		third, _ := h.k.Watch()
		require.NotSame(t, snap.Credential, third.Credential, "renewed over TLS verified by the learned root; log:\n%s", h.log.String())
		require.Len(t, third.Bundle.Roots, 2)

		// The old root goes when the last leaf under it expires, and the
		// watchers are told.
		oldNotAfter := first.Leaf().NotAfter
		require.True(t, third.Credential.RenewAt.After(oldNotAfter), "no renewal in the window this test looks at")
		_, changed = h.k.Watch()
		time.Sleep(time.Until(oldNotAfter) - time.Second)
		synctest.Wait()
		require.False(t, closed(changed))
		time.Sleep(time.Second)
		synctest.Wait()
		require.True(t, closed(changed))
		last, _ := h.k.Watch()
		require.Same(t, third.Credential, last.Credential)
		require.Equal(t, [][]byte{next.root.Raw}, rawOf(last.Bundle.Roots))
		require.Equal(t, 1.0, h.metric(t, "meshca_agent_trust_bundle_roots"))
	})
}

func TestVerifiesMeshcaWithTheRootsFileReadAfresh(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		f := newFakeMeshca(t)
		dir := t.TempDir()
		roots := filepath.Join(dir, "roots.pem")
		require.NoError(t, os.WriteFile(roots, newTestCA(t, "unrelated").rootPEM(), 0o644))
		h := start(t, f, agent.Config{RootsFile: roots, RetryMin: time.Second, RetryMax: time.Second})
		require.ErrorContains(t, h.k.Ready(), "certificate signed by unknown authority")
		require.Zero(t, f.callCount(), "no request to an unverified server")

		require.NoError(t, os.WriteFile(roots, f.ca.rootPEM(), 0o644))
		time.Sleep(time.Second)
		synctest.Wait()
		require.NoError(t, h.k.Ready())
	})
}

func rawOf(certs []*x509.Certificate) [][]byte {
	out := make([][]byte, len(certs))
	for i, c := range certs {
		out[i] = c.Raw
	}
	return out
}

func TestNewChecksConfig(t *testing.T) {
	dir := t.TempDir()
	roots := filepath.Join(dir, "roots.pem")
	require.NoError(t, os.WriteFile(roots, newTestCA(t, "x").rootPEM(), 0o644))
	empty := filepath.Join(dir, "empty.pem")
	require.NoError(t, os.WriteFile(empty, []byte("no PEM here"), 0o644))
	good := func() agent.Config {
		return agent.Config{Address: "meshca.istio-system.svc:15012", RootsFile: roots, TokenFile: filepath.Join(dir, "token"),
			TrustDomain: td, Namespace: "demo", ServiceAccount: "web"}
	}
	k, err := agent.New(good())
	require.NoError(t, err, "the token file may appear later")
	require.Equal(t, webID, k.ID().String())
	require.ErrorContains(t, k.Ready(), "no certificate yet: no attempt finished yet")

	tests := []struct {
		name string
		edit func(*agent.Config)
		want string
	}{
		{"no address", func(c *agent.Config) { c.Address = "" }, "Address is required"},
		{"address without port", func(c *agent.Config) { c.Address = "meshca" }, "Address"},
		{"no roots file", func(c *agent.Config) { c.RootsFile = "" }, "RootsFile is required"},
		{"missing roots file", func(c *agent.Config) { c.RootsFile = filepath.Join(dir, "nope.pem") }, "read roots"},
		{"roots file without certificates", func(c *agent.Config) { c.RootsFile = empty }, "holds no PEM certificate"},
		{"no token file", func(c *agent.Config) { c.TokenFile = "" }, "TokenFile is required"},
		{"no trust domain", func(c *agent.Config) { c.TrustDomain = spiffeid.TrustDomain{} }, "TrustDomain is required"},
		{"no service account", func(c *agent.Config) { c.ServiceAccount = "" }, "Namespace and ServiceAccount are required"},
		{"bad namespace", func(c *agent.Config) { c.Namespace = "a/b" }, "identity"},
		{"unknown key type", func(c *agent.Config) { c.KeyType = "DSA-1024" }, "unknown KeyType"},
		{"fraction above one", func(c *agent.Config) { c.RenewFraction = 1.5 }, "RenewFraction"},
		{"retry bounds upside down", func(c *agent.Config) { c.RetryMin, c.RetryMax = time.Minute, time.Second }, "RetryMax"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			cfg := good()
			tc.edit(&cfg)
			_, err := agent.New(cfg)
			require.ErrorContains(t, err, tc.want)
		})
	}
}

// TestRealListener runs a keeper against the fake over TCP on 127.0.0.1,
// with the default dialer, outside any bubble: what production does.
func TestRealListener(t *testing.T) {
	f := newFakeMeshca(t)
	srv := grpc.NewServer(grpc.Creds(credentials.NewTLS(&tls.Config{GetCertificate: f.getCertificate, MinVersion: tls.VersionTLS12})))
	pb.RegisterIstioCertificateServiceServer(srv, f)
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	go srv.Serve(lis)
	t.Cleanup(srv.Stop)
	dir := t.TempDir()
	roots, token := filepath.Join(dir, "roots.pem"), filepath.Join(dir, "token")
	require.NoError(t, os.WriteFile(roots, f.ca.rootPEM(), 0o644))
	require.NoError(t, os.WriteFile(token, []byte("tok-real"), 0o600))
	k, err := agent.New(agent.Config{Address: lis.Addr().String(), ServerName: serverName, RootsFile: roots, TokenFile: token,
		TrustDomain: td, Namespace: "demo", ServiceAccount: "web", KeyType: "ECDSA-P384"})
	require.NoError(t, err)
	ctx, cancel := context.WithCancel(t.Context())
	done := make(chan error, 1)
	go func() { done <- k.Run(ctx) }()
	_, changed := k.Watch()
	select {
	case <-changed:
	case <-time.After(10 * time.Second):
		t.Fatalf("no credential: %v", k.Ready())
	}
	require.NoError(t, k.Ready())
	s, _ := k.Watch()
	require.Equal(t, webID, s.Credential.ID.String())
	require.Equal(t, []string{"tok-real"}, f.tokensSeen())
	cancel()
	require.NoError(t, <-done)
}
