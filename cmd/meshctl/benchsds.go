package main

import (
	"bufio"
	"bytes"
	"cmp"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"flag"
	"fmt"
	"io"
	"math"
	"math/big"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"runtime/pprof"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	"github.com/google/renameio/v2"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/grpc"
	"google.golang.org/grpc/connectivity"
	pb "istio.io/api/security/v1alpha1"

	"github.com/meshca/meshca/backends"
	"github.com/meshca/meshca/backends/plugged"
	"github.com/meshca/meshca/cmd/internal/config"
	"github.com/meshca/meshca/cmd/internal/devkey"
	"github.com/meshca/meshca/sds/sdstest"
)

// The targets meshctl bench-sds compares its figures with.
const (
	targetFirstSecrets = 10 * time.Second
	targetPerStream    = 32 << 10 // bytes of server memory per open stream
	targetBundlePush   = time.Second
	targetStormP99     = 50 * time.Millisecond
)

// Secret names the streams subscribe to, as Istio's Envoy does.
const (
	secretDefault = "default"
	secretRootCA  = "ROOTCA"
)

// benchSDSCmd holds many SDS streams open on a running dev meshca, each
// as its own workload, and measures what the SDS server costs and how
// fast it pushes: first secrets and memory per stream (figure 1), a new
// trust bundle (figure 2), and the renewal storm that follows it beside
// new pods' CreateCertificate calls (figure 3). With a plugged backend it
// makes the new root itself, by replacing the CA files.
func benchSDSCmd(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("meshctl bench-sds", flag.ContinueOnError)
	fs.SetOutput(stderr)
	b := &sdsBench{out: stdout, log: stderr}
	fs.StringVar(&b.addr, "addr", defaultAddr, "meshca gRPC address")
	fs.StringVar(&b.caCert, "ca-cert", defaultCACert, "PEM roots of meshca's serving certificate")
	cfgPath := fs.String("config", "", "the running meshca's configuration, for its dev token key, plugged CA directory and limits (default: embedded dev config)")
	fs.StringVar(&b.admin, "admin", "http://127.0.0.1:15014", "meshca's admin URL, for /metrics and /debug/pprof ('' to skip server figures)")
	fs.IntVar(&b.conns, "conns", 100, "TLS connections carrying the SDS streams")
	fs.IntVar(&b.perConn, "streams-per-conn", 100, "SDS streams per connection, each its own service account and token")
	fs.StringVar(&b.ns, "namespace", "bench-sds", "namespace of the streams' and new pods' service accounts")
	fs.DurationVar(&b.rampTimeout, "ramp-timeout", time.Minute, "how long every stream may take to get its first secrets")
	fs.DurationVar(&b.settle, "settle", 2*time.Second, "wait after the ramp before reading the server's memory")
	fs.IntVar(&b.newPodWorkers, "new-pod-workers", 8, "workers sending CreateCertificate continuously as new pods, each request with a token never seen before")
	fs.IntVar(&b.newPodConns, "new-pod-conns", 4, "TLS connections of the new pods' load")
	fs.DurationVar(&b.idle, "idle", 5*time.Second, "how long the new pods' load is measured with the streams idle, the storm's baseline")
	fs.DurationVar(&b.warmup, "warmup", time.Second, "unmeasured time before the idle measurement")
	fs.DurationVar(&b.phaseTimeout, "phase-timeout", 2*time.Minute, "how long the new bundle, and then the certificates under the new root, may take to reach every stream")
	fs.StringVar(&b.profileDir, "profile", "", "directory for the server's CPU profiles (10s) of the ramp and of the root rotation, its heap with the streams open and an execution trace of the storm (all need meshca --pprof), and meshctl's own CPU profiles of the bundle push and the storm")
	initCA := fs.Bool("init-ca", false, "write a new CA into the configuration's backend.plugged.dir and exit (run it before starting meshca)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() != 0 {
		return fmt.Errorf("bench-sds takes no arguments, got %q", fs.Args())
	}
	if *initCA {
		return initPluggedCA(*cfgPath, stdout)
	}
	if b.conns < 1 || b.perConn < 1 || b.newPodWorkers < 1 || b.newPodConns < 1 {
		return errors.New("--conns, --streams-per-conn, --new-pod-workers and --new-pod-conns must be at least 1")
	}
	if b.rampTimeout <= 0 || b.idle <= 0 || b.phaseTimeout <= 0 || b.settle < 0 || b.warmup < 0 {
		return errors.New("--ramp-timeout, --idle and --phase-timeout must be positive; --settle and --warmup not negative")
	}
	var err error
	if b.cfg, b.key, err = loadDevKey(*cfgPath); err != nil {
		return err
	}
	if n := b.conns * b.perConn; n > b.cfg.SDS.MaxStreams {
		return fmt.Errorf("%d streams exceed the configuration's sds.maxStreams %d", n, b.cfg.SDS.MaxStreams)
	}
	if uint32(b.perConn) > b.cfg.Server.MaxConcurrentStreams {
		return fmt.Errorf("--streams-per-conn %d exceeds the configuration's server.maxConcurrentStreams %d", b.perConn, b.cfg.Server.MaxConcurrentStreams)
	}
	if b.profileDir != "" {
		if err := os.MkdirAll(b.profileDir, 0o755); err != nil {
			return fmt.Errorf("--profile: %w", err)
		}
	}
	return b.run(ctx)
}

// sdsBench is one run of meshctl bench-sds.
type sdsBench struct {
	out, log io.Writer

	addr, caCert, admin, profileDir, ns string
	conns, perConn                      int
	newPodWorkers, newPodConns          int
	rampTimeout, settle, idle, warmup   time.Duration
	phaseTimeout                        time.Duration

	cfg *config.Config
	key *devkey.Key

	streams []*sdstest.Client
	tokens  []string
	figures []benchFigure
	cpu     []phaseCPU
}

// benchFigure is one line of the summary.
type benchFigure struct {
	name, measured, target string
	// verdict is PASS, MISS, or "" for a figure without a target.
	verdict string
}

// phaseCPU is the CPU time meshca and meshctl used in one phase.
type phaseCPU struct {
	phase string
	// server and client are the CPU seconds meshca and meshctl used.
	server, client float64
	wall           time.Duration
}

func streamAccount(i int) string { return fmt.Sprintf("sa-%05d", i) }

