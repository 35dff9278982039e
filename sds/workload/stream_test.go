package workload_test

import (
	"context"
	"testing"
	"testing/synctest"
	"time"

	workloadpb "github.com/spiffe/go-spiffe/v2/proto/spiffe/workload"
	"github.com/stretchr/testify/require"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/meshca/meshca/sds"
	"github.com/meshca/meshca/sds/workload"
)

// fakeStream is a server stream without a network, so that a handler can
// run inside a synctest bubble, where time is fake.
type fakeStream[T any] struct {
	grpc.ServerStream
	ctx  context.Context
	sent chan *T
}

func newStream[T any](ctx context.Context) *fakeStream[T] {
	return &fakeStream[T]{ctx: metadata.NewIncomingContext(ctx, metadata.Pairs(workload.HeaderKey, "true")), sent: make(chan *T, 16)}
}

func (f *fakeStream[T]) Context() context.Context { return f.ctx }
func (f *fakeStream[T]) Send(m *T) error          { f.sent <- m; return nil }

// handler runs FetchX509SVID on a new server in the background and returns
// its stream and a channel that receives what it returns.
func runX509SVID(t *testing.T, ctx context.Context, src sds.Source, wait time.Duration) (*fakeStream[workloadpb.X509SVIDResponse], chan error) {
	t.Helper()
	srv, err := workload.New(workload.Config{Source: src, FirstWait: wait})
	require.NoError(t, err)
	stream := newStream[workloadpb.X509SVIDResponse](ctx)
	done := make(chan error, 1)
	go func() { done <- srv.FetchX509SVID(&workloadpb.X509SVIDRequest{}, stream) }()
	return stream, done
}

func requireCode(t *testing.T, want codes.Code, err error) {
	t.Helper()
	require.Equal(t, want, status.Code(err), "%v", err)
}

// TestFirstWait: with no credential yet, FetchX509SVID waits FirstWait
// for one, then ends with Unavailable, which clients retry.
func TestFirstWait(t *testing.T) {
	root := newRoot(t, "root")
	cred := root.leaf(t)

	t.Run("times out", func(t *testing.T) {
		synctest.Test(t, func(t *testing.T) {
			src := newSource(sds.Snapshot{Bundle: bundleOf(root)})
			_, done := runX509SVID(t, t.Context(), src, 10*time.Second)
			time.Sleep(10*time.Second - time.Nanosecond)
			synctest.Wait()
			require.Empty(t, done, "the stream ended before FirstWait")
			time.Sleep(time.Nanosecond)
			synctest.Wait()
			err := <-done
			requireCode(t, codes.Unavailable, err)
			require.Contains(t, status.Convert(err).Message(), "no X.509-SVID issued for this workload yet")
		})
	})

	t.Run("no bundle", func(t *testing.T) {
		synctest.Test(t, func(t *testing.T) {
			src := newSource(sds.Snapshot{Credential: cred})
			_, done := runX509SVID(t, t.Context(), src, time.Minute)
			time.Sleep(time.Minute)
			synctest.Wait()
			err := <-done
			requireCode(t, codes.Unavailable, err)
			require.Contains(t, status.Convert(err).Message(), "no trust bundle")
		})
	})

	t.Run("credential arrives", func(t *testing.T) {
		synctest.Test(t, func(t *testing.T) {
			src := newSource(sds.Snapshot{Bundle: bundleOf(root)})
			ctx, cancel := context.WithCancel(t.Context())
			stream, done := runX509SVID(t, ctx, src, 10*time.Second)
			time.Sleep(5 * time.Second)
			src.Publish(sds.Snapshot{Credential: cred, Bundle: bundleOf(root)})
			synctest.Wait()
			require.Len(t, stream.sent, 1)
			require.Equal(t, cred.Chain[0].Raw, (<-stream.sent).Svids[0].X509Svid)

			// Past FirstWait, a stream that has sent keeps going.
			time.Sleep(time.Hour)
			synctest.Wait()
			require.Empty(t, done)
			cancel()
			synctest.Wait()
			requireCode(t, codes.Canceled, <-done)
		})
	})

	t.Run("negative: no wait", func(t *testing.T) {
		synctest.Test(t, func(t *testing.T) {
			src := newSource(sds.Snapshot{Bundle: bundleOf(root)})
			_, done := runX509SVID(t, t.Context(), src, -1)
			synctest.Wait()
			requireCode(t, codes.Unavailable, <-done)
		})
	})
}

// TestUnservableSnapshot: a snapshot that can no longer be served ends the
// stream (the client reconnects); one that is inconsistent is an internal
// error, at once.
func TestUnservableSnapshot(t *testing.T) {
	root := newRoot(t, "root")
	cred := root.leaf(t)

	t.Run("bundle withdrawn", func(t *testing.T) {
		synctest.Test(t, func(t *testing.T) {
			src := newSource(sds.Snapshot{Credential: cred, Bundle: bundleOf(root)})
			stream, done := runX509SVID(t, t.Context(), src, time.Minute)
			synctest.Wait()
			require.Len(t, stream.sent, 1)
			src.Publish(sds.Snapshot{Credential: cred})
			synctest.Wait()
			requireCode(t, codes.Unavailable, <-done)
		})
	})

	t.Run("bundle of another trust domain", func(t *testing.T) {
		synctest.Test(t, func(t *testing.T) {
			other := bundleOf(root)
			other.TrustDomain = spiffeTD(t, "other.org")
			src := newSource(sds.Snapshot{Credential: cred, Bundle: other})
			_, done := runX509SVID(t, t.Context(), src, time.Minute)
			synctest.Wait()
			err := <-done
			requireCode(t, codes.Internal, err)
			require.NotContains(t, status.Convert(err).Message(), "other.org", "details belong in the log")
		})
	})
}
