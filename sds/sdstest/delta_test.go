package sdstest

import (
	"testing"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"github.com/envoyproxy/go-control-plane/pkg/cache/types"
	"github.com/stretchr/testify/require"
	"google.golang.org/grpc/codes"
	"google.golang.org/protobuf/proto"
)

// requireDeltaACK checks that req ACKs resp: its nonce, no error, no node,
// no change of subscription.
func requireDeltaACK(t *testing.T, req *discoveryv3.DeltaDiscoveryRequest, resp *discoveryv3.DeltaDiscoveryResponse) {
	t.Helper()
	require.Equal(t, resp.GetNonce(), req.GetResponseNonce(), "ACK nonce")
	require.Nil(t, req.GetErrorDetail(), "ACK error_detail")
	require.Nil(t, req.GetNode(), "node on a request after the first")
	require.Equal(t, TypeURL, req.GetTypeUrl())
	require.Empty(t, req.GetResourceNamesSubscribe())
	require.Empty(t, req.GetResourceNamesUnsubscribe())
	require.Empty(t, req.GetInitialResourceVersions())
}

// resourceVersions returns the version of each resource of resp by name.
func resourceVersions(resp *discoveryv3.DeltaDiscoveryResponse) map[string]string {
	out := map[string]string{}
	for _, r := range resp.GetResources() {
		out[r.GetName()] = r.GetVersion()
	}
	return out
}

func TestDeltaACKsNACKsAndRemoves(t *testing.T) {
	srv := newSDSServer(t)
	p := newPKI(t)
	chain, key := p.leaf(t, "P-256")
	good := tlsSecret(t, "default", chain, key)
	require.NoError(t, srv.cache.UpdateResources(map[string]types.Resource{
		"default": good, "ROOTCA": rootSecret("ROOTCA", p.root),
	}, nil))
	node := &corev3.Node{Id: "node-d", Cluster: "cluster-d"}
	c := start(t, Config{Conn: srv.dial(t), Node: node, Names: []string{"default", "ROOTCA"}, Delta: true, History: 2})

	_, req := srv.nextDeltaRequest(t)
	require.True(t, proto.Equal(node, req.GetNode()), "first request's node: %v", req.GetNode())
	require.Equal(t, TypeURL, req.GetTypeUrl())
	require.Equal(t, []string{"default", "ROOTCA"}, req.GetResourceNamesSubscribe())
	require.Empty(t, req.GetResourceNamesUnsubscribe())
	require.Empty(t, req.GetInitialResourceVersions(), "nothing held yet")
	require.Empty(t, req.GetResponseNonce())

	_, resp1 := srv.nextDeltaResponse(t)
	require.Len(t, resp1.GetResources(), 2)
	_, ack := srv.nextDeltaRequest(t)
	requireDeltaACK(t, ack, resp1)
	st := wait(t, c, func(s State) bool { return s.ACKs == 1 })
	versions := resourceVersions(resp1)
	require.Len(t, st.Secrets, 2)
	for name, s := range st.Secrets {
		require.Equal(t, versions[name], s.Version, name)
		require.NotEmpty(t, s.Version)
	}
	require.Equal(t, resp1.GetSystemVersionInfo(), st.Version)

	// A leaf with a key that is not its own: NACKed, the good one kept.
	otherChain, _ := p.leaf(t, "P-256")
	_, otherKey := p.leaf(t, "P-256")
	require.NoError(t, srv.cache.UpdateResource("default", tlsSecret(t, "default", otherChain, otherKey)))
	_, resp2 := srv.nextDeltaResponse(t)
	_, nack := srv.nextDeltaRequest(t)
	require.Equal(t, resp2.GetNonce(), nack.GetResponseNonce())
	require.Nil(t, nack.GetNode())
	require.Equal(t, int32(codes.InvalidArgument), nack.GetErrorDetail().GetCode())
	require.Contains(t, nack.GetErrorDetail().GetMessage(), `secret "default"`)
	require.Contains(t, nack.GetErrorDetail().GetMessage(), "does not match")
	st = wait(t, c, func(s State) bool { return s.NACKs == 1 })
	require.True(t, proto.Equal(good, st.Secrets["default"].Secret))
	require.Equal(t, versions["default"], st.Secrets["default"].Version)
	require.Equal(t, resp1.GetSystemVersionInfo(), st.Version)

	// The server removes the root: so does the client.
	require.NoError(t, srv.cache.DeleteResource("ROOTCA"))
	_, resp3 := srv.nextDeltaResponse(t)
	require.Equal(t, []string{"ROOTCA"}, resp3.GetRemovedResources())
	_, ack3 := srv.nextDeltaRequest(t)
	requireDeltaACK(t, ack3, resp3)
	st = wait(t, c, func(s State) bool { return s.ACKs == 2 })
	require.NotContains(t, st.Secrets, "ROOTCA")
	require.Contains(t, st.Secrets, "default")
	require.Len(t, st.Events, 2, "History caps the events")
	require.False(t, st.Events[0].Accepted)
	require.Equal(t, resp2.GetNonce(), st.Events[0].Nonce)
	require.Equal(t, []string{"ROOTCA"}, st.Events[1].Removed)
	require.True(t, st.Events[1].Accepted)
}