func (b *sdsBench) run(ctx context.Context) error {
	n := b.conns * b.perConn
	fmt.Fprintf(b.out, "meshca bench-sds: %d SDS streams (%d TLS connections × %d), each its own service account in namespace %s, subscribing to %s and %s\n",
		n, b.conns, b.perConn, b.ns, secretDefault, secretRootCA)
	fmt.Fprintf(b.out, "%d-core machine: meshca and this load generator share its cores\n", runtime.NumCPU())

	fmt.Fprintf(b.log, "minting %d tokens...\n", n)
	t0 := time.Now()
	var err error
	if b.tokens, err = b.mintTokens(n); err != nil {
		return err
	}
	fmt.Fprintf(b.log, "minted %d tokens in %s\n", n, time.Since(t0).Round(time.Millisecond))

	conns := make([]*grpc.ClientConn, b.conns)
	for i := range conns {
		if conns[i], err = dial(b.addr, b.caCert); err != nil {
			return err
		}
		defer conns[i].Close()
	}
	if err := connectAll(ctx, conns); err != nil {
		return err
	}
	b.streams = make([]*sdstest.Client, n)
	for i := range b.streams {
		c, err := sdstest.New(sdstest.Config{
			Conn:  conns[i/b.perConn],
			Node:  &corev3.Node{Id: fmt.Sprintf("sidecar~10.%d.%d.%d~%s-%d.%s~%s.svc.cluster.local", i>>16&255, i>>8&255, i&255, streamAccount(i), i, b.ns, b.ns), Cluster: streamAccount(i) + "." + b.ns},
			Names: []string{secretDefault, secretRootCA},
		})
		if err != nil {
			return err
		}
		b.streams[i] = c
	}
	load, err := b.newPodLoad()
	if err != nil {
		return err
	}
	defer load.close()

	// The streams live until the end of the run.
	streamsCtx, stopStreams := context.WithCancel(ctx)
	var runs sync.WaitGroup
	defer func() {
		stopStreams()
		runs.Wait()
	}()
	if err := b.holdStreams(ctx, streamsCtx, &runs); err != nil {
		return err
	}
	idle, err := b.newPodsIdle(ctx, load)
	if err != nil {
		return err
	}
	if err := b.rotateRoot(ctx, load, idle); err != nil {
		return err
	}
	b.summary()
	return nil
}

// mintTokens mints a 2-hour token for each stream's service account, on
// every core.
func (b *sdsBench) mintTokens(n int) ([]string, error) {
	toks := make([]string, n)
	workers := runtime.GOMAXPROCS(0)
	errs := make([]error, workers)
	var wg sync.WaitGroup
	for w := range workers {
		wg.Go(func() {
			for i := w; i < n; i += workers {
				tok, err := b.mint(streamAccount(i), "", 2*time.Hour)
				if err != nil {
					errs[w] = err
					return
				}
				toks[i] = tok
			}
		})
	}
	wg.Wait()
	return toks, errors.Join(errs...)
}

func (b *sdsBench) mint(sa, pod string, ttl time.Duration) (string, error) {
	tok, err := mintWith(b.cfg, b.key, b.ns, sa, pod, ttl)
	if err != nil {
		return "", fmt.Errorf("mint a token for %s/%s: %w", b.ns, sa, err)
	}
	return tok, nil
}

// connectAll connects every connection before the clock starts, so that
// the ramp measures streams, not TLS handshakes.
func connectAll(ctx context.Context, conns []*grpc.ClientConn) error {
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	for _, c := range conns {
		c.Connect()
	}
	for _, c := range conns {
		for s := c.GetState(); s != connectivity.Ready; s = c.GetState() {
			if !c.WaitForStateChange(ctx, s) {
				return fmt.Errorf("connect to meshca at %s: still %s after 30s (is `meshca serve` running, and --ca-cert its root?)", c.Target(), s)
			}
		}
	}
	return nil
}

