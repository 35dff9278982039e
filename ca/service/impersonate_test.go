package service_test

import (
	"crypto/tls"
	"fmt"
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/stretchr/testify/require"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/structpb"
	pb "istio.io/api/security/v1alpha1"

	"github.com/meshca/meshca/authn"
	"github.com/meshca/meshca/ca"
	"github.com/meshca/meshca/ca/catest"
	"github.com/meshca/meshca/ca/service"
)

// nodePods is a state-based authn.PodLocator: pods by namespace/name.
type nodePods struct {
	pods map[string]authn.Pod // "namespace/name"
	down bool
}

func (p *nodePods) Pod(namespace, name string) (authn.Pod, bool, error) {
	if p.down {
		return authn.Pod{}, false, fmt.Errorf("%w: pod index not synced yet", authn.ErrUnavailable)
	}
	pod, ok := p.pods[namespace+"/"+name]
	return pod, ok, nil
}

func (p *nodePods) ServiceAccountOnNode(node, namespace, serviceAccount string) (bool, error) {
	if p.down {
		return false, fmt.Errorf("%w: pod index not synced yet", authn.ErrUnavailable)
	}
	for key, pod := range p.pods {
		if pod.NodeName == node && strings.HasPrefix(key, namespace+"/") && pod.ServiceAccount == serviceAccount {
			return true, nil
		}
	}
	return false, nil
}

// impersonating returns ztunnel's metadata: the Struct field
// ImpersonatedIdentity holding a SPIFFE ID.
func impersonating(t *testing.T, id string) *structpb.Struct {
	t.Helper()
	md, err := structpb.NewStruct(map[string]any{service.ImpersonatedIdentityKey: id})
	require.NoError(t, err)
	return md
}

const (
	ztunnelID = "spiffe://cluster.local/ns/istio-system/sa/ztunnel"
	dbID      = "spiffe://cluster.local/ns/demo/sa/db"
)

