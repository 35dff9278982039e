package kube

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"encoding/json"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/go-jose/go-jose/v4"
	"github.com/go-jose/go-jose/v4/jwt"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/stretchr/testify/require"
)

// testIssuer is a service-account issuer of our own: keys, a JWKS file and
// a signer of kube-shaped tokens. It plays the kube-apiserver's signing role
// for the tests that need control of keys, claims and clocks.
type testIssuer struct {
	t    testing.TB
	iss  string
	path string // the JWKS file

	mu   sync.Mutex
	keys map[string]testKey // by kid
	kids []string           // in JWKS order
}

type testKey struct {
	alg    jose.SignatureAlgorithm
	signer crypto.Signer
}

// rsaKeyOnce caches one RSA key per test binary: generating one costs tens
// of milliseconds, and the tests that need several use EC keys.
var rsaKeyOnce = sync.OnceValues(func() (*rsa.PrivateKey, error) { return rsa.GenerateKey(rand.Reader, 2048) })

func newTestIssuer(t testing.TB, iss string) *testIssuer {
	t.Helper()
	ti := &testIssuer{t: t, iss: iss, path: filepath.Join(t.TempDir(), "jwks.json"), keys: map[string]testKey{}}
	return ti
}

// addKey generates a key for alg (RS256 or ES256), publishes it in the JWKS
// file and returns its kid.
func (ti *testIssuer) addKey(kid string, alg jose.SignatureAlgorithm) string {
	ti.t.Helper()
	var signer crypto.Signer
	var err error
	switch alg {
	case jose.RS256:
		signer, err = rsaKeyOnce()
	case jose.ES256:
		signer, err = ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	default:
		ti.t.Fatalf("addKey: unsupported alg %s", alg)
	}
	require.NoError(ti.t, err)
	ti.mu.Lock()
	ti.keys[kid] = testKey{alg: alg, signer: signer}
	ti.kids = append(ti.kids, kid)
	ti.mu.Unlock()
	ti.writeJWKS()
	return kid
}

// writeJWKS writes the public keys, as the kube-apiserver does (alg, use, kid).
func (ti *testIssuer) writeJWKS() {
	ti.t.Helper()
	ti.mu.Lock()
	set := jose.JSONWebKeySet{}
	for _, kid := range ti.kids {
		k := ti.keys[kid]
		set.Keys = append(set.Keys, jose.JSONWebKey{Key: k.signer.Public(), KeyID: kid, Algorithm: string(k.alg), Use: "sig"})
	}
	ti.mu.Unlock()
	b, err := json.Marshal(set)
	require.NoError(ti.t, err)
	tmp := ti.path + ".tmp"
	require.NoError(ti.t, os.WriteFile(tmp, b, 0o600))
	require.NoError(ti.t, os.Rename(tmp, ti.path))
}

// sign signs claims with key kid; the header names kid and alg.
func (ti *testIssuer) sign(kid string, claims any) string {
	ti.t.Helper()
	ti.mu.Lock()
	k, ok := ti.keys[kid]
	ti.mu.Unlock()
	require.True(ti.t, ok, "no key %q", kid)
	return signWith(ti.t, k.alg, k.signer, kid, claims)
}

func signWith(t testing.TB, alg jose.SignatureAlgorithm, key any, kid string, claims any) string {
	t.Helper()
	signer, err := jose.NewSigner(jose.SigningKey{Algorithm: alg, Key: jose.JSONWebKey{Key: key, KeyID: kid}},
		(&jose.SignerOptions{}).WithType("JWT"))
	require.NoError(t, err)
	tok, err := jwt.Signed(signer).Claims(claims).Serialize()
	require.NoError(t, err)
	return tok
}

// saClaims are the claims of a pod-bound projected token, as the
// kube-apiserver mints them, valid from now for ttl.
func saClaims(iss, ns, sa string, aud []string, now time.Time, ttl time.Duration) *claims {
	return &claims{
		Claims: jwt.Claims{
			Issuer:    iss,
			Subject:   serviceAccountUserPrefix + ns + ":" + sa,
			Audience:  aud,
			Expiry:    jwt.NewNumericDate(now.Add(ttl)),
			NotBefore: jwt.NewNumericDate(now),
			IssuedAt:  jwt.NewNumericDate(now),
			ID:        "jti-1",
		},
		Kubernetes: &kubernetesClaim{
			Namespace:      ns,
			ServiceAccount: &objectRef{Name: sa, UID: "sa-uid-" + sa},
			Pod:            &objectRef{Name: "pod-1", UID: "pod-uid-1"},
		},
	}
}

var testTD = spiffeid.RequireTrustDomainFromString("cluster.local")

// fakeServiceAccounts is a state-based ServiceAccountLookup: namespace/name
// to UID. An unset err and a missing key mean "not found".
type fakeServiceAccounts struct {
	mu   sync.Mutex
	uids map[string]string
	err  error
}

func (f *fakeServiceAccounts) set(ns, name, uid string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.uids == nil {
		f.uids = map[string]string{}
	}
	if uid == "" {
		delete(f.uids, ns+"/"+name)
		return
	}
	f.uids[ns+"/"+name] = uid
}

func (f *fakeServiceAccounts) ServiceAccountUID(ns, name string) (string, bool, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.err != nil {
		return "", false, f.err
	}
	uid, ok := f.uids[ns+"/"+name]
	return uid, ok, nil
}

// clock is a settable clock for Config.Now.
type clock struct {
	mu  sync.Mutex
	now time.Time
}

func newClock() *clock { return &clock{now: time.Now()} }

func (c *clock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.now
}

func (c *clock) Advance(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.now = c.now.Add(d)
}