// holdStreams opens every stream at once and measures phase 1: the time
// until all have their first secrets, and the server's memory per stream.
func (b *sdsBench) holdStreams(ctx, streamsCtx context.Context, runs *sync.WaitGroup) error {
	n := len(b.streams)
	fmt.Fprintf(b.out, "\n== 1. Hold %d concurrent SDS streams\n", n)
	before, err := b.scrape()
	if err != nil {
		return err
	}
	var profile chan error
	if b.profileDir != "" && b.admin != "" {
		profile = make(chan error, 1)
		go func() {
			profile <- fetch(ctx, b.admin+"/debug/pprof/profile?seconds=10", filepath.Join(b.profileDir, "cpu-ramp.prof"))
		}()
		time.Sleep(100 * time.Millisecond) // the profile starts before the first stream
	}

	waitCtx, cancel := context.WithTimeout(ctx, b.rampTimeout)
	defer cancel()
	start := time.Now()
	for i, c := range b.streams {
		runs.Go(func() { _ = c.Run(withToken(streamsCtx, b.tokens[i])) })
	}
	ready := b.waitAll(waitCtx, "streams with their first secrets", secretDefault, func(_ int, st sdstest.State) bool {
		return hasSecret(st, secretDefault) && hasSecret(st, secretRootCA)
	})
	rampEnd := time.Now()
	ramped, err := b.scrape()
	if err != nil {
		return err
	}
	b.addCPU("1. ramp (first secrets)", before, ramped, rampEnd.Sub(start))
	got, last, lat := spread(ready, start)
	if got < n {
		return fmt.Errorf("only %d of %d streams had their first secrets after --ramp-timeout %s; e.g. %s",
			got, n, b.rampTimeout, b.firstLagging(ready))
	}
	allAfter := last.Sub(start)
	var secrets, responses, nacks, reconnects int
	for _, c := range b.streams {
		st := c.State()
		secrets += len(st.Secrets)
		responses += st.Responses
		nacks += st.NACKs
		reconnects += st.Reconnects
	}
	b.line("all streams had their first secrets", "%s after the first stream opened (per stream: p50 %s, p99 %s)",
		secs(allAfter), secs(quantile(lat, 0.5)), secs(quantile(lat, 0.99)))
	b.figure(fmt.Sprintf("1. all %d streams have their first secrets", n), secs(allAfter), "≤ "+secs(targetFirstSecrets), verdict(allAfter <= targetFirstSecrets))
	b.line("secrets received (client side)", "%d in %d responses (want %d: %s and %s per stream); %d NACKs, %d reconnects",
		secrets, responses, 2*n, secretDefault, secretRootCA, nacks, reconnects)

	if b.admin == "" {
		b.figure("1. server memory per stream (RSS)", "n/a", "≤ "+kib(targetPerStream), "")
		return b.waitProfile(ctx, profile)
	}
	b.line("server CPU during the ramp", "%.2f s (%.0f µs per stream); meshctl's own: %.2f s",
		ramped.cpu()-before.cpu(), (ramped.cpu()-before.cpu())/float64(n)*1e6, ramped[clientCPUKey]-before[clientCPUKey])
	if err := sleep(ctx, b.settle); err != nil {
		return err
	}
	open, err := b.scrape()
	if err != nil {
		return err
	}
	b.line("server CPU with streams idle", "%.3f s over %s", open.cpu()-ramped.cpu(), b.settle)
	perStream := func(name string) float64 { return (open.get(name) - before.get(name)) / float64(n) }
	rss := perStream("process_resident_memory_bytes")
	b.line("server RSS", "%s before, %s with the streams open: %s per stream",
		mib(before.get("process_resident_memory_bytes")), mib(open.get("process_resident_memory_bytes")), kib(rss))
	b.figure("1. server memory per stream (RSS)", kib(rss), "≤ "+kib(targetPerStream), verdict(rss <= targetPerStream))
	b.line("server Go heap in use", "%s before, %s after: %s per stream",
		mib(before.get("go_memstats_heap_inuse_bytes")), mib(open.get("go_memstats_heap_inuse_bytes")), kib(perStream("go_memstats_heap_inuse_bytes")))
	b.figure("1. server Go heap in use per stream", kib(perStream("go_memstats_heap_inuse_bytes")), "", "")
	b.line("server goroutine stacks", "%s per stream; goroutines %.0f → %.0f (%.1f per stream)",
		kib(perStream("go_memstats_stack_inuse_bytes")), before.get("go_goroutines"), open.get("go_goroutines"), perStream("go_goroutines"))

	// The CPU profile ends before the forced collection below, which is
	// no part of the ramp.
	if err := b.waitProfile(ctx, profile); err != nil {
		return err
	}
	// A heap profile with gc=1 forces a collection first: what remains is
	// what the streams hold, without the ramp's garbage.
	heapFile := ""
	if b.profileDir != "" {
		heapFile = filepath.Join(b.profileDir, "heap-streams.prof")
	}
	if err := fetch(ctx, b.admin+"/debug/pprof/heap?gc=1", heapFile); err != nil {
		b.line("heap after a forced GC", "n/a (%v; start meshca with --pprof)", err)
	} else if gced, err := b.scrape(); err == nil {
		gcPerStream := func(name string) float64 { return (gced.get(name) - before.get(name)) / float64(n) }
		b.line("after a forced GC", "heap in use %s per stream, stacks %s per stream, RSS %s per stream",
			kib(gcPerStream("go_memstats_heap_inuse_bytes")), kib(gcPerStream("go_memstats_stack_inuse_bytes")),
			kib(gcPerStream("process_resident_memory_bytes")))
	}
	if heapFile != "" {
		fmt.Fprintf(b.out, "  server heap with the streams open (in use, after a forced GC): %s\n", heapFile)
		pprofTop(ctx, b.out, heapFile, "-sample_index=inuse_space")
	}
	return nil
}

// waitProfile waits for the ramp's CPU profile, if one was asked for,
// and prints its top entries.
func (b *sdsBench) waitProfile(ctx context.Context, profile chan error) error {
	if profile == nil {
		return nil
	}
	fmt.Fprintln(b.log, "waiting for the ramp's 10s CPU profile...")
	select {
	case err := <-profile:
		if err != nil {
			b.line("server CPU profile of the ramp", "n/a (%v; start meshca with --pprof)", err)
			return nil
		}
	case <-ctx.Done():
		return ctx.Err()
	}
	file := filepath.Join(b.profileDir, "cpu-ramp.prof")
	fmt.Fprintf(b.out, "  server CPU profile, 10 s from just before the first stream opened: %s\n", file)
	pprofTop(ctx, b.out, file)
	return nil
}

// firstLagging describes a stream that did not reach a phase's state.
func (b *sdsBench) firstLagging(at []time.Time) string {
	for i, t := range at {
		if t.IsZero() {
			return fmt.Sprintf("stream %d (%s): %s", i, streamAccount(i), b.streams[i].State())
		}
	}
	return "none"
}

// newPodsIdle measures the baseline of phase 3: new pods' CreateCertificate
// latency with every stream open and nothing due.
func (b *sdsBench) newPodsIdle(ctx context.Context, load *newPodLoad) ([]time.Duration, error) {
	fmt.Fprintf(b.out, "\n== 3, baseline. New pods with the streams open and idle (%d workers sending CreateCertificate, each request a new pod's token)\n", b.newPodWorkers)
	stop := make(chan struct{})
	done := make(chan loadResult, 1)
	go func() { done <- load.run(ctx, stop) }()
	warm := sleep(ctx, b.warmup)
	before, err := b.scrape()
	from := time.Now()
	if warm == nil && err == nil {
		warm = sleep(ctx, b.idle)
	}
	after, err2 := b.scrape()
	close(stop)
	res := <-done
	if err := errors.Join(warm, err, err2, res.err); err != nil {
		return nil, err
	}
	lat := res.window(from, from.Add(b.idle))
	if len(lat) == 0 {
		return nil, fmt.Errorf("no new pod got a certificate in %s; %d requests failed, last: %v", b.idle, res.failed, res.lastErr)
	}
	b.addCPU("3. new pods, idle", before, after, b.idle)
	b.line("new pods, idle", "%s", res.describe(lat, b.idle))
	b.serverLatency(before, after)
	return lat, nil
}

// serverLatency prints the new pods' latency as meshca measured it, from
// its histogram: the bucket bounds of p50 and p99.
func (b *sdsBench) serverLatency(before, after metricSet) {
	if b.admin == "" {
		return
	}
	const name, label = "meshca_issuance_duration_seconds", `service="istio"`
	p50, ok50 := histQuantile(before, after, name, label, 0.5)
	p99, ok99 := histQuantile(before, after, name, label, 0.99)
	if !ok50 || !ok99 {
		return
	}
	gcs := after.get("go_gc_duration_seconds_count") - before.get("go_gc_duration_seconds_count")
	b.line("  as meshca measured them", "p50 ≤ %s, p99 ≤ %s (buckets of %s{%s}); %.0f GC cycles",
		millis(p50), millis(p99), name, label, gcs)
}

