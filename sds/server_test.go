package sds_test

import (
	"bytes"
	"context"
	"crypto"
	"crypto/x509"
	"net"
	"sync/atomic"
	"testing"
	"time"

	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	discovery "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	secretv3 "github.com/envoyproxy/go-control-plane/envoy/service/secret/v3"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/stretchr/testify/require"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"

	"github.com/meshca/meshca/authn"
	"github.com/meshca/meshca/ca"
	"github.com/meshca/meshca/ca/catest"
	"github.com/meshca/meshca/ca/edge"
	"github.com/meshca/meshca/sds"
	"github.com/meshca/meshca/sds/sdstest"
)

var td = spiffeid.RequireTrustDomainFromString("cluster.local")

// tokenTable is a fake authenticator: a token is valid if it is in the
// table. The real token checks run in test/e2e against a kube-apiserver.
type tokenTable map[string]*authn.Caller

func (tt tokenTable) Authenticate(_ context.Context, creds authn.Credentials) (*authn.Caller, error) {
	if creds.Token == "" {
		return nil, authn.ErrNoCredentials
	}
	c, ok := tt[creds.Token]
	if !ok {
		return nil, authn.Fail(authn.ReasonBadSignature, "token not recognised")
	}
	cc := *c
	return &cc, nil
}

func caller(ns, sa string) *authn.Caller {
	id := spiffeid.RequireFromSegments(td, "ns", ns, "sa", sa)
	return &authn.Caller{ID: id, Namespace: ns, ServiceAccount: sa, Authenticator: "jwt"}
}

// saTable is a fake service-account index.
type saTable struct{ gone atomic.Bool }

func (s *saTable) ServiceAccountUID(string, string) (string, bool, error) {
	return "", !s.gone.Load(), nil
}

type central struct {
	holder  *catest.Holder
	ca      *ca.CA
	srv     *sds.Server
	reg     *prometheus.Registry
	metrics *sds.Metrics
	addr    string
	conn    *grpc.ClientConn
}

// shortPolicy issues 2-second leaves renewed at half-life, so that tests
// see rotations in seconds.
func shortPolicy(t *testing.T) *ca.PolicyStore {
	half, none := 0.5, time.Duration(0)
	s, err := ca.NewPolicyStore(&ca.Policy{Default: ca.Rule{DefaultTTL: 2 * time.Second, MinTTL: time.Second, RenewFraction: &half, RenewJitter: &none}})
	require.NoError(t, err)
	return s
}

func startCentral(t *testing.T, tokens tokenTable, policy *ca.PolicyStore, mutate func(*sds.Config)) *central {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	h := catest.NewHolder(t, true)
	cc := ca.Config{Backend: h, Backdate: -1}
	if policy != nil {
		cc.Policy = policy
	}
	c, err := ca.New(ctx, cc)
	require.NoError(t, err)
	go func() { _ = c.Run(ctx) }()
	e, err := edge.New(edge.Edge{Service: sds.ServiceLabel, Authenticator: tokens})
	require.NoError(t, err)
	reg := prometheus.NewRegistry()
	m := sds.NewMetrics(reg)
	cfg := sds.Config{CA: c, Edge: e, BundleAckTimeout: 2 * time.Second, ReissueSpread: 100 * time.Millisecond,
		RetryMin: 50 * time.Millisecond, RetryMax: 200 * time.Millisecond, Metrics: m}
	if mutate != nil {
		mutate(&cfg)
	}
	s, err := sds.New(cfg)
	require.NoError(t, err)
	runDone := make(chan struct{})
	go func() { _ = s.Run(ctx); close(runDone) }()
	g := grpc.NewServer()
	s.Register(g)
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	go func() { _ = g.Serve(lis) }()
	t.Cleanup(func() { g.Stop(); cancel(); <-runDone })
	conn := dial(t, lis.Addr().String())
	return &central{holder: h, ca: c, srv: s, reg: reg, metrics: m, addr: lis.Addr().String(), conn: conn}
}

func dial(t *testing.T, addr string) *grpc.ClientConn {
	t.Helper()
	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	require.NoError(t, err)
	t.Cleanup(func() { conn.Close() })
	return conn
}

// bearer sends a token on a plaintext test connection.
type bearer string

