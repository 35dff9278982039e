package main

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"flag"
	"fmt"
	"io"
	"os"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc/status"
	pb "istio.io/api/security/v1alpha1"
)

// benchAdmissionCmd shows admission control at work: new pods' first
// certificates, at a steady rate, measured while meshca is idle and again
// during a renewal storm that saturates it (workloads renewing with their
// client certificates, as fast as meshca answers).
func benchAdmissionCmd(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("meshctl bench-admission", flag.ContinueOnError)
	fs.SetOutput(stderr)
	addr := fs.String("addr", defaultAddr, "meshca gRPC address")
	caCert := fs.String("ca-cert", defaultCACert, "PEM roots of meshca's serving certificate")
	cfgPath := fs.String("config", "", "meshca configuration, for the dev token key (default: embedded dev config)")
	renewers := fs.Int("renewers", 64, "concurrent renewals in the storm")
	renewConns := fs.Int("renew-conns", 0, "connections (each its own workload's client certificate) the renewals use (0: one per renewal in flight, as each proxy has its own)")
	podRate := fs.Int("pod-rate", 100, "new pods per second, in both phases")
	idle := fs.Duration("idle", 5*time.Second, "the idle phase")
	storm := fs.Duration("storm", 10*time.Second, "the storm phase")
	stormProcess := fs.Bool("storm-process", true, "run the renewal storm in a child process: renewing proxies are other processes than the new pods, so the new pods' client does not queue behind the storm's goroutines")
	stormOnly := fs.Bool("storm-only", false, "internal: be the storm process (renew until stdin closes; a line on stdin prints the counts)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *renewers < 1 || *renewConns < 0 || *podRate < 1 {
		return fmt.Errorf("--renewers and --pod-rate must be at least 1, and --renew-conns at least 0")
	}
	if *renewConns == 0 {
		*renewConns = *renewers
	}
	loadGenGC()
	cfg, key, err := loadDevKey(*cfgPath)
	if err != nil {
		return err
	}
	mint := func(ns, sa string) (string, error) { return mintWith(cfg, key, ns, sa, "", time.Hour) }
	sa := stormArgs{addr: *addr, caCert: *caCert, renewers: *renewers, renewConns: *renewConns, mint: mint, trustDomain: cfg.TrustDomain}
	if *stormOnly {
		return stormChild(ctx, sa, os.Stdin, stdout)
	}

	// New pods: a token and CSR each, never seen by meshca before.
	pods := *podRate * int((*idle + *storm + 2*time.Second).Seconds())
	fmt.Fprintf(stderr, "preparing %d new pods...\n", pods)
	type ask struct{ token, csr string }
	newPods := make([]ask, pods)
	for i := range newPods {
		tok, err := mint("admission", fmt.Sprintf("pod-%d-%d", time.Now().UnixNano()%1e6, i))
		if err != nil {
			return err
		}
		id, err := idFromToken(tok, cfg.TrustDomain)
		if err != nil {
			return err
		}
		k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		if err != nil {
			return err
		}
		csr, err := makeCSR(k, id)
		if err != nil {
			return err
		}
		newPods[i] = ask{tok, string(csr)}
	}
	podConn, err := dial(*addr, *caCert)
	if err != nil {
		return err
	}
	defer podConn.Close()
	podClient := pb.NewIstioCertificateServiceClient(podConn)

	var next atomic.Int64
	// podLoad sends new pods at podRate for d and returns their latencies.
	podLoad := func(d time.Duration) (lat []time.Duration, failed int) {
		var mu sync.Mutex
		var wg sync.WaitGroup
		tick := time.NewTicker(time.Second / time.Duration(*podRate))
		defer tick.Stop()
		end := time.After(d)
	loop:
		for {
			select {
			case <-end:
				break loop
			case <-tick.C:
			}
			i := int(next.Add(1)) - 1
			if i >= len(newPods) {
				break
			}
			wg.Go(func() {
				t0 := time.Now()
				cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
				_, err := podClient.CreateCertificate(withToken(cctx, newPods[i].token), &pb.IstioCertificateRequest{Csr: newPods[i].csr})
				cancel()
				mu.Lock()
				defer mu.Unlock()
				if err != nil {
					failed++
					return
				}
				lat = append(lat, time.Since(t0))
			})
		}
		wg.Wait()
		slices.Sort(lat)
		return lat, failed
	}

	where := "in this process"
	if *stormProcess {
		where = "in a child process"
	}
	fmt.Fprintf(stdout, "new pods at %d/s; storm (%s): %d renewals in flight over %d connections, each renewing with its client certificate\n", *podRate, where, *renewers, *renewConns)
	idleLat, idleFailed := podLoad(*idle)

	var (
		stormLat            []time.Duration
		stormFailed         int
		rate                float64
		shedCount, otherErr int64
	)
	if *stormProcess {
		child, err := startStormChild(ctx, args, stderr)
		if err != nil {
			return err
		}
		time.Sleep(time.Second) // let the storm build
		before, err := child.counts()
		if err != nil {
			return err
		}
		t0 := time.Now()
		stormLat, stormFailed = podLoad(*storm)
		elapsed := time.Since(t0)
		after, err := child.counts()
		if err != nil {
			return err
		}
		if err := child.stop(); err != nil {
			return err
		}
		rate = float64(after.renewed-before.renewed) / elapsed.Seconds()
		shedCount, otherErr = after.shed, after.other
	} else {
		st, err := startStorm(ctx, sa)
		if err != nil {
			return err
		}
		time.Sleep(time.Second) // let the storm build
		before := st.renewed.Load()
		t0 := time.Now()
		stormLat, stormFailed = podLoad(*storm)
		elapsed := time.Since(t0)
		rate = float64(st.renewed.Load()-before) / elapsed.Seconds()
		st.stop()
		shedCount, otherErr = st.shed.Load(), st.other.Load()
	}

	row := "%-24s %9s %9s %9s %8s\n"
	fmt.Fprintf(stdout, row, "new pods", "requests", "p50", "p99", "failed")
	fmt.Fprintf(stdout, row, "idle", fmt.Sprint(len(idleLat)), pct(idleLat, 0.5), pct(idleLat, 0.99), fmt.Sprint(idleFailed))
	fmt.Fprintf(stdout, row, "during the storm", fmt.Sprint(len(stormLat)), pct(stormLat, 0.5), pct(stormLat, 0.99), fmt.Sprint(stormFailed))
	fmt.Fprintf(stdout, "renewals during the storm: %.0f/s, %d told to retry later (ResourceExhausted, honoured), %d other errors\n", rate, shedCount, otherErr)
	if len(idleLat) == 0 || len(stormLat) == 0 {
		return fmt.Errorf("no new pod got a certificate")
	}
	ratio := float64(pctDur(stormLat, 0.99)) / float64(pctDur(idleLat, 0.99))
	verdict := "PASS"
	if ratio > 2 {
		verdict = "MISS"
	}
	fmt.Fprintf(stdout, "new-pod p99 during the storm / idle: %.2f× (target ≤ 2×) %s\n", ratio, verdict)
	return nil
}

// retryAfter is the RetryInfo hint of a status error, or 1s.
func retryAfter(err error) time.Duration {
	for _, d := range status.Convert(err).Details() {
		if ri, ok := d.(*errdetails.RetryInfo); ok {
			return ri.GetRetryDelay().AsDuration()
		}
	}
	return time.Second
}

func pctDur(sorted []time.Duration, q float64) time.Duration {
	return sorted[min(int(float64(len(sorted))*q), len(sorted)-1)]
}

// tlsWithCert is clientTLS presenting the certificate chain (leaf first,
// root dropped) with its key.
func tlsWithCert(addr, caCertFile string, key *ecdsa.PrivateKey, chainPEM []string) (*tls.Config, error) {
	cfg, err := clientTLS(addr, caCertFile)
	if err != nil {
		return nil, err
	}
	cert := tls.Certificate{PrivateKey: key}
	for _, p := range chainPEM[:max(1, len(chainPEM)-1)] {
		c, err := parsePEMCert(p)
		if err != nil {
			return nil, err
		}
		cert.Certificate = append(cert.Certificate, c.Raw)
	}
	cfg.Certificates = []tls.Certificate{cert}
	return cfg, nil
}
