// Package agent is the keeper that `meshca agent` runs beside a proxy, in
// the workload's pod. It generates the workload's private key in memory
// (the key never leaves the process), asks meshca's CreateCertificate for a
// certificate with the pod's projected service-account token, and keeps the
// credential and the trust bundle current. A Keeper is an sds.Source: the
// SDS server and the SPIFFE Workload API serve its snapshot.
//
// # Schedule
//
// Every renewal makes a new key and a new CSR. The next renewal is at the
// point meshca names in the response header service.RenewAtHeader (the
// policy's renewFraction and renewJitter); a response without it, or with a
// time outside the leaf's validity, falls back to Config.RenewFraction and
// Config.RenewJitter. A failed attempt is retried after a wait drawn
// uniformly from [RetryMin, min(RetryMax, RetryMin·2^(n-1))] for the n-th
// failure in a row ("full jitter", floored at RetryMin so it never spins).
// Meanwhile the current credential stays in the snapshot, and Ready stays
// nil until it expires. An expired credential also stays in the snapshot
// (a Snapshot's Credential is nil only before the first issue); Ready and
// the expiry metric say it is stale.
//
// # Responses
//
// A response is used only if its chain parses, the leaf's public key is the
// key just generated, the leaf carries exactly the expected SPIFFE ID as its
// only URI SAN, is no CA, is valid now, and chains to the response's last
// certificate, a self-signed CA certificate taken as the root. Anything else
// is a failed attempt, logged with what was wrong, and never published.
//
// # Trust bundle
//
// The bundle holds the root of the latest response. When a response comes
// with another root, the previous root stays in the bundle until the
// previous leaf's NotAfter, since peers may still hold leaves under it, and
// is then dropped (a new snapshot is published then). Roots are sorted by
// their DER bytes, so the same set is always in the same order.
//
// # Connecting to meshca
//
// The keeper dials meshca afresh for every attempt, over TLS, and closes the
// connection after the answer: renewals are hours apart, so there is no
// connection to keep healthy in between, and gRPC's own reconnect backoff
// never delays a retry. Each dial verifies meshca's serving certificate
// against the certificates in RootsFile, read again for that dial (the last
// good contents are used if it cannot be read), plus the roots in the
// current bundle: meshca's serving certificate is issued by the same CA, so
// when that CA moves to a new root the agent follows it without a new
// RootsFile. The token file is read again for every request, because the
// kubelet rotates it; the token is sent as `authorization: Bearer <token>`
// and is never logged or put in an error.
//
// # Metrics
//
// With Config.Registerer set, the keeper registers:
//
//   - meshca_agent_certificate_expiry_timestamp_seconds (gauge): the
//     current leaf's NotAfter, in Unix seconds; 0 before the first.
//   - meshca_agent_certificate_renew_timestamp_seconds (gauge): when the
//     current leaf is due for renewal, in Unix seconds; 0 before the first.
//   - meshca_agent_renewals_total{result="success"|"failure"} (counter):
//     finished renewal attempts. A failure is a request meshca refused or
//     that did not reach it, or a response the agent refused.
//   - meshca_agent_ready (gauge, read at scrape): 1 while the keeper holds
//     a valid, unexpired credential (Ready returns nil), else 0.
//   - meshca_agent_trust_bundle_roots (gauge): roots in the bundle served.
package agent

import (
	"context"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"net"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/meshca/meshca/ca"
	"github.com/meshca/meshca/sds"
)

