package sdstest

import (
	"crypto"
	"sort"
	"testing"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"github.com/envoyproxy/go-control-plane/pkg/cache/types"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"github.com/stretchr/testify/require"
	"google.golang.org/grpc/codes"
	"google.golang.org/protobuf/proto"
)

func TestTypeURL(t *testing.T) {
	require.Equal(t, resource.SecretType, TypeURL)
}

func sorted(names []string) []string {
	out := append([]string(nil), names...)
	sort.Strings(out)
	return out
}

// requireACK checks that req ACKs resp: its version and nonce, the names,
// no error and no node.
func requireACK(t *testing.T, req *discoveryv3.DiscoveryRequest, resp *discoveryv3.DiscoveryResponse, names ...string) {
	t.Helper()
	require.Equal(t, resp.GetVersionInfo(), req.GetVersionInfo(), "ACK version")
	require.Equal(t, resp.GetNonce(), req.GetResponseNonce(), "ACK nonce")
	require.Nil(t, req.GetErrorDetail(), "ACK error_detail")
	require.Nil(t, req.GetNode(), "node on a request after the first")
	require.Equal(t, TypeURL, req.GetTypeUrl())
	require.Equal(t, sorted(names), sorted(req.GetResourceNames()))
}

func TestSotWACKsWithVersionAndNonceAndSendsNodeOnce(t *testing.T) {
	srv := newSDSServer(t)
	p := newPKI(t)
	chain1, key1 := p.leaf(t, "P-256")
	require.NoError(t, srv.cache.UpdateResources(map[string]types.Resource{
		"default": tlsSecret(t, "default", chain1, key1),
		"ROOTCA":  rootSecret("ROOTCA", p.root),
	}, nil))
	node := &corev3.Node{Id: "sidecar~10.0.0.1~web.demo~demo.svc.cluster.local", Cluster: "web.demo"}
	c := start(t, Config{Conn: srv.dial(t), Node: node, Names: []string{"default", "ROOTCA"}, History: 8})

	stream, req := srv.nextRequest(t)
	require.True(t, proto.Equal(node, req.GetNode()), "first request's node: %v", req.GetNode())
	require.Equal(t, []string{"default", "ROOTCA"}, req.GetResourceNames())
	require.Equal(t, TypeURL, req.GetTypeUrl())
	require.Empty(t, req.GetVersionInfo(), "first request of the first stream: no version yet")
	require.Empty(t, req.GetResponseNonce())

	_, resp1 := srv.nextResponse(t)
	require.Len(t, resp1.GetResources(), 2)
	ackStream, ack := srv.nextRequest(t)
	require.Equal(t, stream, ackStream)
	requireACK(t, ack, resp1, "default", "ROOTCA")

	st := wait(t, c, func(s State) bool { return s.ACKs == 1 })
	require.Equal(t, resp1.GetVersionInfo(), st.Version)
	require.Equal(t, 0, st.NACKs)
	require.Equal(t, 2, st.Requests)
	require.Equal(t, 1, st.Streams)
	require.True(t, st.Connected)
	require.Len(t, st.Secrets, 2)
	gotChain, gotKey, err := ParseTLSCertificate(st.Secrets["default"].Secret)
	require.NoError(t, err)
	require.True(t, gotChain[0].Equal(chain1[0]))
	require.True(t, key1.Public().(interface{ Equal(crypto.PublicKey) bool }).Equal(gotKey.Public()))
	roots, err := ParseValidationContext(st.Secrets["ROOTCA"].Secret)
	require.NoError(t, err)
	require.Len(t, roots, 1)
	require.True(t, roots[0].Equal(p.root))
	require.Equal(t, resp1.GetVersionInfo(), st.Secrets["default"].Version)

	// A rotation: the server sends only the secret that changed, and the
	// client keeps the other one at the version it came in.
	chain2, key2 := p.leaf(t, "RSA-2048")
	require.NoError(t, srv.cache.UpdateResource("default", tlsSecret(t, "default", chain2, key2)))
	_, resp2 := srv.nextResponse(t)
	require.Len(t, resp2.GetResources(), 1)
	_, ack2 := srv.nextRequest(t)
	requireACK(t, ack2, resp2, "default", "ROOTCA")
	require.NotEqual(t, resp1.GetVersionInfo(), resp2.GetVersionInfo())
	require.NotEqual(t, resp1.GetNonce(), resp2.GetNonce())

	st = wait(t, c, func(s State) bool { return s.ACKs == 2 })
	require.Equal(t, resp2.GetVersionInfo(), st.Secrets["default"].Version)
	require.Equal(t, resp1.GetVersionInfo(), st.Secrets["ROOTCA"].Version)
	gotChain, _, err = ParseTLSCertificate(st.Secrets["default"].Secret)
	require.NoError(t, err)
	require.True(t, gotChain[0].Equal(chain2[0]))

	require.Len(t, st.Events, 2)
	require.Equal(t, Event{
		Time: st.Events[0].Time, Stream: 1, Version: resp1.GetVersionInfo(), Nonce: resp1.GetNonce(),
		Names: st.Events[0].Names, Accepted: true, Replied: true,
	}, st.Events[0])
	require.ElementsMatch(t, []string{"default", "ROOTCA"}, st.Events[0].Names)
	require.Equal(t, []string{"default"}, st.Events[1].Names)
	require.Equal(t, st.Events[1], st.Last)
	require.False(t, st.Events[1].Time.Before(st.Events[0].Time))
	srv.noRequest(t)
}