func (b bearer) GetRequestMetadata(context.Context, ...string) (map[string]string, error) {
	return map[string]string{"authorization": "Bearer " + string(b)}, nil
}

func (bearer) RequireTransportSecurity() bool { return false }

// proxy starts an Envoy-like client with token on conn.
func proxy(t *testing.T, ctx context.Context, conn grpc.ClientConnInterface, token string, cfg sdstest.Config) *sdstest.Client {
	t.Helper()
	cfg.Conn = conn
	if token != "" {
		cfg.CallOptions = append(cfg.CallOptions, grpc.PerRPCCredentials(bearer(token)))
	}
	if cfg.Node == nil {
		cfg.Node = &core.Node{Id: "sidecar~" + token, Cluster: "test"}
	}
	if cfg.BackoffBase == 0 {
		cfg.BackoffBase, cfg.BackoffMax = 20*time.Millisecond, 200*time.Millisecond
	}
	c, err := sdstest.New(cfg)
	require.NoError(t, err)
	done := make(chan struct{})
	cctx, cancel := context.WithCancel(ctx)
	go func() { _ = c.Run(cctx); close(done) }()
	t.Cleanup(func() { cancel(); <-done })
	return c
}

func waitFor(t *testing.T, ctx context.Context, c *sdstest.Client, what string, cond func(sdstest.State) bool) sdstest.State {
	t.Helper()
	wctx, cancel := context.WithTimeout(ctx, 15*time.Second)
	defer cancel()
	st, err := c.WaitFor(wctx, cond)
	require.NoError(t, err, "waiting for %s; client state: %s", what, c.State())
	return st
}

func has(names ...string) func(sdstest.State) bool {
	return func(s sdstest.State) bool {
		for _, n := range names {
			if _, ok := s.Secrets[n]; !ok {
				return false
			}
		}
		return true
	}
}

// leafOf returns the certificate and checks the key matches it.
func leafOf(t *testing.T, s sdstest.State, name string) []*x509.Certificate {
	t.Helper()
	chain, key, err := sdstest.ParseTLSCertificate(s.Secrets[name].Secret)
	require.NoError(t, err)
	pub, ok := key.Public().(interface{ Equal(crypto.PublicKey) bool })
	require.True(t, ok)
	require.True(t, pub.Equal(chain[0].PublicKey), "%s: key does not match certificate", name)
	return chain
}

func rootsOf(t *testing.T, s sdstest.State, name string) []*x509.Certificate {
	t.Helper()
	roots, err := sdstest.ParseValidationContext(s.Secrets[name].Secret)
	require.NoError(t, err)
	return roots
}

// verify checks chain against roots for identity id at now.
func verify(t *testing.T, chain, roots []*x509.Certificate, id spiffeid.ID) {
	t.Helper()
	pool, inter := x509.NewCertPool(), x509.NewCertPool()
	for _, r := range roots {
		pool.AddCert(r)
	}
	for _, c := range chain[1:] {
		inter.AddCert(c)
	}
	_, err := chain[0].Verify(x509.VerifyOptions{Roots: pool, Intermediates: inter, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}})
	require.NoError(t, err)
	require.Len(t, chain[0].URIs, 1)
	require.Equal(t, id.String(), chain[0].URIs[0].String())
	require.False(t, chain[0].IsCA)
}

