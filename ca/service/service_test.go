package service_test

import (
	"bytes"
	"context"
	"crypto"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/asn1"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"go/ast"
	"go/parser"
	"go/token"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/stretchr/testify/require"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	pb "istio.io/api/security/v1alpha1"

	"github.com/meshca/meshca/authn"
	"github.com/meshca/meshca/ca"
	"github.com/meshca/meshca/ca/catest"
	"github.com/meshca/meshca/ca/edge"
	"github.com/meshca/meshca/ca/service"
	"github.com/meshca/meshca/ca/serving"
)

var td = spiffeid.RequireTrustDomainFromString("cluster.local")

// tokenTable is a state-based fake authenticator: a token is valid if it
// is in the table. The real token checks are tested in authn/kube and in
// test/e2e against a real kube-apiserver.
type tokenTable map[string]*authn.Caller

func (tt tokenTable) Authenticate(_ context.Context, creds authn.Credentials) (*authn.Caller, error) {
	if creds.Token == "" {
		return nil, authn.ErrNoCredentials
	}
	if creds.Token == "tok-authority-down" {
		return nil, fmt.Errorf("%w: get https://10.9.9.9:6443/apis/authentication.k8s.io/v1/tokenreviews: connection refused", authn.ErrUnavailable)
	}
	c, ok := tt[creds.Token]
	if !ok {
		return nil, authn.Fail(authn.ReasonBadSignature, "token not recognised")
	}
	cc := *c
	return &cc, nil
}

// switchableUpstream is an Upstream (signing with a catest intermediate)
// that can be taken down, for outage tests.
type switchableUpstream struct {
	state ca.State
	down  atomic.Bool
}

func (u *switchableUpstream) SignLeaf(_ context.Context, req ca.SignRequest) (*ca.UpstreamLeaf, error) {
	if u.down.Load() {
		return nil, errors.New("upstream CA connection refused")
	}
	resp, err := u.state.Signing.Sign(req)
	if err != nil {
		return nil, err
	}
	leaf, err := x509.ParseCertificate(resp.Leaf)
	if err != nil {
		return nil, err
	}
	return &ca.UpstreamLeaf{Leaf: leaf, Chain: u.state.Signing.Chain()}, nil
}

func (u *switchableUpstream) TrustBundle(context.Context) ([]*x509.Certificate, error) {
	return u.state.Roots, nil
}

// syncBuffer is an audit sink safe for the server's goroutines.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) lines(t *testing.T) []map[string]any {
	t.Helper()
	s.mu.Lock()
	defer s.mu.Unlock()
	var out []map[string]any
	for _, l := range strings.Split(strings.TrimSpace(s.b.String()), "\n") {
		if l == "" {
			continue
		}
		m := map[string]any{}
		require.NoError(t, json.Unmarshal([]byte(l), &m), l)
		out = append(out, m)
	}
	return out
}

type fixture struct {
	svc     *service.Service
	client  pb.IstioCertificateServiceClient
	dial    func(cert *tls.Certificate) pb.IstioCertificateServiceClient
	metrics *metrics
	audit   *syncBuffer
	roots   *x509.CertPool
}

// metrics are the CA core's and the edge's metrics together.
type metrics struct {
	core *ca.Metrics
	edge *edge.Metrics
	// Both sets' counters, by the names the tests use.
	Requests, AuthnFailures, CSRRejections, TTLClamps *prometheus.CounterVec
}

// newFixture serves CreateCertificate over TLS on loopback, with a CA that
// signs with an intermediate (catest.Holder).
func newFixture(t *testing.T, policy *ca.Policy) *fixture {
	t.Helper()
	return newFixtureWith(t, policy, catest.NewHolder(t, true), nil)
}