func TestSotWNACKKeepsLastAcceptedSecrets(t *testing.T) {
	srv := newSDSServer(t)
	p := newPKI(t)
	chain, key := p.leaf(t, "P-256")
	good := tlsSecret(t, "default", chain, key)
	require.NoError(t, srv.cache.UpdateResources(map[string]types.Resource{
		"default": good, "ROOTCA": rootSecret("ROOTCA", p.root),
	}, nil))
	c := start(t, Config{Conn: srv.dial(t), Names: []string{"default", "ROOTCA"}})

	srv.nextRequest(t)
	_, resp1 := srv.nextResponse(t)
	_, ack := srv.nextRequest(t)
	requireACK(t, ack, resp1, "default", "ROOTCA")

	// One response with a valid new root and a leaf whose key is not its
	// own: Envoy rejects the response as a whole.
	otherChain, _ := p.leaf(t, "P-256")
	_, otherKey := p.leaf(t, "P-256")
	newRoot := newPKI(t).root
	require.NoError(t, srv.cache.UpdateResources(map[string]types.Resource{
		"default": tlsSecret(t, "default", otherChain, otherKey),
		"ROOTCA":  rootSecret("ROOTCA", newRoot),
	}, nil))
	_, resp2 := srv.nextResponse(t)
	require.Len(t, resp2.GetResources(), 2)
	_, nack := srv.nextRequest(t)
	require.Equal(t, resp1.GetVersionInfo(), nack.GetVersionInfo(), "a NACK carries the last accepted version")
	require.Equal(t, resp2.GetNonce(), nack.GetResponseNonce(), "a NACK carries the rejected response's nonce")
	require.NotNil(t, nack.GetErrorDetail())
	require.Equal(t, int32(codes.InvalidArgument), nack.GetErrorDetail().GetCode())
	require.Contains(t, nack.GetErrorDetail().GetMessage(), `secret "default"`)
	require.Contains(t, nack.GetErrorDetail().GetMessage(), "does not match")
	require.NotContains(t, nack.GetErrorDetail().GetMessage(), "ROOTCA", "only what was wrong")
	require.Nil(t, nack.GetNode())
	require.ElementsMatch(t, []string{"default", "ROOTCA"}, nack.GetResourceNames())

	st := wait(t, c, func(s State) bool { return s.NACKs == 1 })
	require.Equal(t, 1, st.ACKs)
	require.Equal(t, resp1.GetVersionInfo(), st.Version)
	require.True(t, proto.Equal(good, st.Secrets["default"].Secret), "the rejected secret must not replace the accepted one")
	require.Equal(t, resp1.GetVersionInfo(), st.Secrets["default"].Version)
	roots, err := ParseValidationContext(st.Secrets["ROOTCA"].Secret)
	require.NoError(t, err)
	require.True(t, roots[0].Equal(p.root), "the valid root of a rejected response must not be applied either")
	require.False(t, st.Last.Accepted)
	require.True(t, st.Last.Replied)
	require.Equal(t, nack.GetErrorDetail().GetMessage(), st.Last.Error)
	require.Equal(t, resp2.GetNonce(), st.Last.Nonce)

	// The server fixes it: accepted.
	chain3, key3 := p.leaf(t, "P-256")
	require.NoError(t, srv.cache.UpdateResource("default", tlsSecret(t, "default", chain3, key3)))
	_, resp3 := srv.nextResponse(t)
	_, ack3 := srv.nextRequest(t)
	requireACK(t, ack3, resp3, "default", "ROOTCA")
	st = wait(t, c, func(s State) bool { return s.ACKs == 2 })
	require.Equal(t, resp3.GetVersionInfo(), st.Version)
	gotChain, _, err := ParseTLSCertificate(st.Secrets["default"].Secret)
	require.NoError(t, err)
	require.True(t, gotChain[0].Equal(chain3[0]))
}

