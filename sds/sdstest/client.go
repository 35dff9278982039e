// Package sdstest is an SDS v3 client that behaves as Envoy's does, for
// tests and benchmarks of meshca's SDS server where Envoy itself cannot run.
//
// A Client holds one stream, state of the world (StreamSecrets) or delta
// (DeltaSecrets), on a gRPC connection the caller dials, so many clients
// can share one connection. It sends the node on the first request of each
// stream only, validates every response as a whole and ACKs or NACKs it,
// keeps the secrets it last accepted, and reopens a failed stream after a
// jittered exponential backoff, telling the server the versions it holds.
//
// Tests read what happened from State, and wait for what should happen
// with WaitFor, which wakes on every change instead of polling.
package sdstest

import (
	"context"
	"errors"
	"fmt"
	"io"
	"maps"
	"math/rand/v2"
	"slices"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	secretv3 "github.com/envoyproxy/go-control-plane/envoy/service/secret/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
)

// TypeURL is the type URL of SDS secrets.
const TypeURL = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"

// Config configures a Client.
type Config struct {
	// Conn carries the client's streams. The caller dials it with the
	// credentials the server wants; many clients may share one. Required.
	Conn grpc.ClientConnInterface
	// CallOptions are passed to every stream the client opens, e.g.
	// grpc.PerRPCCredentials with a workload's bearer token, so that clients
	// sharing Conn can be different workloads.
	CallOptions []grpc.CallOption
	// Node is sent on the first request of every stream. Default: ID and
	// cluster "sdstest".
	Node *corev3.Node
	// Names are the secrets to subscribe to, e.g. "default" and "ROOTCA".
	// At least one is required: Envoy never asks SDS for a wildcard.
	Names []string
	// Delta selects DeltaSecrets; the default is StreamSecrets (state of
	// the world).
	Delta bool
	// BackoffBase and BackoffMax bound the wait before reopening a failed
	// stream: the n-th retry in a row waits a random time below
	// min(BackoffBase<<n, BackoffMax), as Envoy's jittered backoff does.
	// The count starts again once a stream has received a response.
	// Defaults 100ms and 5s.
	BackoffBase time.Duration
	BackoffMax  time.Duration
	// NeverACK makes the client read and apply responses but send nothing
	// after the first request of each stream: no ACK, no NACK, and
	// Subscribe only changes what the next stream asks for.
	NeverACK bool
	// NACKAll makes the client reject every response, valid or not.
	NACKAll bool
	// History is how many events State.Events keeps, the newest. Default 0:
	// only State.Last, so that thousands of clients stay small.
	History int
}

// Secret is an accepted secret.
type Secret struct {
	// Version is the version_info of the state-of-the-world response that
	// carried it, or its resource version in delta.
	Version string
	// Secret is the decoded resource. It is shared: do not modify it.
	Secret *tlsv3.Secret
}

// Event is one response the client received.
type Event struct {
	// Time is when the response was received.
	Time time.Time
	// Stream is the number of the stream it came on: 1 for the first
	// stream, 2 for the first one reopened, and so on.
	Stream int
	// Version is the response's version_info (system_version_info in
	// delta); Nonce is its nonce.
	Version, Nonce string
	// Names are the names of the resources it carried, in its order;
	// Removed are delta's removed resources.
	Names, Removed []string
	// Accepted is whether the client took the response; Error says why
	// it did not, and is the message of the NACK's error_detail.
	Accepted bool
	Error    string
	// Replied is whether an ACK or NACK was sent (false with NeverACK).
	Replied bool
}

// State is a snapshot of what the client holds and has seen.
type State struct {
	// Secrets are the accepted secrets by name, only ever ones subscribed to.
	Secrets map[string]Secret
	// Version is the version_info (system_version_info in delta) of the
	// last accepted response.
	Version string
	// Names are the secrets subscribed to.
	Names []string
	// Streams counts the streams opened; Reconnects the attempts to open
	// one after a stream failed or could not be opened.
	Streams, Reconnects int
	// Connected is whether a stream is open.
	Connected bool
	// Requests counts every request sent, ACKs and NACKs included;
	// Responses counts the responses received.
	Requests, Responses, ACKs, NACKs int
	// LastError is the status the last stream ended with (OK if the
	// server ended it cleanly), or nil if none has ended.
	LastError *status.Status
	// Last is the last response's event, whatever Config.History says.
	Last Event
	// Events are the last Config.History events, oldest first.
	Events []Event
}