func TestStreamRotatesDefaultAtLeastThreeTimes(t *testing.T) {
	for _, delta := range []bool{false, true} {
		t.Run(map[bool]string{false: "sotw", true: "delta"}[delta], func(t *testing.T) {
			ctx := context.Background()
			a := caller("shop", "web")
			c := startCentral(t, tokenTable{"tok-web": a}, shortPolicy(t), nil)
			p := proxy(t, ctx, c.conn, "tok-web", sdstest.Config{Names: []string{sds.NameDefault, sds.NameRootCA}, Delta: delta})
			seen := map[string]bool{}
			var first string
			for len(seen) < 4 {
				st := waitFor(t, ctx, p, "a new certificate", func(s sdstest.State) bool {
					if !has(sds.NameDefault, sds.NameRootCA)(s) {
						return false
					}
					chain, _, err := sdstest.ParseTLSCertificate(s.Secrets[sds.NameDefault].Secret)
					return err == nil && !seen[chain[0].SerialNumber.String()]
				})
				chain := leafOf(t, st, sds.NameDefault)
				verify(t, chain, rootsOf(t, st, sds.NameRootCA), a.ID)
				require.True(t, time.Now().Before(chain[0].NotAfter), "pushed an expired certificate")
				seen[chain[0].SerialNumber.String()] = true
				if first == "" {
					first = st.Secrets[sds.NameRootCA].Version
				}
				// The bundle did not change, so its version did not either.
				require.Equal(t, first, st.Secrets[sds.NameRootCA].Version)
			}
			require.Zero(t, p.State().NACKs)
			require.GreaterOrEqual(t, testutil.ToFloat64(c.metrics.Pushes.WithLabelValues(sds.NameDefault)), 4.0)
			require.GreaterOrEqual(t, histogramCount(t, c.reg, "meshca_sds_push_delay_seconds"), uint64(3), "every renewal's delay is observed")
		})
	}
}

func histogramCount(t *testing.T, reg *prometheus.Registry, name string) uint64 {
	t.Helper()
	mfs, err := reg.Gather()
	require.NoError(t, err)
	for _, mf := range mfs {
		if mf.GetName() == name {
			return mf.GetMetric()[0].GetHistogram().GetSampleCount()
		}
	}
	t.Fatalf("no metric %s", name)
	return 0
}

func TestSPIRENamesAndWildcardAll(t *testing.T) {
	ctx := context.Background()
	a := caller("shop", "web")
	c := startCentral(t, tokenTable{"tok-web": a}, nil, nil)
	p := proxy(t, ctx, c.conn, "tok-web", sdstest.Config{Names: []string{a.ID.String(), td.IDString()}})
	st := waitFor(t, ctx, p, "SPIRE names", has(a.ID.String(), td.IDString()))
	chain := leafOf(t, st, a.ID.String())
	verify(t, chain, rootsOf(t, st, td.IDString()), a.ID)

	// ALL stands for both, as in SPIRE, and so does an empty fetch.
	cl := secretv3.NewSecretDiscoveryServiceClient(c.conn)
	for _, names := range [][]string{{sds.NameAll}, nil} {
		resp, err := cl.FetchSecrets(ctx, &discovery.DiscoveryRequest{ResourceNames: names}, grpc.PerRPCCredentials(bearer("tok-web")))
		require.NoError(t, err)
		got := map[string]bool{}
		for _, r := range resp.Resources {
			var sec tlsv3.Secret
			require.NoError(t, r.UnmarshalTo(&sec))
			got[sec.Name] = true
		}
		require.Equal(t, map[string]bool{a.ID.String(): true, td.IDString(): true}, got)
	}

	q := proxy(t, ctx, c.conn, "tok-web", sdstest.Config{Names: []string{a.ID.String()}, Delta: true})
	st = waitFor(t, ctx, q, "own SPIFFE ID", has(a.ID.String()))
	leafOf(t, st, a.ID.String())
}

func TestStreamAsAAskingForBGetsNothingForB(t *testing.T) {
	ctx := context.Background()
	a, b := caller("shop", "web"), caller("bank", "vault")
	c := startCentral(t, tokenTable{"tok-a": a, "tok-b": b}, nil, nil)
	for _, delta := range []bool{false, true} {
		p := proxy(t, ctx, c.conn, "tok-a", sdstest.Config{
			Names: []string{b.ID.String(), "spiffe://other.example", "nonsense", sds.NameRootCA}, Delta: delta,
			Node: &core.Node{Id: "sidecar~10.0.0.1~vault.bank"}, // a lie: the node ID decides nothing
		})
		st := waitFor(t, ctx, p, "the bundle", has(sds.NameRootCA))
		require.Len(t, st.Secrets, 1, "only the bundle is served: %v", st)
		// The stream stays open and later requests change nothing.
		require.NoError(t, p.Subscribe(ctx, []string{b.ID.String(), sds.NameDefault}))
		st = waitFor(t, ctx, p, "own default", has(sds.NameDefault))
		require.NotContains(t, st.Secrets, b.ID.String())
		verify(t, leafOf(t, st, sds.NameDefault), c.ca.State().Roots, a.ID)
	}
	require.Equal(t, 4.0, testutil.ToFloat64(c.metrics.Refusals.WithLabelValues("not_authorized")), "B's ID and the other trust domain, on each stream")
	require.Equal(t, 2.0, testutil.ToFloat64(c.metrics.Refusals.WithLabelValues("unknown_name")))
}