// histQuantile returns the upper bound of the bucket that holds the
// q-quantile of what histogram name (the series with label) observed
// between two scrapes.
func histQuantile(before, after metricSet, name, label string, q float64) (time.Duration, bool) {
	type bucket struct{ le, n float64 }
	var buckets []bucket
	prefix := name + "_bucket{"
	for series, v := range after {
		if !strings.HasPrefix(series, prefix) || !strings.Contains(series, label) {
			continue
		}
		_, rest, ok := strings.Cut(series, `le="`)
		leText, _, ok2 := strings.Cut(rest, `"`)
		if !ok || !ok2 {
			continue
		}
		le, err := strconv.ParseFloat(leText, 64)
		if err != nil {
			continue
		}
		buckets = append(buckets, bucket{le: le, n: v - before[series]})
	}
	slices.SortFunc(buckets, func(a, b bucket) int { return cmp.Compare(a.le, b.le) })
	if len(buckets) == 0 || buckets[len(buckets)-1].n == 0 {
		return 0, false
	}
	total := buckets[len(buckets)-1].n
	for _, bk := range buckets {
		if bk.n >= q*total {
			if math.IsInf(bk.le, 1) {
				return 0, false
			}
			return time.Duration(bk.le * float64(time.Second)), true
		}
	}
	return 0, false
}

