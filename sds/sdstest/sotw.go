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
	"google.golang.org/protobuf/types/known/anypb"
)

// runSotW holds one StreamSecrets stream until it fails or ctx is done. got
// is whether a response came; err is the stream's error as gRPC gave it.
func (c *Client) runSotW(ctx context.Context) (got bool, err error) {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	st, err := c.sds.StreamSecrets(ctx, c.cfg.CallOptions...)
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
	c.sotw = st
	// A new stream starts from what the client holds: the node, the names
	// and the last accepted version, with no nonce.
	req := c.sotwRequestLocked()
	req.Node = c.cfg.Node
	c.requests++
	c.notifyLocked()
	c.mu.Unlock()
	defer func() {
		c.mu.Lock()
		c.sotw = nil
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
		secrets, names, errs := decodeSotW(resp)
		if len(errs) == 0 && c.cfg.NACKAll {
			errs = append(errs, errors.New("NACKAll: the client rejects every response"))
		}
		ev := Event{
			Time: time.Now(), Stream: stream,
			Version: resp.GetVersionInfo(), Nonce: resp.GetNonce(),
			Names: names, Accepted: len(errs) == 0, Error: errorDetail(errs),
		}
		if c.cfg.NeverACK {
			c.mu.Lock()
			c.nonce = resp.GetNonce()
			if ev.Accepted {
				c.applySotWLocked(resp.GetVersionInfo(), secrets)
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
		if ev.Accepted {
			c.applySotWLocked(resp.GetVersionInfo(), secrets)
		}
		// ACK: the response's version and nonce. NACK: the version last
		// accepted, the response's nonce and what was wrong.
		reply := c.sotwRequestLocked()
		if !ev.Accepted {
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

// sotwRequestLocked returns a request for the names subscribed to, with
// the last accepted version and the last nonce received.
func (c *Client) sotwRequestLocked() *discoveryv3.DiscoveryRequest {
	return &discoveryv3.DiscoveryRequest{
		TypeUrl:       TypeURL,
		ResourceNames: c.names,
		VersionInfo:   c.version,
		ResponseNonce: c.nonce,
	}
}

// applySotWLocked takes an accepted response. State-of-the-world SDS
// responses carry the secrets that changed, so the others stay; secrets
// not subscribed to are ignored, as Envoy ignores resources no watch asked
// for.
func (c *Client) applySotWLocked(version string, secrets []*tlsv3.Secret) {
	c.version = version
	for _, s := range secrets {
		if slices.Contains(c.names, s.GetName()) {
			c.secrets[s.GetName()] = Secret{Version: version, Secret: s}
		}
	}
}

// decodeSotW decodes and checks every resource of a response. It returns
// the secrets that are valid, the names of all resources, and every
// problem found; the response is acceptable only if there is none.
func decodeSotW(resp *discoveryv3.DiscoveryResponse) (secrets []*tlsv3.Secret, names []string, errs []error) {
	if resp.GetTypeUrl() != TypeURL {
		errs = append(errs, fmt.Errorf("response type_url is %q, want %q", resp.GetTypeUrl(), TypeURL))
	}
	for i, a := range resp.GetResources() {
		s, err := decodeAny(a)
		if err != nil {
			errs = append(errs, fmt.Errorf("resource %d: %w", i, err))
			continue
		}
		if s == nil {
			continue // a TTL heartbeat: nothing new
		}
		name := s.GetName()
		if name == "" {
			errs = append(errs, fmt.Errorf("resource %d: secret has no name", i))
			continue
		}
		if slices.Contains(names, name) {
			errs = append(errs, fmt.Errorf("secret %q appears twice", name))
			continue
		}
		names = append(names, name)
		if err := Validate(s); err != nil {
			errs = append(errs, fmt.Errorf("secret %q: %w", name, err))
			continue
		}
		secrets = append(secrets, s)
	}
	return secrets, names, errs
}

// decodeAny decodes a state-of-the-world resource: a Secret, or a Secret
// in a discovery Resource wrapper (nil for a wrapper with no resource, a
// TTL heartbeat).
func decodeAny(a *anypb.Any) (*tlsv3.Secret, error) {
	if a.MessageIs((*discoveryv3.Resource)(nil)) {
		var r discoveryv3.Resource
		if err := a.UnmarshalTo(&r); err != nil {
			return nil, fmt.Errorf("decode Resource wrapper: %w", err)
		}
		if r.GetResource() == nil {
			return nil, nil
		}
		a = r.GetResource()
	}
	if a.GetTypeUrl() != TypeURL {
		return nil, fmt.Errorf("type_url is %q, want %q", a.GetTypeUrl(), TypeURL)
	}
	s := new(tlsv3.Secret)
	if err := a.UnmarshalTo(s); err != nil {
		return nil, fmt.Errorf("decode Secret: %w", err)
	}
	return s, nil
}