func TestRootRotationReachesEveryStreamBundleFirst(t *testing.T) {
	ctx := context.Background()
	tokens := tokenTable{}
	for _, n := range []string{"a", "b", "c"} {
		tokens["tok-"+n] = caller("shop", n)
	}
	c := startCentral(t, tokens, nil, nil)
	oldRoot := c.ca.State().Roots[0]
	// One proxy holds both names on one stream; another on two streams,
	// as Envoy does; a third over delta.
	both := proxy(t, ctx, c.conn, "tok-a", sdstest.Config{Names: []string{sds.NameDefault, sds.NameRootCA}, History: 32})
	certOnly := proxy(t, ctx, c.conn, "tok-b", sdstest.Config{Names: []string{sds.NameDefault}, History: 32})
	bundleOnly := proxy(t, ctx, c.conn, "tok-b", sdstest.Config{Names: []string{sds.NameRootCA}, History: 32})
	deltaBoth := proxy(t, ctx, c.conn, "tok-c", sdstest.Config{Names: []string{sds.NameDefault, sds.NameRootCA}, Delta: true, History: 32})
	for _, p := range []*sdstest.Client{both, deltaBoth} {
		waitFor(t, ctx, p, "first secrets", has(sds.NameDefault, sds.NameRootCA))
	}
	waitFor(t, ctx, certOnly, "first cert", has(sds.NameDefault))
	waitFor(t, ctx, bundleOnly, "first bundle", has(sds.NameRootCA))

	next := catest.NewState(t, true, time.Now().Add(48*time.Hour))
	newRoot := next.Roots[0]
	c.holder.Replace(ctx, next)

	underNew := func(s sdstest.State) bool {
		if _, ok := s.Secrets[sds.NameDefault]; !ok {
			return false
		}
		chain, _, err := sdstest.ParseTLSCertificate(s.Secrets[sds.NameDefault].Secret)
		return err == nil && bytes.Equal(chain[len(chain)-1].AuthorityKeyId, newRoot.SubjectKeyId)
	}
	st := waitFor(t, ctx, bundleOnly, "the new bundle", func(s sdstest.State) bool {
		r, err := sdstest.ParseValidationContext(s.Secrets[sds.NameRootCA].Secret)
		return err == nil && len(r) == 2
	})
	bundleAcceptedAt := st.Last.Time
	roots := rootsOf(t, st, sds.NameRootCA)
	require.True(t, roots[0].Equal(newRoot) && roots[1].Equal(oldRoot), "new root first, the old one kept while its leaves live")

	for name, p := range map[string]*sdstest.Client{"tok-a": both, "tok-c": deltaBoth} {
		st := waitFor(t, ctx, p, name+": a leaf under the new root", underNew)
		// Replay the history: the bundle holding the new root was
		// accepted before any leaf under it.
		bundleAt, leafAt := -1, -1
		for i, e := range st.Events {
			if !e.Accepted {
				continue
			}
			for _, n := range e.Names {
				if n == sds.NameRootCA && bundleAt < 0 && i > 0 {
					bundleAt = i
				}
				if n == sds.NameDefault && i > 0 && leafAt < 0 {
					leafAt = i
				}
			}
		}
		require.True(t, bundleAt > 0 && leafAt > bundleAt, "%s: want the new bundle, then the new leaf: %v", name, st.Events)
		verify(t, leafOf(t, st, sds.NameDefault), rootsOf(t, st, sds.NameRootCA), tokens[name].ID)
	}
	st = waitFor(t, ctx, certOnly, "cert-only stream: a leaf under the new root", underNew)
	require.True(t, st.Last.Time.After(bundleAcceptedAt) || st.Last.Time.Equal(bundleAcceptedAt),
		"the separate cert stream got its new leaf (%s) before the bundle stream accepted the bundle (%s)", st.Last.Time, bundleAcceptedAt)
}

