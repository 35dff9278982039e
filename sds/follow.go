package sds

import (
	"context"
	"crypto/x509"
	"math/rand/v2"
	"sync"
	"time"

	"github.com/meshca/meshca/ca"
)

// followCA applies the CA's changes, one at a time and in order, until ctx
// is done: a new bundle goes to every stream first; certificates under a
// new root wait until every stream accepted the bundle that holds it.
func (s *Server) followCA(ctx context.Context) {
	var (
		mu      sync.Mutex
		pending []ca.Change
		signal  = make(chan struct{}, 1)
	)
	cancel := s.cfg.CA.Subscribe(func(ch ca.Change) {
		mu.Lock()
		pending = append(pending, ch)
		mu.Unlock()
		select {
		case signal <- struct{}{}:
		default:
		}
	})
	defer cancel()
	retire := time.NewTimer(time.Hour)
	retire.Stop()
	defer retire.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-retire.C:
			s.setBundle(s.cfg.CA.State().Roots)
		case <-signal:
			mu.Lock()
			changes := pending
			pending = nil
			mu.Unlock()
			for _, ch := range changes {
				s.applyChange(ctx, ch)
			}
		}
		if next := s.nextRetirement(); !next.IsZero() {
			retire.Reset(time.Until(next))
		}
	}
}

// applyChange serves one change of the CA's state.
func (s *Server) applyChange(ctx context.Context, ch ca.Change) {
	prev := s.currentBundle()
	if ch.SigningChanged && ch.Old.Signing != nil {
		old := ch.Old.Signing.Root()
		if !containsRoot(ch.New.Roots, old) && time.Now().Before(ch.OldLeavesUntil) {
			s.mu.Lock()
			s.retired[string(old.Raw)] = retiredRoot{root: old, until: ch.OldLeavesUntil}
			s.mu.Unlock()
			s.log.Info("a root left the CA's trust bundle; SDS keeps serving it until the leaves signed under it expire",
				"root", old.Subject.String(), "until", ch.OldLeavesUntil)
		}
	}
	cur := s.setBundle(ch.New.Roots)
	if !ch.SigningChanged || ch.New.Signing == nil {
		return
	}
	if !containsRoot(prev.roots, ch.New.Signing.Root()) {
		s.awaitBundle(ctx, cur.seq)
	}
	s.reissueAll()
}

// setBundle makes roots, with the retired roots still in use, the bundle
// in force, and pushes it to every stream if it changed.
func (s *Server) setBundle(roots []*x509.Certificate) *servedBundle {
	now := time.Now()
	s.mu.Lock()
	all := append([]*x509.Certificate(nil), roots...)
	for k, r := range s.retired {
		switch {
		case !now.Before(r.until):
			delete(s.retired, k)
		case !containsRoot(all, r.root):
			all = append(all, r.root)
		}
	}
	if sameRoots(all, s.bundle.roots) {
		b := s.bundle
		s.mu.Unlock()
		return b
	}
	b := newServedBundle(s.bundle.seq+1, all)
	s.bundle = b
	s.mu.Unlock()
	s.log.Info("trust bundle changed; pushing it to every SDS stream", "bundle", b.hash, "roots", len(all))
	for _, st := range s.snapshotStreams() {
		st.pushBundle(b)
	}
	return b
}

// nextRetirement is when the next retired root leaves the bundle.
func (s *Server) nextRetirement() time.Time {
	s.mu.Lock()
	defer s.mu.Unlock()
	var next time.Time
	for _, r := range s.retired {
		if next.IsZero() || r.until.Before(next) {
			next = r.until
		}
	}
	return next
}

// awaitBundle waits until every stream that subscribes to a bundle
// accepted bundle seq, or BundleAckTimeout passed.
func (s *Server) awaitBundle(ctx context.Context, seq uint64) {
	deadline := time.Now().Add(s.cfg.BundleAckTimeout)
	t := time.NewTicker(20 * time.Millisecond)
	defer t.Stop()
	for {
		behind := 0
		for _, st := range s.snapshotStreams() {
			if !st.bundleAccepted(seq) {
				behind++
			}
		}
		if behind == 0 {
			return
		}
		if !time.Now().Before(deadline) {
			s.log.Warn("streams did not accept the new trust bundle in time; pushing certificates under the new root anyway",
				"streams_behind", behind, "waited", s.cfg.BundleAckTimeout)
			return
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

// reissueAll gives every stream holding a certificate a new one, spread
// over ReissueSpread: the signing CA changed.
func (s *Server) reissueAll() {
	n := 0
	for _, st := range s.snapshotStreams() {
		st.mu.Lock()
		if st.cred != nil {
			st.reissue = true
			s.scheduleLocked(st, time.Now().Add(rand.N(s.cfg.ReissueSpread)))
			n++
		}
		st.mu.Unlock()
	}
	if n > 0 {
		s.log.Info("signing CA changed; re-issuing every SDS certificate", "streams", n, "over", s.cfg.ReissueSpread)
	}
}

// followSource serves the Source's snapshots (agent mode) until ctx is
// done: the bundle first, then, once streams accepted it, the credential.
func (s *Server) followSource(ctx context.Context) {
	for {
		snap, changed := s.cfg.Source.Watch()
		prev := s.currentBundle()
		cur := s.setBundle(snap.Bundle.Roots)
		s.mu.Lock()
		newCred := snap.Credential != nil && snap.Credential != s.src
		s.mu.Unlock()
		if newCred {
			m, err := encodeCredential(snap.Credential)
			if err != nil {
				s.log.Error("cannot serve the agent's credential", "err", err)
			} else {
				if cur != prev {
					s.awaitBundle(ctx, cur.seq)
				}
				s.mu.Lock()
				s.src, s.cred = snap.Credential, m
				s.mu.Unlock()
				for _, st := range s.snapshotStreams() {
					if cert, _ := st.wants(); cert {
						st.pushCred(m)
					}
				}
			}
		}
		select {
		case <-ctx.Done():
			return
		case <-changed:
		}
	}
}
