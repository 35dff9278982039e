package edge

import (
	"context"
	"errors"
	"fmt"
	"hash/maphash"
	"runtime"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promauto"
	"golang.org/x/time/rate"
	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/durationpb"
)

// AdmissionConfig configures admission control: who may ask how often,
// and how much issuance runs at once. The rates are enforced only while
// every issuance slot is taken.
type AdmissionConfig struct {
	// PeerRate and PeerBurst bound requests per client address, before
	// authentication. Defaults 10,000/s and 20,000: above what one replica
	// signs on 2 cores, so that they bite only when set for a fleet (SPIRE
	// caps 500/s per node agent).
	PeerRate  float64
	PeerBurst int
	// IdentityRate and IdentityBurst bound requests per authenticated
	// identity (a service account's replicas share it). Defaults 5,000/s
	// and 10,000.
	IdentityRate  float64
	IdentityBurst int
	// MaxInFlight bounds requests being authenticated and issued at once
	// (a TokenReview or an upstream signer waits on the network while
	// holding a slot, hence the margin over the CPU count); Queue bounds
	// those waiting for a slot, and QueueWait how long one waits. Defaults
	// 16 × GOMAXPROCS, 512 and 1s.
	MaxInFlight int
	Queue       int
	QueueWait   time.Duration
	// MaxRenewalsInFlight bounds the renewals among them. Renewals are
	// CPU work that can wait (the proxy holds a valid certificate): with
	// few running at once, a new pod competes for the CPU with those few,
	// not with a whole renewal storm. Default GOMAXPROCS/2 (at least 1):
	// renewals keep at most half the CPUs busy, the rest is for new pods.
	// The cap holds only while first certificates are being asked for
	// (one within FirstWindow): renewals alone use every slot.
	MaxRenewalsInFlight int
	// MaxRenewalsQueued bounds the renewals waiting for a slot while the
	// renewal cap is on; more are refused at once with ResourceExhausted
	// and a retry hint. Each waiting renewal is a proxy's request read,
	// parsed and parked, and its connection's traffic, on the CPUs the new
	// pods need; a renewing proxy loses nothing by coming back a second
	// later. Default 2 × GOMAXPROCS.
	MaxRenewalsQueued int
	// FirstWindow is how long after a first certificate was asked for the
	// renewal cap stays on. Default 1s.
	FirstWindow time.Duration
	// MaxKeys bounds the per-peer and per-identity limiters remembered.
	// Default 100,000.
	MaxKeys int
	// Metrics counts what is shed. Default: unregistered.
	Metrics *AdmissionMetrics
}

// AdmissionMetrics are admission control's metrics.
type AdmissionMetrics struct {
	// Shed counts refused requests by reason (peer_rate, identity_rate,
	// overload) and priority (first, renewal).
	Shed *prometheus.CounterVec
	// Queued is the time a request waited for an issuance slot.
	Queued prometheus.Histogram
}

// NewAdmissionMetrics creates the metrics on reg (nil: unregistered).
func NewAdmissionMetrics(reg prometheus.Registerer) *AdmissionMetrics {
	f := promauto.With(reg)
	return &AdmissionMetrics{
		Shed: f.NewCounterVec(prometheus.CounterOpts{
			Name: "meshca_admission_shed_total",
			Help: "Certificate requests refused with ResourceExhausted, by reason (peer_rate, identity_rate, overload) and priority (first, renewal).",
		}, []string{"reason", "priority"}),
		Queued: f.NewHistogram(prometheus.HistogramOpts{
			Name:    "meshca_admission_queue_seconds",
			Help:    "Time certificate requests waited for an issuance slot.",
			Buckets: []float64{.0001, .0005, .001, .005, .01, .025, .05, .1, .25, .5, 1},
		}),
	}
}

// Priority orders requests under overload.
type Priority int

// Priorities. A pod's first certificate comes before renewals: a renewing
// proxy still holds a valid certificate and can wait.
const (
	PriorityFirst Priority = iota
	PriorityRenewal
)