// rotateRoot is phase 2, and the storm of phase 3: it replaces the
// plugged CA with one under a new root, and measures how fast every
// stream accepts the new trust bundle. Once they have, the server
// re-issues every stream's certificate under the new root, all due at
// once when sds.reissueSpread is short: a renewal storm, during which new
// pods' CreateCertificate latency is measured.
func (b *sdsBench) rotateRoot(ctx context.Context, load *newPodLoad, idle []time.Duration) error {
	n := len(b.streams)
	fmt.Fprintf(b.out, "\n== 2. Trust bundle push: a new root for %d streams\n", n)
	idleFigure := fmt.Sprintf("%s / %s", millis(quantile(idle, 0.5)), millis(quantile(idle, 0.99)))
	if b.cfg.Backend.Type != backends.TypePlugged {
		b.line("bundle push", "skipped: only a plugged backend can be given a new root from here (backend.type is %s; see test/bench-sds.sh)", b.cfg.Backend.Type)
		b.figure(fmt.Sprintf("2. new bundle accepted by all %d streams", n), "skipped", "≤ "+secs(targetBundlePush), "")
		b.figure("3. new pods' p50 / p99, idle", idleFigure, "", "")
		b.figure("3. new pods' p50 / p99 during the renewal storm", "skipped", "p99 ≤ "+millis(targetStormP99), "")
		return nil
	}
	old := trustedCA(b.streams[0].State().Secrets[secretRootCA])
	before, err := b.scrape()
	if err != nil {
		return err
	}
	var serverProfile chan error
	if b.profileDir != "" && b.admin != "" {
		serverProfile = make(chan error, 1)
		go func() {
			serverProfile <- fetch(ctx, b.admin+"/debug/pprof/profile?seconds=10", filepath.Join(b.profileDir, "cpu-rotation.prof"))
		}()
		time.Sleep(100 * time.Millisecond)
	}
	bundleProfile, err := b.startClientProfile("meshctl-bundle.prof")
	if err != nil {
		return err
	}
	waitCtx, cancel := context.WithTimeout(ctx, b.phaseTimeout)
	defer cancel()
	interPEM, err := writePluggedCA(b.cfg.Backend.Plugged.Dir, "rotated")
	if err != nil {
		return err
	}
	swap := time.Now()
	// The server's own view: when it loaded the new CA, and when every
	// stream had ACKed the new bundle (sampled every 100 ms).
	var (
		wg              sync.WaitGroup
		reloaded, acked sampled
	)
	watchCtx, stopWatch := context.WithCancel(waitCtx)
	defer stopWatch()
	if b.admin != "" {
		wg.Go(func() { reloaded, acked = b.watchBundle(watchCtx, before) })
	}
	bundleAt := b.waitAll(waitCtx, "streams with the new bundle", secretRootCA, func(_ int, st sdstest.State) bool {
		roots := trustedCA(st.Secrets[secretRootCA])
		return roots != nil && !bytes.Equal(roots, old)
	})
	b.stopClientProfile(bundleProfile)
	bundleEnd, err := b.scrape()
	if err != nil {
		return err
	}

	// The server re-issues once it has seen every stream ACK the bundle
	// (or after sds.bundleAckTimeout): the new pods' load starts now.
	// No leaf can come before, so waiting for the leaves only now is
	// safe, and keeps their waiters off the CPU during the bundle push.
	stormProfile, err := b.startClientProfile("meshctl-storm.prof")
	if err != nil {
		return err
	}
	var trace chan error
	traceFile := filepath.Join(b.profileDir, "trace-storm.out")
	if b.profileDir != "" && b.admin != "" {
		trace = make(chan error, 1)
		go func() { trace <- fetch(ctx, b.admin+"/debug/pprof/trace?seconds=2", traceFile) }()
	}
	stormStart := time.Now()
	leafCtx, cancelLeaves := context.WithTimeout(ctx, b.phaseTimeout)
	defer cancelLeaves()
	stop := make(chan struct{})
	loadDone := make(chan loadResult, 1)
	go func() { loadDone <- load.run(ctx, stop) }()
	leafAt := b.waitAll(leafCtx, "streams with a leaf under the new root", secretDefault, func(_ int, st sdstest.State) bool {
		return bytes.Contains(certChain(st.Secrets[secretDefault]), interPEM)
	})
	_ = sleep(ctx, 300*time.Millisecond)
	close(stop)
	res := <-loadDone
	b.stopClientProfile(stormProfile)
	stopWatch()
	wg.Wait()
	if res.err != nil {
		return res.err
	}
	after, err := b.scrape()
	if err != nil {
		return err
	}

	// The bundle.
	gotB, lastB, _ := spread(bundleAt, time.Time{})
	if gotB == 0 {
		return fmt.Errorf("no stream got the new trust bundle within --phase-timeout %s of the CA file swap; is backend.plugged.dir %s the running meshca's? e.g. %s",
			b.phaseTimeout, b.cfg.Backend.Plugged.Dir, b.firstLagging(bundleAt))
	}
	b.addCPU("2. new bundle to every stream", before, bundleEnd, lastB.Sub(swap))
	firstB := earliestOf(bundleAt)
	push := lastB.Sub(firstB)
	b.line("new CA files written", "at +0 s (plugged reloadInterval %s; the backend loads a change once two reads agree)", b.cfg.Backend.Plugged.ReloadInterval)
	if !reloaded.before.IsZero() {
		b.line("server loaded the new CA", "%s (from its /metrics, sampled every 100 ms)", reloaded.since(swap))
	}
	b.line("first stream received the new bundle", "at +%s", secs(firstB.Sub(swap)))
	b.line("all streams accepted the new bundle", "%d of %d, at +%s: %s after the first received it", gotB, n, secs(lastB.Sub(swap)), secs(push))
	if !acked.before.IsZero() {
		b.line("server saw every stream ACK it", "%s (from its /metrics, sampled every 100 ms)", acked.since(swap))
	}
	if gotB < n {
		b.line("  bundle not accepted", "%d streams within --phase-timeout; e.g. %s", n-gotB, b.firstLagging(bundleAt))
	}
	b.figure(fmt.Sprintf("2. new bundle accepted by all %d streams", n),
		fmt.Sprintf("%s (+%s after the CA file swap)", secs(push), secs(lastB.Sub(swap))), "≤ "+secs(targetBundlePush),
		verdict(push <= targetBundlePush && gotB == n))

	// The leaves under the new root: the renewal storm.
	fmt.Fprintf(b.out, "\n== 3. Renewal storm vs new pods: every stream's certificate re-issued under the new root\n")
	gotL, lastL, _ := spread(leafAt, time.Time{})
	if gotL == 0 {
		b.line("leaves under the new root", "none within --phase-timeout %s", b.phaseTimeout)
		b.figure("2. all streams hold a leaf under the new root", "none", "", "")
		b.figure("3. new pods' p50 / p99, idle", idleFigure, "", "")
		b.figure("3. new pods' p50 / p99 during the renewal storm", "no storm", "p99 ≤ "+millis(targetStormP99), "")
		b.printProfiles(ctx, bundleProfile, stormProfile, serverProfile, trace, traceFile)
		return nil
	}
	b.addCPU("3. renewal storm + new pods", bundleEnd, after, time.Since(stormStart))
	firstL := earliestOf(leafAt)
	storm := lastL.Sub(firstL)
	rate := float64(gotL) / max(storm.Seconds(), 1e-3)
	b.line("re-issue", "sds.reissueSpread %s, sds.renewWorkers %d, sds.bundleAckTimeout %s", b.cfg.SDS.ReissueSpread, b.cfg.SDS.RenewWorkers, b.cfg.SDS.BundleAckTimeout)
	if b.cfg.SDS.ReissueSpread > time.Second {
		b.line("  note", "all 10,000 certificates came due at the root change; sds.reissueSpread (the jitter) spreads them over %s (SPREAD=1ms makes them simultaneous)", b.cfg.SDS.ReissueSpread)
	}
	b.line("leaves under the new root", "%d of %d: first at +%s, all at +%s after the CA file swap", gotL, n, secs(firstL.Sub(swap)), secs(lastL.Sub(swap)))
	b.line("renewal storm", "%d certificates in %s (first to last received): %.0f renewals/s", gotL, secs(storm), rate)
	if gotL < n {
		b.line("  no leaf under the new root", "%d streams within --phase-timeout; e.g. %s", n-gotL, b.firstLagging(leafAt))
	}
	if b.admin != "" {
		sdsOK := func(m metricSet) float64 { return m.sum("meshca_requests_total{", `service="sds"`, `code="OK"`) }
		sdsAll := func(m metricSet) float64 { return m.sum("meshca_requests_total{", `service="sds"`) }
		b.line("server side", "%.0f SDS issuances, %.0f failed", sdsOK(after)-sdsOK(before), (sdsAll(after)-sdsAll(before))-(sdsOK(after)-sdsOK(before)))
	}
	stormLat := res.window(firstL, lastL)
	b.line("new pods, idle (before)", "p50 %s, p90 %s, p99 %s, max %s",
		millis(quantile(idle, 0.5)), millis(quantile(idle, 0.9)), millis(quantile(idle, 0.99)), millis(quantile(idle, 1)))
	b.line("new pods, during the storm", "%s", res.describe(stormLat, storm))
	b.serverLatency(bundleEnd, after)
	p99 := quantile(stormLat, 0.99)
	v := verdict(p99 <= targetStormP99)
	if len(stormLat) == 0 {
		v = ""
	}
	b.figure("2. all streams hold a leaf under the new root", fmt.Sprintf("+%s after the CA file swap", secs(lastL.Sub(swap))), "", "")
	b.figure("3. new pods' p50 / p99, idle", idleFigure, "", "")
	b.figure("3. new pods' p50 / p99 during the renewal storm", fmt.Sprintf("%s / %s", millis(quantile(stormLat, 0.5)), millis(p99)), "p99 ≤ "+millis(targetStormP99), v)
	b.figure("3. renewals completed per second", fmt.Sprintf("%.0f/s (%d in %s)", rate, gotL, secs(storm)), "", "")

	b.printProfiles(ctx, bundleProfile, stormProfile, serverProfile, trace, traceFile)
	return nil
}

// printProfiles prints the top entries of the profiles of phases 2 and 3,
// those that were taken.
func (b *sdsBench) printProfiles(ctx context.Context, bundle, storm *os.File, server, trace chan error, traceFile string) {
	if bundle != nil {
		fmt.Fprintf(b.out, "  meshctl's own CPU profile, from the CA file swap until every stream held the new bundle: %s\n", bundle.Name())
		pprofTop(ctx, b.out, bundle.Name())
	}
	if storm != nil {
		fmt.Fprintf(b.out, "  meshctl's own CPU profile during the storm: %s\n", storm.Name())
		pprofTop(ctx, b.out, storm.Name())
	}
	if server != nil {
		if err := <-server; err != nil {
			b.line("server CPU profile of the rotation", "n/a (%v)", err)
		} else {
			file := filepath.Join(b.profileDir, "cpu-rotation.prof")
			fmt.Fprintf(b.out, "  server CPU profile, 10 s from just before the CA file swap (bundle push, then the storm): %s\n", file)
			pprofTop(ctx, b.out, file)
		}
	}
	if trace == nil {
		return
	}
	if err := <-trace; err != nil {
		b.line("server execution trace of the storm", "n/a (%v)", err)
		return
	}
	// Where the server's goroutines waited to run: what queues in front
	// of the new pods' requests.
	sched := filepath.Join(b.profileDir, "sched-storm.prof")
	out, err := exec.CommandContext(ctx, "go", "tool", "trace", "-pprof=sched", traceFile).Output()
	if err == nil {
		err = os.WriteFile(sched, out, 0o644)
	}
	if err != nil {
		b.line("server scheduler delays in the storm", "n/a (go tool trace -pprof=sched %s: %v)", traceFile, err)
		return
	}
	fmt.Fprintf(b.out, "  server goroutines' wait to run (runnable, not running), first 2 s of the storm: %s (trace %s)\n", sched, traceFile)
	pprofTop(ctx, b.out, sched)
}

