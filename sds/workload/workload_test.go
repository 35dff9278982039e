package workload_test

import (
	"bytes"
	"context"
	"crypto"
	"crypto/x509"
	"encoding/base64"
	"encoding/hex"
	"errors"
	"log/slog"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	workloadpb "github.com/spiffe/go-spiffe/v2/proto/spiffe/workload"
	"github.com/spiffe/go-spiffe/v2/svid/jwtsvid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"github.com/spiffe/go-spiffe/v2/workloadapi"
	"github.com/stretchr/testify/require"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/meshca/meshca/sds"
	"github.com/meshca/meshca/sds/workload"
)

func newClient(t *testing.T, addr string) *workloadapi.Client {
	t.Helper()
	c, err := workloadapi.New(t.Context(), workloadapi.WithAddr(addr))
	require.NoError(t, err)
	t.Cleanup(func() { c.Close() })
	return c
}

// rawClient is the generated client, for what go-spiffe's client hides:
// the bytes on the wire and calls without the security header.
func rawClient(t *testing.T, addr string) workloadpb.SpiffeWorkloadAPIClient {
	t.Helper()
	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	require.NoError(t, err)
	t.Cleanup(func() { conn.Close() })
	return workloadpb.NewSpiffeWorkloadAPIClient(conn)
}

func withHeader(ctx context.Context) context.Context {
	return metadata.AppendToOutgoingContext(ctx, workload.HeaderKey, "true")
}

// requireSVID checks that svid is cred as go-spiffe parsed it: its ID,
// its chain, leaf first, and a key that matches the leaf.
func requireSVID(t *testing.T, cred *sds.Credential, svid *x509svid.SVID) {
	t.Helper()
	require.Equal(t, appID, svid.ID)
	require.Len(t, svid.Certificates, len(cred.Chain))
	for i := range cred.Chain {
		require.True(t, cred.Chain[i].Equal(svid.Certificates[i]), "certificate %d of the chain", i)
	}
	pub, ok := svid.PrivateKey.Public().(interface{ Equal(crypto.PublicKey) bool })
	require.True(t, ok)
	require.True(t, pub.Equal(svid.Certificates[0].PublicKey), "the SVID's key does not match its leaf")
}

// requireCanceled: err is how a call ends when its client cancels; go-spiffe
// returns the context's error or the Canceled status.
func requireCanceled(t *testing.T, err error) {
	t.Helper()
	if !errors.Is(err, context.Canceled) {
		require.Equal(t, codes.Canceled, status.Code(err), "%v", err)
	}
}

func TestNewRequiresSource(t *testing.T) {
	_, err := workload.New(workload.Config{})
	require.ErrorContains(t, err, "Source is required")
}

func TestFetchWithGoSpiffe(t *testing.T) {
	root := newRoot(t, "root")
	cred := root.leaf(t)
	addr, _ := serve(t, newSource(sds.Snapshot{Credential: cred, Bundle: bundleOf(root)}), workload.Config{})
	c := newClient(t, addr)

	svid, err := c.FetchX509SVID(t.Context())
	require.NoError(t, err)
	requireSVID(t, cred, svid)

	bundles, err := c.FetchX509Bundles(t.Context())
	require.NoError(t, err)
	require.Equal(t, 1, bundles.Len())
	b, ok := bundles.Get(td)
	require.True(t, ok, "no bundle for %s", td)
	require.Len(t, b.X509Authorities(), 1)
	require.True(t, root.cert.Equal(b.X509Authorities()[0]))

	id, _, err := x509svid.Verify(svid.Certificates, bundles)
	require.NoError(t, err)
	require.Equal(t, appID, id)

	// X509Source, as most go-spiffe workloads use the API.
	src, err := workloadapi.NewX509Source(t.Context(), workloadapi.WithClientOptions(workloadapi.WithAddr(addr)))
	require.NoError(t, err)
	defer src.Close()
	got, err := src.GetX509SVID()
	require.NoError(t, err)
	requireSVID(t, cred, got)
	_, err = src.GetX509BundleForTrustDomain(td)
	require.NoError(t, err)
}