func (p Priority) String() string {
	if p == PriorityRenewal {
		return "renewal"
	}
	return "first"
}

// ErrShed is wrapped by admission refusals. Status maps it to
// ResourceExhausted with a retry hint.
var ErrShed = errors.New("shed")

// ShedError is a refusal with the time after which a retry may succeed.
type ShedError struct {
	Reason     string
	RetryAfter time.Duration
}

func (e *ShedError) Error() string {
	switch e.Reason {
	case "peer_rate":
		return fmt.Sprintf("too many requests from this address; retry after %s", e.RetryAfter.Round(time.Millisecond))
	case "identity_rate":
		return fmt.Sprintf("too many requests for this identity; retry after %s", e.RetryAfter.Round(time.Millisecond))
	}
	return fmt.Sprintf("meshca is at capacity; retry after %s", e.RetryAfter.Round(time.Millisecond))
}

// Unwrap makes a *ShedError match ErrShed.
func (e *ShedError) Unwrap() error { return ErrShed }

// shedStatus is the status of a refusal: ResourceExhausted with a
// RetryInfo detail.
func shedStatus(e *ShedError) *status.Status {
	st := status.New(codes.ResourceExhausted, e.Error())
	if d, err := st.WithDetails(&errdetails.RetryInfo{RetryDelay: durationpb.New(e.RetryAfter)}); err == nil {
		return d
	}
	return st
}

// Admission decides whether a request may go on. It is safe for
// concurrent use.
type Admission struct {
	cfg      AdmissionConfig
	peers    *limiters
	ids      *limiters
	mu       sync.Mutex
	inFlight int
	renewing int // renewals among inFlight
	// lastFirst is when a first certificate was last asked for.
	lastFirst time.Time
	// waiting holds, per priority, the requests queued for a slot.
	waiting [2][]chan struct{}

	// issued remembers, by pod (or identity and address), until when the
	// last certificate issued to it is valid: a request from it before
	// then is a renewal.
	issuedMu sync.Mutex
	issued   map[string]time.Time
	// subjects remembers what each token (by hash) names, so that a token
	// seen before is not decoded again.
	seed     maphash.Seed
	subjects map[uint64]string
}

// NewAdmission returns an Admission with cfg's defaults filled in.
func NewAdmission(cfg AdmissionConfig) *Admission {
	if cfg.PeerRate <= 0 {
		cfg.PeerRate = 10000
	}
	if cfg.PeerBurst <= 0 {
		cfg.PeerBurst = 20000
	}
	if cfg.IdentityRate <= 0 {
		cfg.IdentityRate = 5000
	}
	if cfg.IdentityBurst <= 0 {
		cfg.IdentityBurst = 10000
	}
	if cfg.MaxInFlight <= 0 {
		cfg.MaxInFlight = 16 * runtime.GOMAXPROCS(0)
	}
	if cfg.MaxRenewalsInFlight <= 0 {
		cfg.MaxRenewalsInFlight = max(1, runtime.GOMAXPROCS(0)/2)
	}
	cfg.MaxRenewalsInFlight = min(cfg.MaxRenewalsInFlight, cfg.MaxInFlight)
	if cfg.MaxRenewalsQueued <= 0 {
		cfg.MaxRenewalsQueued = 2 * runtime.GOMAXPROCS(0)
	}
	if cfg.FirstWindow <= 0 {
		cfg.FirstWindow = time.Second
	}
	if cfg.Queue <= 0 {
		cfg.Queue = 512
	}
	if cfg.QueueWait <= 0 {
		cfg.QueueWait = time.Second
	}
	if cfg.MaxKeys <= 0 {
		cfg.MaxKeys = 100_000
	}
	if cfg.Metrics == nil {
		cfg.Metrics = NewAdmissionMetrics(nil)
	}
	return &Admission{cfg: cfg,
		peers:  newLimiters(rate.Limit(cfg.PeerRate), cfg.PeerBurst, cfg.MaxKeys),
		ids:    newLimiters(rate.Limit(cfg.IdentityRate), cfg.IdentityBurst, cfg.MaxKeys),
		issued: map[string]time.Time{}, seed: maphash.MakeSeed(), subjects: map[uint64]string{}}
}

