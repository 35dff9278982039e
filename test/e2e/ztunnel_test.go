package e2e

import (
	"encoding/base64"
	"encoding/json"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/structpb"
	pb "istio.io/api/security/v1alpha1"

	"github.com/meshca/meshca/ca/catest"
)

// TestZtunnelImpersonation plays ztunnel, the ambient mesh's node agent,
// against the real kube-apiserver: with its own pod-bound token it asks for
// certificates of the workloads on its node, with the metadata ztunnel
// sends. meshca runs with the default authn.trustedNodeAgents
// (istio-system/ztunnel), in both authentication modes: the node comes from
// the token's kubernetes.io claim (jwt) or TokenReview's node-name extra.
//
// Nothing runs the pods: they are created with spec.nodeName, as if
// scheduled, and stay Pending. No Node objects exist; the apiserver needs
// none for that, and still names the node in a pod-bound token.
func TestZtunnelImpersonation(t *testing.T) {
	for _, mode := range authnModes {
		t.Run(mode.name, func(t *testing.T) {
			ns := uniqueNS("ambient-" + mode.name)
			nodeA, nodeB := ns+"-node-a", ns+"-node-b"
			env.CreateServiceAccount(t, "istio-system", "ztunnel")
			ztunnel := env.CreatePodOnNode(t, "istio-system", "ztunnel-"+ns, "ztunnel", nodeA)
			for _, sa := range []string{"web", "db", "other"} {
				env.CreateServiceAccount(t, ns, sa)
			}
			env.CreatePodOnNode(t, ns, "web-0", "web", nodeA)
			env.CreatePodOnNode(t, ns, "db-0", "db", nodeB) // db runs on node B only
			other := env.CreatePodOnNode(t, ns, "other-0", "other", nodeA)

			ztTok := env.Token(t, "istio-system", "ztunnel", []string{"istio-ca"}, time.Hour, ztunnel)
			require.Equal(t, nodeA, tokenNode(t, ztTok), "the apiserver puts the pod's node in a pod-bound token")
			otherTok := env.Token(t, ns, "other", []string{"istio-ca"}, time.Hour, other)

			m := startMeshca(t, fmt.Sprintf(mode.yaml, meshcaKubeconfig(t)))
			client := m.client(t)
			key := catest.Key(t, "P-256")
			webID, dbID, ztID := spiffeID(ns, "web"), spiffeID(ns, "db"), spiffeID("istio-system", "ztunnel")
			// What ztunnel sends: its own token, a CSR for the workload's
			// identity, and that identity in the metadata Struct.
			impersonate := func(tok, id string) (*pb.IstioCertificateResponse, error) {
				md, err := structpb.NewStruct(map[string]any{"ImpersonatedIdentity": id})
				require.NoError(t, err)
				return client.CreateCertificate(withToken(t.Context(), tok), &pb.IstioCertificateRequest{
					Csr: csrPEM(t, key, id), ValidityDuration: 3600, Metadata: md,
				})
			}

			// web has a pod on ztunnel's node: a certificate for web.
			resp, err := impersonate(ztTok, webID)
			require.NoError(t, err)
			leaf := parseCerts(t, resp.CertChain)[0]
			require.Len(t, leaf.URIs, 1)
			require.Equal(t, webID, leaf.URIs[0].String())

			// db's pods are all on node B: refused, naming the node.
			_, err = impersonate(ztTok, dbID)
			st := status.Convert(err)
			require.Equal(t, codes.PermissionDenied, st.Code(), st.Message())
			require.Contains(t, st.Message(), fmt.Sprintf("no pod of service account %s/db (%s) is scheduled on node %q", ns, dbID, nodeA))

			// A workload on the same node is no node agent.
			_, err = impersonate(otherTok, webID)
			st = status.Convert(err)
			require.Equal(t, codes.PermissionDenied, st.Code(), st.Message())
			require.Contains(t, st.Message(), spiffeID(ns, "other")+" is not a trusted node agent")

			// Another trust domain is refused too.
			_, err = impersonate(ztTok, "spiffe://evil.example/ns/"+ns+"/sa/web")
			st = status.Convert(err)
			require.Equal(t, codes.PermissionDenied, st.Code(), st.Message())
			require.Contains(t, st.Message(), `trust domain "evil.example"`)

			// Once a db pod is scheduled on node A, meshca's pod watch
			// sees it and ztunnel gets db's certificate.
			env.CreatePodOnNode(t, ns, "db-1", "db", nodeA)
			require.Eventually(t, func() bool {
				_, err := impersonate(ztTok, dbID)
				return err == nil
			}, 20*time.Second, 50*time.Millisecond)

			// The audit trail names both identities, and the node.
			var issued, refused, untrusted []map[string]any
			for _, l := range m.audit(t) {
				switch {
				case l["impersonated_by"] == spiffeID(ns, "other"):
					untrusted = append(untrusted, l)
				case l["impersonated_by"] != ztID:
					require.Nil(t, l["impersonated_by"], "no other caller impersonated: %v", l)
				case l["result"] == "issued":
					issued = append(issued, l)
				default:
					refused = append(refused, l)
				}
			}
			require.NotEmpty(t, issued)
			require.Equal(t, webID, issued[0]["identity"])
			require.Equal(t, nodeA, issued[0]["node"])
			require.Equal(t, "istio-system/"+ztunnel.Name, issued[0]["pod"])
			require.Equal(t, mode.name, issued[0]["authenticator"])
			require.Equal(t, dbID, issued[len(issued)-1]["identity"])
			require.Equal(t, dbID, refused[0]["identity"])
			require.Equal(t, "identity_not_on_node", refused[0]["reason"])
			require.Equal(t, "PermissionDenied", refused[0]["code"])
			require.Len(t, untrusted, 1)
			require.Equal(t, "refused", untrusted[0]["result"])
			require.Equal(t, webID, untrusted[0]["identity"], "the identity asked for")
			require.Equal(t, "untrusted_node_agent", untrusted[0]["reason"])

			require.Equal(t, float64(len(issued)), m.metric(t, `meshca_impersonations_total{result="allowed"}`))
			require.Equal(t, 1.0, m.metric(t, `meshca_impersonations_total{result="untrusted_node_agent"}`))
			require.Equal(t, 1.0, m.metric(t, `meshca_impersonations_total{result="bad_impersonated_identity"}`))
			require.GreaterOrEqual(t, m.metric(t, `meshca_impersonations_total{result="identity_not_on_node"}`), 1.0)
			for _, tok := range []string{ztTok, otherTok} {
				require.NotContains(t, readFile(t, m.auditPath), tok)
				require.NotContains(t, readFile(t, m.logPath), tok)
			}
		})
	}
}

// tokenNode returns the node named in a token's kubernetes.io claim, read
// without verifying it.
func tokenNode(t *testing.T, tok string) string {
	t.Helper()
	parts := strings.Split(tok, ".")
	require.Len(t, parts, 3)
	payload, err := base64.RawURLEncoding.DecodeString(parts[1])
	require.NoError(t, err)
	var claims struct {
		Kubernetes struct {
			Node *struct {
				Name string `json:"name"`
			} `json:"node"`
		} `json:"kubernetes.io"`
	}
	require.NoError(t, json.Unmarshal(payload, &claims))
	require.NotNil(t, claims.Kubernetes.Node, "no node in the token's kubernetes.io claim")
	return claims.Kubernetes.Node.Name
}
