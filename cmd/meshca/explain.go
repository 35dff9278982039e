package main

import (
	"flag"
	"fmt"
	"io"
	"strings"
	"text/tabwriter"

	"github.com/meshca/meshca/ca"
	"github.com/meshca/meshca/cmd/internal/config"
)

func explainCmd(args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("meshca policy explain", flag.ContinueOnError)
	fs.SetOutput(stderr)
	cfgPath := fs.String("config", "", "meshca configuration file (its policy.file is explained)")
	dev := fs.Bool("dev", false, "explain the embedded dev configuration's policy")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() != 1 {
		return fmt.Errorf("policy explain takes one NAMESPACE/SERVICEACCOUNT argument, got %d", fs.NArg())
	}
	ns, sa, ok := strings.Cut(fs.Arg(0), "/")
	if !ok || ns == "" || sa == "" || strings.Contains(sa, "/") {
		return fmt.Errorf("want NAMESPACE/SERVICEACCOUNT, got %q", fs.Arg(0))
	}
	cfg, err := loadConfig(*cfgPath, *dev)
	if err != nil {
		return err
	}
	pol, _, err := config.LoadPolicy(cfg.Policy.File)
	if err != nil {
		return err
	}
	writeExplain(stdout, cfg.Policy.File, ns, sa, pol.Explain(ns, sa))
	return nil
}

func writeExplain(w io.Writer, file, ns, sa string, e ca.Effective) {
	if file == "" {
		file = "(none: built-in defaults)"
	}
	fmt.Fprintf(w, "policy file: %s\nidentity:    %s/%s\n\n", file, ns, sa)
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "FIELD\tVALUE\tFROM")
	keys := make([]string, len(e.KeyTypes))
	for i, k := range e.KeyTypes {
		keys[i] = string(k)
	}
	rows := [][2]string{
		{"defaultTTL", e.DefaultTTL.String()},
		{"minTTL", e.MinTTL.String()},
		{"maxTTL", e.MaxTTL.String()},
		{"renewFraction", fmt.Sprint(e.RenewFraction)},
		{"renewJitter", e.RenewJitter.String()},
		{"keyTypes", strings.Join(keys, ", ")},
	}
	for _, r := range rows {
		fmt.Fprintf(tw, "%s\t%s\t%s\n", r[0], r[1], e.Source[r[0]])
	}
	tw.Flush()
}

func loadConfig(path string, dev bool) (*config.Config, error) {
	switch {
	case path != "" && dev:
		return nil, fmt.Errorf("use --config or --dev, not both")
	case dev:
		return config.LoadDev()
	case path == "":
		return nil, fmt.Errorf("--config FILE is required (or --dev for the embedded development configuration)")
	default:
		return config.Load(path)
	}
}

// checkCmd validates a configuration file and the policy file it names,
// without starting anything: for CI pipelines and for a change at 3 a.m.
func checkCmd(args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("meshca config check", flag.ContinueOnError)
	fs.SetOutput(stderr)
	cfgPath := fs.String("config", "", "configuration file to check")
	if err := fs.Parse(args); err != nil {
		return err
	}
	cfg, err := loadConfig(*cfgPath, false)
	if err != nil {
		return err
	}
	pol, _, err := config.LoadPolicy(cfg.Policy.File)
	if err != nil {
		return err
	}
	if err := cfg.Backend.CheckPolicy(pol); err != nil {
		return err
	}
	fmt.Fprintf(stdout, "%s: valid (backend %s, authn %s)\n", *cfgPath, cfg.Backend.Type, strings.Join(cfg.Authn.Chain, ","))
	return nil
}

func printDevConfig(w io.Writer) error {
	_, err := w.Write(config.DevYAML())
	return err
}