// TestWireFormat checks the bytes go-spiffe's client hides: the chain as
// concatenated DER, leaf first; the key as PKCS#8; the bundle keyed by the
// trust domain's SPIFFE ID. It also checks that a snapshot that changes
// nothing sends nothing, and that no log line carries the key.
func TestWireFormat(t *testing.T) {
	root := newRoot(t, "root")
	inter := root.intermediate(t, "intermediate")
	cred := inter.leaf(t)
	snap := sds.Snapshot{Credential: cred, Bundle: bundleOf(root)}
	src := newSource(snap)
	logs := &syncBuffer{}
	log := slog.New(slog.NewJSONHandler(logs, &slog.HandlerOptions{Level: slog.LevelDebug}))
	addr, _ := serve(t, src, workload.Config{Log: log})
	c := rawClient(t, addr)
	ctx := withHeader(t.Context())

	stream, err := c.FetchX509SVID(ctx, &workloadpb.X509SVIDRequest{})
	require.NoError(t, err)
	resp, err := stream.Recv()
	require.NoError(t, err)
	require.Len(t, resp.Svids, 1)
	got := resp.Svids[0]
	require.Equal(t, "spiffe://example.org/ns/default/sa/app", got.SpiffeId)
	require.Equal(t, append(append([]byte{}, cred.Chain[0].Raw...), inter.cert.Raw...), got.X509Svid)
	require.Equal(t, root.cert.Raw, got.Bundle)
	require.Empty(t, got.Hint)
	key, err := x509.ParsePKCS8PrivateKey(got.X509SvidKey)
	require.NoError(t, err)
	require.True(t, cred.Key.(interface{ Equal(crypto.PrivateKey) bool }).Equal(key), "the key sent is not the credential's")

	bstream, err := c.FetchX509Bundles(ctx, &workloadpb.X509BundlesRequest{})
	require.NoError(t, err)
	bresp, err := bstream.Recv()
	require.NoError(t, err)
	require.Equal(t, map[string][]byte{"spiffe://example.org": root.cert.Raw}, bresp.Bundles)

	// The same snapshot again: both streams look at it and send nothing,
	// so the next message each receives is the next change.
	before := src.watches.Load()
	src.Publish(snap)
	require.Eventually(t, func() bool { return src.watches.Load() >= before+2 }, 10*time.Second, 5*time.Millisecond)
	next := inter.leaf(t)
	src.Publish(sds.Snapshot{Credential: next, Bundle: bundleOf(root)})
	resp, err = stream.Recv()
	require.NoError(t, err)
	require.Equal(t, append(append([]byte{}, next.Chain[0].Raw...), inter.cert.Raw...), resp.Svids[0].X509Svid)

	root2 := newRoot(t, "root 2")
	src.Publish(sds.Snapshot{Credential: next, Bundle: bundleOf(root, root2)})
	bresp, err = bstream.Recv()
	require.NoError(t, err)
	require.Equal(t, append(append([]byte{}, root.cert.Raw...), root2.cert.Raw...), bresp.Bundles["spiffe://example.org"],
		"the bundle stream sent something before the bundle changed")

	// Debug logs of every push are written; none carries a key.
	require.Contains(t, logs.String(), "sent X.509-SVID")
	for _, k := range [][]byte{got.X509SvidKey, mustPKCS8(t, next)} {
		require.NotContains(t, logs.String(), base64.StdEncoding.EncodeToString(k))
		require.NotContains(t, logs.String(), hex.EncodeToString(k))
	}
	require.NotContains(t, logs.String(), "PRIVATE KEY")
}

// syncBuffer is a log sink the server writes while the test reads.
type syncBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

func mustPKCS8(t *testing.T, c *sds.Credential) []byte {
	t.Helper()
	der, err := x509.MarshalPKCS8PrivateKey(c.Key)
	require.NoError(t, err)
	return der
}

