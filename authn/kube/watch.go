package kube

import (
	"context"
	"errors"
	"log/slog"
	"sync/atomic"

	toolscache "k8s.io/client-go/tools/cache"
)

// watch is a shared informer that an index runs once and asks whether it
// has synced: what ServiceAccountIndex and PodIndex have in common.
type watch struct {
	informer toolscache.SharedIndexInformer
	log      *slog.Logger
	// what names the watched kind in logs and errors, e.g. "pods".
	what    string
	started atomic.Bool
	synced  atomic.Bool // latches HasSynced, which takes a lock per call
}

// Run lists and watches until ctx is done, then returns nil. It may be
// called once.
func (w *watch) Run(ctx context.Context) error {
	if !w.started.CompareAndSwap(false, true) {
		return errors.New("run " + w.what + " index: already running")
	}
	w.log.Info("watching " + w.what)
	w.informer.Run(ctx.Done())
	return nil
}

// HasSynced reports whether the index has listed every object once.
func (w *watch) HasSynced() bool {
	if w.synced.Load() {
		return true
	}
	if w.informer.HasSynced() {
		w.synced.Store(true)
		return true
	}
	return false
}