// String summarises the state for test failure messages.
func (s State) String() string {
	var b strings.Builder
	fmt.Fprintf(&b, "streams=%d reconnects=%d connected=%t requests=%d responses=%d acks=%d nacks=%d version=%q",
		s.Streams, s.Reconnects, s.Connected, s.Requests, s.Responses, s.ACKs, s.NACKs, s.Version)
	names := make([]string, 0, len(s.Secrets))
	for n := range s.Secrets {
		names = append(names, n)
	}
	sort.Strings(names)
	b.WriteString(" secrets=[")
	for i, n := range names {
		if i > 0 {
			b.WriteByte(' ')
		}
		fmt.Fprintf(&b, "%s@%s", n, s.Secrets[n].Version)
	}
	b.WriteByte(']')
	if s.LastError != nil {
		fmt.Fprintf(&b, " last_error=%q", s.LastError.Err())
	}
	if s.Last.Error != "" {
		fmt.Fprintf(&b, " last_nack=%q", s.Last.Error)
	}
	return b.String()
}

// Client is an Envoy-like SDS client. Run drives it; the other methods are
// safe to call from any goroutine.
type Client struct {
	cfg     Config
	sds     secretv3.SecretDiscoveryServiceClient
	running atomic.Bool
	// sending is held, as a one-slot semaphore, by whoever sends on the
	// stream, from reading what the request carries until it is sent, so
	// requests leave in the order their contents were decided.
	sending chan struct{}

	mu      sync.Mutex
	names   []string
	secrets map[string]Secret
	version string
	// nonce is the last nonce received on the current stream.
	nonce string
	// sotw or delta is the open stream, nil between streams. It is set
	// while sending is held, before the stream's first request goes out,
	// so no other request can go first.
	sotw  secretv3.SecretDiscoveryService_StreamSecretsClient
	delta secretv3.SecretDiscoveryService_DeltaSecretsClient
	// streams, reconnects, … back State's fields of the same names.
	streams, reconnects              int
	requests, responses, acks, nacks int
	lastErr                          *status.Status
	last                             Event
	events                           []Event
	// changed is closed at the next change of state; nil until a waiter
	// needs it.
	changed chan struct{}
}

// New checks cfg, fills in its defaults and returns a client; Run starts it.
func New(cfg Config) (*Client, error) {
	if cfg.Conn == nil {
		return nil, errors.New("new sds client: Conn is required")
	}
	names, err := cleanNames(cfg.Names)
	if err != nil {
		return nil, fmt.Errorf("new sds client: %w", err)
	}
	if cfg.Node == nil {
		cfg.Node = &corev3.Node{Id: "sdstest", Cluster: "sdstest"}
	} else {
		cfg.Node = proto.Clone(cfg.Node).(*corev3.Node)
	}
	if cfg.BackoffBase <= 0 {
		cfg.BackoffBase = 100 * time.Millisecond
	}
	if cfg.BackoffMax <= 0 {
		cfg.BackoffMax = 5 * time.Second
	}
	cfg.BackoffMax = max(cfg.BackoffMax, cfg.BackoffBase)
	cfg.History = max(cfg.History, 0)
	cfg.CallOptions = slices.Clip(cfg.CallOptions)
	return &Client{
		cfg:     cfg,
		sds:     secretv3.NewSecretDiscoveryServiceClient(cfg.Conn),
		sending: make(chan struct{}, 1),
		names:   names,
		secrets: make(map[string]Secret, len(names)),
	}, nil
}

// cleanNames returns names without repeats, in their first order.
func cleanNames(names []string) ([]string, error) {
	out := make([]string, 0, len(names))
	for _, n := range names {
		if n == "" {
			return nil, errors.New("empty secret name")
		}
		if !slices.Contains(out, n) {
			out = append(out, n)
		}
	}
	if len(out) == 0 {
		return nil, errors.New("no secret names")
	}
	return out, nil
}

// Run holds a stream open, reopening it after failures, until ctx is done;
// then it returns nil. A client runs once at a time.
func (c *Client) Run(ctx context.Context) error {
	if !c.running.CompareAndSwap(false, true) {
		return errors.New("run sds client: already running")
	}
	defer c.running.Store(false)
	attempt := 0
	for {
		var (
			got bool
			err error
		)
		if c.cfg.Delta {
			got, err = c.runDelta(ctx)
		} else {
			got, err = c.runSotW(ctx)
		}
		if ctx.Err() != nil {
			return nil
		}
		if got {
			attempt = 0
		}
		c.ended(err)
		t := time.NewTimer(c.backoff(attempt))
		attempt++
		select {
		case <-ctx.Done():
			t.Stop()
			return nil
		case <-t.C:
		}
		c.mu.Lock()
		c.reconnects++
		c.notifyLocked()
		c.mu.Unlock()
	}
}

// backoff returns a random wait below min(BackoffBase<<attempt,
// BackoffMax).
func (c *Client) backoff(attempt int) time.Duration {
	limit := c.cfg.BackoffMax
	if attempt < 32 {
		if d := c.cfg.BackoffBase << attempt; d > 0 && d < limit {
			limit = d
		}
	}
	return rand.N(limit)
}