// Config configures a Keeper.
type Config struct {
	// Address is meshca's gRPC address, host:port. Required.
	Address string
	// ServerName is the name meshca's serving certificate is checked
	// against, and the TLS SNI. Default: the host part of Address.
	ServerName string
	// RootsFile is a PEM bundle of CA certificates that meshca's serving
	// certificate chains to. Required. It is read again for every dial.
	RootsFile string
	// TokenFile is the projected service-account token. Required. It is
	// read again for every request.
	TokenFile string

	// TrustDomain, Namespace and ServiceAccount are the identity asked
	// for: spiffe://<TrustDomain>/ns/<Namespace>/sa/<ServiceAccount>.
	// Required.
	TrustDomain    spiffeid.TrustDomain
	Namespace      string
	ServiceAccount string

	// KeyType is the type of key generated for each certificate. Default
	// ca.KeyECDSAP256.
	KeyType ca.KeyType
	// TTL is the lifetime requested, in whole seconds (the rest is
	// dropped); meshca's policy may clamp it. 0 asks for the policy's
	// default.
	TTL time.Duration
	// RenewFraction and RenewJitter set the renewal point when meshca's
	// response does not (see ca.RenewAt). Defaults 0.5 and 0.
	RenewFraction float64
	RenewJitter   time.Duration
	// RetryMin and RetryMax bound the wait after a failed attempt.
	// Defaults 1s and 2m.
	RetryMin time.Duration
	RetryMax time.Duration
	// RequestTimeout bounds one attempt: dial, handshake and answer.
	// Default 10s.
	RequestTimeout time.Duration

	// Dial opens the connection to Address, for every attempt; TLS runs
	// over it. Default: TCP, resolving the name at every dial.
	Dial func(ctx context.Context, address string) (net.Conn, error)
	// Log receives operational logs. Default: discard.
	Log *slog.Logger
	// Registerer registers the metrics (see the package doc); one Keeper
	// per Registerer. nil: the metrics are kept but not registered.
	Registerer prometheus.Registerer
	// Now is the clock validity is checked against. Default time.Now.
	// Waits use the time package.
	Now func() time.Time
}

// Keeper keeps one workload's credential and trust bundle current. It is
// an sds.Source, and safe for concurrent use. Run must be called (once)
// for it to fetch anything.
type Keeper struct {
	cfg     Config
	id      spiffeid.ID
	metrics *metrics
	// fileRoots is RootsFile's last good contents. Only the goroutine
	// running Run touches it after New.
	fileRoots []*x509.Certificate

	mu      sync.Mutex
	snap    sds.Snapshot
	changed chan struct{}
	bundle  rootSet
	// lastErr is the last attempt's failure, nil after a success.
	lastErr error
}

var _ sds.Source = (*Keeper)(nil)