// startClientProfile profiles meshctl itself into name, when --profile
// is given.
func (b *sdsBench) startClientProfile(name string) (*os.File, error) {
	if b.profileDir == "" {
		return nil, nil
	}
	f, err := os.Create(filepath.Join(b.profileDir, name))
	if err != nil {
		return nil, fmt.Errorf("--profile: %w", err)
	}
	if err := pprof.StartCPUProfile(f); err != nil {
		f.Close()
		return nil, fmt.Errorf("--profile: %w", err)
	}
	return f, nil
}

func (b *sdsBench) stopClientProfile(f *os.File) {
	if f == nil {
		return
	}
	pprof.StopCPUProfile()
	if err := f.Close(); err != nil {
		fmt.Fprintf(b.log, "meshctl CPU profile: %v\n", err)
	}
}

// sampled bounds when the server's metrics first showed an event: after
// the start of the last sample that did not show it, and before the end
// of the first that did.
type sampled struct{ after, before time.Time }

func (s sampled) since(t time.Time) string {
	return fmt.Sprintf("between +%s and +%s", secs(s.after.Sub(t)), secs(s.before.Sub(t)))
}

// watchBundle samples the server's metrics every 100 ms until ctx is
// done or every stream ACKed the new bundle: it returns when the backend
// reloaded its files, and when no stream was left with a stale bundle.
func (b *sdsBench) watchBundle(ctx context.Context, before metricSet) (reloaded, acked sampled) {
	const reloadOK = `result="success"`
	base := before.sum("meshca_reloads_total{", `what="backend"`, reloadOK)
	t := time.NewTicker(100 * time.Millisecond)
	defer t.Stop()
	prev := time.Now()
	for {
		select {
		case <-ctx.Done():
			return reloaded, acked
		case <-t.C:
		}
		start := time.Now()
		m, err := b.scrape()
		if err != nil {
			continue
		}
		if reloaded.before.IsZero() && m.sum("meshca_reloads_total{", `what="backend"`, reloadOK) > base {
			reloaded = sampled{after: prev, before: time.Now()}
		}
		if !reloaded.before.IsZero() && m.get("meshca_sds_stale_bundle_proxies") == 0 {
			return reloaded, sampled{after: prev, before: time.Now()}
		}
		prev = start
	}
}

// waitAll waits, one goroutine per stream, until cond holds for every
// stream or ctx is done, and returns when each stream's state first met it
// (zero for those that never did): the receipt of the response that made
// it so, if that response carried name, else when the waiter saw it.
func (b *sdsBench) waitAll(ctx context.Context, what, name string, cond func(i int, st sdstest.State) bool) []time.Time {
	at := make([]time.Time, len(b.streams))
	var (
		wg   sync.WaitGroup
		done atomic.Int64
	)
	for i, c := range b.streams {
		wg.Go(func() {
			st, err := c.WaitFor(ctx, func(st sdstest.State) bool { return cond(i, st) })
			if err != nil {
				return
			}
			at[i] = time.Now()
			if st.Last.Accepted && slices.Contains(st.Last.Names, name) {
				at[i] = st.Last.Time
			}
			done.Add(1)
		})
	}
	finished := make(chan struct{})
	go func() {
		wg.Wait()
		close(finished)
	}()
	t := time.NewTicker(2 * time.Second)
	defer t.Stop()
	for {
		select {
		case <-finished:
			return at
		case <-t.C:
			fmt.Fprintf(b.log, "  %s: %d/%d\n", what, done.Load(), len(b.streams))
		}
	}
}

// line prints one labeled result.
func (b *sdsBench) line(label, format string, args ...any) {
	fmt.Fprintf(b.out, "  %-40s %s\n", label+":", fmt.Sprintf(format, args...))
}

func (b *sdsBench) figure(name, measured, target, verdict string) {
	b.figures = append(b.figures, benchFigure{name: name, measured: measured, target: target, verdict: verdict})
}

func (b *sdsBench) addCPU(phase string, before, after metricSet, wall time.Duration) {
	b.cpu = append(b.cpu, phaseCPU{phase: phase, server: after.cpu() - before.cpu(),
		client: after[clientCPUKey] - before[clientCPUKey], wall: wall})
}

func (b *sdsBench) summary() {
	fmt.Fprintf(b.out, "\n== Summary\n")
	const row = "  %-50s %-40s %-15s %s\n"
	fmt.Fprintf(b.out, row, "figure", "measured", "target", "")
	for _, f := range b.figures {
		fmt.Fprintf(b.out, row, f.name, f.measured, f.target, f.verdict)
	}
	fmt.Fprintf(b.out, "\n  CPU by phase (wall time; meshca's CPU from its /metrics, meshctl's own from /proc):\n")
	for _, c := range b.cpu {
		server := "n/a"
		if b.admin != "" {
			server = fmt.Sprintf("%6.2f s (%3.0f%% of a core)", c.server, c.server/max(c.wall.Seconds(), 1e-3)*100)
		}
		fmt.Fprintf(b.out, "    %-34s %8s wall   meshca %s   meshctl %6.2f s (%3.0f%% of a core)\n",
			c.phase, secs(c.wall), server, c.client, c.client/max(c.wall.Seconds(), 1e-3)*100)
	}
}

func verdict(pass bool) string {
	if pass {
		return "PASS"
	}
	return "MISS"
}

// spread returns how many times are set, the latest, and (from start,
// when set) the sorted durations to each.
func spread(at []time.Time, start time.Time) (n int, last time.Time, since []time.Duration) {
	for _, t := range at {
		if t.IsZero() {
			continue
		}
		n++
		if t.After(last) {
			last = t
		}
		if !start.IsZero() {
			since = append(since, t.Sub(start))
		}
	}
	slices.Sort(since)
	return n, last, since
}

