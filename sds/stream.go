package sds

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"slices"
	"strconv"
	"sync"
	"time"

	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	discovery "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"github.com/envoyproxy/go-control-plane/pkg/cache/types"
	cachev3 "github.com/envoyproxy/go-control-plane/pkg/cache/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	rpcstatus "google.golang.org/genproto/googleapis/rpc/status"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/anypb"

	"github.com/meshca/meshca/authn"
)

// stream is one open SDS stream: who it is, the small cache that
// go-control-plane's server answers it from, and what the proxy accepted.
type stream struct {
	srv      *Server
	id       int64
	protocol string
	peer     string
	opened   time.Time
	caller   *authn.Caller
	ident    spiffeid.ID

	ctx    context.Context
	cancel context.CancelCauseFunc
	cache  *cachev3.LinearCache

	mu sync.Mutex
	// names are the served names ever asked for on the stream, by kind;
	// refused are those refused, each logged once.
	names   map[string]kind
	refused map[string]bool
	node    string
	// cred and bundle are what the cache holds now.
	cred   *material
	bundle *servedBundle
	// version mirrors the cache's version counter: one step per update.
	version uint64
	// history maps recent cache versions to what they held, for ACKs.
	history [4]cacheState
	// pendingNonce and pendingVersion are the last response sent.
	pendingNonce   string
	pendingVersion uint64
	// accepted is the cache state the proxy last ACKed.
	accepted cacheState
	lastACK  time.Time
	lastNACK time.Time
	nackMsg  string
	// Renewal (central mode).
	timer    *time.Timer
	queued   bool
	reissue  bool
	failures int
	endErr   error
}

// cacheState is what the cache held at one version.
type cacheState struct {
	version uint64
	cred    *material
	bundle  *servedBundle
}

func (st *stream) init(ctx context.Context) {
	st.ctx, st.cancel = context.WithCancelCause(ctx)
	st.cache = cachev3.NewLinearCache(resource.SecretType)
}

// end closes the stream with err, a gRPC status error.
func (st *stream) end(err error) {
	st.mu.Lock()
	if st.endErr == nil {
		st.endErr = err
	}
	st.mu.Unlock()
	st.cancel(err)
}

// result is the status the stream ends with.
func (st *stream) result(err error) error {
	st.mu.Lock()
	defer st.mu.Unlock()
	if st.endErr != nil {
		return st.endErr
	}
	return err
}

func (st *stream) stop() {
	st.cancel(context.Canceled)
	st.mu.Lock()
	defer st.mu.Unlock()
	if st.timer != nil {
		st.timer.Stop()
	}
}

// OnStreamOpen implements sotw.Callbacks.
func (st *stream) OnStreamOpen(context.Context, int64, string) error { return nil }

// OnStreamClosed implements sotw.Callbacks.
func (st *stream) OnStreamClosed(int64, *core.Node) {}

// OnStreamRequest implements sotw.Callbacks: it records ACKs and NACKs,
// and puts the requested secrets the stream may have into its cache before
// go-control-plane looks there.
func (st *stream) OnStreamRequest(_ int64, req *discovery.DiscoveryRequest) error {
	if err := st.request(req.GetTypeUrl(), req.GetNode(), req.GetResponseNonce(), req.GetErrorDetail()); err != nil {
		return err
	}
	if req.GetErrorDetail() != nil && req.GetVersionInfo() == "" {
		// A NACK of the first response. Without a version, the cache
		// would answer at once with an empty response, which a proxy
		// that NACKs again turns into a loop; the proxy is waiting for a
		// change, so wait with it.
		req.VersionInfo = "0"
	}
	names := req.GetResourceNames()
	if len(names) == 0 {
		// A wildcard request: everything the caller may have.
		names = []string{NameAll}
	}
	names = expand(names, st.ident)
	if len(req.GetResourceNames()) != 0 {
		req.ResourceNames = names
	}
	return st.subscribe(names, nil)
}

// OnStreamResponse implements sotw.Callbacks.
func (st *stream) OnStreamResponse(_ context.Context, _ int64, _ *discovery.DiscoveryRequest, resp *discovery.DiscoveryResponse) {
	st.sent(resp.GetNonce(), resp.GetVersionInfo())
}

// OnDeltaStreamOpen implements delta.Callbacks.
func (st *stream) OnDeltaStreamOpen(context.Context, int64, string) error { return nil }

// OnDeltaStreamClosed implements delta.Callbacks.
func (st *stream) OnDeltaStreamClosed(int64, *core.Node) {}