type contextWatcher struct{ updates chan *workloadapi.X509Context }

func (w contextWatcher) OnX509ContextUpdate(c *workloadapi.X509Context) { w.updates <- c }
func (w contextWatcher) OnX509ContextWatchError(error)                  {}

type bundleWatcher struct{ updates chan *x509bundle.Set }

func (w bundleWatcher) OnX509BundlesUpdate(s *x509bundle.Set) { w.updates <- s }
func (w bundleWatcher) OnX509BundlesWatchError(error)         {}

// TestRotations watches with go-spiffe through three rotations: a new leaf,
// a leaf under an intermediate, and a leaf under a new root that only the
// new bundle trusts. Each update must be the credential just published,
// and must chain to the bundle that came with it.
func TestRotations(t *testing.T) {
	root := newRoot(t, "root")
	first := root.leaf(t)
	src := newSource(sds.Snapshot{Credential: first, Bundle: bundleOf(root)})
	addr, _ := serve(t, src, workload.Config{})
	c := newClient(t, addr)

	w := contextWatcher{updates: make(chan *workloadapi.X509Context, 16)}
	ctx, cancel := context.WithCancel(t.Context())
	done := make(chan error, 1)
	go func() { done <- c.WatchX509Context(ctx, w) }()
	defer func() {
		cancel()
		requireCanceled(t, <-done)
	}()

	check := func(cred *sds.Credential, u *workloadapi.X509Context) {
		t.Helper()
		requireSVID(t, cred, u.DefaultSVID())
		id, _, err := x509svid.Verify(u.DefaultSVID().Certificates, u.Bundles)
		require.NoError(t, err, "the SVID does not chain to the bundle it came with")
		require.Equal(t, appID, id)
	}
	check(first, recv(t, w.updates))

	inter := root.intermediate(t, "intermediate")
	root2 := newRoot(t, "root 2")
	rotations := []sds.Snapshot{
		{Credential: root.leaf(t), Bundle: bundleOf(root)},
		{Credential: inter.leaf(t), Bundle: bundleOf(root)},
		{Credential: root2.leaf(t), Bundle: bundleOf(root2)},
	}
	for i, snap := range rotations {
		src.Publish(snap)
		u := recv(t, w.updates)
		check(snap.Credential, u)
		require.Equal(t, len(snap.Bundle.Roots), len(mustBundle(t, u.Bundles).X509Authorities()), "rotation %d", i)
	}
	// The last leaf is only trusted through the bundle that came with it.
	_, _, err := x509svid.Verify(rotations[2].Credential.Chain, x509bundle.FromX509Authorities(td, []*x509.Certificate{root.cert}))
	require.Error(t, err)
}

func mustBundle(t *testing.T, s *x509bundle.Set) *x509bundle.Bundle {
	t.Helper()
	b, ok := s.Get(td)
	require.True(t, ok)
	return b
}

// TestBundleWatch watches bundles with go-spiffe: a new credential alone
// sends nothing, a new root does.
func TestBundleWatch(t *testing.T) {
	root := newRoot(t, "root")
	src := newSource(sds.Snapshot{Credential: root.leaf(t), Bundle: bundleOf(root)})
	addr, _ := serve(t, src, workload.Config{})
	c := newClient(t, addr)

	w := bundleWatcher{updates: make(chan *x509bundle.Set, 16)}
	ctx, cancel := context.WithCancel(t.Context())
	done := make(chan error, 1)
	go func() { done <- c.WatchX509Bundles(ctx, w) }()
	defer func() {
		cancel()
		<-done
	}()

	require.Len(t, mustBundle(t, recv(t, w.updates)).X509Authorities(), 1)

	before := src.watches.Load()
	src.Publish(sds.Snapshot{Credential: root.leaf(t), Bundle: bundleOf(root)})
	require.Eventually(t, func() bool { return src.watches.Load() > before }, 10*time.Second, 5*time.Millisecond)

	root2 := newRoot(t, "root 2")
	src.Publish(sds.Snapshot{Credential: root.leaf(t), Bundle: bundleOf(root, root2)})
	got := mustBundle(t, recv(t, w.updates)).X509Authorities()
	require.Len(t, got, 2, "the first update after the bundle changed is not the new bundle")
	require.True(t, root.cert.Equal(got[0]))
	require.True(t, root2.cert.Equal(got[1]))

	src.Publish(sds.Snapshot{Credential: root.leaf(t), Bundle: bundleOf(root2)})
	got = mustBundle(t, recv(t, w.updates)).X509Authorities()
	require.Len(t, got, 1)
	require.True(t, root2.cert.Equal(got[0]))
}

