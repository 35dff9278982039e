package sds_test

import (
	"context"
	"crypto/x509"
	"encoding/pem"
	"fmt"
	"net"
	"testing"
	"time"

	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	discovery "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	secretv3 "github.com/envoyproxy/go-control-plane/envoy/service/secret/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/stretchr/testify/require"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"

	"github.com/meshca/meshca/authn"
	"github.com/meshca/meshca/ca"
	"github.com/meshca/meshca/ca/catest"
	"github.com/meshca/meshca/ca/edge"
	"github.com/meshca/meshca/sds"
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

type central struct {
	holder *catest.Holder
	ca     *ca.CA
	srv    *sds.Server
	conn   *grpc.ClientConn
}

func startCentral(t *testing.T, tokens tokenTable, mutate func(*sds.Config)) *central {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	h := catest.NewHolder(t, true)
	c, err := ca.New(ctx, ca.Config{Backend: h})
	require.NoError(t, err)
	go func() { _ = c.Run(ctx) }()
	e, err := edge.New(edge.Edge{Service: sds.ServiceLabel, Authenticator: tokens})
	require.NoError(t, err)
	cfg := sds.Config{CA: c, Edge: e, BundleAckTimeout: time.Second, ReissueSpread: 50 * time.Millisecond}
	if mutate != nil {
		mutate(&cfg)
	}
	s, err := sds.New(cfg)
	require.NoError(t, err)
	go func() { _ = s.Run(ctx) }()
	g := grpc.NewServer()
	s.Register(g)
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	go func() { _ = g.Serve(lis) }()
	t.Cleanup(g.Stop)
	conn, err := grpc.NewClient(lis.Addr().String(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	require.NoError(t, err)
	t.Cleanup(func() { conn.Close() })
	return &central{holder: h, ca: c, srv: s, conn: conn}
}

func withToken(ctx context.Context, tok string) context.Context {
	return metadata.AppendToOutgoingContext(ctx, "authorization", "Bearer "+tok)
}

func TestSmokeSotw(t *testing.T) {
	tokens := tokenTable{"a": caller("ns1", "a")}
	c := startCentral(t, tokens, nil)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	cl := secretv3.NewSecretDiscoveryServiceClient(c.conn)
	ss, err := cl.StreamSecrets(withToken(ctx, "a"))
	require.NoError(t, err)
	require.NoError(t, ss.Send(&discovery.DiscoveryRequest{Node: &core.Node{Id: "n1"}, TypeUrl: resource.SecretType, ResourceNames: []string{"default", "ROOTCA"}}))
	resp, err := ss.Recv()
	require.NoError(t, err)
	require.Len(t, resp.Resources, 2)
	for _, a := range resp.Resources {
		var s tlsv3.Secret
		require.NoError(t, a.UnmarshalTo(&s))
		fmt.Println(s.Name, resp.VersionInfo, resp.Nonce)
		if tc := s.GetTlsCertificate(); tc != nil {
			b, _ := pem.Decode(tc.CertificateChain.GetInlineBytes())
			leaf, err := x509.ParseCertificate(b.Bytes)
			require.NoError(t, err)
			fmt.Println(leaf.URIs, leaf.NotAfter)
		}
	}
}
