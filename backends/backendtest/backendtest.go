// Package backendtest is the conformance suite every ca.Backend's tests
// run: whatever signs, the leaves it returns must look and chain the same.
package backendtest

import (
	"context"
	"crypto"
	"crypto/x509"
	"encoding/pem"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/stretchr/testify/require"

	"github.com/meshca/meshca/ca"
	"github.com/meshca/meshca/ca/catest"
)

// Run checks the contract of ca.Backend against backends made by
// newBackend, which is called once per subtest and must return a ready
// backend whose signing certificate (or, for an Authority, whose minted
// intermediate) stays valid for at least two more hours. Each backend is
// put under a ca.CA, so Holders, Authorities and Upstreams answer the same
// questions the way meshca uses them. It uses the real clock for the
// validity it requests.
func Run(t *testing.T, newBackend func(t *testing.T) ca.Backend) {
	t.Helper()
	id := spiffeid.RequireFromString("spiffe://cluster.local/ns/backendtest/sa/workload")

	for _, kt := range []struct{ name, kind string }{{name: "ECDSA-P256", kind: "P-256"}, {name: "RSA-2048", kind: "RSA-2048"}} {
		t.Run("SignsWorkloadLeaf/"+kt.name, func(t *testing.T) {
			b := build(t, newBackend)
			key := catest.Key(t, kt.kind)
			notBefore := time.Now().Add(-time.Minute).Truncate(time.Second)
			notAfter := notBefore.Add(time.Hour)
			resp, err := b.Sign(t.Context(), ca.SignRequest{CSR: catest.CSR(t, key), ID: id, NotBefore: notBefore, NotAfter: notAfter})
			require.NoError(t, err)
			leaf := parseLeaf(t, resp)

			require.Len(t, leaf.URIs, 1)
			require.Equal(t, id.String(), leaf.URIs[0].String())
			require.Empty(t, leaf.DNSNames)
			require.Empty(t, leaf.IPAddresses)
			require.Empty(t, leaf.EmailAddresses)
			require.ElementsMatch(t, []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth}, leaf.ExtKeyUsage)
			require.NotZero(t, leaf.KeyUsage&x509.KeyUsageDigitalSignature)
			require.False(t, leaf.IsCA)
			require.True(t, key.Public().(interface{ Equal(crypto.PublicKey) bool }).Equal(leaf.PublicKey))

			if b.upstream {
				// An upstream counts the lifetime on its own clock, and
				// back-dates by its own rule.
				require.WithinDuration(t, notBefore, leaf.NotBefore, upstreamSlack, "NotBefore")
				require.WithinDuration(t, notAfter, leaf.NotAfter, upstreamSlack, "NotAfter")
			} else {
				require.True(t, leaf.NotBefore.Equal(notBefore), "NotBefore %s, asked for %s", leaf.NotBefore, notBefore)
				require.True(t, leaf.NotAfter.Equal(notAfter), "NotAfter %s, asked for %s", leaf.NotAfter, notAfter)
			}
			require.True(t, resp.NotBefore.Equal(leaf.NotBefore))
			require.True(t, resp.NotAfter.Equal(leaf.NotAfter))
			require.Zero(t, resp.Serial.Cmp(leaf.SerialNumber))
			require.NotEmpty(t, resp.SignedBy)

			chain := parseChain(t, resp.ChainPEM)
			require.NoError(t, leaf.CheckSignatureFrom(chain[0]), "leaf must be signed by ChainPEM[0]")
			bundle, err := b.TrustBundle(t.Context())
			require.NoError(t, err)
			require.NotEmpty(t, bundle)
			root := chain[len(chain)-1]
			require.True(t, containsCert(bundle, root), "ChainPEM must end with a root in TrustBundle")
			for _, usage := range []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth} {
				verify(t, leaf, bundle, chain, usage)
			}
		})
	}

	t.Run("CapsNotAfter", func(t *testing.T) {
		b := build(t, newBackend)
		if b.upstream {
			// An upstream caps at its own issuer, or at its own role's
			// bound; the core checks its answer either way
			// (ca.TestUpstreamLeafCappedAtIssuer).
			t.Skip("an upstream caps lifetimes itself")
		}
		probe := sign(t, b, id)
		signing := parseChain(t, probe.ChainPEM)[0]
		notBefore := time.Now().Truncate(time.Second)
		resp, err := b.Sign(t.Context(), ca.SignRequest{
			CSR: catest.CSR(t, catest.Key(t, "P-256")), ID: id,
			NotBefore: notBefore, NotAfter: signing.NotAfter.Add(365 * 24 * time.Hour),
		})
		require.NoError(t, err)
		leaf := parseLeaf(t, resp)
		require.True(t, leaf.NotAfter.Equal(signing.NotAfter), "NotAfter %s, signing CA's %s", leaf.NotAfter, signing.NotAfter)
		require.True(t, resp.NotAfter.Equal(signing.NotAfter))
		require.True(t, leaf.NotBefore.Equal(notBefore))
	})

	t.Run("SerialsUnique", func(t *testing.T) {
		b := build(t, newBackend)
		seen := map[string]bool{}
		for range 50 {
			s := sign(t, b, id).Serial.String()
			require.False(t, seen[s], "duplicate serial %s", s)
			seen[s] = true
		}
	})

	t.Run("ConcurrentSign", func(t *testing.T) {
		b := build(t, newBackend)
		csr := catest.CSR(t, catest.Key(t, "P-256"))
		const workers, each = 8, 10
		var (
			mu      sync.Mutex
			serials = map[string]bool{}
			errs    []error
			wg      sync.WaitGroup
		)
		for range workers {
			wg.Go(func() {
				for range each {
					now := time.Now()
					resp, err := b.Sign(t.Context(), ca.SignRequest{CSR: csr, ID: id, NotBefore: now, NotAfter: now.Add(time.Hour)})
					mu.Lock()
					switch {
					case err != nil:
						errs = append(errs, err)
					case serials[resp.Serial.String()]:
						errs = append(errs, fmt.Errorf("duplicate serial %s", resp.Serial))
					default:
						serials[resp.Serial.String()] = true
					}
					mu.Unlock()
				}
			})
		}
		wg.Wait()
		require.Empty(t, errs)
		require.Len(t, serials, workers*each)
	})
}