func earliestOf(at []time.Time) time.Time {
	var first time.Time
	for _, t := range at {
		if !t.IsZero() && (first.IsZero() || t.Before(first)) {
			first = t
		}
	}
	return first
}

func hasSecret(st sdstest.State, name string) bool {
	_, ok := st.Secrets[name]
	return ok
}

// certChain is the PEM chain of a tls_certificate secret.
func certChain(s sdstest.Secret) []byte {
	return inlineData(s.Secret.GetTlsCertificate().GetCertificateChain())
}

// trustedCA is the PEM roots of a validation_context secret.
func trustedCA(s sdstest.Secret) []byte {
	return inlineData(s.Secret.GetValidationContext().GetTrustedCa())
}

func inlineData(ds *corev3.DataSource) []byte {
	if b := ds.GetInlineBytes(); b != nil {
		return b
	}
	if s := ds.GetInlineString(); s != "" {
		return []byte(s)
	}
	return nil
}

// newPodLoad sends CreateCertificate as new pods do: every request
// carries a token the server has never seen (so it is verified, not
// found in the token cache), with a CSR for its service account's SPIFFE
// ID made beforehand.
type newPodLoad struct {
	b       *sdsBench
	conns   []*grpc.ClientConn
	clients []pb.IstioCertificateServiceClient
	sas     []string
	csrs    []string
	seq     atomic.Int64
}

func (b *sdsBench) newPodLoad() (*newPodLoad, error) {
	td, err := spiffeid.TrustDomainFromString(b.cfg.TrustDomain)
	if err != nil {
		return nil, fmt.Errorf("trustDomain: %w", err)
	}
	l := &newPodLoad{b: b}
	for i := range 64 {
		sa := fmt.Sprintf("new-pod-%02d", i)
		id, err := spiffeid.FromSegments(td, "ns", b.ns, "sa", sa)
		if err != nil {
			return nil, err
		}
		key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		if err != nil {
			return nil, err
		}
		csr, err := makeCSR(key, id)
		if err != nil {
			return nil, err
		}
		l.sas, l.csrs = append(l.sas, sa), append(l.csrs, string(csr))
	}
	for range b.newPodConns {
		conn, err := dial(b.addr, b.caCert)
		if err != nil {
			l.close()
			return nil, err
		}
		l.conns = append(l.conns, conn)
		l.clients = append(l.clients, pb.NewIstioCertificateServiceClient(conn))
	}
	return l, nil
}

func (l *newPodLoad) close() {
	for _, c := range l.conns {
		c.Close()
	}
}

// loadResult is what one run of the load saw.
type loadResult struct {
	samples []loadSample
	failed  int64
	lastErr error
	// err is set when the load could not run at all.
	err error
}

type loadSample struct {
	start time.Time
	lat   time.Duration
}

// run sends requests from every worker until stop is closed or ctx is
// done.
func (l *newPodLoad) run(ctx context.Context, stop <-chan struct{}) loadResult {
	var (
		mu  sync.Mutex
		res loadResult
		wg  sync.WaitGroup
	)
	for w := range l.b.newPodWorkers {
		wg.Go(func() {
			cl := l.clients[w%len(l.clients)]
			local := make([]loadSample, 0, 4096)
			var failed int64
			var lastErr error
			for !stopped(ctx, stop) {
				n := l.seq.Add(1)
				i := int(n % int64(len(l.sas)))
				tok, err := l.b.mint(l.sas[i], fmt.Sprintf("new-pod-%d", n), 10*time.Minute)
				if err != nil {
					mu.Lock()
					res.err = err
					mu.Unlock()
					return
				}
				t0 := time.Now()
				cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
				_, err = cl.CreateCertificate(withToken(cctx, tok), &pb.IstioCertificateRequest{Csr: l.csrs[i]})
				cancel()
				if err != nil {
					failed++
					lastErr = err
					continue
				}
				local = append(local, loadSample{start: t0, lat: time.Since(t0)})
			}
			mu.Lock()
			res.samples = append(res.samples, local...)
			res.failed += failed
			if lastErr != nil {
				res.lastErr = lastErr
			}
			mu.Unlock()
		})
	}
	wg.Wait()
	if res.err == nil && ctx.Err() != nil {
		res.err = ctx.Err()
	}
	return res
}

func stopped(ctx context.Context, stop <-chan struct{}) bool {
	select {
	case <-stop:
		return true
	case <-ctx.Done():
		return true
	default:
		return false
	}
}

// window returns the sorted latencies of the requests started in [from, to].
func (r loadResult) window(from, to time.Time) []time.Duration {
	var lat []time.Duration
	for _, s := range r.samples {
		if !s.start.Before(from) && !s.start.After(to) {
			lat = append(lat, s.lat)
		}
	}
	slices.Sort(lat)
	return lat
}

func (r loadResult) describe(lat []time.Duration, over time.Duration) string {
	s := fmt.Sprintf("%d requests in %s (%.0f/s): p50 %s, p90 %s, p99 %s, max %s",
		len(lat), secs(over), float64(len(lat))/max(over.Seconds(), 1e-3),
		millis(quantile(lat, 0.5)), millis(quantile(lat, 0.9)), millis(quantile(lat, 0.99)), millis(quantile(lat, 1)))
	if r.failed > 0 {
		s += fmt.Sprintf("; %d failed in the whole run, last: %v", r.failed, r.lastErr)
	}
	return s
}

// quantile is the q-quantile of sorted durations (0 for none).
func quantile(sorted []time.Duration, q float64) time.Duration {
	if len(sorted) == 0 {
		return 0
	}
	return sorted[min(int(float64(len(sorted))*q), len(sorted)-1)]
}

func secs(d time.Duration) string { return fmt.Sprintf("%.2f s", d.Seconds()) }

func millis(d time.Duration) string { return fmt.Sprintf("%.2f ms", float64(d.Microseconds())/1000) }

func kib(bytes float64) string { return fmt.Sprintf("%.1f KiB", bytes/(1<<10)) }

func mib(bytes float64) string { return fmt.Sprintf("%.1f MiB", bytes/(1<<20)) }

func sleep(ctx context.Context, d time.Duration) error {
	if d <= 0 {
		return ctx.Err()
	}
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-t.C:
		return nil
	}
}

// metricSet is one scrape of meshca's /metrics: every sample's value by
// its name and labels as exposed, e.g. `meshca_sds_streams{mode="central"}`.
type metricSet map[string]float64