// OnStreamDeltaRequest implements delta.Callbacks.
func (st *stream) OnStreamDeltaRequest(_ int64, req *discovery.DeltaDiscoveryRequest) error {
	if err := st.request(req.GetTypeUrl(), req.GetNode(), req.GetResponseNonce(), req.GetErrorDetail()); err != nil {
		return err
	}
	sub := expand(req.GetResourceNamesSubscribe(), st.ident)
	req.ResourceNamesSubscribe = sub
	req.ResourceNamesUnsubscribe = expand(req.GetResourceNamesUnsubscribe(), st.ident)
	var initial []string
	if st.isFirst() && len(sub) == 0 {
		initial = []string{NameAll}
	}
	return st.subscribe(sub, expand(initial, st.ident))
}

// OnStreamDeltaResponse implements delta.Callbacks.
func (st *stream) OnStreamDeltaResponse(_ int64, _ *discovery.DeltaDiscoveryRequest, resp *discovery.DeltaDiscoveryResponse) {
	st.sent(resp.GetNonce(), resp.GetSystemVersionInfo())
}

func (st *stream) isFirst() bool {
	st.mu.Lock()
	defer st.mu.Unlock()
	return st.version == 0 && len(st.names) == 0
}

// request handles what every request carries: the type, the node (on the
// first), and the ACK or NACK of the last response.
func (st *stream) request(typeURL string, node *core.Node, nonce string, nack *rpcstatus.Status) error {
	if typeURL != "" && typeURL != resource.SecretType {
		return wrongType(typeURL)
	}
	st.mu.Lock()
	defer st.mu.Unlock()
	if node != nil && st.node == "" {
		st.node = node.GetId()
	}
	if nonce == "" || nonce != st.pendingNonce {
		return nil
	}
	st.pendingNonce = ""
	now := time.Now()
	if nack != nil {
		st.lastNACK, st.nackMsg = now, truncate(nack.GetMessage(), 512)
		st.srv.metrics.NACKs.Inc()
		st.srv.log.Warn("proxy rejected a secret (NACK); it keeps the last one it accepted",
			"identity", st.ident.String(), "node", st.node, "peer", st.peer, "nonce", nonce, "error_detail", st.nackMsg)
		return nil
	}
	st.lastACK = now
	for _, h := range st.history {
		if h.version != 0 && h.version <= st.pendingVersion && h.version >= st.accepted.version {
			st.accepted = h
		}
	}
	return nil
}

// sent records the response about to go out, whose ACK or NACK comes next.
func (st *stream) sent(nonce, version string) {
	v, err := strconv.ParseUint(version, 10, 64)
	if err != nil {
		return
	}
	st.mu.Lock()
	st.pendingNonce, st.pendingVersion = nonce, v
	st.mu.Unlock()
}

// subscribe adds names (and, silently, quiet: names a wildcard implies) to
// what the stream is served: it refuses and logs what the caller may not
// have, issues the stream's first certificate if one is asked for, and
// fills the cache.
func (st *stream) subscribe(names, quiet []string) error {
	st.mu.Lock()
	var wantCert bool
	for i, n := range append(names, quiet...) {
		if _, ok := st.names[n]; ok || st.refused[n] {
			continue
		}
		k := classify(n, st.ident)
		switch k {
		case kindCert, kindBundle:
			st.names[n] = k
			wantCert = wantCert || k == kindCert
			continue
		}
		if i >= len(names) {
			continue
		}
		if st.refused == nil {
			st.refused = map[string]bool{}
		}
		if len(st.refused) < 64 {
			st.refused[n] = true
		}
		if k == kindForeign {
			st.srv.metrics.Refusals.WithLabelValues("not_authorized").Inc()
			st.srv.log.Warn("stream asked for a secret its identity may not have; not served",
				"identity", st.ident.String(), "node", st.node, "peer", st.peer, "asked", truncate(n, 256))
		} else {
			st.srv.metrics.Refusals.WithLabelValues("unknown_name").Inc()
			st.srv.log.Info("stream asked for an unknown secret name; not served",
				"identity", st.ident.String(), "node", st.node, "asked", truncate(n, 256), "served_names", knownNames(st.ident))
		}
	}
	needCred := wantCert && st.cred == nil
	st.mu.Unlock()

	var cred *material
	if needCred {
		var err error
		if cred, err = st.srv.firstCredential(st); err != nil {
			return err
		}
	}
	bundle := st.srv.currentBundle()
	st.mu.Lock()
	defer st.mu.Unlock()
	if cred != nil && st.cred == nil {
		st.cred = cred
		st.srv.scheduleLocked(st, cred.renewAt)
	}
	if st.bundle == nil {
		st.bundle = bundle
	}
	st.fillLocked(kindCert|kindBundle, false)
	return nil
}

