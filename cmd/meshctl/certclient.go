package main

import (
	"context"
	"crypto/tls"
	"fmt"
	"sync"

	"google.golang.org/grpc"
	pb "istio.io/api/security/v1alpha1"
)

// certClient makes CreateCertificate calls on one connection, as a proxy
// does.
type certClient interface {
	// CreateCertificate sends req with token as a bearer token ("" for
	// none: a client certificate then speaks for the caller).
	CreateCertificate(ctx context.Context, token string, req *pb.IstioCertificateRequest) (*pb.IstioCertificateResponse, error)
	Close() error
}

// Load generator clients: --client picks one.
const (
	clientH2   = "h2"   // h2Conn: one call at a time per connection, on the caller's goroutine
	clientGRPC = "grpc" // grpc-go: connections may be shared by several workers
)

// grpcClient is a certClient on a grpc-go connection; several goroutines
// may share it.
type grpcClient struct {
	conn *grpc.ClientConn
	c    pb.IstioCertificateServiceClient
}

func newGRPCClient(addr string, cfg *tls.Config) (*grpcClient, error) {
	conn, err := grpcDial(addr, cfg)
	if err != nil {
		return nil, err
	}
	return &grpcClient{conn: conn, c: pb.NewIstioCertificateServiceClient(conn)}, nil
}

func (g *grpcClient) CreateCertificate(ctx context.Context, token string, req *pb.IstioCertificateRequest) (*pb.IstioCertificateResponse, error) {
	if token != "" {
		ctx = withToken(ctx, token)
	}
	return g.c.CreateCertificate(ctx, req, grpc.WaitForReady(true))
}

func (g *grpcClient) Close() error { return g.conn.Close() }

// h2Client is a certClient on an h2Conn, for one goroutine at a time. It
// dials again after the server closes the connection (GOAWAY at meshca's
// maximum connection age), as a proxy would.
type h2Client struct {
	addr string
	cfg  *tls.Config
	mu   sync.Mutex
	conn *h2Conn
}

func newH2Client(ctx context.Context, addr string, cfg *tls.Config) (*h2Client, error) {
	conn, err := dialH2(ctx, addr, cfg)
	if err != nil {
		return nil, err
	}
	return &h2Client{addr: addr, cfg: cfg, conn: conn}, nil
}

func (h *h2Client) CreateCertificate(ctx context.Context, token string, req *pb.IstioCertificateRequest) (*pb.IstioCertificateResponse, error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if !h.conn.usable() {
		h.conn.Close()
		c, err := dialH2(ctx, h.addr, h.cfg)
		if err != nil {
			return nil, err
		}
		h.conn = c
	}
	resp := new(pb.IstioCertificateResponse)
	if err := h.conn.Invoke(ctx, pb.IstioCertificateService_CreateCertificate_FullMethodName, token, req, resp); err != nil {
		return nil, err
	}
	return resp, nil
}

func (h *h2Client) Close() error {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.conn.Close()
}

// checkClientKind refuses a --client value other than clientH2 and
// clientGRPC.
func checkClientKind(kind string) error {
	if kind != clientH2 && kind != clientGRPC {
		return fmt.Errorf("--client must be %s or %s, got %q", clientH2, clientGRPC, kind)
	}
	return nil
}

// newCertClient dials one connection of the kind named (clientH2 or
// clientGRPC).
func newCertClient(ctx context.Context, kind, addr string, cfg *tls.Config) (certClient, error) {
	if err := checkClientKind(kind); err != nil {
		return nil, err
	}
	if kind == clientH2 {
		return newH2Client(ctx, addr, cfg)
	}
	return newGRPCClient(addr, cfg)
}