func (b *sdsBench) scrape() (metricSet, error) {
	m := metricSet{clientCPUKey: ownCPU()}
	if b.admin == "" {
		return m, nil
	}
	url := b.admin + "/metrics"
	resp, err := http.Get(url)
	if err != nil {
		return nil, fmt.Errorf("scrape %s: %w", url, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("scrape %s: %s", url, resp.Status)
	}
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		if name, val, ok := cutValue(sc.Text()); ok {
			m[name] = val
		}
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("scrape %s: %w", url, err)
	}
	return m, nil
}

// clientCPUKey holds, in every metricSet, the CPU seconds meshctl itself
// had used when the set was scraped.
const clientCPUKey = "meshctl:cpu_seconds"

// ownCPU is the CPU time this process has used, in seconds, from
// /proc/self/stat (user + system, in clock ticks of 1/100 s); 0 where
// there is no /proc.
func ownCPU() float64 {
	data, err := os.ReadFile("/proc/self/stat")
	if err != nil {
		return 0
	}
	// The fields after the command name, which is in parentheses: utime
	// and stime are the 12th and 13th.
	i := bytes.LastIndexByte(data, ')')
	if i < 0 {
		return 0
	}
	f := strings.Fields(string(data[i+1:]))
	if len(f) < 13 {
		return 0
	}
	utime, err1 := strconv.ParseFloat(f[11], 64)
	stime, err2 := strconv.ParseFloat(f[12], 64)
	if err1 != nil || err2 != nil {
		return 0
	}
	return (utime + stime) / 100
}

func (m metricSet) get(name string) float64 { return m[name] }

func (m metricSet) cpu() float64 { return m["process_cpu_seconds_total"] }

// sum adds the samples whose name starts with prefix and contains every
// one of labels.
func (m metricSet) sum(prefix string, labels ...string) float64 {
	var total float64
	for name, v := range m {
		if !strings.HasPrefix(name, prefix) {
			continue
		}
		all := true
		for _, l := range labels {
			all = all && strings.Contains(name, l)
		}
		if all {
			total += v
		}
	}
	return total
}

// fetch GETs url into file ("" discards the body).
func fetch(ctx context.Context, url, file string) error {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return err
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return fmt.Errorf("get %s: %w", url, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("get %s: %s", url, resp.Status)
	}
	if file == "" {
		_, err = io.Copy(io.Discard, resp.Body)
		return err
	}
	data, err := io.ReadAll(resp.Body)
	if err != nil {
		return fmt.Errorf("get %s: %w", url, err)
	}
	return os.WriteFile(file, data, 0o644)
}

// pprofTop prints `go tool pprof -top` of a profile, indented.
func pprofTop(ctx context.Context, w io.Writer, file string, extra ...string) {
	args := append([]string{"tool", "pprof", "-top", "-nodecount=15"}, extra...)
	args = append(args, file)
	out, err := exec.CommandContext(ctx, "go", args...).CombinedOutput()
	if err != nil {
		fmt.Fprintf(w, "  (go %s failed: %v)\n", strings.Join(args, " "), err)
		return
	}
	for _, l := range strings.Split(strings.TrimRight(string(out), "\n"), "\n") {
		fmt.Fprintf(w, "    %s\n", l)
	}
}

// initPluggedCA writes the first CA into the plugged directory of the
// configuration at cfgPath, for meshca to start with.
func initPluggedCA(cfgPath string, stdout io.Writer) error {
	cfg, err := loadMeshcaConfig(cfgPath)
	if err != nil {
		return err
	}
	if cfg.Backend.Type != backends.TypePlugged {
		return fmt.Errorf("--init-ca writes a plugged CA, but backend.type is %q", cfg.Backend.Type)
	}
	if _, err := writePluggedCA(cfg.Backend.Plugged.Dir, "initial"); err != nil {
		return err
	}
	fmt.Fprintf(stdout, "wrote a new root and intermediate into %s\n", cfg.Backend.Plugged.Dir)
	return nil
}

// writePluggedCA writes a new P-256 root and an intermediate under it
// into dir, in Istio's cacerts layout, and returns the intermediate's PEM:
// every leaf signed under it carries it in its chain.
func writePluggedCA(dir, label string) ([]byte, error) {
	now := time.Now()
	stamp := now.UTC().Format("15:04:05.000")
	rootKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	rootTmpl := caTemplate(fmt.Sprintf("meshca bench-sds %s root %s", label, stamp), now)
	rootTmpl.MaxPathLen = 1
	rootDER, err := x509.CreateCertificate(rand.Reader, rootTmpl, rootTmpl, rootKey.Public(), rootKey)
	if err != nil {
		return nil, fmt.Errorf("create root: %w", err)
	}
	root, err := x509.ParseCertificate(rootDER)
	if err != nil {
		return nil, err
	}
	interKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	interTmpl := caTemplate(fmt.Sprintf("meshca bench-sds %s intermediate %s", label, stamp), now)
	interTmpl.MaxPathLenZero = true
	interDER, err := x509.CreateCertificate(rand.Reader, interTmpl, root, interKey.Public(), rootKey)
	if err != nil {
		return nil, fmt.Errorf("create intermediate: %w", err)
	}
	keyDER, err := x509.MarshalPKCS8PrivateKey(interKey)
	if err != nil {
		return nil, fmt.Errorf("encode intermediate key: %w", err)
	}
	rootPEM := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: rootDER})
	interPEM := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: interDER})
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("create plugged CA dir: %w", err)
	}
	for _, f := range []struct {
		name string
		data []byte
		perm os.FileMode
	}{
		{plugged.CAKeyFile, pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: keyDER}), 0o600},
		{plugged.CACertFile, interPEM, 0o644},
		{plugged.CertChainFile, append(slices.Clone(interPEM), rootPEM...), 0o644},
		{plugged.RootCertFile, rootPEM, 0o644},
	} {
		if err := renameio.WriteFile(filepath.Join(dir, f.name), f.data, f.perm); err != nil {
			return nil, fmt.Errorf("write plugged CA: %w", err)
		}
	}
	return interPEM, nil
}

func caTemplate(cn string, now time.Time) *x509.Certificate {
	serial, _ := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	return &x509.Certificate{
		SerialNumber: serial, Subject: pkix.Name{Organization: []string{"meshca"}, CommonName: cn},
		NotBefore: now.Add(-time.Hour), NotAfter: now.Add(48 * time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
	}
}
