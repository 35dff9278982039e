package main

import (
	"bufio"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"google.golang.org/grpc"
	pb "istio.io/api/security/v1alpha1"
)

// benchCmd drives a running meshca (in dev mode, so it can mint tokens)
// with pre-generated P-256 CSRs over reused TLS connections, and reads
// the server's own CPU and memory from its /metrics.
func benchCmd(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("meshctl bench", flag.ContinueOnError)
	fs.SetOutput(stderr)
	addr := fs.String("addr", defaultAddr, "meshca gRPC address")
	caCert := fs.String("ca-cert", defaultCACert, "PEM roots of meshca's serving certificate")
	cfgPath := fs.String("config", "", "meshca configuration, for the dev token key (default: embedded dev config)")
	levels := fs.String("concurrency", "1,8,64", "comma-separated concurrency levels")
	duration := fs.Duration("duration", 10*time.Second, "measured time per level")
	warmup := fs.Duration("warmup", 2*time.Second, "unmeasured time before each level")
	requests := fs.Int("requests", 0, "stop each level after this many requests instead of --duration")
	conns := fs.Int("conns", 4, "gRPC connections, shared round-robin by the workers")
	identities := fs.Int("identities", 64, "distinct service accounts (each with its own token and CSR)")
	metricsURL := fs.String("metrics", "http://127.0.0.1:15014/metrics", "meshca's /metrics, for server CPU and RSS ('' to skip)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	var cs []int
	for _, f := range strings.Split(*levels, ",") {
		n, err := strconv.Atoi(strings.TrimSpace(f))
		if err != nil || n < 1 {
			return fmt.Errorf("--concurrency: %q is not a positive number", f)
		}
		cs = append(cs, n)
	}
	if *conns < 1 || *identities < 1 {
		return errors.New("--conns and --identities must be at least 1")
	}

	fmt.Fprintf(stderr, "preparing %d identities (token + P-256 CSR each)...\n", *identities)
	type ident struct{ token, csr string }
	ids := make([]ident, *identities)
	for i := range ids {
		sa := fmt.Sprintf("bench-%d", i)
		tok, err := mintDevToken(*cfgPath, "bench", sa, "", 2*time.Hour)
		if err != nil {
			return err
		}
		id, err := idFromToken(tok, "cluster.local")
		if err != nil {
			return err
		}
		key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		if err != nil {
			return err
		}
		csr, err := makeCSR(key, id)
		if err != nil {
			return err
		}
		ids[i] = ident{token: tok, csr: string(csr)}
	}
	clients := make([]pb.IstioCertificateServiceClient, *conns)
	for i := range clients {
		conn, err := dial(*addr, *caCert)
		if err != nil {
			return err
		}
		defer conn.Close()
		clients[i] = pb.NewIstioCertificateServiceClient(conn)
	}

	// A worker that sees maxErrorStreak failures in a row stops the run:
	// a bench against a server that refuses everything measures nothing.
	const maxErrorStreak = 100
	var (
		abort   atomic.Bool
		lastErr atomic.Value
	)
	const row = "%11s %9s %9s %9s %9s %16s %11s %7s\n"
	fmt.Fprintf(stdout, row, "concurrency", "certs/s", "p50", "p90", "p99", "server CPU/cert", "server RSS", "errors")
	for _, c := range cs {
		run := func(d time.Duration, limit int, record bool) (n int, errs int64, lat []time.Duration) {
			var (
				mu      sync.Mutex
				wg      sync.WaitGroup
				started atomic.Int64
				failed  atomic.Int64
			)
			deadline := time.Now().Add(d)
			for w := range c {
				wg.Add(1)
				go func() {
					defer wg.Done()
					cl := clients[w%len(clients)]
					local := make([]time.Duration, 0, 4096)
					streak := 0
					for i := w; !abort.Load(); i += c {
						if limit > 0 {
							if started.Add(1) > int64(limit) {
								break
							}
						} else if time.Now().After(deadline) {
							break
						}
						id := ids[i%len(ids)]
						t0 := time.Now()
						cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
						_, err := cl.CreateCertificate(withToken(cctx, id.token), &pb.IstioCertificateRequest{Csr: id.csr}, grpc.WaitForReady(true))
						cancel()
						if err != nil {
							failed.Add(1)
							streak++
							if ctx.Err() != nil || streak >= maxErrorStreak {
								abort.Store(true)
								lastErr.Store(err.Error())
								break
							}
							continue
						}
						streak = 0
						if record {
							local = append(local, time.Since(t0))
						}
					}
					mu.Lock()
					lat = append(lat, local...)
					mu.Unlock()
				}()
			}
			wg.Wait()
			return len(lat), failed.Load(), lat
		}
		run(*warmup, 0, false)
		if abort.Load() {
			return fmt.Errorf("stopped after %d failed requests in a row; last: %v", maxErrorStreak, lastErr.Load())
		}
		before, err := scrape(*metricsURL)
		if err != nil {
			return err
		}
		t0 := time.Now()
		n, errs, lat := run(*duration, *requests, true)
		elapsed := time.Since(t0)
		after, err := scrape(*metricsURL)
		if err != nil {
			return err
		}
		if ctx.Err() != nil {
			return ctx.Err()
		}
		if abort.Load() {
			return fmt.Errorf("stopped after %d failed requests in a row; last: %v", maxErrorStreak, lastErr.Load())
		}
		slices.Sort(lat)
		cpu, rss := "n/a", "n/a"
		if *metricsURL != "" {
			okCerts := after.ok - before.ok
			if okCerts > 0 {
				cpu = fmt.Sprintf("%.0f µs", (after.cpu-before.cpu)/okCerts*1e6)
			}
			rss = fmt.Sprintf("%.0f MiB", after.rss/(1<<20))
		}
		fmt.Fprintf(stdout, row, strconv.Itoa(c), fmt.Sprintf("%.0f", float64(n)/elapsed.Seconds()),
			pct(lat, 0.50), pct(lat, 0.90), pct(lat, 0.99), cpu, rss, strconv.FormatInt(errs, 10))
	}
	return nil
}

func pct(sorted []time.Duration, q float64) string {
	if len(sorted) == 0 {
		return "-"
	}
	return millis(quantile(sorted, q))
}

type serverStats struct{ cpu, rss, ok float64 }

// scrape reads the server's CPU seconds, RSS and OK issuances from its
// Prometheus text exposition.
func scrape(url string) (serverStats, error) {
	var s serverStats
	if url == "" {
		return s, nil
	}
	resp, err := http.Get(url)
	if err != nil {
		return s, fmt.Errorf("scrape %s: %w", url, err)
	}
	defer resp.Body.Close()
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		name, val, ok := cutValue(line)
		if !ok {
			continue
		}
		switch {
		case name == "process_cpu_seconds_total":
			s.cpu = val
		case name == "process_resident_memory_bytes":
			s.rss = val
		case strings.HasPrefix(name, "meshca_requests_total{") && strings.Contains(name, `code="OK"`):
			s.ok += val
		}
	}
	return s, sc.Err()
}

func cutValue(line string) (string, float64, bool) {
	if line == "" || line[0] == '#' {
		return "", 0, false
	}
	i := strings.LastIndexByte(line, ' ')
	if i < 0 {
		return "", 0, false
	}
	v, err := strconv.ParseFloat(line[i+1:], 64)
	if err != nil {
		return "", 0, false
	}
	return line[:i], v, true
}
