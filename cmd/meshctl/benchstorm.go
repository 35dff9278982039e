package main

import (
	"bufio"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"sync"
	"sync/atomic"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	pb "istio.io/api/security/v1alpha1"
)

// stormArgs is what a renewal storm needs.
type stormArgs struct {
	addr, caCert         string
	renewers, renewConns int
	mint                 func(ns, sa string) (string, error)
	trustDomain          string
}

// storm is a running renewal storm: renewers workloads renewing with their
// client certificates, back to back.
type storm struct {
	renewed, shed, other atomic.Int64
	done                 chan struct{}
	wg                   sync.WaitGroup
	conns                []certClient
}

// startStorm gives each renewing workload a certificate (with a token),
// then starts the renewals, each with its certificate alone, on a
// connection of its own.
func startStorm(ctx context.Context, a stormArgs) (*storm, error) {
	st := &storm{done: make(chan struct{})}
	csrs := make([]string, a.renewConns)
	first, err := dial(a.addr, a.caCert)
	if err != nil {
		return nil, err
	}
	defer first.Close()
	firstClient := pb.NewIstioCertificateServiceClient(first)
	// The renewers' client is light on CPU (h2Conn) when each has a
	// connection of its own: the storm shares the cores with meshca and
	// with the new pods whose latency is measured.
	kind := clientGRPC
	if a.renewConns >= a.renewers {
		kind = clientH2
	}
	for i := range csrs {
		tok, err := a.mint("admission", fmt.Sprintf("renewer-%d", i))
		if err != nil {
			return nil, err
		}
		id, err := idFromToken(tok, a.trustDomain)
		if err != nil {
			return nil, err
		}
		k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		if err != nil {
			return nil, err
		}
		csr, err := makeCSR(k, id)
		if err != nil {
			return nil, err
		}
		resp, err := firstClient.CreateCertificate(withToken(ctx, tok), &pb.IstioCertificateRequest{Csr: string(csr)}, grpc.WaitForReady(true))
		if err != nil {
			return nil, fmt.Errorf("first certificate for a renewing workload: %w", err)
		}
		cfg, err := tlsWithCert(a.addr, a.caCert, k, resp.CertChain)
		if err != nil {
			return nil, err
		}
		conn, err := newCertClient(ctx, kind, a.addr, cfg)
		if err != nil {
			return nil, err
		}
		st.conns = append(st.conns, conn)
		csrs[i] = string(csr)
	}
	for w := range a.renewers {
		st.wg.Go(func() {
			c, csr := st.conns[w%len(st.conns)], csrs[w%len(csrs)]
			for {
				select {
				case <-st.done:
					return
				default:
				}
				cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
				_, err := c.CreateCertificate(cctx, "", &pb.IstioCertificateRequest{Csr: csr})
				cancel()
				switch status.Code(err) {
				case codes.OK:
					st.renewed.Add(1)
				case codes.ResourceExhausted:
					// A well-behaved client comes back when told to.
					st.shed.Add(1)
					select {
					case <-st.done:
					case <-time.After(retryAfter(err)):
					}
				default:
					st.other.Add(1)
				}
			}
		})
	}
	return st, nil
}

// stop ends the storm and closes its connections.
func (st *storm) stop() {
	close(st.done)
	st.wg.Wait()
	for _, c := range st.conns {
		c.Close()
	}
}

// stormChild is the storm process: it storms until in closes, and answers
// each line read from in with its counts.
func stormChild(ctx context.Context, a stormArgs, in io.Reader, out io.Writer) error {
	st, err := startStorm(ctx, a)
	if err != nil {
		return err
	}
	defer st.stop()
	fmt.Fprintln(out, "storming")
	sc := bufio.NewScanner(in)
	for sc.Scan() {
		fmt.Fprintf(out, "%d %d %d\n", st.renewed.Load(), st.shed.Load(), st.other.Load())
	}
	return nil
}

// stormCounts are a storm child's counts.
type stormCounts struct{ renewed, shed, other int64 }

// childStorm is a storm child process.
type childStorm struct {
	cmd *exec.Cmd
	in  io.WriteCloser
	out *bufio.Scanner
}

// startStormChild runs this program as a storm child with the same
// arguments and waits until it storms.
func startStormChild(ctx context.Context, args []string, stderr io.Writer) (*childStorm, error) {
	self, err := os.Executable()
	if err != nil {
		return nil, err
	}
	cmd := exec.CommandContext(ctx, self, append([]string{"bench-admission", "--storm-only"}, args...)...)
	cmd.Stderr = stderr
	in, err := cmd.StdinPipe()
	if err != nil {
		return nil, err
	}
	outPipe, err := cmd.StdoutPipe()
	if err != nil {
		return nil, err
	}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("start the storm process: %w", err)
	}
	c := &childStorm{cmd: cmd, in: in, out: bufio.NewScanner(outPipe)}
	if !c.out.Scan() || c.out.Text() != "storming" {
		_ = c.stop()
		return nil, errors.New("the storm process did not start storming")
	}
	return c, nil
}

// counts asks the child for its counts.
func (c *childStorm) counts() (stormCounts, error) {
	var n stormCounts
	if _, err := fmt.Fprintln(c.in); err != nil {
		return n, fmt.Errorf("storm process: %w", err)
	}
	if !c.out.Scan() {
		return n, errors.New("storm process: no counts")
	}
	_, err := fmt.Sscanf(c.out.Text(), "%d %d %d", &n.renewed, &n.shed, &n.other)
	return n, err
}

// stop ends the child and waits for it.
func (c *childStorm) stop() error {
	c.in.Close()
	if err := c.cmd.Wait(); err != nil {
		return fmt.Errorf("storm process: %w", err)
	}
	return nil
}
