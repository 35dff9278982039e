// Command meshctl is meshca's operator CLI.
//
//	meshctl dev-token --ns N --sa S     mint a development token (dev mode only)
//	meshctl issue --token T             ask a running meshca for a certificate
//	meshctl bench                       load-test a running meshca (or, --storm, a burst of new connections)
//	meshctl svid --socket PATH          fetch an SVID from meshca agent's Workload API
//	meshctl proxies                     list the proxies on meshca's SDS, soonest expiry first
//	meshctl bench-sds                   hold 10,000 SDS streams on a running dev meshca
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
			fmt.Fprintln(os.Stderr, "meshctl:", err)
		}
		os.Exit(1)
	}
}

const usage = `usage:
  meshctl dev-token [--config FILE] --ns NAMESPACE --sa SERVICEACCOUNT [--pod NAME] [--ttl 1h]
  meshctl issue [--addr HOST:PORT] [--ca-cert FILE] --token TOKEN|@FILE [--ttl 1h] [--key ecdsa|rsa] [--out DIR]
  meshctl bench [--addr HOST:PORT] [--ca-cert FILE] [--concurrency 1,8,64] [--conns 0] [--duration 10s] [--metrics URL]
  meshctl bench --storm 250,1000 [--addr HOST:PORT] [--ca-cert FILE] [--metrics URL]
  meshctl svid [--socket PATH] [--out DIR]
  meshctl proxies [--admin URL] [--json]
  meshctl bench-sds [--config FILE] [--addr HOST:PORT] [--ca-cert FILE] [--conns 100] [--streams-per-conn 100] [--admin URL] [--profile DIR]
  meshctl bench-sds --config FILE --init-ca
  meshctl bench-admission [--renewers 64] [--renew-conns 16] [--pod-rate 100] [--idle 5s] [--storm 10s]`

func run(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	if len(args) == 0 {
		fmt.Fprintln(stderr, usage)
		return flag.ErrHelp
	}
	switch args[0] {
	case "dev-token":
		return devTokenCmd(args[1:], stdout, stderr)
	case "issue":
		return issueCmd(ctx, args[1:], stdout, stderr)
	case "bench":
		return benchCmd(ctx, args[1:], stdout, stderr)
	case "svid":
		return svidCmd(ctx, args[1:], stdout, stderr)
	case "proxies":
		return proxiesCmd(ctx, args[1:], stdout, stderr)
	case "bench-admission":
		return benchAdmissionCmd(ctx, args[1:], stdout, stderr)
	case "bench-sds":
		return benchSDSCmd(ctx, args[1:], stdout, stderr)
	case "-h", "--help", "help":
		fmt.Fprintln(stdout, usage)
		return nil
	default:
		return fmt.Errorf("unknown command %q\n%s", args[0], usage)
	}
}
