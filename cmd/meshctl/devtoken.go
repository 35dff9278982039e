package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"io/fs"
	"time"

	"github.com/meshca/meshca/cmd/internal/config"
	"github.com/meshca/meshca/cmd/internal/devkey"
)

func devTokenCmd(args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("meshctl dev-token", flag.ContinueOnError)
	fs.SetOutput(stderr)
	cfgPath := fs.String("config", "", "meshca configuration file (default: the embedded dev configuration)")
	ns := fs.String("ns", "", "namespace (required)")
	sa := fs.String("sa", "", "service account (required)")
	pod := fs.String("pod", "", "pod name to bind the token to (optional)")
	ttl := fs.Duration("ttl", time.Hour, "token lifetime")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *ns == "" || *sa == "" {
		return errors.New("dev-token needs --ns and --sa")
	}
	if *ttl <= 0 {
		return fmt.Errorf("--ttl must be positive, got %s", *ttl)
	}
	tok, err := mintDevToken(*cfgPath, *ns, *sa, *pod, *ttl)
	if err != nil {
		return err
	}
	fmt.Fprintln(stdout, tok)
	return nil
}

// mintDevToken mints a token with the development key of the meshca
// configuration at cfgPath ("" = embedded dev config). It refuses any
// configuration that is not in dev mode: a production meshca verifies
// tokens from the cluster, and nothing should pretend to mint those.
func mintDevToken(cfgPath, ns, sa, pod string, ttl time.Duration) (string, error) {
	mint, err := devMinter(cfgPath)
	if err != nil {
		return "", err
	}
	return mint(ns, sa, pod, ttl)
}

// devMinter loads the configuration and its development key once, for
// callers that mint many tokens (meshctl bench).
func devMinter(cfgPath string) (func(ns, sa, pod string, ttl time.Duration) (string, error), error) {
	cfg, key, err := loadDevKey(cfgPath)
	if err != nil {
		return nil, err
	}
	return func(ns, sa, pod string, ttl time.Duration) (string, error) {
		return mintWith(cfg, key, ns, sa, pod, ttl)
	}, nil
}

// mintWith mints a token for ns/sa (bound to pod, if set) with key and the
// issuer and audiences cfg's meshca expects.
func mintWith(cfg *config.Config, key *devkey.Key, ns, sa, pod string, ttl time.Duration) (string, error) {
	return key.Mint(devkey.Claims{
		Issuer: cfg.Authn.Issuer, Audiences: cfg.Authn.Audiences,
		Namespace: ns, ServiceAccount: sa, PodName: pod, TTL: ttl,
	})
}

// loadDevKey loads the meshca configuration at cfgPath ("" = embedded dev
// config) and its development key, for callers that mint many tokens. It
// refuses a configuration that is not in dev mode.
func loadDevKey(cfgPath string) (*config.Config, *devkey.Key, error) {
	cfg, err := loadMeshcaConfig(cfgPath)
	if err != nil {
		return nil, nil, err
	}
	if !cfg.Dev.Enabled {
		return nil, nil, errors.New("refusing: this configuration is not in dev mode (dev.enabled is false); dev-token only mints tokens for `meshca serve --dev`")
	}
	key, err := devkey.Load(cfg.Dev.Dir)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil, fmt.Errorf("no development key in %s: start `meshca serve --dev` (make run) first, from the same directory", cfg.Dev.Dir)
	}
	if err != nil {
		return nil, nil, err
	}
	return cfg, key, nil
}

// loadMeshcaConfig loads the meshca configuration at cfgPath, or the
// embedded dev configuration when cfgPath is "".
func loadMeshcaConfig(cfgPath string) (*config.Config, error) {
	if cfgPath == "" {
		return config.LoadDev()
	}
	return config.Load(cfgPath)
}