// newFixtureWith is newFixture with a backend of the test's, and imp as
// the edge's Impersonator (nil: none).
func newFixtureWith(t *testing.T, policy *ca.Policy, backend ca.Backend, imp edge.Impersonator) *fixture {
	t.Helper()
	if policy == nil {
		policy = &ca.Policy{}
	}
	store, err := ca.NewPolicyStore(policy)
	require.NoError(t, err)
	reg := prometheus.NewRegistry()
	cm, em := ca.NewMetrics(reg), edge.NewMetrics(reg)
	m := &metrics{core: cm, edge: em, Requests: em.Requests, AuthnFailures: em.AuthnFailures, CSRRejections: cm.CSRRejections, TTLClamps: cm.TTLClamps}
	core, err := ca.New(t.Context(), ca.Config{Backend: backend, Policy: store, Metrics: cm})
	require.NoError(t, err)
	trustBundle := func(context.Context) ([]*x509.Certificate, error) { return core.State().Roots, nil }
	cc, err := authn.NewClientCert(authn.ClientCertConfig{TrustDomain: td, Roots: trustBundle})
	require.NoError(t, err)
	mk := func(ns, sa string) *authn.Caller {
		id, err := authn.ServiceAccountID(td, ns, sa)
		require.NoError(t, err)
		return &authn.Caller{ID: id, Namespace: ns, ServiceAccount: sa, PodName: "p-1"}
	}
	onNode := func(c *authn.Caller, pod, uid, node string) *authn.Caller {
		c.PodName, c.PodUID, c.NodeName = pod, uid, node
		return c
	}
	chain, err := authn.NewChain(
		authn.Named{Name: "clientcert", Authenticator: cc},
		authn.Named{Name: "table", Authenticator: tokenTable{
			"tok-web": mk("demo", "web"), "tok-short": mk("short", "lived"),
			// A node agent's pod-bound token, and one bound to no pod.
			"tok-ztunnel-a":      onNode(mk("istio-system", "ztunnel"), "ztunnel-a", "zt-uid-a", "node-a"),
			"tok-ztunnel-nopod":  mk("istio-system", "ztunnel"),
			"tok-web-on-a":       onNode(mk("demo", "web"), "web-0", "web-uid-0", "node-a"),
			"tok-ztunnel-a-gone": onNode(mk("istio-system", "ztunnel"), "ztunnel-a", "zt-uid-old", "node-a"),
		}},
	)
	require.NoError(t, err)
	audit := &syncBuffer{}
	e, err := edge.New(edge.Edge{Service: service.ServiceLabel, Authenticator: chain, Impersonator: imp, Metrics: em, Audit: edge.NewAuditor(audit)})
	require.NoError(t, err)
	svc, err := service.New(service.Config{CA: core, Edge: e})
	require.NoError(t, err)

	serving, err := serving.New(t.Context(), serving.Config{CA: core, IPAddresses: []net.IP{net.IPv4(127, 0, 0, 1)}})
	require.NoError(t, err)
	srv := grpc.NewServer(grpc.Creds(credentials.NewTLS(&tls.Config{
		GetCertificate: serving.GetCertificate, ClientAuth: tls.RequestClientCert, MinVersion: tls.VersionTLS12,
	})), grpc.MaxRecvMsgSize(256<<10))
	svc.Register(srv)
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	go srv.Serve(lis)
	t.Cleanup(srv.Stop)

	roots := x509.NewCertPool()
	for _, r := range core.State().Roots {
		roots.AddCert(r)
	}
	dial := func(cert *tls.Certificate) pb.IstioCertificateServiceClient {
		cfg := &tls.Config{RootCAs: roots, ServerName: "127.0.0.1"}
		if cert != nil {
			cfg.Certificates = []tls.Certificate{*cert}
		}
		conn, err := grpc.NewClient(lis.Addr().String(), grpc.WithTransportCredentials(credentials.NewTLS(cfg)))
		require.NoError(t, err)
		t.Cleanup(func() { conn.Close() })
		return pb.NewIstioCertificateServiceClient(conn)
	}
	return &fixture{svc: svc, client: dial(nil), dial: dial, metrics: m, audit: audit, roots: roots}
}

// csrFor is catest.CSRPEM as the string the Istio API carries.
func csrFor(t *testing.T, key crypto.Signer, edit func(*x509.CertificateRequest), uris ...string) string {
	t.Helper()
	return string(catest.CSRPEM(t, key, edit, uris...))
}

func bearer(t *testing.T, tok string) context.Context {
	return metadata.AppendToOutgoingContext(t.Context(), "authorization", "Bearer "+tok)
}

func parseChain(t *testing.T, chain []string) []*x509.Certificate {
	t.Helper()
	var certs []*x509.Certificate
	for _, p := range chain {
		b, _ := pem.Decode([]byte(p))
		require.NotNil(t, b)
		c, err := x509.ParseCertificate(b.Bytes)
		require.NoError(t, err)
		certs = append(certs, c)
	}
	return certs
}