func TestSotWFirstResponseInvalidNACKsWithEmptyVersion(t *testing.T) {
	srv := newSDSServer(t)
	p := newPKI(t)
	chain, _ := p.leaf(t, "P-256")
	_, otherKey := p.leaf(t, "P-256")
	require.NoError(t, srv.cache.UpdateResource("default", tlsSecret(t, "default", chain, otherKey)))
	c := start(t, Config{Conn: srv.dial(t), Names: []string{"default"}})

	srv.nextRequest(t)
	_, resp := srv.nextResponse(t)
	_, nack := srv.nextRequest(t)
	require.Empty(t, nack.GetVersionInfo(), "nothing accepted yet")
	require.Equal(t, resp.GetNonce(), nack.GetResponseNonce())
	require.Equal(t, int32(codes.InvalidArgument), nack.GetErrorDetail().GetCode())
	st := wait(t, c, func(s State) bool { return s.NACKs == 1 })
	require.Empty(t, st.Secrets)
}

func TestSotWReconnectsAfterStreamKilled(t *testing.T) {
	srv := newSDSServer(t)
	p := newPKI(t)
	chain, key := p.leaf(t, "P-256")
	require.NoError(t, srv.cache.UpdateResource("default", tlsSecret(t, "default", chain, key)))
	node := &corev3.Node{Id: "node-a", Cluster: "cluster-a"}
	c := start(t, Config{Conn: srv.dial(t), Node: node, Names: []string{"default"}})

	first, _ := srv.nextRequest(t)
	_, resp1 := srv.nextResponse(t)
	_, ack1 := srv.nextRequest(t)
	requireACK(t, ack1, resp1, "default")

	// The server ends the stream when the client ACKs the next push.
	killACK := func(m proto.Message) bool {
		req := m.(*discoveryv3.DiscoveryRequest)
		return req.GetResponseNonce() != "" && req.GetVersionInfo() != ack1.GetVersionInfo()
	}
	srv.kill.Store(&killACK)
	chain2, key2 := p.leaf(t, "P-256")
	require.NoError(t, srv.cache.UpdateResource("default", tlsSecret(t, "default", chain2, key2)))
	_, resp2 := srv.nextResponse(t)
	_, ack2 := srv.nextRequest(t)
	requireACK(t, ack2, resp2, "default")

	second, req := srv.nextRequest(t)
	require.NotEqual(t, first, second, "a new stream")
	require.True(t, proto.Equal(node, req.GetNode()), "the node again on the new stream's first request")
	require.Equal(t, resp2.GetVersionInfo(), req.GetVersionInfo(), "the last accepted version")
	require.Empty(t, req.GetResponseNonce(), "no nonce on a new stream")
	require.Equal(t, []string{"default"}, req.GetResourceNames())
	require.Nil(t, req.GetErrorDetail())

	_, resp3 := srv.nextResponse(t)
	require.Len(t, resp3.GetResources(), 1)
	_, ack3 := srv.nextRequest(t)
	requireACK(t, ack3, resp3, "default")

	st := wait(t, c, func(s State) bool { return s.ACKs == 3 })
	require.Equal(t, 2, st.Streams)
	require.GreaterOrEqual(t, st.Reconnects, 1)
	require.True(t, st.Connected)
	require.NotNil(t, st.LastError)
	require.Equal(t, codes.Unavailable, st.LastError.Code())
	require.Contains(t, st.LastError.Message(), "stream killed by the test")
	require.Equal(t, 2, st.Last.Stream)
	gotChain, _, err := ParseTLSCertificate(st.Secrets["default"].Secret)
	require.NoError(t, err)
	require.True(t, gotChain[0].Equal(chain2[0]))
}

