package main

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"fmt"
	"math/big"
	"net"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/keepalive"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/durationpb"
	pb "istio.io/api/security/v1alpha1"
)

// funcCA is a real grpc-go CreateCertificate server whose answer is a
// function of the request.
type funcCA struct {
	pb.UnimplementedIstioCertificateServiceServer
	handle func(ctx context.Context, req *pb.IstioCertificateRequest) (*pb.IstioCertificateResponse, error)
}

func (f *funcCA) CreateCertificate(ctx context.Context, req *pb.IstioCertificateRequest) (*pb.IstioCertificateResponse, error) {
	return f.handle(ctx, req)
}

// startFuncCA serves handle over TLS on loopback with grpc-go and returns
// the address, a client TLS config that trusts it, and a count of the
// connections accepted.
func startFuncCA(t *testing.T, handle func(context.Context, *pb.IstioCertificateRequest) (*pb.IstioCertificateResponse, error), opts ...grpc.ServerOption) (string, *tls.Config, *atomic.Int64) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	require.NoError(t, err)
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "func CA"},
		NotBefore: time.Now().Add(-time.Minute), NotAfter: time.Now().Add(time.Hour),
		IPAddresses: []net.IP{net.IPv4(127, 0, 0, 1)},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	require.NoError(t, err)
	cert, err := x509.ParseCertificate(der)
	require.NoError(t, err)
	srv := grpc.NewServer(append(opts, grpc.Creds(credentials.NewTLS(&tls.Config{
		Certificates: []tls.Certificate{{Certificate: [][]byte{der}, PrivateKey: key}}, MinVersion: tls.VersionTLS12,
	})))...)
	pb.RegisterIstioCertificateServiceServer(srv, &funcCA{handle: handle})
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	var accepted atomic.Int64
	go func() { _ = srv.Serve(countingListener{lis, &accepted}) }()
	t.Cleanup(srv.Stop)
	pool := x509.NewCertPool()
	pool.AddCert(cert)
	return lis.Addr().String(), &tls.Config{RootCAs: pool, ServerName: "127.0.0.1", MinVersion: tls.VersionTLS12}, &accepted
}

// echoCA answers with the caller's authorization header and CSR, and a
// chain as long as the CSR asks for ("size:N" gives an N-byte string).
func echoCA(ctx context.Context, req *pb.IstioCertificateRequest) (*pb.IstioCertificateResponse, error) {
	md, _ := metadata.FromIncomingContext(ctx)
	chain := []string{strings.Join(md.Get("authorization"), ","), req.GetCsr()}
	var n int
	if _, err := fmt.Sscanf(req.GetCsr(), "size:%d", &n); err == nil {
		chain = append(chain, strings.Repeat("x", n))
	}
	return &pb.IstioCertificateResponse{CertChain: chain}, nil
}

func TestH2ConnCalls(t *testing.T) {
	addr, cfg, accepted := startFuncCA(t, echoCA)
	ctx, cancel := context.WithTimeout(t.Context(), 20*time.Second)
	defer cancel()
	c, err := dialH2(ctx, addr, cfg)
	require.NoError(t, err)
	defer c.Close()

	// Many calls on one connection, 2 KiB up and 6 KiB down each: 400 KiB
	// each way, past both 64 KiB connection windows, so that flow control
	// must be credited both ways.
	csr := "size:6000 " + strings.Repeat("c", 2048)
	for i := range 200 {
		resp := new(pb.IstioCertificateResponse)
		err := c.Invoke(ctx, pb.IstioCertificateService_CreateCertificate_FullMethodName, "tok", &pb.IstioCertificateRequest{Csr: csr}, resp)
		require.NoError(t, err, "call %d", i)
		require.Equal(t, []string{"Bearer tok", csr, strings.Repeat("x", 6000)}, resp.CertChain, "call %d", i)
	}

	// One response far past a stream's 64 KiB window.
	resp := new(pb.IstioCertificateResponse)
	require.NoError(t, c.Invoke(ctx, pb.IstioCertificateService_CreateCertificate_FullMethodName, "", &pb.IstioCertificateRequest{Csr: "size:300000"}, resp))
	require.Len(t, resp.CertChain[2], 300000)
	require.Equal(t, "", resp.CertChain[0], "no token, no authorization header")
	require.EqualValues(t, 1, accepted.Load(), "all on one connection")
}

