// Package backends chooses and builds the signing backend named in the
// configuration: one explicit switch over Config.Type, nothing registered
// behind the scenes.
package backends

import (
	"errors"
	"fmt"
	"log/slog"

	"github.com/meshca/meshca/backends/plugged"
	"github.com/meshca/meshca/backends/selfsigned"
	"github.com/meshca/meshca/ca"
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

// New builds the backend cfg.Type names. log is used when the backend's own
// Log is unset. The result may also implement ca.Inspector and ca.Runner;
// the caller must run a ca.Runner for the backend to stay current.
func New(cfg Config, log *slog.Logger) (ca.Backend, error) {
	switch cfg.Type {
	case TypeSelfSigned:
		if cfg.SelfSigned.Log == nil {
			cfg.SelfSigned.Log = log
		}
		b, err := selfsigned.New(cfg.SelfSigned)
		if err != nil {
			return nil, fmt.Errorf("new backend: %w", err)
		}
		return b, nil
	case TypePlugged:
		if cfg.Plugged.Log == nil {
			cfg.Plugged.Log = log
		}
		b, err := plugged.New(cfg.Plugged)
		if err != nil {
			return nil, fmt.Errorf("new backend: %w", err)
		}
		return b, nil
	}
	return nil, fmt.Errorf("new backend: %s", unknownType(cfg.Type))
}

func unknownType(t string) string {
	return fmt.Sprintf("backend.type: unknown backend type %q, want one of %s", t, knownTypes)
}
