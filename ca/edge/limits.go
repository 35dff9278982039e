package edge

import (
	"context"
	"net"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promauto"
	"golang.org/x/net/netutil"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/keepalive"
	"google.golang.org/grpc/status"
	"google.golang.org/grpc/tap"
)

// Limits bound what any peer, authenticated or not, can make the gRPC
// server hold. README.md ("Limits and hardening") lists each with its key.
type Limits struct {
	// MaxConnections bounds open connections; more wait in the kernel's
	// accept queue. Default 4096.
	MaxConnections int
	// HandshakeTimeout bounds the TLS handshake. Default 5s.
	HandshakeTimeout time.Duration
	// MaxConcurrentStreams bounds streams per connection. Default 128.
	MaxConcurrentStreams uint32
	// MaxHeaderListBytes bounds a request's header list (tokens are at most
	// 16 KiB). Default 32 KiB.
	MaxHeaderListBytes uint32
	// RequestTimeout bounds how long a stream may wait for its first
	// message; it ends with DeadlineExceeded. Long-lived SDS streams are
	// not bounded once their first request has arrived. Default 10s.
	RequestTimeout time.Duration
	// MaxConnectionAge closes connections after this long (with
	// MaxConnectionAgeGrace for streams to finish), so that load
	// rebalances across replicas. Defaults 30m and 1m.
	MaxConnectionAge, MaxConnectionAgeGrace time.Duration
	// MaxConnectionIdle closes connections without streams. Default 5m.
	MaxConnectionIdle time.Duration
	// KeepaliveTime and KeepaliveTimeout: meshca pings a connection quiet
	// for KeepaliveTime and closes it if no answer comes within
	// KeepaliveTimeout. Defaults 1m and 20s.
	KeepaliveTime, KeepaliveTimeout time.Duration
	// Shed counts streams ended for waiting too long for their request.
	// Default: unregistered.
	Shed *prometheus.CounterVec
}

// NewShedCounter creates meshca_shed_total on reg (nil: unregistered).
func NewShedCounter(reg prometheus.Registerer) *prometheus.CounterVec {
	return promauto.With(reg).NewCounterVec(prometheus.CounterOpts{
		Name: "meshca_shed_total",
		Help: "Streams and connections meshca ended or refused at a limit, by limit.",
	}, []string{"limit"})
}

func (l Limits) withDefaults() Limits {
	if l.MaxConnections <= 0 {
		l.MaxConnections = 4096
	}
	if l.HandshakeTimeout <= 0 {
		l.HandshakeTimeout = 5 * time.Second
	}
	if l.MaxConcurrentStreams == 0 {
		l.MaxConcurrentStreams = 128
	}
	if l.MaxHeaderListBytes == 0 {
		l.MaxHeaderListBytes = 32 << 10
	}
	if l.RequestTimeout <= 0 {
		l.RequestTimeout = 10 * time.Second
	}
	if l.MaxConnectionAge <= 0 {
		l.MaxConnectionAge = 30 * time.Minute
	}
	if l.MaxConnectionAgeGrace <= 0 {
		l.MaxConnectionAgeGrace = time.Minute
	}
	if l.MaxConnectionIdle <= 0 {
		l.MaxConnectionIdle = 5 * time.Minute
	}
	if l.KeepaliveTime <= 0 {
		l.KeepaliveTime = time.Minute
	}
	if l.KeepaliveTimeout <= 0 {
		l.KeepaliveTimeout = 20 * time.Second
	}
	if l.Shed == nil {
		l.Shed = NewShedCounter(nil)
	}
	return l
}

// ServerOptions are the gRPC server options that enforce l.
func (l Limits) ServerOptions() []grpc.ServerOption {
	l = l.withDefaults()
	w := &firstMessage{timeout: l.RequestTimeout, shed: l.Shed}
	return []grpc.ServerOption{
		grpc.ConnectionTimeout(l.HandshakeTimeout),
		grpc.MaxConcurrentStreams(l.MaxConcurrentStreams),
		grpc.MaxHeaderListSize(l.MaxHeaderListBytes),
		grpc.KeepaliveParams(keepalive.ServerParameters{
			MaxConnectionIdle: l.MaxConnectionIdle, MaxConnectionAge: l.MaxConnectionAge,
			MaxConnectionAgeGrace: l.MaxConnectionAgeGrace, Time: l.KeepaliveTime, Timeout: l.KeepaliveTimeout,
		}),
		grpc.KeepaliveEnforcementPolicy(keepalive.EnforcementPolicy{MinTime: 10 * time.Second, PermitWithoutStream: true}),
		grpc.InTapHandle(w.tap),
		grpc.ChainUnaryInterceptor(w.unary),
		grpc.ChainStreamInterceptor(w.stream),
	}
}

// Listener bounds lis to l.MaxConnections open connections.
func (l Limits) Listener(lis net.Listener) net.Listener {
	return netutil.LimitListener(lis, l.withDefaults().MaxConnections)
}

// firstMessage ends a stream that does not send its first message within
// timeout: a peer that opens streams and sends only headers otherwise
// holds their memory for as long as the connection lives.
type firstMessage struct {
	timeout time.Duration
	shed    *prometheus.CounterVec
}

type waitKey struct{}

// wait is one stream's wait for its first message.
type wait struct {
	once   sync.Once
	timer  *time.Timer
	cancel context.CancelCauseFunc
}

var errNoRequest = status.Error(codes.DeadlineExceeded, "no request message arrived in time after the stream's headers")

// tap runs as each stream arrives, before its handler: the stream's
// context is cancelled unless a message arrives within the timeout.
func (f *firstMessage) tap(ctx context.Context, _ *tap.Info) (context.Context, error) {
	ctx, cancel := context.WithCancelCause(ctx)
	w := &wait{cancel: cancel}
	w.timer = time.AfterFunc(f.timeout, func() {
		f.shed.WithLabelValues("request_timeout").Inc()
		cancel(errNoRequest)
	})
	return context.WithValue(ctx, waitKey{}, w), nil
}

// stop ends ctx's wait for its first message.
func stop(ctx context.Context) {
	if w, ok := ctx.Value(waitKey{}).(*wait); ok {
		w.once.Do(func() { w.timer.Stop() })
	}
}

// unary runs once a unary call's request has arrived: the wait is over.
func (f *firstMessage) unary(ctx context.Context, req any, _ *grpc.UnaryServerInfo, h grpc.UnaryHandler) (any, error) {
	stop(ctx)
	return h(ctx, req)
}

// stream ends the wait at the stream's first message (or its end).
func (f *firstMessage) stream(srv any, ss grpc.ServerStream, _ *grpc.StreamServerInfo, h grpc.StreamHandler) error {
	defer stop(ss.Context())
	return h(srv, &firstRecv{ServerStream: ss})
}

// firstRecv stops the wait when its first message is received.
type firstRecv struct {
	grpc.ServerStream
	done bool
}

func (r *firstRecv) RecvMsg(m any) error {
	err := r.ServerStream.RecvMsg(m)
	if !r.done && err == nil {
		r.done = true
		stop(r.Context())
	}
	return err
}