func TestH2ConnStatusAndDetails(t *testing.T) {
	addr, cfg, _ := startFuncCA(t, func(_ context.Context, req *pb.IstioCertificateRequest) (*pb.IstioCertificateResponse, error) {
		if req.GetCsr() == "busy" {
			st, _ := status.New(codes.ResourceExhausted, "busy: 100% of slots").WithDetails(&errdetails.RetryInfo{RetryDelay: durationpb.New(1500 * time.Millisecond)})
			return nil, st.Err()
		}
		return nil, status.Error(codes.PermissionDenied, "CSR asks for spiffe://x/ns/a/sa/b, caller is ns/c/sa/d")
	})
	ctx := t.Context()
	c, err := dialH2(ctx, addr, cfg)
	require.NoError(t, err)
	defer c.Close()

	err = c.Invoke(ctx, pb.IstioCertificateService_CreateCertificate_FullMethodName, "t", &pb.IstioCertificateRequest{Csr: "busy"}, new(pb.IstioCertificateResponse))
	require.Equal(t, codes.ResourceExhausted, status.Code(err))
	require.Equal(t, "busy: 100% of slots", status.Convert(err).Message(), "the message, percent-decoded")
	require.Equal(t, 1500*time.Millisecond, retryAfter(err), "the RetryInfo detail arrives")

	err = c.Invoke(ctx, pb.IstioCertificateService_CreateCertificate_FullMethodName, "t", &pb.IstioCertificateRequest{Csr: "other"}, new(pb.IstioCertificateResponse))
	require.Equal(t, codes.PermissionDenied, status.Code(err))
	require.Contains(t, status.Convert(err).Message(), "spiffe://x/ns/a/sa/b")
	require.True(t, c.usable(), "an error status leaves the connection usable")
}

func TestH2ClientRedialsAfterGoAwayAndTimeout(t *testing.T) {
	var slow atomic.Bool
	addr, cfg, accepted := startFuncCA(t, func(ctx context.Context, req *pb.IstioCertificateRequest) (*pb.IstioCertificateResponse, error) {
		if slow.Load() {
			<-ctx.Done()
			return nil, ctx.Err()
		}
		return echoCA(ctx, req)
	}, grpc.KeepaliveParams(keepalive.ServerParameters{MaxConnectionAge: 100 * time.Millisecond, MaxConnectionAgeGrace: time.Second}))
	ctx := t.Context()
	c, err := newH2Client(ctx, addr, cfg)
	require.NoError(t, err)
	defer c.Close()

	// The server closes each connection after 100ms (GOAWAY); calls over
	// 600ms all succeed on new connections.
	for deadline := time.Now().Add(600 * time.Millisecond); time.Now().Before(deadline); {
		_, err := c.CreateCertificate(ctx, "t", &pb.IstioCertificateRequest{Csr: "csr"})
		require.NoError(t, err)
		time.Sleep(5 * time.Millisecond)
	}
	require.GreaterOrEqual(t, accepted.Load(), int64(3), "GOAWAY led to new connections")

	// A call past its deadline ends with DeadlineExceeded; the next dials
	// again and succeeds.
	slow.Store(true)
	short, cancel := context.WithTimeout(ctx, 100*time.Millisecond)
	_, err = c.CreateCertificate(short, "t", &pb.IstioCertificateRequest{Csr: "csr"})
	cancel()
	require.Equal(t, codes.DeadlineExceeded, status.Code(err), "%v", err)
	slow.Store(false)
	before := accepted.Load()
	_, err = c.CreateCertificate(ctx, "t", &pb.IstioCertificateRequest{Csr: "csr"})
	require.NoError(t, err)
	require.Equal(t, before+1, accepted.Load(), "a timed-out connection is replaced")
}

func TestH2ConnRefusesNonHTTP2(t *testing.T) {
	// A TLS server that does not speak h2: ALPN fails.
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	require.NoError(t, err)
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(2), NotBefore: time.Now().Add(-time.Minute), NotAfter: time.Now().Add(time.Hour), IPAddresses: []net.IP{net.IPv4(127, 0, 0, 1)}}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	require.NoError(t, err)
	lis, err := tls.Listen("tcp", "127.0.0.1:0", &tls.Config{Certificates: []tls.Certificate{{Certificate: [][]byte{der}, PrivateKey: key}}, NextProtos: []string{"http/1.1"}})
	require.NoError(t, err)
	defer lis.Close()
	go func() {
		for {
			c, err := lis.Accept()
			if err != nil {
				return
			}
			_ = c.(*tls.Conn).Handshake()
		}
	}()
	cert, _ := x509.ParseCertificate(der)
	pool := x509.NewCertPool()
	pool.AddCert(cert)
	_, err = dialH2(t.Context(), lis.Addr().String(), &tls.Config{RootCAs: pool, ServerName: "127.0.0.1"})
	require.ErrorContains(t, err, "application protocol")
}