// ended records how a stream ended.
func (c *Client) ended(err error) {
	st := status.New(codes.OK, "server closed the stream")
	if !errors.Is(err, io.EOF) {
		st = status.Convert(err)
	}
	c.mu.Lock()
	c.lastErr = st
	c.notifyLocked()
	c.mu.Unlock()
}

// Subscribe changes the secrets subscribed to, as Envoy does when a
// listener starts or stops using one: it sends a request with the new
// names on the open stream (unless NeverACK is set, or the names are the
// same), and every later stream asks for them. Secrets no longer
// subscribed to are dropped from State. An error means the request could
// not be sent; the new names stand all the same.
func (c *Client) Subscribe(ctx context.Context, names []string) error {
	names, err := cleanNames(names)
	if err != nil {
		return fmt.Errorf("subscribe to secrets: %w", err)
	}
	if err := c.acquire(ctx); err != nil {
		return fmt.Errorf("subscribe to %v: %w", names, err)
	}
	defer c.release()
	c.mu.Lock()
	send := c.resubscribeLocked(names)
	c.mu.Unlock()
	if send == nil {
		return nil
	}
	// io.EOF: the stream has ended, and the next one asks for names.
	if err := send(); err != nil && !errors.Is(err, io.EOF) {
		return fmt.Errorf("subscribe to %v: %w", names, err)
	}
	return nil
}

// resubscribeLocked sets the names and returns the send of the request
// that tells the server, or nil if none is due.
func (c *Client) resubscribeLocked(names []string) func() error {
	old := c.names
	c.names = names
	for n := range c.secrets {
		if !slices.Contains(names, n) {
			delete(c.secrets, n)
		}
	}
	c.notifyLocked()
	if c.cfg.NeverACK || sameSet(old, names) {
		return nil
	}
	switch {
	case c.sotw != nil:
		s, req := c.sotw, c.sotwRequestLocked()
		c.requests++
		return func() error { return s.Send(req) }
	case c.delta != nil:
		s, req := c.delta, c.deltaResubscribeLocked(old, names)
		c.requests++
		return func() error { return s.Send(req) }
	}
	return nil
}

func sameSet(a, b []string) bool {
	if len(a) != len(b) {
		return false
	}
	for _, n := range a {
		if !slices.Contains(b, n) {
			return false
		}
	}
	return true
}

// acquire takes the right to send, or fails once ctx is done.
func (c *Client) acquire(ctx context.Context) error {
	select {
	case c.sending <- struct{}{}:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

func (c *Client) release() { <-c.sending }

// State returns a snapshot of the client's state.
func (c *Client) State() State {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.stateLocked()
}

func (c *Client) stateLocked() State {
	return State{
		Secrets:    maps.Clone(c.secrets),
		Version:    c.version,
		Names:      slices.Clone(c.names),
		Streams:    c.streams,
		Reconnects: c.reconnects,
		Connected:  c.sotw != nil || c.delta != nil,
		Requests:   c.requests,
		Responses:  c.responses,
		ACKs:       c.acks,
		NACKs:      c.nacks,
		LastError:  c.lastErr,
		Last:       c.last,
		Events:     slices.Clone(c.events),
	}
}

// WaitFor returns the first state for which cond is true, checking the
// current state and then each change. If ctx is done first, it returns the
// last state seen and an error that describes it. cond runs without the
// client's lock held.
func (c *Client) WaitFor(ctx context.Context, cond func(State) bool) (State, error) {
	for {
		c.mu.Lock()
		st := c.stateLocked()
		if c.changed == nil {
			c.changed = make(chan struct{})
		}
		changed := c.changed
		c.mu.Unlock()
		if cond(st) {
			return st, nil
		}
		select {
		case <-changed:
		case <-ctx.Done():
			return st, fmt.Errorf("wait for sds client state, last %s: %w", st, ctx.Err())
		}
	}
}

// notifyLocked wakes the waiters.
func (c *Client) notifyLocked() {
	if c.changed != nil {
		close(c.changed)
		c.changed = nil
	}
}

// recordLocked appends a response's event.
func (c *Client) recordLocked(e Event) {
	c.responses++
	if e.Replied {
		if e.Accepted {
			c.acks++
		} else {
			c.nacks++
		}
		c.requests++
	}
	c.last = e
	if h := c.cfg.History; h > 0 {
		if len(c.events) == h {
			copy(c.events, c.events[1:])
			c.events[h-1] = e
		} else {
			c.events = append(c.events, e)
		}
	}
	c.notifyLocked()
}

// errorDetail joins the problems of one response into a NACK's message.
func errorDetail(errs []error) string {
	msgs := make([]string, len(errs))
	for i, err := range errs {
		msgs[i] = err.Error()
	}
	return strings.Join(msgs, "; ")
}