const webID = "spiffe://cluster.local/ns/demo/sa/web"

func TestCreateCertificate(t *testing.T) {
	f := newFixture(t, &ca.Policy{Default: ca.Rule{DefaultTTL: 24 * time.Hour, MinTTL: time.Hour, MaxTTL: 48 * time.Hour}})
	key := catest.Key(t, "P-256")
	resp, err := f.client.CreateCertificate(bearer(t, "tok-web"), &pb.IstioCertificateRequest{
		Csr: csrFor(t, key, nil, webID), ValidityDuration: int64((2 * time.Hour).Seconds()),
	})
	require.NoError(t, err)
	certs := parseChain(t, resp.CertChain)
	require.Len(t, certs, 3, "leaf, intermediate, root")
	leaf, root := certs[0], certs[len(certs)-1]
	require.Equal(t, webID, leaf.URIs[0].String())
	require.Empty(t, leaf.DNSNames)
	require.False(t, leaf.IsCA)
	require.NoError(t, root.CheckSignatureFrom(root), "last certificate is the self-signed root")
	inter := x509.NewCertPool()
	inter.AddCert(certs[1])
	_, err = leaf.Verify(x509.VerifyOptions{Roots: f.roots, Intermediates: inter, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth, x509.ExtKeyUsageServerAuth}})
	require.NoError(t, err)
	life := leaf.NotAfter.Sub(leaf.NotBefore)
	require.InDelta(t, (2*time.Hour + 30*time.Second).Seconds(), life.Seconds(), 2, "requested 2h, plus the 30s back-date")
	require.WithinDuration(t, time.Now().Add(-30*time.Second), leaf.NotBefore, 5*time.Second)
	require.Equal(t, x509.KeyUsageDigitalSignature, leaf.KeyUsage)
	require.ElementsMatch(t, []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth}, leaf.ExtKeyUsage)

	// The audit line names who got what, and never the token.
	lines := f.audit.lines(t)
	require.Len(t, lines, 1)
	a := lines[0]
	require.Equal(t, "issued", a["result"])
	require.Equal(t, webID, a["identity"])
	require.Equal(t, "demo/p-1", a["pod"])
	require.Equal(t, "table", a["authenticator"])
	require.Equal(t, leaf.SerialNumber.Text(16), a["serial"])
	require.Equal(t, "ECDSA-P256", a["key_type"])
	require.NotEmpty(t, a["signing_ca"])
	require.Contains(t, a["peer"], "127.0.0.1:")
	require.NotContains(t, f.audit.b.String(), "tok-web")
	require.Equal(t, 1.0, testutil.ToFloat64(f.metrics.Requests.WithLabelValues("istio", "OK")))

	// An RSA key gets keyEncipherment too.
	rk := catest.Key(t, "RSA-2048")
	resp, err = f.client.CreateCertificate(bearer(t, "tok-web"), &pb.IstioCertificateRequest{Csr: csrFor(t, rk, nil, webID)})
	require.NoError(t, err)
	leaf = parseChain(t, resp.CertChain)[0]
	require.Equal(t, x509.KeyUsageDigitalSignature|x509.KeyUsageKeyEncipherment, leaf.KeyUsage)
	require.InDelta(t, (24*time.Hour + 30*time.Second).Seconds(), leaf.NotAfter.Sub(leaf.NotBefore).Seconds(), 2, "0 means the policy default")
}