func TestRefusedAndMalformedStreams(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	a := caller("shop", "web")
	c := startCentral(t, tokenTable{"tok-web": a}, nil, func(cfg *sds.Config) { cfg.MaxStreams = 50 })
	cl := secretv3.NewSecretDiscoveryServiceClient(c.conn)
	recvCode := func(ss grpc.BidiStreamingClient[discovery.DiscoveryRequest, discovery.DiscoveryResponse], req *discovery.DiscoveryRequest) codes.Code {
		if ss == nil {
			return codes.OK
		}
		_ = ss.Send(req)
		_, err := ss.Recv()
		return status.Code(err)
	}
	open := func(tok string) grpc.BidiStreamingClient[discovery.DiscoveryRequest, discovery.DiscoveryResponse] {
		var opts []grpc.CallOption
		if tok != "" {
			opts = append(opts, grpc.PerRPCCredentials(bearer(tok)))
		}
		ss, err := cl.StreamSecrets(ctx, opts...)
		require.NoError(t, err)
		return ss
	}
	req := &discovery.DiscoveryRequest{ResourceNames: []string{sds.NameDefault}}
	require.Equal(t, codes.Unauthenticated, recvCode(open(""), req), "no credentials")
	require.Equal(t, codes.Unauthenticated, recvCode(open("forged"), req), "unknown token")
	wrong := &discovery.DiscoveryRequest{TypeUrl: "type.googleapis.com/envoy.config.cluster.v3.Cluster", ResourceNames: []string{sds.NameDefault}}
	require.Equal(t, codes.InvalidArgument, recvCode(open("tok-web"), wrong), "wrong type URL")
	_, err := cl.FetchSecrets(ctx, wrong, grpc.PerRPCCredentials(bearer("tok-web")))
	require.Equal(t, codes.InvalidArgument, status.Code(err))
	resp, err := cl.FetchSecrets(ctx, &discovery.DiscoveryRequest{ResourceNames: []string{sds.NameDefault, "nope"}}, grpc.PerRPCCredentials(bearer("tok-web")))
	require.NoError(t, err)
	require.Len(t, resp.Resources, 1, "fetch serves the known name only")

	// Past MaxStreams, streams are shed with ResourceExhausted, and the
	// server serves again once they close.
	var held []context.CancelFunc
	for range 50 {
		sctx, scancel := context.WithCancel(ctx)
		held = append(held, scancel)
		ss, err := cl.StreamSecrets(sctx, grpc.PerRPCCredentials(bearer("tok-web")))
		require.NoError(t, err)
		require.NoError(t, ss.Send(&discovery.DiscoveryRequest{ResourceNames: []string{sds.NameRootCA}}))
		_, err = ss.Recv()
		require.NoError(t, err)
	}
	require.Equal(t, codes.ResourceExhausted, recvCode(open("tok-web"), req))
	require.Equal(t, 1.0, testutil.ToFloat64(c.metrics.Shed.WithLabelValues("streams")))
	for _, f := range held {
		f()
	}
	p := proxy(t, ctx, c.conn, "tok-web", sdstest.Config{Names: []string{sds.NameDefault}})
	waitFor(t, ctx, p, "service after shedding", has(sds.NameDefault))
}

func TestNACKStormAndSilentClientsDoNotStopService(t *testing.T) {
	ctx := context.Background()
	a := caller("shop", "web")
	c := startCentral(t, tokenTable{"tok-web": a}, shortPolicy(t), nil)
	storm := []*sdstest.Client{
		proxy(t, ctx, c.conn, "tok-web", sdstest.Config{Names: []string{sds.NameDefault, sds.NameRootCA}, NACKAll: true}),
		proxy(t, ctx, c.conn, "tok-web", sdstest.Config{Names: []string{sds.NameDefault}, NACKAll: true, Delta: true}),
	}
	silent := proxy(t, ctx, c.conn, "tok-web", sdstest.Config{Names: []string{sds.NameDefault}, NeverACK: true})
	for _, p := range storm {
		waitFor(t, ctx, p, "NACKs", func(s sdstest.State) bool { return s.NACKs >= 2 })
	}
	waitFor(t, ctx, silent, "a response", func(s sdstest.State) bool { return s.Responses >= 1 })
	// A NACK does not make the server resend what was refused: over the
	// storm's lifetime there are about as many NACKs as renewals, not a loop.
	time.Sleep(500 * time.Millisecond)
	n1 := testutil.ToFloat64(c.metrics.NACKs)
	time.Sleep(time.Second)
	n2 := testutil.ToFloat64(c.metrics.NACKs)
	require.LessOrEqual(t, n2-n1, 8.0, "NACKs per second with two storming clients and 1 s renewals")

	good := proxy(t, ctx, c.conn, "tok-web", sdstest.Config{Names: []string{sds.NameDefault}})
	st := waitFor(t, ctx, good, "service during the storm", has(sds.NameDefault))
	verify(t, leafOf(t, st, sds.NameDefault), c.ca.State().Roots, a.ID)
	for _, p := range c.srv.Proxies() {
		if p.LastNACK != nil {
			require.NotEmpty(t, p.NACKDetail)
		}
	}
}

