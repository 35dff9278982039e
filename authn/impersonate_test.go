package authn_test

import (
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/stretchr/testify/require"

	"github.com/meshca/meshca/authn"
)

// podTable is a state-based PodLocator: pods by namespace/name.
type podTable struct {
	pods map[string]podEntry
	err  error // returned by every lookup when set
}

type podEntry struct {
	namespace, name string
	authn.Pod
}

func newPodTable(pods ...podEntry) *podTable {
	t := &podTable{pods: map[string]podEntry{}}
	for _, p := range pods {
		t.pods[p.namespace+"/"+p.name] = p
	}
	return t
}

func (t *podTable) Pod(namespace, name string) (authn.Pod, bool, error) {
	if t.err != nil {
		return authn.Pod{}, false, t.err
	}
	p, ok := t.pods[namespace+"/"+name]
	return p.Pod, ok, nil
}

func (t *podTable) ServiceAccountOnNode(node, namespace, serviceAccount string) (bool, error) {
	if t.err != nil {
		return false, t.err
	}
	for _, p := range t.pods {
		if p.NodeName == node && p.namespace == namespace && p.ServiceAccount == serviceAccount {
			return true, nil
		}
	}
	return false, nil
}

func pod(ns, name, uid, node, sa string) podEntry {
	return podEntry{namespace: ns, name: name, Pod: authn.Pod{UID: uid, NodeName: node, ServiceAccount: sa}}
}

