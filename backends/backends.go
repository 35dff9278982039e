// Package backends chooses and builds the signing backend named in the
// configuration: one explicit switch over Config.Type, nothing registered
// behind the scenes.
package backends

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"time"

	"github.com/meshca/meshca/backends/plugged"
	"github.com/meshca/meshca/backends/selfsigned"
	"github.com/meshca/meshca/ca"
	"github.com/meshca/meshca/ca/reload"
)

// Backend types for Config.Type.
const (
	TypeSelfSigned = "selfsigned"
	TypePlugged    = "plugged"
)

// knownTypes lists the backend types New builds, for error messages.
const knownTypes = TypeSelfSigned + ", " + TypePlugged

// Config is the `backend` section of the configuration. Only the
// sub-section named by Type is used; the others are ignored.
type Config struct {
	// Type is the backend: "selfsigned" or "plugged". Required (the
	// configuration loader defaults it to selfsigned).
	Type       string            `yaml:"type"`
	SelfSigned selfsigned.Config `yaml:"selfSigned"`
	Plugged    plugged.Config    `yaml:"plugged"`
}

// Validate checks the chosen backend's section, reporting problems by
// dotted path (backend.type, backend.selfSigned.keyType, ...) joined with
// errors.Join. An unknown type is an error listing the known ones.
func (c Config) Validate() error {
	switch c.Type {
	case TypeSelfSigned:
		return c.SelfSigned.Validate()
	case TypePlugged:
		return c.Plugged.Validate()
	}
	return errors.New(unknownType(c.Type))
}

// Deps are the runtime inputs of every backend, apart from its
// configuration: the YAML types above stay the file's schema.
type Deps struct {
	// Log receives operational logs. Default: discard.
	Log *slog.Logger
	// Now is the clock. Default time.Now.
	Now func() time.Time
	// Reloads counts reloads of backend files. Optional.
	Reloads *reload.Metrics
}

// New builds the backend cfg.Type names: a ca.Holder, ca.Authority or
// ca.Upstream for ca.New, which also needs cfg.IntermediateConfig(). ctx
// bounds any start-up I/O (an upstream login, for backends that have one).
func New(ctx context.Context, cfg Config, deps Deps) (ca.Backend, error) {
	if err := ctx.Err(); err != nil {
		return nil, fmt.Errorf("new backend: %w", err)
	}
	switch cfg.Type {
	case TypeSelfSigned:
		b, err := selfsigned.New(cfg.SelfSigned, selfsigned.Deps{Log: deps.Log, Now: deps.Now})
		if err != nil {
			return nil, fmt.Errorf("new backend: %w", err)
		}
		return b, nil
	case TypePlugged:
		b, err := plugged.New(cfg.Plugged, plugged.Deps{Log: deps.Log, Now: deps.Now, Reloads: deps.Reloads})
		if err != nil {
			return nil, fmt.Errorf("new backend: %w", err)
		}
		return b, nil
	}
	return nil, fmt.Errorf("new backend: %s", unknownType(cfg.Type))
}

// IntermediateConfig is the shape of the intermediates the CA core
// generates when the backend is a ca.Authority.
func (c Config) IntermediateConfig() ca.IntermediateConfig {
	if c.Type == TypeSelfSigned {
		return c.SelfSigned.IntermediateConfig()
	}
	return ca.IntermediateConfig{}
}

func unknownType(t string) string {
	return fmt.Sprintf("backend.type: unknown backend type %q, want one of %s", t, knownTypes)
}