// TestCreateCertificateRenewAtHeader checks that an issued certificate
// comes with the policy's renewal point in a header, so meshca agent renews
// when the security team's policy says, and that a refusal carries none.
func TestCreateCertificateRenewAtHeader(t *testing.T) {
	fraction, jitter := 0.8, 20*time.Minute
	f := newFixture(t, &ca.Policy{Default: ca.Rule{DefaultTTL: 24 * time.Hour, MinTTL: time.Hour, MaxTTL: 48 * time.Hour,
		RenewFraction: &fraction, RenewJitter: &jitter}})
	key := catest.Key(t, "P-256")
	seen := map[time.Time]bool{}
	for range 8 {
		var header metadata.MD
		resp, err := f.client.CreateCertificate(bearer(t, "tok-web"), &pb.IstioCertificateRequest{
			Csr: csrFor(t, key, nil, webID), ValidityDuration: int64((2 * time.Hour).Seconds()),
		}, grpc.Header(&header))
		require.NoError(t, err)
		leaf := parseChain(t, resp.CertChain)[0]
		vals := header.Get(service.RenewAtHeader)
		require.Len(t, vals, 1, "one %s header", service.RenewAtHeader)
		at, err := time.Parse(time.RFC3339, vals[0])
		require.NoError(t, err)
		require.True(t, strings.HasSuffix(vals[0], "Z"), "UTC: %s", vals[0])
		require.Equal(t, at, at.Truncate(time.Second), "whole seconds: %s", vals[0])
		// The fraction counts from issuance, not from the NotBefore that
		// is back-dated 30s for clock skew; the header's whole seconds
		// may fall up to 1s below the exact point.
		issued := leaf.NotBefore.Add(30 * time.Second)
		latest := issued.Add(time.Duration(float64(leaf.NotAfter.Sub(issued)) * fraction))
		earliest := latest.Add(-jitter - time.Second)
		require.False(t, at.Before(earliest), "renew at %s, before %s", at, earliest)
		require.False(t, at.After(latest), "renew at %s, after %s", at, latest)
		seen[at] = true
	}
	require.Greater(t, len(seen), 1, "the jitter spreads renewals")

	var header metadata.MD
	_, err := f.client.CreateCertificate(bearer(t, "tok-forged"), &pb.IstioCertificateRequest{Csr: csrFor(t, key, nil, webID)}, grpc.Header(&header))
	require.Equal(t, codes.Unauthenticated, status.Code(err))
	require.Empty(t, header.Get(service.RenewAtHeader), "no renewal point without a certificate")

	// Called directly, with no gRPC stream to carry the header, it still
	// issues.
	ctx := metadata.NewIncomingContext(t.Context(), metadata.Pairs("authorization", "Bearer tok-web"))
	resp, err := f.svc.CreateCertificate(ctx, &pb.IstioCertificateRequest{Csr: csrFor(t, key, nil, webID)})
	require.NoError(t, err)
	require.NotEmpty(t, resp.CertChain)
}

