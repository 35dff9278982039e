// Package reload watches files by polling their contents and hands each
// settled change to a callback: the one way meshca hot-reloads its policy
// and Istio's plugged CA files. Polling contents, rather than watching
// inotify events or modification times, also catches the symlink swap
// Kubernetes uses to update mounted ConfigMaps and Secrets.
//
// The torn-write rule, the same for every file set: a change is acted on
// only once two checks in a row, an interval apart, read the same new
// contents. A file caught half-written, or a set caught with some files
// replaced and others not, is never applied.
package reload

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/binary"
	"log/slog"
	"os"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promauto"
)

// Snapshot is the contents of a set of files, read once.
type Snapshot struct {
	// Files maps each path to its contents, or to the error reading it
	// (fs.ErrNotExist for a missing file).
	Files map[string]File
	hash  [sha256.Size]byte
}

// File is one file's contents, or why it could not be read.
type File struct {
	Data []byte
	Err  error
}

// Read reads paths. Read errors are recorded, not returned: they are part
// of what changed.
func Read(paths ...string) Snapshot {
	s := Snapshot{Files: make(map[string]File, len(paths))}
	h := sha256.New()
	for _, p := range paths {
		data, err := os.ReadFile(p)
		s.Files[p] = File{Data: data, Err: err}
		status := "ok"
		if err != nil {
			status = err.Error()
		}
		for _, part := range [][]byte{[]byte(p), []byte(status), data} {
			h.Write(binary.BigEndian.AppendUint64(nil, uint64(len(part))))
			h.Write(part)
		}
	}
	h.Sum(s.hash[:0])
	return s
}

// Equal reports whether s and o read the same contents and errors.
func (s Snapshot) Equal(o Snapshot) bool { return bytes.Equal(s.hash[:], o.hash[:]) }

// Metrics count reloads; one set serves every Poller of a process.
type Metrics struct {
	// Reloads counts reloads by what and result.
	Reloads *prometheus.CounterVec
}

// NewMetrics creates meshca_reloads_total on reg (nil: unregistered).
func NewMetrics(reg prometheus.Registerer) *Metrics {
	return &Metrics{Reloads: promauto.With(reg).NewCounterVec(prometheus.CounterOpts{
		Name: "meshca_reloads_total",
		Help: "Reloads of watched files, by what was reloaded (policy, backend) and result (success, failure).",
	}, []string{"what", "result"})}
}

// Poller calls Apply with each settled change of Paths.
type Poller struct {
	// Paths are the files, read in this order at each check. Required.
	Paths []string
	// Interval between checks. Default 5s.
	Interval time.Duration
	// What names the file set in logs and in meshca_reloads_total
	// ("policy", "backend").
	What string
	// Apply puts new contents in force, or returns why it cannot; the
	// last good contents then stay in force. It is not called again for
	// the same contents. Required.
	Apply func(Snapshot) error
	// Metrics counts each Apply by result. Optional.
	Metrics *Metrics
	// Log receives one line per Apply. Default: discard.
	Log *slog.Logger
}

// Run checks the files every Interval until ctx is done, then returns nil.
// baseline is the contents in force when Run starts (so an edit made
// between loading and Run is not mistaken for it).
func (p *Poller) Run(ctx context.Context, baseline Snapshot) error {
	interval := p.Interval
	if interval <= 0 {
		interval = 5 * time.Second
	}
	log := p.Log
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	last := baseline // the contents last acted on
	// pending holds changed contents seen once, waiting to settle.
	var pending *Snapshot
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
		}
		snap := Read(p.Paths...)
		if snap.Equal(last) {
			pending = nil
			continue
		}
		if pending == nil || !snap.Equal(*pending) {
			pending = &snap
			continue
		}
		last, pending = snap, nil
		result := "success"
		if err := p.Apply(snap); err != nil {
			result = "failure"
			log.Error("changed files rejected; keeping the last good ones in force", "what", p.What, "paths", p.Paths, "err", err)
		} else {
			log.Info("reloaded changed files", "what", p.What, "paths", p.Paths)
		}
		if p.Metrics != nil {
			p.Metrics.Reloads.WithLabelValues(p.What, result).Inc()
		}
	}
}