func TestDeltaReconnectSendsInitialResourceVersions(t *testing.T) {
	srv := newSDSServer(t)
	p := newPKI(t)
	chain, key := p.leaf(t, "P-256")
	require.NoError(t, srv.cache.UpdateResources(map[string]types.Resource{
		"default": tlsSecret(t, "default", chain, key), "ROOTCA": rootSecret("ROOTCA", p.root),
	}, nil))
	c := start(t, Config{Conn: srv.dial(t), Names: []string{"default", "ROOTCA"}, Delta: true})

	first, _ := srv.nextDeltaRequest(t)
	_, resp1 := srv.nextDeltaResponse(t)
	srv.nextDeltaRequest(t)
	wait(t, c, func(s State) bool { return s.ACKs == 1 })

	srv.stop()
	st := wait(t, c, func(s State) bool { return !s.Connected && s.LastError != nil })
	require.Equal(t, codes.Unavailable, st.LastError.Code())
	newRoot := newPKI(t).root
	require.NoError(t, srv.cache.UpdateResource("ROOTCA", rootSecret("ROOTCA", newRoot)))
	srv.start(srv.addr)

	second, req := srv.nextDeltaRequest(t)
	require.NotEqual(t, first, second)
	require.NotNil(t, req.GetNode(), "the node again on the new stream's first request")
	require.ElementsMatch(t, []string{"default", "ROOTCA"}, req.GetResourceNamesSubscribe())
	require.Equal(t, resourceVersions(resp1), req.GetInitialResourceVersions())
	require.Empty(t, req.GetResponseNonce())

	// The server knows the client holds default at its version: it sends
	// only the root that changed. (The first stream may have sent one more
	// response, and had it ACKed, before it was stopped: skip those.)
	var resp2 *discoveryv3.DeltaDiscoveryResponse
	for resp2 == nil {
		if id, r := srv.nextDeltaResponse(t); id == second {
			resp2 = r
		}
	}
	require.Equal(t, []string{"ROOTCA"}, sorted(keys(resourceVersions(resp2))))
	var ack *discoveryv3.DeltaDiscoveryRequest
	for ack == nil {
		if id, r := srv.nextDeltaRequest(t); id == second {
			ack = r
		}
	}
	requireDeltaACK(t, ack, resp2)

	st = wait(t, c, func(s State) bool {
		roots, err := ParseValidationContext(s.Secrets["ROOTCA"].Secret)
		return s.ACKs >= 2 && err == nil && roots[0].Equal(newRoot)
	})
	require.Equal(t, 2, st.Streams)
	require.GreaterOrEqual(t, st.Reconnects, 1)
	roots, err := ParseValidationContext(st.Secrets["ROOTCA"].Secret)
	require.NoError(t, err)
	require.True(t, roots[0].Equal(newRoot))
	require.Equal(t, resourceVersions(resp1)["default"], st.Secrets["default"].Version)
}

