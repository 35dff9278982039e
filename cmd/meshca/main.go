// Command meshca is the certificate authority server.
//
//	meshca serve --config FILE      serve with a configuration file
//	meshca serve --dev              serve the embedded no-cluster dev config
//	meshca policy explain --config FILE NS/SA
//	meshca config check --config FILE  validate a configuration and its policy
//	meshca config dev                  print the embedded dev configuration
//	meshca agent [flags]               per-pod SDS and SPIFFE Workload API on a Unix socket
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"syscall"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	err := run(ctx, os.Args[1:], os.Stdout, os.Stderr)
	stop()
	if err != nil {
		if !errors.Is(err, flag.ErrHelp) {
			fmt.Fprintln(os.Stderr, "meshca:", err)
		}
		os.Exit(2)
	}
}

const usage = `usage:
  meshca serve (--config FILE | --dev) [--log-level LEVEL] [--grpc-address ADDR] [--admin-address ADDR]
  meshca policy explain --config FILE NAMESPACE/SERVICEACCOUNT
  meshca config check --config FILE
  meshca config dev
  meshca agent [--ca-address ADDR] [--ca-roots FILE] [--token-file FILE] [--socket PATH] ... (meshca agent -h lists them)`

func run(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	if len(args) == 0 {
		fmt.Fprintln(stderr, usage)
		return flag.ErrHelp
	}
	switch args[0] {
	case "serve":
		return serveCmd(ctx, args[1:], stderr)
	case "agent":
		return agentCmd(ctx, args[1:], stderr)
	case "policy":
		if len(args) < 2 || args[1] != "explain" {
			return fmt.Errorf("unknown policy command; %s", usage)
		}
		return explainCmd(args[2:], stdout, stderr)
	case "config":
		switch {
		case len(args) >= 2 && args[1] == "dev":
			return printDevConfig(stdout)
		case len(args) >= 2 && args[1] == "check":
			return checkCmd(args[2:], stdout, stderr)
		}
		return fmt.Errorf("unknown config command; %s", usage)
	case "-h", "--help", "help":
		fmt.Fprintln(stdout, usage)
		return nil
	default:
		return fmt.Errorf("unknown command %q\n%s", args[0], usage)
	}
}
