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
	"net"
	"net/http"
	"os"
	"runtime/debug"
	"runtime/pprof"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	pb "istio.io/api/security/v1alpha1"
)

// benchCmd drives a running meshca (in dev mode, so it can mint tokens)
// with pre-generated P-256 CSRs, and reads the server's own CPU and memory
// from its /metrics. By default every concurrent client has its own TLS
// connection, as every proxy has its own; --storm instead opens N new
// connections at once, one CSR each, as when all the pods of a node start.
func benchCmd(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("meshctl bench", flag.ContinueOnError)
	fs.SetOutput(stderr)
	addr := fs.String("addr", defaultAddr, "meshca gRPC address")
	caCert := fs.String("ca-cert", defaultCACert, "PEM roots of meshca's serving certificate")
	cfgPath := fs.String("config", "", "meshca configuration, for the dev token key (default: embedded dev config)")
	levels := fs.String("concurrency", "1,8,64", "comma-separated concurrency levels")
	duration := fs.Duration("duration", 10*time.Second, "measured time per level")
	warmup := fs.Duration("warmup", 2*time.Second, "unmeasured time before each level (with --storm: 0 skips the unmeasured warm-up storm)")
	requests := fs.Int("requests", 0, "stop each level after this many requests instead of --duration")
	conns := fs.Int("conns", 0, "gRPC connections, shared round-robin by the workers (0 = one per worker, as each proxy has its own)")
	storm := fs.String("storm", "", "comma-separated storm sizes: N new TLS connections at once, one CSR each (replaces --concurrency)")
	identities := fs.Int("identities", 64, "distinct service accounts (each with its own token and CSR)")
	metricsURL := fs.String("metrics", "http://127.0.0.1:15014/metrics", "the server's /metrics, for server CPU and RSS ('' to skip)")
	cpuProfile := fs.String("cpuprofile", "", "write the load generator's own CPU profile to this file")
	client := fs.String("client", clientH2, "h2: each connection carries one call at a time, framed by meshctl on the worker's goroutine (cheap on CPU that the server shares); grpc: grpc-go's client, whose connections --conns may share")
	if err := fs.Parse(args); err != nil {
		return err
	}
	cs, err := positiveList("--concurrency", *levels)
	if err != nil {
		return err
	}
	var storms []int
	if *storm != "" {
		if storms, err = positiveList("--storm", *storm); err != nil {
			return err
		}
	}
	if err := checkClientKind(*client); err != nil {
		return err
	}
	if *conns < 0 || *identities < 1 {
		return errors.New("--conns must be at least 0 and --identities at least 1")
	}

	loadGenGC()
	mint, err := devMinter(*cfgPath)
	if err != nil {
		return err
	}
	fmt.Fprintf(stderr, "preparing %d identities (token + P-256 CSR each)...\n", *identities)
	ids := make([]benchIdent, *identities)
	for i := range ids {
		sa := fmt.Sprintf("bench-%d", i)
		tok, err := mint("bench", sa, "", 2*time.Hour)
		if err != nil {
			return err
		}
		id, err := idFromToken(tok, "cluster.local")
		if err != nil {
			return err
		}
		key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		if err != nil {
			return fmt.Errorf("generate CSR key: %w", err)
		}
		csr, err := makeCSR(key, id)
		if err != nil {
			return err
		}
		ids[i] = benchIdent{sa: sa, token: tok, csr: string(csr)}
	}
	if *cpuProfile != "" {
		f, err := os.Create(*cpuProfile)
		if err != nil {
			return fmt.Errorf("--cpuprofile: %w", err)
		}
		defer f.Close()
		if err := pprof.StartCPUProfile(f); err != nil {
			return fmt.Errorf("--cpuprofile: %w", err)
		}
		defer pprof.StopCPUProfile()
	}
	b := &bench{
		addr: *addr, caCert: *caCert, metricsURL: *metricsURL, client: *client,
		ids: ids, mint: mint, stdout: stdout, stderr: stderr,
	}
	if storms != nil {
		return b.storms(ctx, storms, *warmup)
	}
	return b.levels(ctx, cs, *conns, *duration, *warmup, *requests)
}

// loadGenGC makes the load generator collect garbage less often. It
// shares the cores with the server it measures: its own collections would
// take CPU from the server and add to the latencies it reports. GOGC, when
// set, still wins.
func loadGenGC() {
	if os.Getenv("GOGC") == "" {
		debug.SetGCPercent(400)
	}
}

type benchIdent struct{ sa, token, csr string }

type bench struct {
	addr, caCert, metricsURL string
	client                   string // clientH2 or clientGRPC
	ids                      []benchIdent
	mint                     func(ns, sa, pod string, ttl time.Duration) (string, error)
	stdout, stderr           io.Writer
}