func TestSotWReconnectsAfterServerRestart(t *testing.T) {
	srv := newSDSServer(t)
	p := newPKI(t)
	chain, key := p.leaf(t, "P-256")
	require.NoError(t, srv.cache.UpdateResource("default", tlsSecret(t, "default", chain, key)))
	c := start(t, Config{Conn: srv.dial(t), Names: []string{"default"}})

	srv.nextRequest(t)
	_, resp1 := srv.nextResponse(t)
	srv.nextRequest(t)
	wait(t, c, func(s State) bool { return s.ACKs == 1 })

	srv.stop()
	st := wait(t, c, func(s State) bool { return !s.Connected && s.LastError != nil })
	require.Equal(t, codes.Unavailable, st.LastError.Code())
	// The secret is rotated while the server is down; the client keeps
	// what it has.
	chain2, key2 := p.leaf(t, "P-256")
	require.NoError(t, srv.cache.UpdateResource("default", tlsSecret(t, "default", chain2, key2)))
	require.Equal(t, resp1.GetVersionInfo(), c.State().Secrets["default"].Version)
	srv.start(srv.addr)

	_, req := srv.nextRequest(t)
	require.NotNil(t, req.GetNode())
	require.Equal(t, resp1.GetVersionInfo(), req.GetVersionInfo())
	require.Empty(t, req.GetResponseNonce())
	_, resp2 := srv.nextResponse(t)
	_, ack := srv.nextRequest(t)
	requireACK(t, ack, resp2, "default")

	st = wait(t, c, func(s State) bool { return s.ACKs == 2 })
	require.GreaterOrEqual(t, st.Reconnects, 1)
	require.Equal(t, 2, st.Streams)
	require.Equal(t, resp2.GetVersionInfo(), st.Secrets["default"].Version)
	gotChain, _, err := ParseTLSCertificate(st.Secrets["default"].Secret)
	require.NoError(t, err)
	require.True(t, gotChain[0].Equal(chain2[0]))
}

func TestSotWSubscribeChangesNames(t *testing.T) {
	srv := newSDSServer(t)
	p := newPKI(t)
	chain, key := p.leaf(t, "P-256")
	require.NoError(t, srv.cache.UpdateResources(map[string]types.Resource{
		"default": tlsSecret(t, "default", chain, key), "ROOTCA": rootSecret("ROOTCA", p.root),
	}, nil))
	c := start(t, Config{Conn: srv.dial(t), Names: []string{"default"}})

	_, req := srv.nextRequest(t)
	require.Equal(t, []string{"default"}, req.GetResourceNames())
	_, resp1 := srv.nextResponse(t)
	srv.nextRequest(t)
	st := wait(t, c, func(s State) bool { return s.ACKs == 1 })
	require.Len(t, st.Secrets, 1)

	require.NoError(t, c.Subscribe(t.Context(), []string{"default", "ROOTCA"}))
	_, sub := srv.nextRequest(t)
	require.Equal(t, []string{"default", "ROOTCA"}, sub.GetResourceNames())
	require.Equal(t, resp1.GetVersionInfo(), sub.GetVersionInfo())
	require.Equal(t, resp1.GetNonce(), sub.GetResponseNonce())
	require.Nil(t, sub.GetNode())
	require.Nil(t, sub.GetErrorDetail())
	_, resp2 := srv.nextResponse(t)
	_, ack := srv.nextRequest(t)
	requireACK(t, ack, resp2, "default", "ROOTCA")
	st = wait(t, c, func(s State) bool { return s.ACKs == 2 })
	require.Len(t, st.Secrets, 2)
	require.Equal(t, []string{"default", "ROOTCA"}, st.Names)

	// The same names again: nothing to tell the server.
	require.NoError(t, c.Subscribe(t.Context(), []string{"ROOTCA", "default"}))
	require.NoError(t, c.Subscribe(t.Context(), []string{"ROOTCA"}))
	_, sub = srv.nextRequest(t)
	require.Equal(t, []string{"ROOTCA"}, sub.GetResourceNames())
	require.Equal(t, resp2.GetNonce(), sub.GetResponseNonce())
	st = c.State()
	require.Len(t, st.Secrets, 1, "a secret no longer subscribed to is dropped")
	require.Contains(t, st.Secrets, "ROOTCA")
	require.Equal(t, 5, st.Requests, "first, ACK, subscribe, ACK, subscribe")

	require.Error(t, c.Subscribe(t.Context(), nil))
	require.Error(t, c.Subscribe(t.Context(), []string{""}))
}