func keys(m map[string]string) []string {
	var out []string
	for k := range m {
		out = append(out, k)
	}
	return out
}

func TestDeltaSubscribeChangesNames(t *testing.T) {
	srv := newSDSServer(t)
	p := newPKI(t)
	chain, key := p.leaf(t, "P-256")
	require.NoError(t, srv.cache.UpdateResources(map[string]types.Resource{
		"default": tlsSecret(t, "default", chain, key), "ROOTCA": rootSecret("ROOTCA", p.root),
	}, nil))
	c := start(t, Config{Conn: srv.dial(t), Names: []string{"default"}, Delta: true})

	srv.nextDeltaRequest(t)
	srv.nextDeltaResponse(t)
	srv.nextDeltaRequest(t)
	wait(t, c, func(s State) bool { return s.ACKs == 1 })

	require.NoError(t, c.Subscribe(t.Context(), []string{"default", "ROOTCA"}))
	_, sub := srv.nextDeltaRequest(t)
	require.Equal(t, []string{"ROOTCA"}, sub.GetResourceNamesSubscribe())
	require.Empty(t, sub.GetResourceNamesUnsubscribe())
	require.Nil(t, sub.GetNode())
	require.Nil(t, sub.GetErrorDetail())
	_, resp := srv.nextDeltaResponse(t)
	require.Equal(t, []string{"ROOTCA"}, keys(resourceVersions(resp)))
	_, ack := srv.nextDeltaRequest(t)
	requireDeltaACK(t, ack, resp)
	st := wait(t, c, func(s State) bool { return s.ACKs == 2 })
	require.Len(t, st.Secrets, 2)

	require.NoError(t, c.Subscribe(t.Context(), []string{"ROOTCA"}))
	_, sub = srv.nextDeltaRequest(t)
	require.Empty(t, sub.GetResourceNamesSubscribe())
	require.Equal(t, []string{"default"}, sub.GetResourceNamesUnsubscribe())
	st = c.State()
	require.NotContains(t, st.Secrets, "default")
	require.Contains(t, st.Secrets, "ROOTCA")
}

func TestDeltaNACKAll(t *testing.T) {
	srv := newSDSServer(t)
	p := newPKI(t)
	chain, key := p.leaf(t, "P-256")
	require.NoError(t, srv.cache.UpdateResource("default", tlsSecret(t, "default", chain, key)))
	c := start(t, Config{Conn: srv.dial(t), Names: []string{"default"}, Delta: true, NACKAll: true})

	srv.nextDeltaRequest(t)
	_, resp1 := srv.nextDeltaResponse(t)
	_, nack1 := srv.nextDeltaRequest(t)
	require.Equal(t, resp1.GetNonce(), nack1.GetResponseNonce())
	require.Equal(t, int32(codes.InvalidArgument), nack1.GetErrorDetail().GetCode())
	require.Contains(t, nack1.GetErrorDetail().GetMessage(), "NACKAll")

	chain2, key2 := p.leaf(t, "P-256")
	require.NoError(t, srv.cache.UpdateResource("default", tlsSecret(t, "default", chain2, key2)))
	_, resp2 := srv.nextDeltaResponse(t)
	_, nack2 := srv.nextDeltaRequest(t)
	require.Equal(t, resp2.GetNonce(), nack2.GetResponseNonce())
	require.NotNil(t, nack2.GetErrorDetail())

	st := wait(t, c, func(s State) bool { return s.NACKs == 2 })
	require.Zero(t, st.ACKs)
	require.Empty(t, st.Secrets)
	require.Empty(t, st.Version)
}
