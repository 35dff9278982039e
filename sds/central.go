package sds

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"strings"
	"sync"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/meshca/meshca/authn"
	"github.com/meshca/meshca/ca"
)

// issueTimeout bounds one issuance for a renewal, which has no caller
// waiting with a deadline of its own.
const issueTimeout = 30 * time.Second

// firstCredential obtains a stream's first certificate: in central mode,
// a new key and a certificate issued for it now, waiting for a free
// issuance slot; in agent mode, the pod's credential, if it has one yet.
func (s *Server) firstCredential(st *stream) (*material, error) {
	if s.mode == ModeAgent {
		s.mu.Lock()
		defer s.mu.Unlock()
		return s.cred, nil
	}
	select {
	case s.issuing <- struct{}{}:
	case <-st.ctx.Done():
		return nil, status.FromContextError(context.Cause(st.ctx)).Err()
	}
	defer func() { <-s.issuing }()
	var (
		m   *material
		err error
	)
	offload(func() { m, err = s.issue(st.ctx, st) })
	return m, err
}

// issue generates a key of the type the caller's policy prefers and has
// the CA certify it. The result is audited and counted by the edge; the
// error is the edge's gRPC status.
func (s *Server) issue(ctx context.Context, st *stream) (*material, error) {
	c := st.caller
	rule := s.cfg.CA.Rule(c.Namespace, c.ServiceAccount)
	call := s.cfg.Edge.StartFor(c, st.peer)
	key, err := ca.GenerateKey(rule.KeyTypes[0])
	if err != nil {
		return nil, call.End(fmt.Errorf("generate %s key: %w", rule.KeyTypes[0], err))
	}
	is, err := s.cfg.CA.IssueKey(ctx, c, key, 0)
	if err != nil {
		return nil, call.End(err)
	}
	call.Issued(is)
	keyPEM, err := encodeKey(key)
	if err != nil {
		return nil, call.End(err)
	}
	var chain strings.Builder
	chain.WriteString(is.CertPEM)
	// The chain stops below the root: proxies get roots from the bundle.
	for i, p := range is.ChainPEM {
		if i < len(is.ChainPEM)-1 {
			chain.WriteString(p)
		}
	}
	m := &material{chainPEM: []byte(chain.String()), keyPEM: keyPEM, serial: is.Serial,
		notBefore: is.NotBefore, notAfter: is.NotAfter,
		renewAt: is.RenewAt}
	return m, call.End(nil)
}

// scheduleLocked arranges st's renewal at at. st.mu is held.
func (s *Server) scheduleLocked(st *stream, at time.Time) {
	if s.mode != ModeCentral || st.ctx.Err() != nil {
		return
	}
	if st.timer != nil {
		st.timer.Stop()
	}
	st.timer = time.AfterFunc(time.Until(at), func() { s.queue.push(st) })
}

// renew replaces st's certificate, unless its credential no longer holds.
func (s *Server) renew(ctx context.Context, st *stream) {
	s.queue.done(st)
	if st.ctx.Err() != nil {
		return
	}
	if err := s.stillValid(st); err != nil {
		s.log.Info("ending an SDS stream: its credential no longer holds", "identity", st.ident.String(), "node", st.node, "reason", err.Error())
		st.end(err)
		return
	}
	ictx, cancel := context.WithTimeout(st.ctx, issueTimeout)
	m, err := s.issue(ictx, st)
	cancel()
	st.mu.Lock()
	defer st.mu.Unlock()
	if err != nil {
		if st.ctx.Err() != nil {
			return
		}
		st.failures++
		wait := backoff(s.cfg.RetryMin, s.cfg.RetryMax, st.failures)
		s.log.Warn("could not renew an SDS certificate; the proxy keeps its current one, retrying",
			"identity", st.ident.String(), "node", st.node, "attempt", st.failures, "retry_in", wait, "err", err)
		s.scheduleLocked(st, time.Now().Add(wait))
		return
	}
	old := st.cred
	if old != nil && !st.reissue {
		s.metrics.PushDelay.Observe(time.Since(old.renewAt).Seconds())
	}
	st.failures, st.reissue = 0, false
	st.cred = m
	st.fillLocked(kindCert, true)
	s.scheduleLocked(st, m.renewAt)
}

// stillValid checks that the credential st opened with still holds: the
// token has not expired, and the service account still exists as it was.
// The error is the gRPC status the stream ends with.
func (s *Server) stillValid(st *stream) error {
	c := st.caller
	if !c.ExpiresAt.IsZero() && time.Now().After(c.ExpiresAt) {
		return status.Errorf(codes.Unauthenticated, "the credential this stream opened with expired at %s; reconnect with a current token",
			c.ExpiresAt.UTC().Format(time.RFC3339))
	}
	if err := authn.CheckServiceAccount(s.cfg.ServiceAccounts, c); err != nil && errors.Is(err, authn.ErrUnauthenticated) {
		return status.Error(codes.Unauthenticated, err.Error())
	}
	return nil
}

// recheck ends, every RecheckInterval, the streams whose credential no
// longer holds.
func (s *Server) recheck(ctx context.Context) {
	t := time.NewTicker(s.cfg.RecheckInterval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		for _, st := range s.snapshotStreams() {
			if st.caller == nil {
				continue
			}
			if err := s.stillValid(st); err != nil {
				s.log.Info("ending an SDS stream: its credential no longer holds", "identity", st.ident.String(), "node", st.node, "reason", err.Error())
				st.end(err)
			}
		}
	}
}

// backoff is the wait before attempt n (from 1): exponential from min,
// capped at max, with full jitter in its upper half.
func backoff(minWait, maxWait time.Duration, n int) time.Duration {
	d := minWait
	for i := 1; i < n && d < maxWait; i++ {
		d *= 2
	}
	d = min(d, maxWait)
	return d/2 + rand.N(d/2+1)
}

// renewQueue holds the streams due for renewal, in order.
type renewQueue struct {
	mu     sync.Mutex
	items  []*stream
	signal chan struct{}
}

func (q *renewQueue) push(st *stream) {
	st.mu.Lock()
	if st.queued {
		st.mu.Unlock()
		return
	}
	st.queued = true
	st.mu.Unlock()
	q.mu.Lock()
	q.items = append(q.items, st)
	q.mu.Unlock()
	select {
	case q.signal <- struct{}{}:
	default:
	}
}

// pop returns the next stream, waiting for one; nil once ctx is done.
func (q *renewQueue) pop(ctx context.Context) *stream {
	for {
		q.mu.Lock()
		if len(q.items) > 0 {
			st := q.items[0]
			q.items[0] = nil
			q.items = q.items[1:]
			more := len(q.items) > 0
			q.mu.Unlock()
			if more {
				select {
				case q.signal <- struct{}{}:
				default:
				}
			}
			return st
		}
		q.mu.Unlock()
		select {
		case <-ctx.Done():
			return nil
		case <-q.signal:
		}
	}
}

// done marks st as out of the queue.
func (q *renewQueue) done(st *stream) {
	st.mu.Lock()
	st.queued = false
	st.mu.Unlock()
}