// subject is what token names for renewal keys (see unverifiedPod),
// remembered by the token's hash. A collision only misorders a request.
func (a *Admission) subject(token string) string {
	h := maphash.String(a.seed, token)
	a.issuedMu.Lock()
	s, ok := a.subjects[h]
	a.issuedMu.Unlock()
	if ok {
		return s
	}
	s = unverifiedPod(token)
	a.issuedMu.Lock()
	if len(a.subjects) >= a.cfg.MaxKeys {
		a.subjects = map[uint64]string{}
	}
	a.subjects[h] = s
	a.issuedMu.Unlock()
	return s
}

// recent reports whether key holds a certificate it was issued.
func (a *Admission) recent(key string) bool {
	a.issuedMu.Lock()
	defer a.issuedMu.Unlock()
	until, ok := a.issued[key]
	return ok && time.Now().Before(until)
}

// note records that key was issued a certificate valid until until.
func (a *Admission) note(key string, until time.Time) {
	a.issuedMu.Lock()
	defer a.issuedMu.Unlock()
	if _, ok := a.issued[key]; !ok && len(a.issued) >= a.cfg.MaxKeys {
		now := time.Now()
		for k, u := range a.issued {
			if !now.Before(u) {
				delete(a.issued, k)
			}
		}
		if len(a.issued) >= a.cfg.MaxKeys {
			a.issued = map[string]time.Time{}
		}
	}
	a.issued[key] = until
}

// busy reports whether every issuance slot is taken. Rate limits apply
// only then: an idle meshca never refuses work it can do, and under load
// the peers and identities beyond their rate are the ones shed.
func (a *Admission) busy() bool {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.inFlight >= a.cfg.MaxInFlight
}

// Peer admits one request from addr (host part of the peer address).
func (a *Admission) Peer(addr string, p Priority) error {
	if ok, wait := a.peers.allow(addr); !ok && a.busy() {
		a.cfg.Metrics.Shed.WithLabelValues("peer_rate", p.String()).Inc()
		return &ShedError{Reason: "peer_rate", RetryAfter: wait}
	}
	return nil
}

// Identity admits one request for an authenticated identity.
func (a *Admission) Identity(id string, p Priority) error {
	if ok, wait := a.ids.allow(id); !ok && a.busy() {
		a.cfg.Metrics.Shed.WithLabelValues("identity_rate", p.String()).Inc()
		return &ShedError{Reason: "identity_rate", RetryAfter: wait}
	}
	return nil
}

// Acquire waits for an issuance slot and returns its release. When the
// queue is full or the wait runs out it refuses. Renewals are refused
// first: they may fill only half the queue, a freed slot goes to a first
// certificate before them, and while first certificates are being asked
// for at most MaxRenewalsInFlight of them run and MaxRenewalsQueued wait.
func (a *Admission) Acquire(ctx context.Context, p Priority) (release func(), err error) {
	release = a.releaseFirst
	if p == PriorityRenewal {
		release = a.releaseRenewal
	}
	a.mu.Lock()
	if p == PriorityFirst {
		a.lastFirst = time.Now()
	}
	if a.canRunLocked(p) && len(a.waiting[PriorityFirst]) == 0 && (p == PriorityFirst || len(a.waiting[PriorityRenewal]) == 0) {
		a.startLocked(p)
		a.mu.Unlock()
		return release, nil
	}
	queued := len(a.waiting[PriorityFirst]) + len(a.waiting[PriorityRenewal])
	limit := a.cfg.Queue
	if p == PriorityRenewal {
		limit /= 2
	}
	renewalsFull := p == PriorityRenewal && a.firstsLocked() && len(a.waiting[PriorityRenewal]) >= a.cfg.MaxRenewalsQueued
	if queued >= limit || renewalsFull {
		a.mu.Unlock()
		return nil, a.overload(p)
	}
	ch := make(chan struct{})
	a.waiting[p] = append(a.waiting[p], ch)
	a.mu.Unlock()

	start := time.Now()
	t := time.NewTimer(a.cfg.QueueWait)
	defer t.Stop()
	select {
	case <-ch:
		a.cfg.Metrics.Queued.Observe(time.Since(start).Seconds())
		return release, nil
	case <-t.C:
		err = a.overload(p)
	case <-ctx.Done():
		err = ctx.Err()
	}
	a.mu.Lock()
	for i, w := range a.waiting[p] {
		if w == ch {
			a.waiting[p] = append(a.waiting[p][:i], a.waiting[p][i+1:]...)
			a.mu.Unlock()
			return nil, err
		}
	}
	a.mu.Unlock()
	// Handed a slot just as it gave up: pass it on.
	release()
	return nil, err
}

