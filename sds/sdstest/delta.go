package sdstest

import (
	"context"
	"errors"
	"fmt"
	"io"
	"slices"
	"time"

	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	rpcstatus "google.golang.org/genproto/googleapis/rpc/status"
	"google.golang.org/grpc/codes"
)

// runDelta holds one DeltaSecrets stream until it fails or ctx is done. got
// is whether a response came; err is the stream's error as gRPC gave it.
func (c *Client) runDelta(ctx context.Context) (got bool, err error) {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	st, err := c.sds.DeltaSecrets(ctx, c.cfg.CallOptions...)
	if err != nil {
		return false, err
	}
	if err := c.acquire(ctx); err != nil {
		return false, err
	}
	c.mu.Lock()
	c.streams++
	stream := c.streams
	c.nonce = ""
	c.delta = st
	// A new stream subscribes to every name and tells the server the
	// version of each secret the client holds.
	req := &discoveryv3.DeltaDiscoveryRequest{
		Node:                   c.cfg.Node,
		TypeUrl:                TypeURL,
		ResourceNamesSubscribe: c.names,
	}
	if len(c.secrets) > 0 {
		req.InitialResourceVersions = make(map[string]string, len(c.secrets))
		for name, s := range c.secrets {
			req.InitialResourceVersions[name] = s.Version
		}
	}
	c.requests++
	c.notifyLocked()
	c.mu.Unlock()
	defer func() {
		c.mu.Lock()
		c.delta = nil
		c.notifyLocked()
		c.mu.Unlock()
	}()
	err = st.Send(req)
	c.release()
	// io.EOF: the server ended the stream; Recv says how.
	if err != nil && !errors.Is(err, io.EOF) {
		return false, err
	}

	for {
		resp, err := st.Recv()
		if err != nil {
			return got, err
		}
		got = true
		secrets, names, removed, errs := decodeDelta(resp)
		if len(errs) == 0 && c.cfg.NACKAll {
			errs = append(errs, errors.New("NACKAll: the client rejects every response"))
		}
		ev := Event{
			Time: time.Now(), Stream: stream,
			Version: resp.GetSystemVersionInfo(), Nonce: resp.GetNonce(),
			Names: names, Removed: removed, Accepted: len(errs) == 0, Error: errorDetail(errs),
		}
		if c.cfg.NeverACK {
			c.mu.Lock()
			c.nonce = resp.GetNonce()
			if ev.Accepted {
				c.applyDeltaLocked(resp.GetSystemVersionInfo(), secrets, removed)
			}
			c.recordLocked(ev)
			c.mu.Unlock()
			continue
		}
		if err := c.acquire(ctx); err != nil {
			return got, err
		}
		c.mu.Lock()
		c.nonce = resp.GetNonce()
		reply := &discoveryv3.DeltaDiscoveryRequest{TypeUrl: TypeURL, ResponseNonce: resp.GetNonce()}
		if ev.Accepted {
			c.applyDeltaLocked(resp.GetSystemVersionInfo(), secrets, removed)
		} else {
			reply.ErrorDetail = &rpcstatus.Status{Code: int32(codes.InvalidArgument), Message: ev.Error}
		}
		ev.Replied = true
		c.recordLocked(ev)
		c.mu.Unlock()
		err = st.Send(reply)
		c.release()
		if err != nil && !errors.Is(err, io.EOF) {
			return got, err
		}
	}
}

// deltaResubscribeLocked returns the request that moves the subscription
// from old to names.
func (c *Client) deltaResubscribeLocked(old, names []string) *discoveryv3.DeltaDiscoveryRequest {
	req := &discoveryv3.DeltaDiscoveryRequest{TypeUrl: TypeURL}
	for _, n := range names {
		if !slices.Contains(old, n) {
			req.ResourceNamesSubscribe = append(req.ResourceNamesSubscribe, n)
		}
	}
	for _, n := range old {
		if !slices.Contains(names, n) {
			req.ResourceNamesUnsubscribe = append(req.ResourceNamesUnsubscribe, n)
		}
	}
	return req
}

// deltaSecret is a valid resource of a delta response.
type deltaSecret struct {
	version string
	secret  *tlsv3.Secret
}

// applyDeltaLocked takes an accepted response: its secrets replace those
// of the same names, its removed resources go; secrets not subscribed to
// are ignored.
func (c *Client) applyDeltaLocked(version string, secrets []deltaSecret, removed []string) {
	c.version = version
	for _, s := range secrets {
		if name := s.secret.GetName(); slices.Contains(c.names, name) {
			c.secrets[name] = Secret{Version: s.version, Secret: s.secret}
		}
	}
	for _, name := range removed {
		delete(c.secrets, name)
	}
}

// decodeDelta decodes and checks every resource of a delta response. It
// returns the valid secrets, the names of all resources, the removed
// names, and every problem found; the response is acceptable only if there
// is none.
func decodeDelta(resp *discoveryv3.DeltaDiscoveryResponse) (secrets []deltaSecret, names, removed []string, errs []error) {
	if resp.GetTypeUrl() != TypeURL {
		errs = append(errs, fmt.Errorf("response type_url is %q, want %q", resp.GetTypeUrl(), TypeURL))
	}
	for i, r := range resp.GetResources() {
		name := r.GetName()
		if name == "" {
			name = r.GetResourceName().GetName()
		}
		if name == "" {
			errs = append(errs, fmt.Errorf("resource %d has no name", i))
			continue
		}
		if slices.Contains(names, name) {
			errs = append(errs, fmt.Errorf("resource %q appears twice", name))
			continue
		}
		names = append(names, name)
		a := r.GetResource()
		if a == nil {
			continue // a TTL heartbeat: nothing new
		}
		if a.GetTypeUrl() != TypeURL {
			errs = append(errs, fmt.Errorf("resource %q: type_url is %q, want %q", name, a.GetTypeUrl(), TypeURL))
			continue
		}
		s := new(tlsv3.Secret)
		if err := a.UnmarshalTo(s); err != nil {
			errs = append(errs, fmt.Errorf("resource %q: decode Secret: %w", name, err))
			continue
		}
		if s.GetName() != name {
			errs = append(errs, fmt.Errorf("resource %q holds secret %q", name, s.GetName()))
			continue
		}
		if err := Validate(s); err != nil {
			errs = append(errs, fmt.Errorf("secret %q: %w", name, err))
			continue
		}
		secrets = append(secrets, deltaSecret{version: r.GetVersion(), secret: s})
	}
	removed = slices.Clone(resp.GetRemovedResources())
	for _, rn := range resp.GetRemovedResourceNames() {
		removed = append(removed, rn.GetName())
	}
	return secrets, names, removed, errs
}