func TestSotWNeverACKSendsOneRequest(t *testing.T) {
	srv := newSDSServer(t)
	p := newPKI(t)
	chain, key := p.leaf(t, "P-256")
	require.NoError(t, srv.cache.UpdateResources(map[string]types.Resource{
		"default": tlsSecret(t, "default", chain, key), "ROOTCA": rootSecret("ROOTCA", p.root),
	}, nil))
	c, err := New(Config{Conn: srv.dial(t), Names: []string{"default"}, NeverACK: true})
	require.NoError(t, err)
	stop := run(t, c)
	t.Cleanup(stop)

	stream, req := srv.nextRequest(t)
	require.NotNil(t, req.GetNode())
	_, resp := srv.nextResponse(t)
	st := wait(t, c, func(s State) bool { return s.Responses == 1 })
	require.True(t, st.Last.Accepted)
	require.False(t, st.Last.Replied)
	require.Equal(t, resp.GetVersionInfo(), st.Secrets["default"].Version, "a NeverACK client still takes what it gets")

	// Neither a new subscription nor a new push makes it send anything.
	require.NoError(t, c.Subscribe(t.Context(), []string{"default", "ROOTCA"}))
	chain2, key2 := p.leaf(t, "P-256")
	require.NoError(t, srv.cache.UpdateResource("default", tlsSecret(t, "default", chain2, key2)))
	// A wrong client ACKs right after it records the response; give it
	// ample time to show.
	time.Sleep(200 * time.Millisecond)
	srv.noRequest(t)

	stop()
	srv.waitClosed(t, stream)
	srv.noRequest(t)
	st = c.State()
	require.Equal(t, 1, st.Requests)
	require.Equal(t, 0, st.ACKs+st.NACKs)
	require.Equal(t, []string{"default", "ROOTCA"}, st.Names)
}

func TestManyStreamsShareOneConnection(t *testing.T) {
	srv := newSDSServer(t)
	p := newPKI(t)
	chain, key := p.leaf(t, "P-256")
	require.NoError(t, srv.cache.UpdateResources(map[string]types.Resource{
		"default": tlsSecret(t, "default", chain, key), "ROOTCA": rootSecret("ROOTCA", p.root),
	}, nil))
	// Drain the recordings: this test counts on the clients' state.
	go func() {
		for {
			select {
			case <-srv.reqs:
			case <-srv.resps:
			case <-srv.stopped:
				return
			}
		}
	}()
	conn := srv.dial(t)
	var clients []*Client
	for i := range 20 {
		clients = append(clients, start(t, Config{Conn: conn, Names: []string{"default", "ROOTCA"}, Delta: i%2 == 1}))
	}
	for _, c := range clients {
		st := wait(t, c, func(s State) bool { return len(s.Secrets) == 2 && s.ACKs >= 1 })
		require.Equal(t, 1, st.Streams)
	}
	require.Equal(t, int64(1), srv.accepted.Load(), "one TCP connection for every stream")
	require.Equal(t, int64(20), srv.streams.Load())
}