func (a *Admission) overload(p Priority) error {
	a.cfg.Metrics.Shed.WithLabelValues("overload", p.String()).Inc()
	return &ShedError{Reason: "overload", RetryAfter: a.cfg.QueueWait}
}

// canRunLocked says whether a request of priority p may start now.
func (a *Admission) canRunLocked(p Priority) bool {
	if a.inFlight >= a.cfg.MaxInFlight {
		return false
	}
	return p == PriorityFirst || a.renewing < a.cfg.MaxRenewalsInFlight || !a.firstsLocked()
}

// firstsLocked reports whether first certificates are being asked for
// (one within FirstWindow): the renewal caps are on.
func (a *Admission) firstsLocked() bool {
	return time.Since(a.lastFirst) <= a.cfg.FirstWindow
}

func (a *Admission) startLocked(p Priority) {
	a.inFlight++
	if p == PriorityRenewal {
		a.renewing++
	}
}

func (a *Admission) releaseFirst()   { a.release(PriorityFirst) }
func (a *Admission) releaseRenewal() { a.release(PriorityRenewal) }

// release frees a slot of priority p and starts the waiters that may run
// now: first certificates before renewals.
func (a *Admission) release(p Priority) {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.inFlight--
	if p == PriorityRenewal {
		a.renewing--
	}
	for _, q := range []Priority{PriorityFirst, PriorityRenewal} {
		for len(a.waiting[q]) > 0 && a.canRunLocked(q) {
			ch := a.waiting[q][0]
			a.waiting[q] = a.waiting[q][1:]
			a.startLocked(q)
			close(ch)
		}
	}
}

// limiters is a bounded set of token buckets by key.
type limiters struct {
	mu    sync.Mutex
	limit rate.Limit
	burst int
	max   int
	m     map[string]*rate.Limiter
}

func newLimiters(limit rate.Limit, burst, max int) *limiters {
	return &limiters{limit: limit, burst: burst, max: max, m: map[string]*rate.Limiter{}}
}

// allow takes a token for key, or says how long until one is due.
func (l *limiters) allow(key string) (bool, time.Duration) {
	now := time.Now()
	l.mu.Lock()
	lim, ok := l.m[key]
	if !ok {
		if len(l.m) >= l.max {
			// Drop the full buckets: they hold no state worth keeping.
			for k, v := range l.m {
				if v.TokensAt(now) >= float64(l.burst) {
					delete(l.m, k)
				}
			}
			if len(l.m) >= l.max {
				l.m = map[string]*rate.Limiter{}
			}
		}
		lim = rate.NewLimiter(l.limit, l.burst)
		l.m[key] = lim
	}
	l.mu.Unlock()
	r := lim.ReserveN(now, 1)
	if d := r.DelayFrom(now); d > 0 {
		r.CancelAt(now)
		return false, d
	}
	return true, 0
}
