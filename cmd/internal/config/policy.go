package config

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"time"

	"go.yaml.in/yaml/v3"

	"github.com/meshca/meshca/ca"
)

// ParsePolicy strictly decodes and validates a rotation policy. An empty
// document is refused: it is far more often a truncated file than a wish
// for the built-in defaults, which `default: {}` states explicitly.
func ParsePolicy(data []byte) (*ca.Policy, error) {
	var doc yaml.Node
	if err := yaml.Unmarshal(data, &doc); err == nil && len(doc.Content) == 0 {
		return nil, errors.New("policy file is empty; write `default: {}` for the built-in defaults")
	}
	var p ca.Policy
	if err := decodeStrict(data, &p); err != nil {
		return nil, err
	}
	if err := p.Validate(); err != nil {
		return nil, err
	}
	return &p, nil
}

// LoadPolicy reads the policy file at path; "" gives the built-in defaults.
// It also returns the bytes it parsed, for PolicyWatcher.Loaded.
func LoadPolicy(path string) (*ca.Policy, []byte, error) {
	if path == "" {
		return &ca.Policy{}, nil, nil
	}
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, nil, fmt.Errorf("read policy: %w", err)
	}
	p, err := ParsePolicy(data)
	if err != nil {
		return nil, nil, fmt.Errorf("policy %s: %w", path, err)
	}
	return p, data, nil
}

// PolicyWatcher puts a changed policy file in force. It polls the file's
// contents rather than watching inotify events, which also catches the
// symlink swap Kubernetes uses to update a mounted ConfigMap.
type PolicyWatcher struct {
	// Path is the policy file. Required.
	Path string
	// Store receives each valid new policy. Required.
	Store *ca.PolicyStore
	// Loaded is the content of the policy in force when Run starts, so an
	// edit made between loading and Run is not mistaken for the baseline.
	// Nil reads the file when Run starts.
	Loaded []byte
	// Interval between checks. Default 5s.
	Interval time.Duration
	// OnReload, if set, is called after each attempt with its outcome.
	OnReload func(err error)
	Log      *slog.Logger
}

// Run checks the file every Interval until ctx is done. A change is put in
// force only once two checks in a row read the same new contents, so a file
// caught half-written is never applied. A new policy that fails to parse or
// validate is logged and reported, and the last good one stays in force;
// the same bad contents are not reported again.
func (w *PolicyWatcher) Run(ctx context.Context) error {
	if w.Interval <= 0 {
		w.Interval = 5 * time.Second
	}
	log := w.Log
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	last := w.Loaded // the contents last acted on
	if last == nil {
		last, _ = os.ReadFile(w.Path)
	}
	// pending holds changed contents seen once, waiting to settle. It is a
	// pointer because empty contents are a state of their own, not "none".
	var pending *[]byte
	t := time.NewTicker(w.Interval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
		}
		data, err := os.ReadFile(w.Path)
		if err != nil {
			if last != nil {
				log.Error("policy file unreadable; keeping the policy in force", "path", w.Path, "err", err)
				w.report(err)
				last, pending = nil, nil
			}
			continue
		}
		if bytes.Equal(data, last) {
			pending = nil
			continue
		}
		if pending == nil || !bytes.Equal(data, *pending) {
			pending = &data
			continue
		}
		last, pending = data, nil
		p, err := ParsePolicy(data)
		if err == nil {
			err = w.Store.Store(p)
		}
		if err != nil {
			log.Error("new policy rejected; keeping the policy in force", "path", w.Path, "err", err)
		} else {
			log.Info("policy reloaded", "path", w.Path)
		}
		w.report(err)
	}
}

func (w *PolicyWatcher) report(err error) {
	if w.OnReload != nil {
		w.OnReload(err)
	}
}