func TestNodeAuthorizer(t *testing.T) {
	td := spiffeid.RequireTrustDomainFromString("cluster.local")
	pods := newPodTable(
		pod("istio-system", "ztunnel-a", "zt-uid-a", "node-a", "ztunnel"),
		pod("istio-system", "ztunnel-b", "zt-uid-b", "node-b", "ztunnel"),
		pod("shop", "web-0", "web-uid-0", "node-a", "web"),
		pod("shop", "db-0", "db-uid-0", "node-b", "db"), // db runs on node-b only
		pod("shop", "pending-0", "pending-uid", "", "pending"),
	)
	a, err := authn.NewNodeAuthorizer(authn.NodeAuthorizerConfig{TrustDomain: td, Trusted: []string{"istio-system/ztunnel"}, Pods: pods})
	require.NoError(t, err)

	expires := time.Now().Add(time.Hour).Truncate(time.Second)
	caller := func(ns, sa, podName, podUID, node string) *authn.Caller {
		id, err := authn.ServiceAccountID(td, ns, sa)
		require.NoError(t, err)
		return &authn.Caller{ID: id, Namespace: ns, ServiceAccount: sa, ServiceAccountUID: "sa-uid",
			PodName: podName, PodUID: podUID, NodeName: node, Authenticator: "jwt", ExpiresAt: expires}
	}
	ztunnelA := caller("istio-system", "ztunnel", "ztunnel-a", "zt-uid-a", "node-a")

	tests := []struct {
		name     string
		caller   *authn.Caller
		identity string
		want     string // the granted identity; "" when refused
		reason   string
		msg      string // part of the refusal's message
	}{
		{name: "trusted agent, identity on its node", caller: ztunnelA, identity: "spiffe://cluster.local/ns/shop/sa/web",
			want: "spiffe://cluster.local/ns/shop/sa/web"},
		{name: "trusted agent, itself", caller: ztunnelA, identity: "spiffe://cluster.local/ns/istio-system/sa/ztunnel",
			want: "spiffe://cluster.local/ns/istio-system/sa/ztunnel"},
		{name: "trusted agent on the other node", caller: caller("istio-system", "ztunnel", "ztunnel-b", "zt-uid-b", "node-b"),
			identity: "spiffe://cluster.local/ns/shop/sa/db", want: "spiffe://cluster.local/ns/shop/sa/db"},
		{name: "service account with pods on another node only", caller: ztunnelA, identity: "spiffe://cluster.local/ns/shop/sa/db",
			reason: authn.ReasonNotOnNode, msg: `no pod of service account shop/db (spiffe://cluster.local/ns/shop/sa/db) is scheduled on node "node-a"`},
		{name: "service account of an unscheduled pod", caller: ztunnelA, identity: "spiffe://cluster.local/ns/shop/sa/pending",
			reason: authn.ReasonNotOnNode, msg: `on node "node-a"`},
		{name: "service account without pods", caller: ztunnelA, identity: "spiffe://cluster.local/ns/shop/sa/ghost",
			reason: authn.ReasonNotOnNode, msg: "shop/ghost"},
		{name: "same name in another namespace", caller: ztunnelA, identity: "spiffe://cluster.local/ns/other/sa/web",
			reason: authn.ReasonNotOnNode, msg: "other/web"},
		{name: "untrusted caller", caller: caller("shop", "web", "web-0", "web-uid-0", "node-a"), identity: "spiffe://cluster.local/ns/shop/sa/web",
			reason: authn.ReasonUntrustedNodeAgent, msg: "spiffe://cluster.local/ns/shop/sa/web is not a trusted node agent (authn.trustedNodeAgents)"},
		{name: "untrusted caller named like the agent in another namespace", caller: caller("shop", "ztunnel", "ztunnel-x", "x", "node-a"),
			identity: "spiffe://cluster.local/ns/shop/sa/web", reason: authn.ReasonUntrustedNodeAgent, msg: "not a trusted node agent"},
		{name: "untrusted caller learns nothing of the identity", caller: caller("shop", "web", "", "", ""), identity: "garbage",
			reason: authn.ReasonUntrustedNodeAgent},
		{name: "missing node (token not bound to a scheduled pod)", caller: caller("istio-system", "ztunnel", "ztunnel-a", "zt-uid-a", ""),
			identity: "spiffe://cluster.local/ns/shop/sa/web", reason: authn.ReasonNoNode, msg: "names no node"},
		{name: "missing pod (client certificate)", caller: caller("istio-system", "ztunnel", "", "", ""),
			identity: "spiffe://cluster.local/ns/shop/sa/web", reason: authn.ReasonNoNode, msg: "client certificates"},
		{name: "token names another node than the pod's", caller: caller("istio-system", "ztunnel", "ztunnel-b", "zt-uid-b", "node-a"),
			identity: "spiffe://cluster.local/ns/shop/sa/web", reason: authn.ReasonCallerPodGone, msg: `pod istio-system/ztunnel-b is not on node "node-a"`},
		{name: "caller's pod re-created", caller: caller("istio-system", "ztunnel", "ztunnel-a", "zt-uid-old", "node-a"),
			identity: "spiffe://cluster.local/ns/shop/sa/web", reason: authn.ReasonCallerPodGone},
		{name: "caller's pod deleted", caller: caller("istio-system", "ztunnel", "ztunnel-gone", "zt-uid-gone", "node-a"),
			identity: "spiffe://cluster.local/ns/shop/sa/web", reason: authn.ReasonCallerPodGone},
		{name: "other trust domain", caller: ztunnelA, identity: "spiffe://evil.example/ns/shop/sa/web",
			reason: authn.ReasonBadIdentity, msg: `is in trust domain "evil.example"; meshca issues only in "cluster.local"`},
		{name: "not a SPIFFE ID", caller: ztunnelA, identity: "shop/web", reason: authn.ReasonBadIdentity, msg: `"shop/web" is not a SPIFFE ID`},
		{name: "upper-case scheme", caller: ztunnelA, identity: "SPIFFE://cluster.local/ns/shop/sa/web", reason: authn.ReasonBadIdentity},
		{name: "trailing fragment", caller: ztunnelA, identity: "spiffe://cluster.local/ns/shop/sa/web#", reason: authn.ReasonBadIdentity},
		{name: "trailing slash", caller: ztunnelA, identity: "spiffe://cluster.local/ns/shop/sa/web/", reason: authn.ReasonBadIdentity},
		{name: "not a service account path", caller: ztunnelA, identity: "spiffe://cluster.local/ns/shop/pod/web", reason: authn.ReasonBadIdentity,
			msg: "not a service account's identity; want spiffe://cluster.local/ns/<namespace>/sa/<serviceaccount>"},
		{name: "extra segments", caller: ztunnelA, identity: "spiffe://cluster.local/ns/shop/sa/web/x", reason: authn.ReasonBadIdentity},
		{name: "trust domain only", caller: ztunnelA, identity: "spiffe://cluster.local", reason: authn.ReasonBadIdentity},
		{name: "over 2048 bytes", caller: ztunnelA, identity: "spiffe://cluster.local/ns/shop/sa/" + strings.Repeat("w", 2048),
			reason: authn.ReasonBadIdentity, msg: "a SPIFFE ID has at most 2048"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got, err := a.Impersonate(tc.caller, tc.identity)
			if tc.want != "" {
				require.NoError(t, err)
				require.Equal(t, tc.want, got.ID.String())
				ns, sa, _ := strings.Cut(strings.TrimPrefix(tc.want, "spiffe://cluster.local/ns/"), "/sa/")
				require.Equal(t, ns, got.Namespace)
				require.Equal(t, sa, got.ServiceAccount)
				require.Equal(t, tc.caller.NodeName, got.NodeName)
				require.Equal(t, tc.caller.Authenticator, got.Authenticator)
				require.Equal(t, expires, got.ExpiresAt, "the credential behind it is the caller's")
				require.Empty(t, got.PodName, "the caller's pod is not the impersonated identity's")
				require.Empty(t, got.ServiceAccountUID)
				return
			}
			require.ErrorIs(t, err, authn.ErrImpersonationDenied)
			require.NotErrorIs(t, err, authn.ErrUnauthenticated, "the caller is authenticated; the request is refused")
			var ie *authn.ImpersonationError
			require.ErrorAs(t, err, &ie)
			require.Equal(t, tc.reason, ie.Reason, err.Error())
			require.Contains(t, err.Error(), tc.msg)
			require.Nil(t, got)
		})
	}
}