// New checks cfg, fills in the defaults and reads RootsFile once, so that
// a missing or empty file is reported at start. It makes no request.
func New(cfg Config) (*Keeper, error) {
	if cfg.Address == "" {
		return nil, errors.New("agent: Address is required")
	}
	host, _, err := net.SplitHostPort(cfg.Address)
	if err != nil {
		return nil, fmt.Errorf("agent: Address: %w", err)
	}
	if cfg.ServerName == "" {
		cfg.ServerName = host
	}
	if cfg.ServerName == "" {
		return nil, fmt.Errorf("agent: Address %q has no host to check the server against; set ServerName", cfg.Address)
	}
	if cfg.RootsFile == "" {
		return nil, errors.New("agent: RootsFile is required")
	}
	if cfg.TokenFile == "" {
		return nil, errors.New("agent: TokenFile is required")
	}
	if cfg.TrustDomain.IsZero() {
		return nil, errors.New("agent: TrustDomain is required")
	}
	if cfg.Namespace == "" || cfg.ServiceAccount == "" {
		return nil, errors.New("agent: Namespace and ServiceAccount are required")
	}
	id, err := spiffeid.FromSegments(cfg.TrustDomain, "ns", cfg.Namespace, "sa", cfg.ServiceAccount)
	if err != nil {
		return nil, fmt.Errorf("agent: identity: %w", err)
	}
	switch cfg.KeyType {
	case "":
		cfg.KeyType = ca.KeyECDSAP256
	case ca.KeyECDSAP256, ca.KeyECDSAP384, ca.KeyRSA2048, ca.KeyRSA3072, ca.KeyRSA4096, ca.KeyEd25519:
	default:
		return nil, fmt.Errorf("agent: unknown KeyType %q", cfg.KeyType)
	}
	if cfg.TTL < 0 {
		return nil, fmt.Errorf("agent: TTL %s is negative", cfg.TTL)
	}
	if cfg.RenewFraction == 0 {
		cfg.RenewFraction = 0.5
	}
	if cfg.RenewFraction < 0 || cfg.RenewFraction > 1 {
		return nil, fmt.Errorf("agent: RenewFraction %v is outside (0, 1]", cfg.RenewFraction)
	}
	if cfg.RenewJitter < 0 {
		return nil, fmt.Errorf("agent: RenewJitter %s is negative", cfg.RenewJitter)
	}
	if cfg.RetryMin <= 0 {
		cfg.RetryMin = time.Second
	}
	if cfg.RetryMax <= 0 {
		cfg.RetryMax = 2 * time.Minute
	}
	if cfg.RetryMax < cfg.RetryMin {
		return nil, fmt.Errorf("agent: RetryMax %s is below RetryMin %s", cfg.RetryMax, cfg.RetryMin)
	}
	if cfg.RequestTimeout <= 0 {
		cfg.RequestTimeout = 10 * time.Second
	}
	if cfg.Dial == nil {
		var d net.Dialer
		cfg.Dial = func(ctx context.Context, address string) (net.Conn, error) { return d.DialContext(ctx, "tcp", address) }
	}
	if cfg.Log == nil {
		cfg.Log = slog.New(slog.DiscardHandler)
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	roots, err := readRoots(cfg.RootsFile)
	if err != nil {
		return nil, fmt.Errorf("agent: %w", err)
	}
	k := &Keeper{
		cfg:       cfg,
		id:        id,
		fileRoots: roots,
		snap:      sds.Snapshot{Bundle: sds.Bundle{TrustDomain: cfg.TrustDomain}},
		changed:   make(chan struct{}),
	}
	k.metrics = newMetrics(cfg.Registerer, k)
	return k, nil
}

// ID returns the SPIFFE ID the keeper asks for.
func (k *Keeper) ID() spiffeid.ID { return k.id }

// Watch implements sds.Source.
func (k *Keeper) Watch() (sds.Snapshot, <-chan struct{}) {
	k.mu.Lock()
	defer k.mu.Unlock()
	return k.snap, k.changed
}

// Ready returns nil while the keeper holds a credential that is valid now,
// and otherwise an error that says what is missing and why.
func (k *Keeper) Ready() error {
	k.mu.Lock()
	cred, lastErr := k.snap.Credential, k.lastErr
	k.mu.Unlock()
	why := "no attempt finished yet"
	if lastErr != nil {
		why = "last attempt failed: " + lastErr.Error()
	}
	if cred == nil {
		return errors.New("no certificate yet: " + why)
	}
	now, leaf := k.cfg.Now(), cred.Leaf()
	if !now.Before(leaf.NotAfter) {
		if lastErr == nil {
			why = "renewal pending"
		}
		return fmt.Errorf("certificate expired at %s: %s", leaf.NotAfter.UTC().Format(time.RFC3339), why)
	}
	if now.Before(leaf.NotBefore) {
		return fmt.Errorf("certificate not valid before %s (check the clock)", leaf.NotBefore.UTC().Format(time.RFC3339))
	}
	return nil
}

// Run keeps the credential current until ctx is done, then returns nil.
// It makes the first request at once.
func (k *Keeper) Run(ctx context.Context) error {
	var next time.Time // the next attempt; zero: now
	failures := 0
	for {
		if !k.cfg.Now().Before(next) {
			next = k.attempt(ctx, &failures)
			if ctx.Err() != nil {
				return nil
			}
		}
		wake := next
		if r := k.retireRoots(); !r.IsZero() && r.Before(wake) {
			wake = r
		}
		t := time.NewTimer(wake.Sub(k.cfg.Now()))
		select {
		case <-ctx.Done():
			t.Stop()
			return nil
		case <-t.C:
		}
	}
}

// attempt makes one renewal and returns when to make the next.
func (k *Keeper) attempt(ctx context.Context, failures *int) time.Time {
	cred, root, err := k.request(ctx)
	if ctx.Err() != nil {
		return time.Time{}
	}
	now := k.cfg.Now()
	if err != nil {
		*failures++
		wait := k.backoff(*failures)
		k.metrics.renewals.WithLabelValues("failure").Inc()
		k.mu.Lock()
		k.lastErr = err
		held := k.snap.Credential
		k.mu.Unlock()
		attrs := []any{"id", k.id.String(), "failures", *failures, "retry_in", wait.Round(time.Millisecond), "err", err}
		switch {
		case held == nil:
			k.cfg.Log.Error("certificate request failed; no certificate to serve yet", attrs...)
		case !now.Before(held.Leaf().NotAfter):
			attrs = append(attrs, "current_not_after", held.Leaf().NotAfter)
			k.cfg.Log.Error("certificate renewal failed; the current certificate has expired", attrs...)
		default:
			attrs = append(attrs, "current_not_after", held.Leaf().NotAfter)
			k.cfg.Log.Warn("certificate renewal failed; serving the current certificate", attrs...)
		}
		return now.Add(wait)
	}
	*failures = 0
	k.metrics.renewals.WithLabelValues("success").Inc()
	changed := k.install(cred, root, now)
	leaf := cred.Leaf()
	k.cfg.Log.Info("certificate renewed", "id", k.id.String(), "serial", leaf.SerialNumber.Text(16),
		"not_after", leaf.NotAfter, "renew_at", cred.RenewAt, "root_changed", changed)
	// Never sooner than RetryMin: a renewal point already past (a skewed
	// clock, a lifetime squeezed by an expiring CA) must not become a
	// busy loop.
	return maxTime(cred.RenewAt, now.Add(k.cfg.RetryMin))
}

// backoff returns the wait after the n-th failure in a row (n >= 1):
// uniformly random in [RetryMin, min(RetryMax, RetryMin·2^(n-1))].
func (k *Keeper) backoff(n int) time.Duration {
	lo, hi := k.cfg.RetryMin, k.cfg.RetryMin
	for i := 1; i < n && hi < k.cfg.RetryMax; i++ {
		hi *= 2
	}
	hi = min(hi, k.cfg.RetryMax)
	if hi <= lo {
		return lo
	}
	return lo + rand.N(hi-lo+1)
}

// install puts a new credential in force with its root, and reports
// whether the root changed.
func (k *Keeper) install(cred *sds.Credential, root *x509.Certificate, now time.Time) bool {
	k.mu.Lock()
	defer k.mu.Unlock()
	var prevNotAfter time.Time
	if prev := k.snap.Credential; prev != nil {
		prevNotAfter = prev.Leaf().NotAfter
	}
	changed := k.bundle.use(root, prevNotAfter)
	k.retireLocked(now)
	k.lastErr = nil
	k.publishLocked(sds.Snapshot{Credential: cred, Bundle: sds.Bundle{TrustDomain: k.cfg.TrustDomain, Roots: k.bundle.roots()}})
	k.metrics.expiry.Set(float64(cred.Leaf().NotAfter.Unix()))
	k.metrics.renewAt.Set(float64(cred.RenewAt.Unix()))
	return changed
}

// retireRoots drops the previous roots whose time is up, publishing a new
// snapshot if any went, and returns when the next one goes (zero: none
// left to retire).
func (k *Keeper) retireRoots() time.Time {
	k.mu.Lock()
	defer k.mu.Unlock()
	if k.retireLocked(k.cfg.Now()) {
		s := k.snap
		s.Bundle.Roots = k.bundle.roots()
		k.publishLocked(s)
	}
	return k.bundle.nextRetirement()
}

// retireLocked drops the previous roots whose time is up at now and
// reports whether any went. k.mu must be held.
func (k *Keeper) retireLocked(now time.Time) bool {
	dropped := k.bundle.retire(now)
	for _, r := range dropped {
		k.cfg.Log.Info("previous root dropped from the trust bundle", "root", r.Subject.String())
	}
	return len(dropped) > 0
}

// publishLocked puts s in force and wakes the watchers. k.mu must be held.
func (k *Keeper) publishLocked(s sds.Snapshot) {
	k.snap = s
	close(k.changed)
	k.changed = make(chan struct{})
	k.metrics.roots.Set(float64(len(s.Bundle.Roots)))
}

func maxTime(a, b time.Time) time.Time {
	if a.After(b) {
		return a
	}
	return b
}