func TestCreateCertificateImpersonation(t *testing.T) {
	pods := &nodePods{pods: map[string]authn.Pod{
		"istio-system/ztunnel-a": {UID: "zt-uid-a", NodeName: "node-a", ServiceAccount: "ztunnel"},
		"demo/web-0":             {UID: "web-uid-0", NodeName: "node-a", ServiceAccount: "web"},
		"demo/db-0":              {UID: "db-uid-0", NodeName: "node-b", ServiceAccount: "db"},
	}}
	nodes, err := authn.NewNodeAuthorizer(authn.NodeAuthorizerConfig{TrustDomain: td, Trusted: []string{"istio-system/ztunnel"}, Pods: pods})
	require.NoError(t, err)
	// demo/web's policy allows only P-384 keys: an impersonated request
	// is held to the impersonated identity's policy.
	f := newFixtureWith(t, &ca.Policy{ServiceAccounts: map[string]ca.Rule{"demo/web": {KeyTypes: []ca.KeyType{"ECDSA-P384"}}}},
		catest.NewHolder(t, true), nodes)
	p384, p256 := catest.Key(t, "P-384"), catest.Key(t, "P-256")
	imps := f.metrics.edge.Impersonations

	// Allowed: ztunnel on node-a asks for demo/web, which runs there.
	resp, err := f.client.CreateCertificate(bearer(t, "tok-ztunnel-a"), &pb.IstioCertificateRequest{
		Csr: csrFor(t, p384, nil, webID), Metadata: impersonating(t, webID),
	})
	require.NoError(t, err)
	leaf := parseChain(t, resp.CertChain)[0]
	require.Len(t, leaf.URIs, 1)
	require.Equal(t, webID, leaf.URIs[0].String(), "a certificate for the impersonated identity")
	line := f.audit.lines(t)[0]
	require.Equal(t, "issued", line["result"])
	require.Equal(t, webID, line["identity"])
	require.Equal(t, ztunnelID, line["impersonated_by"])
	require.Equal(t, "node-a", line["node"])
	require.Equal(t, "istio-system/ztunnel-a", line["pod"], "the pod the caller's token is bound to")
	require.Equal(t, 1.0, testutil.ToFloat64(imps.WithLabelValues("allowed")))

	// Without the field, the node agent gets its own identity, as before.
	resp, err = f.client.CreateCertificate(bearer(t, "tok-ztunnel-a"), &pb.IstioCertificateRequest{Csr: csrFor(t, p256, nil, ztunnelID)})
	require.NoError(t, err)
	require.Equal(t, ztunnelID, parseChain(t, resp.CertChain)[0].URIs[0].String())
	require.NotContains(t, f.audit.lines(t)[1], "impersonated_by")
	// An empty string is no impersonation either (as for istiod).
	resp, err = f.client.CreateCertificate(bearer(t, "tok-ztunnel-a"), &pb.IstioCertificateRequest{Csr: csrFor(t, p256, nil, ztunnelID), Metadata: impersonating(t, "")})
	require.NoError(t, err)
	require.Equal(t, ztunnelID, parseChain(t, resp.CertChain)[0].URIs[0].String())

	// A certificate the node agent holds for itself renews itself, but
	// impersonates nobody: a client certificate names no node.
	certs := parseChain(t, resp.CertChain)
	held := &tls.Certificate{PrivateKey: p256, Leaf: certs[0]}
	for _, c := range certs[:len(certs)-1] {
		held.Certificate = append(held.Certificate, c.Raw)
	}
	withCert := f.dial(held)
	_, err = withCert.CreateCertificate(t.Context(), &pb.IstioCertificateRequest{Csr: csrFor(t, p256, nil, ztunnelID)})
	require.NoError(t, err)

	tests := []struct {
		name       string
		client     pb.IstioCertificateServiceClient
		token      string
		asked      *structpb.Struct
		csr        string
		wantCode   codes.Code
		wantMsg    string
		wantReason string
		wantAudit  string // the audit line's identity
	}{
		{name: "identity with pods on another node only", token: "tok-ztunnel-a", asked: impersonating(t, dbID), csr: csrFor(t, p256, nil, dbID),
			wantCode: codes.PermissionDenied, wantMsg: `no pod of service account demo/db (` + dbID + `) is scheduled on node "node-a"`,
			wantReason: authn.ReasonNotOnNode, wantAudit: dbID},
		{name: "untrusted caller", token: "tok-web-on-a", asked: impersonating(t, dbID), csr: csrFor(t, p256, nil, dbID),
			wantCode: codes.PermissionDenied, wantMsg: webID + " is not a trusted node agent", wantReason: authn.ReasonUntrustedNodeAgent, wantAudit: dbID},
		{name: "untrusted caller asking for itself", token: "tok-web", asked: impersonating(t, webID), csr: csrFor(t, p384, nil, webID),
			wantCode: codes.PermissionDenied, wantReason: authn.ReasonUntrustedNodeAgent, wantAudit: webID},
		{name: "other trust domain", token: "tok-ztunnel-a", asked: impersonating(t, "spiffe://evil.example/ns/demo/sa/web"), csr: csrFor(t, p384, nil, "spiffe://evil.example/ns/demo/sa/web"),
			wantCode: codes.PermissionDenied, wantMsg: `trust domain "evil.example"`, wantReason: authn.ReasonBadIdentity, wantAudit: "spiffe://evil.example/ns/demo/sa/web"},
		{name: "malformed identity", token: "tok-ztunnel-a", asked: impersonating(t, "demo/web"), csr: csrFor(t, p384, nil, webID),
			wantCode: codes.PermissionDenied, wantMsg: "not a SPIFFE ID", wantReason: authn.ReasonBadIdentity, wantAudit: "demo/web"},
		{name: "token bound to no pod", token: "tok-ztunnel-nopod", asked: impersonating(t, webID), csr: csrFor(t, p384, nil, webID),
			wantCode: codes.PermissionDenied, wantMsg: "names no node", wantReason: authn.ReasonNoNode, wantAudit: webID},
		{name: "client certificate", client: withCert, asked: impersonating(t, webID), csr: csrFor(t, p384, nil, webID),
			wantCode: codes.PermissionDenied, wantMsg: "client certificates", wantReason: authn.ReasonNoNode, wantAudit: webID},
		{name: "caller's pod re-created", token: "tok-ztunnel-a-gone", asked: impersonating(t, webID), csr: csrFor(t, p384, nil, webID),
			wantCode: codes.PermissionDenied, wantMsg: `pod istio-system/ztunnel-a is not on node "node-a"`, wantReason: authn.ReasonCallerPodGone, wantAudit: webID},
		// The CSR is checked against the impersonated identity.
		{name: "CSR for the caller's own identity", token: "tok-ztunnel-a", asked: impersonating(t, webID), csr: csrFor(t, p384, nil, ztunnelID),
			wantCode: codes.PermissionDenied, wantMsg: "CSR asks for " + ztunnelID + " but the caller holds " + webID, wantReason: "identity_mismatch", wantAudit: webID},
		// ...and with the impersonated identity's policy.
		{name: "key the identity's policy refuses", token: "tok-ztunnel-a", asked: impersonating(t, webID), csr: csrFor(t, p256, nil, webID),
			wantCode: codes.InvalidArgument, wantMsg: "the policy for demo/web allows ECDSA-P384", wantReason: ca.CSRKeyType, wantAudit: webID},
		{name: "field not a string", token: "tok-ztunnel-a", asked: &structpb.Struct{Fields: map[string]*structpb.Value{service.ImpersonatedIdentityKey: structpb.NewBoolValue(true)}},
			csr: csrFor(t, p256, nil, ztunnelID), wantCode: codes.InvalidArgument, wantMsg: "metadata ImpersonatedIdentity must be a string", wantReason: "bad_request", wantAudit: ztunnelID},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			before := len(f.audit.lines(t))
			client, ctx := tc.client, t.Context()
			if client == nil {
				client, ctx = f.client, bearer(t, tc.token)
			}
			_, err := client.CreateCertificate(ctx, &pb.IstioCertificateRequest{Csr: tc.csr, Metadata: tc.asked})
			st := status.Convert(err)
			require.Equal(t, tc.wantCode, st.Code(), st.Message())
			require.Contains(t, st.Message(), tc.wantMsg)
			lines := f.audit.lines(t)
			require.Len(t, lines, before+1)
			require.Equal(t, "refused", lines[before]["result"])
			require.Equal(t, tc.wantReason, lines[before]["reason"])
			require.Equal(t, tc.wantAudit, lines[before]["identity"])
			if tc.wantReason != "bad_request" {
				require.NotEmpty(t, lines[before]["impersonated_by"])
			}
		})
	}
	for result, want := range map[string]float64{
		"allowed": 3, authn.ReasonNotOnNode: 1, authn.ReasonUntrustedNodeAgent: 2, authn.ReasonBadIdentity: 2,
		authn.ReasonNoNode: 2, authn.ReasonCallerPodGone: 1,
	} {
		require.Equal(t, want, testutil.ToFloat64(imps.WithLabelValues(result)), result)
	}

	// While the pods are not known, meshca cannot decide: Unavailable.
	pods.down = true
	_, err = f.client.CreateCertificate(bearer(t, "tok-ztunnel-a"), &pb.IstioCertificateRequest{Csr: csrFor(t, p384, nil, webID), Metadata: impersonating(t, webID)})
	require.Equal(t, codes.Unavailable, status.Code(err))
	require.Equal(t, 1.0, testutil.ToFloat64(imps.WithLabelValues(authn.ReasonUnavailable)))
}

// TestCreateCertificateImpersonationOff checks that without trusted node
// agents the field is refused, never ignored.
func TestCreateCertificateImpersonationOff(t *testing.T) {
	f := newFixture(t, nil)
	key := catest.Key(t, "P-256")
	_, err := f.client.CreateCertificate(bearer(t, "tok-ztunnel-a"), &pb.IstioCertificateRequest{
		Csr: csrFor(t, key, nil, webID), Metadata: impersonating(t, webID),
	})
	st := status.Convert(err)
	require.Equal(t, codes.PermissionDenied, st.Code())
	require.Contains(t, st.Message(), "authn.trustedNodeAgents is empty")
	line := f.audit.lines(t)[0]
	require.Equal(t, authn.ReasonImpersonationOff, line["reason"])
	require.Equal(t, webID, line["identity"])
	require.Equal(t, ztunnelID, line["impersonated_by"])
	require.Equal(t, 1.0, testutil.ToFloat64(f.metrics.edge.Impersonations.WithLabelValues(authn.ReasonImpersonationOff)))
}