// TestSecurityHeader: a call without "workload.spiffe.io: true" is refused
// with InvalidArgument before anything else, JWT calls included.
func TestSecurityHeader(t *testing.T) {
	root := newRoot(t, "root")
	addr, m := serve(t, newSource(sds.Snapshot{Credential: root.leaf(t), Bundle: bundleOf(root)}), workload.Config{})
	c := rawClient(t, addr)

	calls := map[string]func(context.Context) error{
		"FetchX509SVID": func(ctx context.Context) error {
			s, err := c.FetchX509SVID(ctx, &workloadpb.X509SVIDRequest{})
			if err != nil {
				return err
			}
			_, err = s.Recv()
			return err
		},
		"FetchX509Bundles": func(ctx context.Context) error {
			s, err := c.FetchX509Bundles(ctx, &workloadpb.X509BundlesRequest{})
			if err != nil {
				return err
			}
			_, err = s.Recv()
			return err
		},
		"FetchJWTSVID": func(ctx context.Context) error {
			_, err := c.FetchJWTSVID(ctx, &workloadpb.JWTSVIDRequest{Audience: []string{"a"}})
			return err
		},
		"FetchJWTBundles": func(ctx context.Context) error {
			s, err := c.FetchJWTBundles(ctx, &workloadpb.JWTBundlesRequest{})
			if err != nil {
				return err
			}
			_, err = s.Recv()
			return err
		},
		"ValidateJWTSVID": func(ctx context.Context) error {
			_, err := c.ValidateJWTSVID(ctx, &workloadpb.ValidateJWTSVIDRequest{Audience: "a", Svid: "x"})
			return err
		},
	}
	headers := map[string]metadata.MD{
		"absent":     nil,
		"false":      metadata.Pairs(workload.HeaderKey, "false"),
		"True":       metadata.Pairs(workload.HeaderKey, "True"),
		"duplicated": metadata.Pairs(workload.HeaderKey, "true", workload.HeaderKey, "true"),
	}
	for method, call := range calls {
		for name, md := range headers {
			t.Run(method+"/"+name, func(t *testing.T) {
				ctx := t.Context()
				if md != nil {
					ctx = metadata.NewOutgoingContext(ctx, md)
				}
				st := status.Convert(call(ctx))
				require.Equal(t, codes.InvalidArgument, st.Code(), st.Message())
				require.Contains(t, st.Message(), `"workload.spiffe.io: true"`)
			})
		}
	}
	require.Equal(t, float64(len(headers)), testutil.ToFloat64(m.Calls.WithLabelValues("FetchX509SVID", "InvalidArgument")))

	// With the header, the same raw client is served.
	s, err := c.FetchX509SVID(withHeader(t.Context()), &workloadpb.X509SVIDRequest{})
	require.NoError(t, err)
	_, err = s.Recv()
	require.NoError(t, err)
}