func sign(t *testing.T, b signer, id spiffeid.ID) *ca.SignResponse {
	t.Helper()
	now := time.Now()
	resp, err := b.Sign(t.Context(), ca.SignRequest{CSR: catest.CSR(t, catest.Key(t, "P-256")), ID: id, NotBefore: now, NotAfter: now.Add(time.Hour)})
	require.NoError(t, err)
	return resp
}

// upstreamSlack is how far an upstream leaf's validity may be from what was
// asked, in the suite.
const upstreamSlack = 2 * time.Minute

// Held is a backend under a CA, seen as meshca's edges see it. Backend
// tests use it to sign and inspect through the CA core.
type Held struct {
	CA *ca.CA
	// upstream says the backend is a ca.Upstream, which signs every leaf.
	upstream bool
}

// NewHeld puts b under a new CA configured by cfg (whose Backend it sets).
func NewHeld(t *testing.T, b ca.Backend, cfg ca.Config) Held {
	t.Helper()
	cfg.Backend = b
	c, err := ca.New(t.Context(), cfg)
	require.NoError(t, err)
	_, up := b.(ca.Upstream)
	return Held{CA: c, upstream: up}
}

// Sign signs through the CA.
func (h Held) Sign(ctx context.Context, req ca.SignRequest) (*ca.SignResponse, error) {
	return h.CA.Sign(ctx, req)
}

// TrustBundle is the CA's trust bundle.
func (h Held) TrustBundle(context.Context) ([]*x509.Certificate, error) {
	return h.CA.State().Roots, nil
}

// SigningChain is the CA's signing certificate and the chain above it.
func (h Held) SigningChain() []*x509.Certificate { return h.CA.State().Signing.Chain() }

// Run runs the CA, and with it the backend's Watch or the rotation loop.
func (h Held) Run(ctx context.Context) error { return h.CA.Run(ctx) }

// signer is what the suite needs of a Held.
type signer = Held

func build(t *testing.T, newBackend func(t *testing.T) ca.Backend) signer {
	t.Helper()
	return NewHeld(t, newBackend(t), ca.Config{})
}

func parseLeaf(t *testing.T, resp *ca.SignResponse) *x509.Certificate {
	t.Helper()
	require.NotNil(t, resp)
	leaf, err := x509.ParseCertificate(resp.Leaf)
	require.NoError(t, err)
	return leaf
}

// parseChain parses ChainPEM, which must hold one certificate per element.
func parseChain(t *testing.T, chainPEM []string) []*x509.Certificate {
	t.Helper()
	require.NotEmpty(t, chainPEM)
	var chain []*x509.Certificate
	for i, p := range chainPEM {
		block, rest := pem.Decode([]byte(p))
		require.NotNil(t, block, "ChainPEM[%d] is not PEM", i)
		require.Equal(t, "CERTIFICATE", block.Type)
		require.Empty(t, rest, "ChainPEM[%d] holds more than one certificate", i)
		c, err := x509.ParseCertificate(block.Bytes)
		require.NoError(t, err)
		chain = append(chain, c)
	}
	return chain
}

func verify(t *testing.T, leaf *x509.Certificate, bundle, chain []*x509.Certificate, usage x509.ExtKeyUsage) {
	t.Helper()
	roots := x509.NewCertPool()
	for _, r := range bundle {
		roots.AddCert(r)
	}
	inter := x509.NewCertPool()
	for _, c := range chain {
		inter.AddCert(c)
	}
	_, err := leaf.Verify(x509.VerifyOptions{Roots: roots, Intermediates: inter, KeyUsages: []x509.ExtKeyUsage{usage}})
	require.NoError(t, err)
}

func containsCert(certs []*x509.Certificate, c *x509.Certificate) bool {
	for _, x := range certs {
		if x.Equal(c) {
			return true
		}
	}
	return false
}
