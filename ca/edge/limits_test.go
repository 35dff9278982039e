package edge_test

import (
	"context"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/stretchr/testify/require"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/meshca/meshca/ca/edge"
)

func serveWithLimits(t *testing.T, l edge.Limits) string {
	t.Helper()
	g := grpc.NewServer(l.ServerOptions()...)
	healthpb.RegisterHealthServer(g, health.NewServer())
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	go func() { _ = g.Serve(l.Listener(lis)) }()
	t.Cleanup(g.Stop)
	return lis.Addr().String()
}

func TestLimits(t *testing.T) {
	shed := edge.NewShedCounter(nil)
	addr := serveWithLimits(t, edge.Limits{RequestTimeout: 300 * time.Millisecond, HandshakeTimeout: 300 * time.Millisecond,
		MaxHeaderListBytes: 20 << 10, Shed: shed})
	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	require.NoError(t, err)
	defer conn.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	hc := healthpb.NewHealthClient(conn)
	_, err = hc.Check(ctx, &healthpb.HealthCheckRequest{})
	require.NoError(t, err, "a well-behaved request passes")

	t.Run("header bomb", func(t *testing.T) {
		big := metadata.AppendToOutgoingContext(ctx, "x-bomb-bin", strings.Repeat("A", 40<<10))
		_, err := hc.Check(big, &healthpb.HealthCheckRequest{})
		require.Error(t, err)
		_, err = hc.Check(ctx, &healthpb.HealthCheckRequest{})
		require.NoError(t, err, "the server serves on")
	})

	t.Run("headers and no body", func(t *testing.T) {
		s, err := conn.NewStream(ctx, &grpc.StreamDesc{ClientStreams: true, ServerStreams: true}, "/grpc.health.v1.Health/Check")
		require.NoError(t, err)
		// Send nothing: the server ends the stream instead of holding it.
		err = s.RecvMsg(&healthpb.HealthCheckResponse{})
		require.Error(t, err)
		require.Contains(t, []codes.Code{codes.Canceled, codes.DeadlineExceeded}, status.Code(err))
		require.Equal(t, 1.0, testutil.ToFloat64(shed.WithLabelValues("request_timeout")))
		// A stream that sent its request in time is not cut short.
		_, err = hc.Check(ctx, &healthpb.HealthCheckRequest{})
		require.NoError(t, err)
		w, err := hc.Watch(ctx, &healthpb.HealthCheckRequest{})
		require.NoError(t, err)
		_, err = w.Recv()
		require.NoError(t, err)
		time.Sleep(600 * time.Millisecond)
		require.Equal(t, 1.0, testutil.ToFloat64(shed.WithLabelValues("request_timeout")), "a long-lived stream that sent its request is not ended")
	})

	t.Run("silent connection", func(t *testing.T) {
		c, err := net.Dial("tcp", addr)
		require.NoError(t, err)
		defer c.Close()
		require.NoError(t, c.SetReadDeadline(time.Now().Add(5*time.Second)))
		// The server's own preface may come first; then it hangs up.
		for err == nil {
			_, err = c.Read(make([]byte, 256))
		}
		var ne net.Error
		require.False(t, errorAs(err, &ne) && ne.Timeout(), "the server closed the silent connection before 5s: %v", err)
	})
}

func errorAs(err error, target *net.Error) bool {
	ne, ok := err.(net.Error)
	if ok {
		*target = ne
	}
	return ok
}