func TestCreateCertificateBadInput(t *testing.T) {
	f := newFixture(t, &ca.Policy{Default: ca.Rule{DefaultTTL: 24 * time.Hour, MinTTL: time.Hour, MaxTTL: 48 * time.Hour}})
	p256 := catest.Key(t, "P-256")
	p224 := catest.Key(t, "P-224")
	rsa1024 := catest.Key(t, "RSA-1024")
	good := csrFor(t, p256, nil, webID)
	block, _ := pem.Decode([]byte(good))
	broken := append([]byte(nil), block.Bytes...)
	broken[len(broken)-3] ^= 0xff
	caTrue, err := asn1.Marshal(struct{ IsCA bool }{true})
	require.NoError(t, err)

	tests := []struct {
		name       string
		ctx        context.Context
		csr        string
		validity   int64
		wantCode   codes.Code
		wantMsg    string
		wantReason string
	}{
		{name: "no token", ctx: t.Context(), csr: good, wantCode: codes.Unauthenticated, wantMsg: "Bearer", wantReason: "no_credentials"},
		{name: "not a bearer token", ctx: metadata.AppendToOutgoingContext(t.Context(), "authorization", "Basic dXNlcjpwYXNz"), csr: good, wantCode: codes.Unauthenticated, wantReason: "malformed"},
		{name: "empty bearer token", ctx: metadata.AppendToOutgoingContext(t.Context(), "authorization", "Bearer  "), csr: good, wantCode: codes.Unauthenticated, wantReason: "malformed"},
		{name: "unknown token", ctx: bearer(t, "tok-forged"), csr: good, wantCode: codes.Unauthenticated, wantReason: "bad_signature"},
		{name: "token authority unreachable", ctx: bearer(t, "tok-authority-down"), csr: good, wantCode: codes.Unavailable, wantMsg: "retry later", wantReason: "unavailable"},
		{name: "CSR for another service account", ctx: bearer(t, "tok-web"), csr: csrFor(t, p256, nil, "spiffe://cluster.local/ns/demo/sa/db"),
			wantCode: codes.PermissionDenied, wantMsg: "spiffe://cluster.local/ns/demo/sa/db but the caller holds " + webID, wantReason: "identity_mismatch"},
		{name: "CSR for another namespace", ctx: bearer(t, "tok-web"), csr: csrFor(t, p256, nil, "spiffe://cluster.local/ns/kube-system/sa/web"),
			wantCode: codes.PermissionDenied, wantMsg: "ns/kube-system/sa/web", wantReason: "identity_mismatch"},
		{name: "CSR with an extra DNS SAN", ctx: bearer(t, "tok-web"), csr: csrFor(t, p256, func(r *x509.CertificateRequest) { r.DNSNames = []string{"bank.example"} }, webID),
			wantCode: codes.PermissionDenied, wantMsg: "DNS:bank.example", wantReason: "identity_mismatch"},
		{name: "CSR asking for CA:true", ctx: bearer(t, "tok-web"), csr: csrFor(t, p256, func(r *x509.CertificateRequest) {
			r.ExtraExtensions = []pkix.Extension{{Id: asn1.ObjectIdentifier{2, 5, 29, 19}, Critical: true, Value: caTrue}}
		}, webID), wantCode: codes.InvalidArgument, wantMsg: "CA certificate", wantReason: ca.CSRRequestsCA},
		{name: "RSA-1024 key", ctx: bearer(t, "tok-web"), csr: csrFor(t, rsa1024, nil, webID), wantCode: codes.InvalidArgument, wantMsg: "CSR key is RSA-1024; the policy for demo/web allows ECDSA-P256, ECDSA-P384, RSA-2048, RSA-3072, RSA-4096", wantReason: ca.CSRKeyType},
		{name: "P-224 key", ctx: bearer(t, "tok-web"), csr: csrFor(t, p224, nil, webID), wantCode: codes.InvalidArgument, wantMsg: "P-224; the policy for demo/web allows ECDSA-P256", wantReason: ca.CSRKeyType},
		{name: "broken CSR signature", ctx: bearer(t, "tok-web"), csr: string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: broken})),
			wantCode: codes.InvalidArgument, wantMsg: "signature", wantReason: ca.CSRBadSignature},
		{name: "CSR not PEM", ctx: bearer(t, "tok-web"), csr: "this is not a CSR", wantCode: codes.InvalidArgument, wantMsg: "not PEM", wantReason: ca.CSRNotPEM},
		{name: "empty CSR", ctx: bearer(t, "tok-web"), csr: "", wantCode: codes.InvalidArgument, wantMsg: "empty", wantReason: ca.CSREmpty},
		{name: "CSR over 64 KiB", ctx: bearer(t, "tok-web"), csr: strings.Repeat("A", 65<<10), wantCode: codes.InvalidArgument, wantMsg: "limit is 65536", wantReason: ca.CSRTooLarge},
		{name: "negative validity", ctx: bearer(t, "tok-web"), csr: good, validity: -60, wantCode: codes.InvalidArgument, wantMsg: "validity_duration is -60", wantReason: "bad_request"},
	}
	// The counter each refusal must move: an authentication failure (by the
	// authenticator that decided, "none" when none did) or a CSR rejection.
	authnBy := map[string]string{"no_credentials": "none", "malformed": "none", "bad_signature": "table", "unavailable": "table"}
	reasonCounter := func(reason string) prometheus.Counter {
		if by, ok := authnBy[reason]; ok {
			return f.metrics.AuthnFailures.WithLabelValues(by, reason)
		}
		if reason == "bad_request" {
			return nil
		}
		return f.metrics.CSRRejections.WithLabelValues(reason)
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			before := len(f.audit.lines(t))
			codeCount := f.metrics.Requests.WithLabelValues("istio", tc.wantCode.String())
			codeBefore := testutil.ToFloat64(codeCount)
			rc := reasonCounter(tc.wantReason)
			var reasonBefore float64
			if rc != nil {
				reasonBefore = testutil.ToFloat64(rc)
			}
			_, err := f.client.CreateCertificate(tc.ctx, &pb.IstioCertificateRequest{Csr: tc.csr, ValidityDuration: tc.validity})
			st := status.Convert(err)
			require.Equal(t, tc.wantCode, st.Code(), st.Message())
			require.Contains(t, st.Message(), tc.wantMsg)
			require.NotContains(t, st.Message(), "10.9.9.9", "internal hosts stay in the log")
			lines := f.audit.lines(t)
			require.Len(t, lines, before+1, "one audit line per request")
			require.Equal(t, "refused", lines[before]["result"])
			require.Equal(t, tc.wantCode.String(), lines[before]["code"])
			require.Equal(t, tc.wantReason, lines[before]["reason"])
			require.Equal(t, codeBefore+1, testutil.ToFloat64(codeCount), "requests_total by code")
			if rc != nil {
				require.Equal(t, reasonBefore+1, testutil.ToFloat64(rc), "the reason's counter")
			}
			// The server keeps serving.
			_, err = f.client.CreateCertificate(bearer(t, "tok-web"), &pb.IstioCertificateRequest{Csr: good})
			require.NoError(t, err)
		})
	}
	require.Equal(t, 2.0, testutil.ToFloat64(f.metrics.CSRRejections.WithLabelValues(ca.CSRKeyType)))
	require.Equal(t, 3.0, testutil.ToFloat64(f.metrics.CSRRejections.WithLabelValues("identity_mismatch")))
	require.Equal(t, 1.0, testutil.ToFloat64(f.metrics.AuthnFailures.WithLabelValues("table", "bad_signature")))
	require.Equal(t, 2.0, testutil.ToFloat64(f.metrics.AuthnFailures.WithLabelValues("none", "malformed")))
	require.Equal(t, 3.0, testutil.ToFloat64(f.metrics.Requests.WithLabelValues("istio", "PermissionDenied")))
	require.NotContains(t, f.audit.b.String(), "tok-web")
}