// fillLocked puts the secrets of kinds (a bit set of kindCert and
// kindBundle) into the cache, for every served name not holding them
// already (all such names when force).
func (st *stream) fillLocked(kinds kind, force bool) {
	cached := st.cache.GetResources()
	update := map[string]types.Resource{}
	for n, k := range st.names {
		if k&kinds == 0 {
			continue
		}
		if _, ok := cached[n]; ok && !force {
			continue
		}
		switch {
		case k == kindCert && st.cred != nil:
			update[n] = certSecret(n, st.cred)
		case k == kindBundle && st.bundle != nil && len(st.bundle.roots) > 0:
			update[n] = bundleSecret(n, st.bundle)
		}
	}
	if len(update) == 0 {
		return
	}
	st.version++
	copy(st.history[1:], st.history[:len(st.history)-1])
	st.history[0] = cacheState{version: st.version, cred: st.cred, bundle: st.bundle}
	for n := range update {
		st.srv.metrics.Pushes.WithLabelValues(pushLabel(n)).Inc()
	}
	_ = st.cache.UpdateResources(update, nil)
}

// pushBundle replaces the stream's bundle.
func (st *stream) pushBundle(b *servedBundle) {
	st.mu.Lock()
	defer st.mu.Unlock()
	if st.bundle == b {
		return
	}
	st.bundle = b
	st.fillLocked(kindBundle, true)
}

// pushCred replaces the stream's certificate.
func (st *stream) pushCred(m *material) {
	st.mu.Lock()
	defer st.mu.Unlock()
	st.cred = m
	st.fillLocked(kindCert, true)
}

// wants reports what the stream subscribes to.
func (st *stream) wants() (cert, bundle bool) {
	st.mu.Lock()
	defer st.mu.Unlock()
	return st.wantsLocked()
}

// wantsLocked is wants with st.mu held.
func (st *stream) wantsLocked() (cert, bundle bool) {
	for _, k := range st.names {
		cert = cert || k == kindCert
		bundle = bundle || k == kindBundle
	}
	return cert, bundle
}

// bundleAccepted reports whether the stream accepted bundle seq (or a
// later one), or does not subscribe to a bundle at all.
func (st *stream) bundleAccepted(seq uint64) bool {
	st.mu.Lock()
	defer st.mu.Unlock()
	if _, bundle := st.wantsLocked(); !bundle {
		return true
	}
	return st.accepted.bundle != nil && st.accepted.bundle.seq >= seq
}

// acceptedState is what the metrics need: the accepted certificate's
// NotAfter, and the accepted bundle when the stream subscribes to one.
func (st *stream) acceptedState() (notAfter time.Time, wantsBundle bool, bundleSeq uint64) {
	st.mu.Lock()
	defer st.mu.Unlock()
	if st.accepted.cred != nil {
		notAfter = st.accepted.cred.notAfter
	}
	_, wantsBundle = st.wantsLocked()
	if st.accepted.bundle != nil {
		bundleSeq = st.accepted.bundle.seq
	}
	return notAfter, wantsBundle, bundleSeq
}

func (st *stream) describe(cur *servedBundle) Proxy {
	st.mu.Lock()
	defer st.mu.Unlock()
	p := Proxy{Identity: st.ident.String(), Node: st.node, Mode: st.srv.mode, Protocol: st.protocol,
		Peer: st.peer, Connected: st.opened, NACKDetail: st.nackMsg}
	for n := range st.names {
		p.Resources = append(p.Resources, n)
	}
	slices.Sort(p.Resources)
	if m := st.cred; m != nil {
		p.Serial = m.serial.Text(16)
		na, ra := m.notAfter, m.renewAt
		p.NotAfter, p.NextRenewal = &na, &ra
	}
	_, wantsBundle := st.wantsLocked()
	p.BundleCurrent = wantsBundle && st.accepted.bundle != nil && st.accepted.bundle.seq == cur.seq
	if !st.lastACK.IsZero() {
		t := st.lastACK
		p.LastACK = &t
	}
	if !st.lastNACK.IsZero() {
		t := st.lastNACK
		p.LastNACK = &t
	}
	return p
}

// fetchResponse answers a fetch from the cache.
func (st *stream) fetchResponse(names []string) (*discovery.DiscoveryResponse, error) {
	res := st.cache.GetResources()
	out := &discovery.DiscoveryResponse{TypeUrl: resource.SecretType}
	h := sha256.New()
	for _, n := range names {
		r, ok := res[n]
		if !ok {
			continue
		}
		a, err := anypb.New(r)
		if err != nil {
			return nil, status.Error(codes.Internal, "could not encode a secret")
		}
		h.Write(a.Value)
		out.Resources = append(out.Resources, a)
	}
	out.VersionInfo = hex.EncodeToString(h.Sum(nil)[:8])
	return out, nil
}

func truncate(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return s[:n] + "…"
}