func positiveList(flagName, list string) ([]int, error) {
	var ns []int
	for _, f := range strings.Split(list, ",") {
		n, err := strconv.Atoi(strings.TrimSpace(f))
		if err != nil || n < 1 {
			return nil, fmt.Errorf("%s: %q is not a positive number", flagName, f)
		}
		ns = append(ns, n)
	}
	return ns, nil
}

// levels runs each concurrency level for duration (or requests) after an
// unmeasured warmup. With conns 0 every worker has its own connection,
// opened in the warm-up of the first level that needs it and reused by the
// levels after; otherwise the workers share conns connections round-robin.
func (b *bench) levels(ctx context.Context, cs []int, conns int, duration, warmup time.Duration, requests int) error {
	if conns == 0 {
		fmt.Fprintln(b.stderr, "connections: one per concurrent client")
	} else {
		fmt.Fprintf(b.stderr, "connections: %d, shared round-robin by the clients\n", conns)
	}
	tlsCfg, err := clientTLS(b.addr, b.caCert)
	if err != nil {
		return err
	}
	var clients []certClient
	defer func() {
		for _, c := range clients {
			_ = c.Close()
		}
	}()
	// A worker that sees maxErrorStreak failures in a row stops the run:
	// a bench against a server that refuses everything measures nothing.
	const maxErrorStreak = 100
	var (
		abort   atomic.Bool
		lastErr atomic.Value
	)
	const row = "%11s %9s %9s %9s %9s %16s %11s %7s\n"
	fmt.Fprintf(b.stdout, row, "concurrency", "certs/s", "p50", "p90", "p99", "server CPU/cert", "server RSS", "errors")
	for _, c := range cs {
		want := conns
		if want == 0 {
			want = c
		}
		if want < c && b.client == clientH2 {
			return fmt.Errorf("--client %s carries one call at a time per connection: with --conns %d below concurrency %d, use --client %s", clientH2, want, c, clientGRPC)
		}
		for len(clients) < want {
			cl, err := newCertClient(ctx, b.client, b.addr, tlsCfg)
			if err != nil {
				return err
			}
			clients = append(clients, cl)
		}
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
					cl := clients[w%want]
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
						id := b.ids[i%len(b.ids)]
						t0 := time.Now()
						cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
						_, err := cl.CreateCertificate(cctx, id.token, &pb.IstioCertificateRequest{Csr: id.csr})
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
		run(warmup, 0, false)
		if abort.Load() {
			return fmt.Errorf("stopped after %d failed requests in a row; last: %v", maxErrorStreak, lastErr.Load())
		}
		before, err := scrape(b.metricsURL)
		if err != nil {
			return err
		}
		t0 := time.Now()
		n, errs, lat := run(duration, requests, true)
		elapsed := time.Since(t0)
		after, err := scrape(b.metricsURL)
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
		cpu, rss := serverUse(b.metricsURL, before, after)
		fmt.Fprintf(b.stdout, row, strconv.Itoa(c), fmt.Sprintf("%.0f", float64(n)/elapsed.Seconds()),
			pct(lat, 0.50), pct(lat, 0.90), pct(lat, 0.99), cpu, rss, strconv.FormatInt(errs, 10))
	}
	return nil
}

// storms opens, for each size n, n new TLS connections at once, each
// sending one CSR with a token of its own (a new pod's token, which no
// server cache has seen), and keeps them open until all are answered and
// the server has been read, as the proxies of a node whose pods all start
// together stay connected. Latencies count
// from the start of the storm: the handshake's when its TLS handshake
// completed, the certificate's when its answer arrived.
func (b *bench) storms(ctx context.Context, sizes []int, warmup time.Duration) error {
	creds, err := clientCreds(b.addr, b.caCert)
	if err != nil {
		return err
	}
	fmt.Fprintln(b.stderr, "storm: each connection is new (no TLS session to resume) and sends one CSR with a new pod's token")
	const row = "%6s %13s %9s %14s %14s %9s %9s %16s %11s %7s\n"
	if warmup > 0 {
		r, err := b.storm(ctx, creds, min(64, slices.Max(sizes)), "warmup")
		if err != nil {
			return fmt.Errorf("warm-up storm: %w", err)
		}
		r.close()
	}
	fmt.Fprintf(b.stdout, row, "conns", "handshakes/s", "certs/s", "handshake p50", "handshake p99", "cert p50", "cert p99", "server CPU/cert", "server RSS", "errors")
	for k, n := range sizes {
		before, err := scrape(b.metricsURL)
		if err != nil {
			return err
		}
		r, err := b.storm(ctx, creds, n, strconv.Itoa(k))
		if err != nil {
			return err
		}
		// Read the server while the storm's connections are still open:
		// its RSS then holds them, as it holds a node's proxies.
		after, err := scrape(b.metricsURL)
		r.close()
		if err != nil {
			return err
		}
		cpu, rss := serverUse(b.metricsURL, before, after)
		fmt.Fprintf(b.stdout, row, strconv.Itoa(n), rate(len(r.handshakes), r.handshakes), rate(len(r.certs), r.certs),
			pct(r.handshakes, 0.50), pct(r.handshakes, 0.99), pct(r.certs, 0.50), pct(r.certs, 0.99),
			cpu, rss, strconv.Itoa(r.errors))
	}
	return nil
}