func TestCreateCertificateClampsValidity(t *testing.T) {
	f := newFixture(t, &ca.Policy{Default: ca.Rule{DefaultTTL: 24 * time.Hour, MinTTL: time.Hour, MaxTTL: 48 * time.Hour}})
	key := catest.Key(t, "P-256")
	csr := csrFor(t, key, nil, webID)
	tests := []struct {
		name     string
		validity int64
		wantLife time.Duration
		bound    string
	}{
		{"absurdly long", 1 << 62, 48 * time.Hour, "max"},
		{"a century", 100 * 365 * 24 * 3600, 48 * time.Hour, "max"},
		{"one second", 1, time.Hour, "min"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			before := testutil.ToFloat64(f.metrics.TTLClamps.WithLabelValues(tc.bound))
			resp, err := f.client.CreateCertificate(bearer(t, "tok-web"), &pb.IstioCertificateRequest{Csr: csr, ValidityDuration: tc.validity})
			require.NoError(t, err)
			leaf := parseChain(t, resp.CertChain)[0]
			require.InDelta(t, (tc.wantLife + 30*time.Second).Seconds(), leaf.NotAfter.Sub(leaf.NotBefore).Seconds(), 2)
			require.Equal(t, before+1, testutil.ToFloat64(f.metrics.TTLClamps.WithLabelValues(tc.bound)))
		})
	}
}

func TestCreateCertificateBackendOutage(t *testing.T) {
	up := &switchableUpstream{state: catest.NewState(t, true, time.Now().Add(48*time.Hour))}
	f := newFixtureWith(t, nil, up, nil)
	key := catest.Key(t, "P-256")
	req := &pb.IstioCertificateRequest{Csr: csrFor(t, key, nil, webID)}
	up.down.Store(true)
	_, err := f.client.CreateCertificate(bearer(t, "tok-web"), req)
	st := status.Convert(err)
	require.Equal(t, codes.Unavailable, st.Code())
	require.NotContains(t, st.Message(), "connection refused", "backend detail goes to the log, not the client")
	up.down.Store(false)
	_, err = f.client.CreateCertificate(bearer(t, "tok-web"), req)
	require.NoError(t, err, "recovers when the backend does")
	lines := f.audit.lines(t)
	require.Equal(t, "backend_unavailable", lines[0]["reason"])
	require.Equal(t, 1.0, testutil.ToFloat64(f.metrics.Requests.WithLabelValues("istio", "Unavailable")))
}