// TestUnimplemented: meshca signs no JWT-SVID or WIT-SVID, and says so.
func TestUnimplemented(t *testing.T) {
	root := newRoot(t, "root")
	addr, m := serve(t, newSource(sds.Snapshot{Credential: root.leaf(t), Bundle: bundleOf(root)}), workload.Config{})
	c := newClient(t, addr)

	_, err := c.FetchJWTSVID(t.Context(), jwtsvid.Params{Audience: "a", Subject: appID})
	requireUnimplemented(t, err, "JWT-SVID")
	_, err = c.FetchJWTBundles(t.Context())
	requireUnimplemented(t, err, "JWT-SVID")
	_, err = c.ValidateJWTSVID(t.Context(), "a.b.c", "a")
	requireUnimplemented(t, err, "JWT-SVID")
	_, err = c.FetchWITSVID(t.Context(), "")
	requireUnimplemented(t, err, "WIT-SVID")
	_, err = c.FetchWITBundles(t.Context())
	requireUnimplemented(t, err, "WIT-SVID")
	require.Equal(t, 1.0, testutil.ToFloat64(m.Calls.WithLabelValues("ValidateJWTSVID", "Unimplemented")))
}

func requireUnimplemented(t *testing.T, err error, profile string) {
	t.Helper()
	st := status.Convert(err)
	require.Equal(t, codes.Unimplemented, st.Code(), st.Message())
	require.Contains(t, st.Message(), "meshca does not issue "+profile+"s")
}

// TestStreamsEndWithClient: every stream, including one still waiting for
// a first credential, returns once its client cancels.
func TestStreamsEndWithClient(t *testing.T) {
	root := newRoot(t, "root")
	// The pending server never gets a credential; the other one has one.
	pending := newSource(sds.Snapshot{Bundle: bundleOf(root)})
	pendingAddr, pm := serve(t, pending, workload.Config{FirstWait: time.Hour})
	ready := newSource(sds.Snapshot{Credential: root.leaf(t), Bundle: bundleOf(root)})
	addr, m := serve(t, ready, workload.Config{})

	ctx, cancel := context.WithCancel(t.Context())
	defer cancel()
	done := make(chan error, 3)
	c := newClient(t, addr)
	go func() {
		done <- c.WatchX509Context(ctx, contextWatcher{updates: make(chan *workloadapi.X509Context, 16)})
	}()
	go func() { done <- c.WatchX509Bundles(ctx, bundleWatcher{updates: make(chan *x509bundle.Set, 16)}) }()
	waiting, err := rawClient(t, pendingAddr).FetchX509SVID(withHeader(ctx), &workloadpb.X509SVIDRequest{})
	require.NoError(t, err)
	go func() {
		_, err := waiting.Recv()
		done <- err
	}()

	open := func(m *workload.Metrics, method string) func() bool {
		return func() bool { return testutil.ToFloat64(m.Streams.WithLabelValues(method)) == 1 }
	}
	require.Eventually(t, open(m, "FetchX509SVID"), 10*time.Second, 5*time.Millisecond)
	require.Eventually(t, open(m, "FetchX509Bundles"), 10*time.Second, 5*time.Millisecond)
	require.Eventually(t, open(pm, "FetchX509SVID"), 10*time.Second, 5*time.Millisecond)
	select {
	case err := <-done:
		t.Fatalf("a stream ended before its client canceled: %v", err)
	default:
	}

	cancel()
	for range 3 {
		requireCanceled(t, recv(t, done))
	}
	closed := func() bool {
		return testutil.ToFloat64(m.Streams.WithLabelValues("FetchX509SVID")) == 0 &&
			testutil.ToFloat64(m.Streams.WithLabelValues("FetchX509Bundles")) == 0 &&
			testutil.ToFloat64(pm.Streams.WithLabelValues("FetchX509SVID")) == 0
	}
	require.Eventually(t, closed, 10*time.Second, 5*time.Millisecond, "a stream handler did not return")
	require.Equal(t, 1.0, testutil.ToFloat64(pm.Calls.WithLabelValues("FetchX509SVID", "Canceled")))
	require.Equal(t, 1.0, testutil.ToFloat64(m.Calls.WithLabelValues("FetchX509Bundles", "Canceled")))
}