// rate is n events over the time the last of them took (sorted holds the
// times since the start), per second.
func rate(n int, sorted []time.Duration) string {
	if n == 0 || sorted[len(sorted)-1] <= 0 {
		return "-"
	}
	return fmt.Sprintf("%.0f", float64(n)/sorted[len(sorted)-1].Seconds())
}

type stormResult struct {
	handshakes, certs []time.Duration // since the storm's start, sorted
	errors            int
	conns             []*grpc.ClientConn
}

// close closes the storm's connections.
func (r stormResult) close() {
	for _, c := range r.conns {
		if c != nil {
			_ = c.Close()
		}
	}
}

func (b *bench) storm(ctx context.Context, creds credentials.TransportCredentials, n int, name string) (stormResult, error) {
	// Tokens are minted before the clock starts; each names its own pod, so
	// that no server has it cached, as with a pod that has just started.
	toks := make([]string, n)
	for i := range toks {
		id := b.ids[i%len(b.ids)]
		tok, err := b.mint("bench", id.sa, fmt.Sprintf("storm-%s-%d-%d", name, time.Now().UnixNano(), i), 2*time.Hour)
		if err != nil {
			return stormResult{}, err
		}
		toks[i] = tok
	}
	var (
		wg      sync.WaitGroup
		mu      sync.Mutex
		res     stormResult
		lastErr error
	)
	res.conns = make([]*grpc.ClientConn, n)
	start := time.Now()
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			var handshake atomic.Int64
			conn, err := grpc.NewClient(b.addr, grpc.WithTransportCredentials(timedCreds{creds, func() {
				handshake.CompareAndSwap(0, int64(time.Since(start)))
			}}))
			if err == nil {
				res.conns[i] = conn
				cctx, cancel := context.WithTimeout(ctx, 30*time.Second)
				_, err = pb.NewIstioCertificateServiceClient(conn).CreateCertificate(withToken(cctx, toks[i]),
					&pb.IstioCertificateRequest{Csr: b.ids[i%len(b.ids)].csr}, grpc.WaitForReady(true))
				cancel()
			}
			took := time.Since(start)
			mu.Lock()
			defer mu.Unlock()
			if h := handshake.Load(); h > 0 {
				res.handshakes = append(res.handshakes, time.Duration(h))
			}
			if err != nil {
				res.errors++
				lastErr = err
				return
			}
			res.certs = append(res.certs, took)
		}()
	}
	wg.Wait()
	if ctx.Err() != nil {
		res.close()
		return res, ctx.Err()
	}
	if len(res.certs) == 0 {
		res.close()
		return res, fmt.Errorf("storm of %d: every request failed; last: %w", n, lastErr)
	}
	slices.Sort(res.handshakes)
	slices.Sort(res.certs)
	return res, nil
}

// timedCreds calls done when a client TLS handshake completes.
type timedCreds struct {
	credentials.TransportCredentials
	done func()
}

func (c timedCreds) ClientHandshake(ctx context.Context, authority string, raw net.Conn) (net.Conn, credentials.AuthInfo, error) {
	conn, info, err := c.TransportCredentials.ClientHandshake(ctx, authority, raw)
	if err == nil {
		c.done()
	}
	return conn, info, err
}

func (c timedCreds) Clone() credentials.TransportCredentials {
	return timedCreds{c.TransportCredentials.Clone(), c.done}
}

func pct(sorted []time.Duration, q float64) string {
	if len(sorted) == 0 {
		return "-"
	}
	return millis(quantile(sorted, q))
}

// serverUse formats the server's CPU per issued certificate between two
// scrapes, and its RSS at the second.
func serverUse(url string, before, after serverStats) (cpu, rss string) {
	cpu, rss = "n/a", "n/a"
	if url == "" {
		return cpu, rss
	}
	if okCerts := after.ok - before.ok; okCerts > 0 {
		cpu = fmt.Sprintf("%.0f µs", (after.cpu-before.cpu)/okCerts*1e6)
	}
	return cpu, fmt.Sprintf("%.0f MiB", after.rss/(1<<20))
}

type serverStats struct{ cpu, rss, ok float64 }

// scrape reads the server's CPU seconds, RSS and OK issuances from its
// Prometheus text exposition: meshca's meshca_requests_total, or, for
// istiod's CA (make bench-vs-istiod), citadel_server_success_cert_issuance_count.
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
		case name == "citadel_server_success_cert_issuance_count" || strings.HasPrefix(name, "citadel_server_success_cert_issuance_count{"):
			s.ok += val
		}
	}
	if err := sc.Err(); err != nil {
		return s, fmt.Errorf("scrape %s: %w", url, err)
	}
	return s, nil
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