func TestCreateCertificateRenewWithClientCert(t *testing.T) {
	f := newFixture(t, nil)
	key := catest.Key(t, "P-256")
	resp, err := f.client.CreateCertificate(bearer(t, "tok-web"), &pb.IstioCertificateRequest{Csr: csrFor(t, key, nil, webID)})
	require.NoError(t, err)
	certs := parseChain(t, resp.CertChain)
	held := &tls.Certificate{PrivateKey: key, Leaf: certs[0]}
	for _, c := range certs[:len(certs)-1] {
		held.Certificate = append(held.Certificate, c.Raw)
	}
	withCert := f.dial(held)

	// No token: the certificate alone renews the same identity...
	resp, err = withCert.CreateCertificate(t.Context(), &pb.IstioCertificateRequest{Csr: csrFor(t, key, nil, webID)})
	require.NoError(t, err)
	require.Equal(t, webID, parseChain(t, resp.CertChain)[0].URIs[0].String())
	require.Equal(t, "clientcert", f.audit.lines(t)[1]["authenticator"])

	// ...and no other.
	_, err = withCert.CreateCertificate(t.Context(), &pb.IstioCertificateRequest{Csr: csrFor(t, key, nil, "spiffe://cluster.local/ns/demo/sa/admin")})
	require.Equal(t, codes.PermissionDenied, status.Code(err))

	// A certificate from another CA is refused.
	other := catest.NewCA(t, false)
	csrPEM := csrFor(t, key, nil, webID)
	b, _ := pem.Decode([]byte(csrPEM))
	csr, err := x509.ParseCertificateRequest(b.Bytes)
	require.NoError(t, err)
	id, err := spiffeid.FromString(webID)
	require.NoError(t, err)
	foreign, err := other.Sign(t.Context(), ca.SignRequest{CSR: csr, ID: id, NotBefore: time.Now().Add(-time.Minute), NotAfter: time.Now().Add(time.Hour)})
	require.NoError(t, err)
	_, err = f.dial(&tls.Certificate{Certificate: [][]byte{foreign.Leaf}, PrivateKey: key}).CreateCertificate(t.Context(), &pb.IstioCertificateRequest{Csr: csrPEM})
	st := status.Convert(err)
	require.Equal(t, codes.Unauthenticated, st.Code())
	require.Contains(t, st.Message(), authn.ReasonUntrustedCert)
}

// TestAuditReasonsAreUnambiguous guards the audit trail's `reason`: an
// authentication reason, a CSR reason and an edge reason must never share a
// value, or a line could not say which check refused the request. It reads
// every Reason*/CSR* string constant from the source of authn, ca and
// ca/edge, so a reason added later is checked too.
func TestAuditReasonsAreUnambiguous(t *testing.T) {
	seen := map[string]string{}
	for _, dir := range []string{"../../authn", "..", "../edge"} {
		entries, err := os.ReadDir(dir)
		require.NoError(t, err)
		for _, e := range entries {
			if !strings.HasSuffix(e.Name(), ".go") || strings.HasSuffix(e.Name(), "_test.go") {
				continue
			}
			file, err := parser.ParseFile(token.NewFileSet(), filepath.Join(dir, e.Name()), nil, 0)
			require.NoError(t, err)
			pkg := file.Name
			for _, decl := range file.Decls {
				gd, ok := decl.(*ast.GenDecl)
				if !ok || gd.Tok != token.CONST {
					continue
				}
				for _, spec := range gd.Specs {
					vs := spec.(*ast.ValueSpec)
					for i, name := range vs.Names {
						if (!strings.HasPrefix(name.Name, "Reason") && !strings.HasPrefix(name.Name, "CSR")) || i >= len(vs.Values) {
							continue
						}
						lit, ok := vs.Values[i].(*ast.BasicLit)
						if !ok || lit.Kind != token.STRING {
							continue
						}
						v, err := strconv.Unquote(lit.Value)
						require.NoError(t, err)
						where := pkg.Name + "." + name.Name
						require.NotContains(t, seen, v, "reason %q is used by %s and %s", v, seen[v], where)
						seen[v] = where
					}
				}
			}
		}
	}
	// The sets this test must have found: 13 authentication reasons, 8
	// CSR reasons and 4 of the edge's own.
	require.GreaterOrEqual(t, len(seen), 25, "found %v", seen)
	for _, r := range []string{authn.ReasonMalformed, ca.CSRKeyType, edge.ReasonIdentityMismatch, edge.ReasonInternal} {
		require.Contains(t, seen, r)
	}
}