func TestNodeAuthorizerPodsUnknown(t *testing.T) {
	td := spiffeid.RequireTrustDomainFromString("cluster.local")
	pods := newPodTable()
	pods.err = fmt.Errorf("%w: pod index not synced yet", authn.ErrUnavailable)
	a, err := authn.NewNodeAuthorizer(authn.NodeAuthorizerConfig{TrustDomain: td, Trusted: []string{"istio-system/ztunnel"}, Pods: pods})
	require.NoError(t, err)
	id, err := authn.ServiceAccountID(td, "istio-system", "ztunnel")
	require.NoError(t, err)
	_, err = a.Impersonate(&authn.Caller{ID: id, Namespace: "istio-system", ServiceAccount: "ztunnel", PodName: "z", PodUID: "u", NodeName: "n"},
		"spiffe://cluster.local/ns/shop/sa/web")
	require.ErrorIs(t, err, authn.ErrUnavailable)
	require.NotErrorIs(t, err, authn.ErrImpersonationDenied)
}

func TestNewNodeAuthorizer(t *testing.T) {
	td := spiffeid.RequireTrustDomainFromString("cluster.local")
	pods := newPodTable()
	for _, tc := range []struct {
		name string
		cfg  authn.NodeAuthorizerConfig
		err  string
	}{
		{"no trust domain", authn.NodeAuthorizerConfig{Trusted: []string{"a/b"}, Pods: pods}, "TrustDomain"},
		{"no pods", authn.NodeAuthorizerConfig{TrustDomain: td, Trusted: []string{"a/b"}}, "Pods"},
		{"no agents", authn.NodeAuthorizerConfig{TrustDomain: td, Pods: pods}, "at least one"},
		{"no slash", authn.NodeAuthorizerConfig{TrustDomain: td, Trusted: []string{"ztunnel"}, Pods: pods}, `"ztunnel": want namespace/serviceaccount`},
		{"empty namespace", authn.NodeAuthorizerConfig{TrustDomain: td, Trusted: []string{"/ztunnel"}, Pods: pods}, "want namespace/serviceaccount"},
		{"two slashes", authn.NodeAuthorizerConfig{TrustDomain: td, Trusted: []string{"a/b/c"}, Pods: pods}, "want namespace/serviceaccount"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := authn.NewNodeAuthorizer(tc.cfg)
			require.ErrorContains(t, err, tc.err)
		})
	}
}
