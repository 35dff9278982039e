package sdstest

import (
	"context"
	"crypto"
	"crypto/x509"
	"encoding/pem"
	"net"
	"net/url"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	secretv3 "github.com/envoyproxy/go-control-plane/envoy/service/secret/v3"
	cachev3 "github.com/envoyproxy/go-control-plane/pkg/cache/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	serverv3 "github.com/envoyproxy/go-control-plane/pkg/server/v3"
	"github.com/stretchr/testify/require"
	"google.golang.org/grpc"
	"google.golang.org/grpc/backoff"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	"github.com/meshca/meshca/ca/catest"
)

// waitTimeout bounds every wait in these tests.
const waitTimeout = 10 * time.Second

// wire is one message as it crossed the wire, seen by the server.
type wire struct {
	stream int64 // the server's count of streams, from 1
	msg    proto.Message
}

// sdsServer is go-control-plane's SDS server on a LinearCache, on
// 127.0.0.1. It records every request and response as it crossed the wire
// (go-control-plane's OnStreamRequest sees a request only after filling in
// the node the stream's first request carried, so it cannot tell whether
// a later request carried one), and can end a stream or be restarted.
type sdsServer struct {
	t     *testing.T
	cache *cachev3.LinearCache
	xds   serverv3.Server
	addr  string
	gs    *grpc.Server
	// accepted counts the TCP connections accepted.
	accepted atomic.Int64

	streams atomic.Int64
	// kill, when set, ends with Unavailable the stream of the first
	// request for which it is true, then is cleared.
	kill    atomic.Pointer[func(proto.Message) bool]
	reqs    chan wire
	resps   chan wire
	closed  chan int64
	stopped chan struct{}
	mu      sync.Mutex
}

func newSDSServer(t *testing.T) *sdsServer {
	t.Helper()
	s := &sdsServer{
		t:       t,
		cache:   cachev3.NewLinearCache(resource.SecretType),
		reqs:    make(chan wire, 256),
		resps:   make(chan wire, 256),
		closed:  make(chan int64, 256),
		stopped: make(chan struct{}),
	}
	killer := func(req proto.Message) error {
		if kill := s.kill.Load(); kill != nil && (*kill)(req) && s.kill.CompareAndSwap(kill, nil) {
			return status.Error(codes.Unavailable, "stream killed by the test")
		}
		return nil
	}
	s.xds = serverv3.NewServer(t.Context(), s.cache, serverv3.CallbackFuncs{
		StreamRequestFunc:      func(_ int64, req *discoveryv3.DiscoveryRequest) error { return killer(req) },
		StreamDeltaRequestFunc: func(_ int64, req *discoveryv3.DeltaDiscoveryRequest) error { return killer(req) },
	})
	s.start("127.0.0.1:0")
	t.Cleanup(func() {
		close(s.stopped)
		s.stop()
	})
	return s
}

// start serves on addr, the server's own address after a stop.
func (s *sdsServer) start(addr string) {
	s.t.Helper()
	lis, err := net.Listen("tcp", addr)
	require.NoError(s.t, err)
	gs := grpc.NewServer(grpc.StreamInterceptor(s.intercept))
	secretv3.RegisterSecretDiscoveryServiceServer(gs, s.xds)
	s.mu.Lock()
	s.addr, s.gs = lis.Addr().String(), gs
	s.mu.Unlock()
	go func() { _ = gs.Serve(&countingListener{Listener: lis, n: &s.accepted}) }()
}

// stop ends every stream and connection and closes the listener.
func (s *sdsServer) stop() {
	s.mu.Lock()
	gs := s.gs
	s.mu.Unlock()
	gs.Stop()
}

type countingListener struct {
	net.Listener
	n *atomic.Int64
}

func (l *countingListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err == nil {
		l.n.Add(1)
	}
	return c, err
}

func (s *sdsServer) intercept(srv any, ss grpc.ServerStream, _ *grpc.StreamServerInfo, handler grpc.StreamHandler) error {
	id := s.streams.Add(1)
	defer func() {
		select {
		case s.closed <- id:
		case <-s.stopped:
		}
	}()
	return handler(srv, &recordingStream{ServerStream: ss, s: s, id: id})
}

type recordingStream struct {
	grpc.ServerStream
	s  *sdsServer
	id int64
}

func (r *recordingStream) RecvMsg(m any) error {
	err := r.ServerStream.RecvMsg(m)
	if err == nil {
		// Cloned now: go-control-plane changes the request afterwards.
		r.s.record(r.s.reqs, wire{stream: r.id, msg: proto.Clone(m.(proto.Message))})
	}
	return err
}

func (r *recordingStream) SendMsg(m any) error {
	r.s.record(r.s.resps, wire{stream: r.id, msg: proto.Clone(m.(proto.Message))})
	return r.ServerStream.SendMsg(m)
}

func (s *sdsServer) record(ch chan wire, w wire) {
	select {
	case ch <- w:
	case <-s.stopped:
	}
}

func next(t *testing.T, ch chan wire, what string) wire {
	t.Helper()
	select {
	case w := <-ch:
		return w
	case <-time.After(waitTimeout):
		t.Fatalf("no %s within %s", what, waitTimeout)
		return wire{}
	}
}

func (s *sdsServer) nextRequest(t *testing.T) (int64, *discoveryv3.DiscoveryRequest) {
	t.Helper()
	w := next(t, s.reqs, "request")
	req, ok := w.msg.(*discoveryv3.DiscoveryRequest)
	require.True(t, ok, "got a %T", w.msg)
	return w.stream, req
}

func (s *sdsServer) nextResponse(t *testing.T) (int64, *discoveryv3.DiscoveryResponse) {
	t.Helper()
	w := next(t, s.resps, "response")
	resp, ok := w.msg.(*discoveryv3.DiscoveryResponse)
	require.True(t, ok, "got a %T", w.msg)
	return w.stream, resp
}