func TestExpiredTokenAndDeletedAccountEndTheStream(t *testing.T) {
	ctx := context.Background()
	short := caller("shop", "web")
	short.ExpiresAt = time.Now().Add(time.Second)
	gone := caller("shop", "gone")
	sas := &saTable{}
	c := startCentral(t, tokenTable{"tok-short": short, "tok-gone": gone}, nil, func(cfg *sds.Config) {
		cfg.RecheckInterval = 200 * time.Millisecond
		cfg.ServiceAccounts = sas
	})
	pShort := proxy(t, ctx, c.conn, "tok-short", sdstest.Config{Names: []string{sds.NameDefault}})
	pGone := proxy(t, ctx, c.conn, "tok-gone", sdstest.Config{Names: []string{sds.NameDefault}})
	first := leafOf(t, waitFor(t, ctx, pShort, "first cert", has(sds.NameDefault)), sds.NameDefault)
	waitFor(t, ctx, pGone, "first cert", has(sds.NameDefault))

	// The token expires: the stream ends with Unauthenticated, the proxy
	// keeps its still-valid certificate, and its reconnect is judged on
	// the token it brings (here the same expired one: refused).
	st := waitFor(t, ctx, pShort, "the stream to end", func(s sdstest.State) bool { return s.LastError != nil && s.LastError.Code() == codes.Unauthenticated })
	require.Contains(t, st.LastError.Message(), "expired")
	kept := leafOf(t, st, sds.NameDefault)
	require.True(t, kept[0].Equal(first[0]) && time.Now().Before(kept[0].NotAfter))

	sas.gone.Store(true)
	st = waitFor(t, ctx, pGone, "the deleted account's stream to end", func(s sdstest.State) bool {
		return s.LastError != nil && s.LastError.Code() == codes.Unauthenticated
	})
	require.Contains(t, st.LastError.Message(), "no longer exists")
}

func TestManyStreamsOpenedAndDroppedAtOnce(t *testing.T) {
	if testing.Short() {
		t.Skip("opens 10,000 streams")
	}
	ctx := context.Background()
	a := caller("shop", "web")
	c := startCentral(t, tokenTable{"tok-web": a}, nil, nil)
	cl := secretv3.NewSecretDiscoveryServiceClient(c.conn)
	const n = 10000
	var opened atomic.Int64
	sctx, drop := context.WithCancel(ctx)
	errs := make(chan error, 64)
	for range 64 {
		go func() {
			for opened.Add(1) <= n {
				ss, err := cl.StreamSecrets(sctx, grpc.PerRPCCredentials(bearer("tok-web")))
				if err != nil {
					break
				}
				_ = ss.Send(&discovery.DiscoveryRequest{ResourceNames: []string{sds.NameDefault, sds.NameRootCA}})
			}
			errs <- nil
		}()
	}
	for range 64 {
		<-errs
	}
	drop()
	// The server is still serving, and every dropped stream is gone.
	p := proxy(t, ctx, dial(t, c.addr), "tok-web", sdstest.Config{Names: []string{sds.NameDefault}})
	waitFor(t, ctx, p, "service after the flood", has(sds.NameDefault))
	require.Eventually(t, func() bool { return len(c.srv.Proxies()) == 1 }, 20*time.Second, 50*time.Millisecond)
}
