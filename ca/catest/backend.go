package catest

import (
	"context"
	"crypto"
	"crypto/rand"
	"crypto/x509"
	"fmt"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/meshca/meshca/ca"
)

// Holder is a tiny ca.Holder for tests of the CA core and the edges: a
// P-256 root, and an intermediate below it when asked for, made with this
// package's keys. Replace publishes a new state to a running CA.
type Holder struct {
	state   ca.State
	updates chan ca.State
}

// NewHolder returns a Holder valid for the next 48 hours. With
// intermediate, leaves are signed by an intermediate below the root.
func NewHolder(t testing.TB, intermediate bool) *Holder {
	t.Helper()
	return &Holder{state: NewState(t, intermediate, time.Now().Add(48*time.Hour)), updates: make(chan ca.State)}
}

// NewState returns a signing state: a new P-256 root valid until notAfter
// and, with intermediate, an intermediate below it that signs.
func NewState(t testing.TB, intermediate bool, notAfter time.Time) ca.State {
	t.Helper()
	now := time.Now()
	rootKey := Key(t, "P-256")
	tmpl := CATemplate("catest root", now.Add(-time.Hour), notAfter)
	tmpl.MaxPathLen = 1
	root := Issue(t, tmpl, rootKey, nil, nil)
	if !intermediate {
		s, err := ca.NewSigningCA(root, rootKey, nil)
		require.NoError(t, err)
		return ca.State{Signing: s, Roots: []*x509.Certificate{root}}
	}
	interKey := Key(t, "P-256")
	it := CATemplate("catest intermediate", now.Add(-time.Hour), notAfter)
	it.MaxPathLen, it.MaxPathLenZero = 0, true
	inter := Issue(t, it, interKey, root, rootKey)
	s, err := ca.NewSigningCA(inter, interKey, []*x509.Certificate{root})
	require.NoError(t, err)
	return ca.State{Signing: s, Roots: []*x509.Certificate{root}}
}

// Current implements ca.Holder.
func (h *Holder) Current() ca.State { return h.state }

// Watch implements ca.Holder: it publishes what Replace is given.
func (h *Holder) Watch(ctx context.Context, publish func(ca.State)) error {
	for {
		select {
		case <-ctx.Done():
			return nil
		case s := <-h.updates:
			publish(s)
		}
	}
}

// Replace hands s to the CA running Watch, and returns once it has it.
func (h *Holder) Replace(ctx context.Context, s ca.State) {
	select {
	case h.updates <- s:
	case <-ctx.Done():
	}
}

// NewCA returns a CA over a new Holder (see NewHolder) with default policy.
func NewCA(t testing.TB, intermediate bool) *ca.CA {
	t.Helper()
	c, err := ca.New(context.Background(), ca.Config{Backend: NewHolder(t, intermediate)})
	require.NoError(t, err)
	return c
}

// Authority is a tiny ca.Authority for tests: it mints intermediates from
// a P-256 root, and fails while Down is set.
type Authority struct {
	Root    *x509.Certificate
	rootKey crypto.Signer
	// Down makes MintCA fail as an unreachable upstream does.
	Down atomic.Bool
	// Mints counts MintCA calls.
	Mints atomic.Int64
}

// NewAuthority returns an Authority whose root is valid for rootTTL.
func NewAuthority(t testing.TB, rootTTL time.Duration) *Authority {
	t.Helper()
	now := time.Now()
	key := Key(t, "P-256")
	tmpl := CATemplate("catest authority root", now.Add(-time.Hour), now.Add(rootTTL))
	tmpl.MaxPathLen = 1
	return &Authority{Root: Issue(t, tmpl, key, nil, nil), rootKey: key}
}

// MintCA implements ca.Authority.
func (a *Authority) MintCA(_ context.Context, req ca.MintRequest) (*ca.MintedCA, error) {
	a.Mints.Add(1)
	if a.Down.Load() {
		return nil, fmt.Errorf("%w: catest authority is down", ca.ErrBackendUnavailable)
	}
	now := time.Now()
	tmpl := CATemplate(req.CSR.Subject.CommonName, now.Add(-time.Minute), now.Add(req.TTL))
	tmpl.SerialNumber = serial()
	tmpl.MaxPathLen, tmpl.MaxPathLenZero = 0, true
	if tmpl.NotAfter.After(a.Root.NotAfter) {
		tmpl.NotAfter = a.Root.NotAfter
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, a.Root, req.CSR.PublicKey, a.rootKey)
	if err != nil {
		return nil, err
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, err
	}
	return &ca.MintedCA{Cert: cert, Chain: []*x509.Certificate{a.Root}, Roots: []*x509.Certificate{a.Root}}, nil
}