func (s *sdsServer) nextDeltaRequest(t *testing.T) (int64, *discoveryv3.DeltaDiscoveryRequest) {
	t.Helper()
	w := next(t, s.reqs, "delta request")
	req, ok := w.msg.(*discoveryv3.DeltaDiscoveryRequest)
	require.True(t, ok, "got a %T", w.msg)
	return w.stream, req
}

func (s *sdsServer) nextDeltaResponse(t *testing.T) (int64, *discoveryv3.DeltaDiscoveryResponse) {
	t.Helper()
	w := next(t, s.resps, "delta response")
	resp, ok := w.msg.(*discoveryv3.DeltaDiscoveryResponse)
	require.True(t, ok, "got a %T", w.msg)
	return w.stream, resp
}

// noRequest fails if a request is waiting.
func (s *sdsServer) noRequest(t *testing.T) {
	t.Helper()
	select {
	case w := <-s.reqs:
		t.Fatalf("unexpected request on stream %d: %v", w.stream, w.msg)
	default:
	}
}

// waitClosed waits until the server's handler of stream has returned.
func (s *sdsServer) waitClosed(t *testing.T, stream int64) {
	t.Helper()
	timeout := time.After(waitTimeout)
	for {
		select {
		case id := <-s.closed:
			if id == stream {
				return
			}
		case <-timeout:
			t.Fatalf("stream %d still open after %s", stream, waitTimeout)
		}
	}
}

// dial connects to the server, reconnecting quickly after a restart.
func (s *sdsServer) dial(t *testing.T) *grpc.ClientConn {
	t.Helper()
	conn, err := grpc.NewClient(s.addr,
		grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithConnectParams(grpc.ConnectParams{
			Backoff:           backoff.Config{BaseDelay: 10 * time.Millisecond, Multiplier: 1.6, Jitter: 0.2, MaxDelay: 100 * time.Millisecond},
			MinConnectTimeout: time.Second,
		}))
	require.NoError(t, err)
	t.Cleanup(func() { _ = conn.Close() })
	return conn
}

// start runs a client until the test ends.
func start(t *testing.T, cfg Config) *Client {
	t.Helper()
	if cfg.BackoffBase == 0 {
		cfg.BackoffBase, cfg.BackoffMax = 10*time.Millisecond, 100*time.Millisecond
	}
	c, err := New(cfg)
	require.NoError(t, err)
	stop := run(t, c)
	t.Cleanup(stop)
	return c
}

// run runs c; the returned func stops it and checks Run returned nil.
func run(t *testing.T, c *Client) func() {
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- c.Run(ctx) }()
	var once sync.Once
	return func() {
		once.Do(func() {
			cancel()
			require.NoError(t, <-done)
		})
	}
}

// wait waits for cond on c's state.
func wait(t *testing.T, c *Client, cond func(State) bool) State {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), waitTimeout)
	defer cancel()
	st, err := c.WaitFor(ctx, cond)
	require.NoError(t, err)
	return st
}

// pki is a root CA that issues workload leaves.
type pki struct {
	root    *x509.Certificate
	rootKey crypto.Signer
}

func newPKI(t *testing.T) *pki {
	t.Helper()
	key := catest.Key(t, "P-256")
	now := time.Now()
	root := catest.Issue(t, catest.CATemplate("sdstest root", now.Add(-time.Hour), now.Add(24*time.Hour)), key, nil, nil)
	return &pki{root: root, rootKey: key}
}

// leaf issues a workload certificate for a new key of the given kind.
func (p *pki) leaf(t *testing.T, kind string) ([]*x509.Certificate, crypto.Signer) {
	t.Helper()
	key := catest.Key(t, kind)
	now := time.Now()
	u, err := url.Parse("spiffe://cluster.local/ns/demo/sa/web")
	require.NoError(t, err)
	leaf := catest.Issue(t, &x509.Certificate{
		NotBefore: now.Add(-time.Minute), NotAfter: now.Add(time.Hour),
		URIs:        []*url.URL{u},
		KeyUsage:    x509.KeyUsageDigitalSignature,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
	}, key, p.root, p.rootKey)
	return []*x509.Certificate{leaf}, key
}

func certsPEM(certs ...*x509.Certificate) []byte {
	var out []byte
	for _, c := range certs {
		out = append(out, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: c.Raw})...)
	}
	return out
}

func pkcs8PEM(t *testing.T, key crypto.Signer) []byte {
	t.Helper()
	der, err := x509.MarshalPKCS8PrivateKey(key)
	require.NoError(t, err)
	return pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der})
}

func inlineBytes(b []byte) *corev3.DataSource {
	return &corev3.DataSource{Specifier: &corev3.DataSource_InlineBytes{InlineBytes: b}}
}

// tlsSecret is a tls_certificate secret as meshca serves it.
func tlsSecret(t *testing.T, name string, chain []*x509.Certificate, key crypto.Signer) *tlsv3.Secret {
	t.Helper()
	return &tlsv3.Secret{Name: name, Type: &tlsv3.Secret_TlsCertificate{TlsCertificate: &tlsv3.TlsCertificate{
		CertificateChain: inlineBytes(certsPEM(chain...)),
		PrivateKey:       inlineBytes(pkcs8PEM(t, key)),
	}}}
}

// rootSecret is a validation_context secret.
func rootSecret(name string, roots ...*x509.Certificate) *tlsv3.Secret {
	return &tlsv3.Secret{Name: name, Type: &tlsv3.Secret_ValidationContext{ValidationContext: &tlsv3.CertificateValidationContext{
		TrustedCa: inlineBytes(certsPEM(roots...)),
	}}}
}
