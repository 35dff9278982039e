package sdstest_test

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"

	"github.com/meshca/meshca/sds/sdstest"
)

// bearer sends a workload's token with each stream.
type bearer string

func (b bearer) GetRequestMetadata(context.Context, ...string) (map[string]string, error) {
	return map[string]string{"authorization": "Bearer " + string(b)}, nil
}

func (bearer) RequireTransportSecurity() bool { return true }

// Two workloads' streams over one TLS connection, each with its own token.
func ExampleClient() {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	roots := x509.NewCertPool() // meshca's serving CA
	conn, err := grpc.NewClient("127.0.0.1:15012",
		grpc.WithTransportCredentials(credentials.NewTLS(&tls.Config{RootCAs: roots, MinVersion: tls.VersionTLS12})))
	if err != nil {
		panic(err)
	}
	defer conn.Close()

	for _, w := range []struct{ node, token string }{{"sidecar~10.0.0.1~web.demo", "token-web"}, {"sidecar~10.0.0.2~db.demo", "token-db"}} {
		c, err := sdstest.New(sdstest.Config{
			Conn:        conn,
			CallOptions: []grpc.CallOption{grpc.PerRPCCredentials(bearer(w.token))},
			Node:        &corev3.Node{Id: w.node, Cluster: "demo"},
			Names:       []string{"default", "ROOTCA"},
		})
		if err != nil {
			panic(err)
		}
		go func() { _ = c.Run(ctx) }()

		st, err := c.WaitFor(ctx, func(s sdstest.State) bool { return len(s.Secrets) == 2 })
		if err != nil {
			panic(err)
		}
		chain, _, err := sdstest.ParseTLSCertificate(st.Secrets["default"].Secret)
		if err != nil {
			panic(err)
		}
		fmt.Println(chain[0].URIs[0])
	}
}
