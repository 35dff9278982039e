package config

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"time"

	"go.yaml.in/yaml/v3"

	"github.com/meshca/meshca/ca"
	"github.com/meshca/meshca/ca/reload"
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
// It also returns the contents it parsed, for PolicyWatcher.Loaded.
func LoadPolicy(path string) (*ca.Policy, reload.Snapshot, error) {
	if path == "" {
		return &ca.Policy{}, reload.Snapshot{}, nil
	}
	snap := reload.Read(path)
	f := snap.Files[path]
	if f.Err != nil {
		return nil, snap, fmt.Errorf("read policy: %w", f.Err)
	}
	p, err := ParsePolicy(f.Data)
	if err != nil {
		return nil, snap, fmt.Errorf("policy %s: %w", path, err)
	}
	return p, snap, nil
}

// PolicyWatcher puts a changed policy file in force, by package reload's
// rules: a change is applied once two checks in a row read the same new
// contents. A new policy that fails to read, parse or validate is logged
// and counted, and the last good one stays in force; the same bad contents
// are not reported again.
type PolicyWatcher struct {
	// Path is the policy file. Required.
	Path string
	// Store receives each valid new policy. Required.
	Store *ca.PolicyStore
	// Loaded is the contents of the policy in force when Run starts (from
	// LoadPolicy), so an edit made between loading and Run is not mistaken
	// for the baseline.
	Loaded reload.Snapshot
	// Interval between checks. Default 5s.
	Interval time.Duration
	// Metrics counts reloads as what="policy". Optional.
	Metrics *reload.Metrics
	Log     *slog.Logger
	// Check refuses a new policy the backend cannot serve (an
	// intermediate too short for its maxTTL). Optional.
	Check func(*ca.Policy) error
}

// Run checks the file every Interval until ctx is done.
func (w *PolicyWatcher) Run(ctx context.Context) error {
	p := &reload.Poller{
		Paths: []string{w.Path}, Interval: w.Interval, What: "policy", Metrics: w.Metrics, Log: w.Log,
		Apply: func(snap reload.Snapshot) error {
			f := snap.Files[w.Path]
			if f.Err != nil {
				return fmt.Errorf("read policy: %w", f.Err)
			}
			p, err := ParsePolicy(f.Data)
			if err != nil {
				return err
			}
			if w.Check != nil {
				if err := w.Check(p); err != nil {
					return err
				}
			}
			return w.Store.Store(p)
		},
	}
	return p.Run(ctx, w.Loaded)
}
