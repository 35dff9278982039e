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

	"github.com/prometheus/client_golang/prometheus"

	"github.com/meshca/meshca/backends/awspca"
	"github.com/meshca/meshca/backends/plugged"
	"github.com/meshca/meshca/backends/selfsigned"
	"github.com/meshca/meshca/backends/vault"
	"github.com/meshca/meshca/ca"
	"github.com/meshca/meshca/ca/reload"
)

// Backend types for Config.Type.
const (
	TypeSelfSigned = "selfsigned"
	TypePlugged    = "plugged"
	TypeVault      = "vault"
	TypeAWSPCA     = "awspca"
)

// knownTypes lists the backend types New builds, for error messages.
const knownTypes = TypeSelfSigned + ", " + TypePlugged + ", " + TypeVault + ", " + TypeAWSPCA

// Config is the `backend` section of the configuration. Only the
// sub-section named by Type is used; the others are ignored.
type Config struct {
	// Type is the backend: "selfsigned", "plugged", "vault" or "awspca".
	// Required (the configuration loader defaults it to selfsigned).
	Type       string            `yaml:"type"`
	SelfSigned selfsigned.Config `yaml:"selfSigned"`
	Plugged    plugged.Config    `yaml:"plugged"`
	Vault      vault.Config      `yaml:"vault"`
	AWSPCA     awspca.Config     `yaml:"awsPCA"`
	// Upstream bounds the calls to a remote backend (vault, awspca).
	Upstream Upstream `yaml:"upstream"`
}

// Upstream bounds meshca's calls to a remote signing backend. The loader
// fills the defaults.
type Upstream struct {
	// BundleRefreshInterval is how often the upstream's trust bundle is
	// read again; it is also the upstream's health probe.
	BundleRefreshInterval time.Duration `yaml:"bundleRefreshInterval"`
	// Timeout bounds each call (a mint, a leaf, a bundle read).
	Timeout time.Duration `yaml:"timeout"`
	// MaxInFlight bounds the leaf-signing calls in flight (direct mode).
	MaxInFlight int `yaml:"maxInFlight"`
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
	case TypeVault:
		return errors.Join(c.Vault.Validate(), c.Upstream.validate())
	case TypeAWSPCA:
		return errors.Join(c.AWSPCA.Validate(), c.Upstream.validate())
	}
	return errors.New(unknownType(c.Type))
}

func (u Upstream) validate() error {
	var errs []error
	if u.BundleRefreshInterval < time.Second {
		errs = append(errs, fmt.Errorf("backend.upstream.bundleRefreshInterval: must be at least 1s, got %s", u.BundleRefreshInterval))
	}
	if u.Timeout < time.Second {
		errs = append(errs, fmt.Errorf("backend.upstream.timeout: must be at least 1s, got %s", u.Timeout))
	}
	if u.MaxInFlight < 1 {
		errs = append(errs, fmt.Errorf("backend.upstream.maxInFlight: must be at least 1, got %d", u.MaxInFlight))
	}
	return errors.Join(errs...)
}

// UsesIntermediate says meshca generates and rotates an intermediate that
// the backend signs, and names the setting of its lifetime.
func (c Config) UsesIntermediate() (bool, string) {
	switch c.Type {
	case TypeSelfSigned:
		return c.SelfSigned.Intermediate, "backend.selfSigned.intermediateTTL"
	case TypeVault:
		return c.Vault.Mode != vault.ModeDirect, "backend.vault.intermediateTTL"
	case TypeAWSPCA:
		return c.AWSPCA.Mode != awspca.ModeDirect, "backend.awsPCA.intermediateTTL"
	}
	return false, ""
}

// CheckPolicy refuses a backend that cannot serve the policy: an
// intermediate too short-lived for its leaves (ca.Policy.CheckIntermediateRoom).
func (c Config) CheckPolicy(p *ca.Policy) error {
	if ok, setting := c.UsesIntermediate(); ok {
		return p.CheckIntermediateRoom(c.IntermediateConfig(), setting)
	}
	return nil
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
	// Registerer receives a remote backend's metrics. Optional.
	Registerer prometheus.Registerer
	// MaxLeafTTL is the policy's longest maxTTL, which a direct-mode
	// upstream must be able to issue. 0 skips the check.
	MaxLeafTTL time.Duration
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
	case TypeVault:
		b, err := vault.New(ctx, cfg.Vault, vault.Deps{Log: deps.Log, Now: deps.Now, Registerer: deps.Registerer, MaxLeafTTL: deps.MaxLeafTTL})
		if err != nil {
			return nil, fmt.Errorf("new backend: %w", err)
		}
		return b, nil
	case TypeAWSPCA:
		b, err := awspca.New(ctx, cfg.AWSPCA, awspca.Deps{Log: deps.Log, Now: deps.Now, Registerer: deps.Registerer})
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
	switch c.Type {
	case TypeSelfSigned:
		return c.SelfSigned.IntermediateConfig()
	case TypeVault:
		return c.Vault.IntermediateConfig()
	case TypeAWSPCA:
		return c.AWSPCA.IntermediateConfig()
	}
	return ca.IntermediateConfig{}
}

func unknownType(t string) string {
	return fmt.Sprintf("backend.type: unknown backend type %q, want one of %s", t, knownTypes)
}
