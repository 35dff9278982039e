package kube

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
	"os"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/go-jose/go-jose/v4"
	"github.com/go-jose/go-jose/v4/jwt"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/stretchr/testify/require"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"

	"github.com/meshca/meshca/authn"
)

const testIss = "https://issuer.test"

// newLocalJWT returns a JWT authenticator trusting ti's JWKS file.
func newLocalJWT(t *testing.T, ti *testIssuer, mod func(*JWTConfig)) *JWT {
	t.Helper()
	cfg := JWTConfig{TrustDomain: testTD, Issuer: ti.iss, JWKSFile: ti.path}
	if mod != nil {
		mod(&cfg)
	}
	j, err := NewJWT(cfg)
	require.NoError(t, err)
	return j
}

// requireReason asserts that err is an authentication failure with reason.
func requireReason(t *testing.T, err error, reason string) {
	t.Helper()
	require.Error(t, err)
	require.ErrorIs(t, err, authn.ErrUnauthenticated)
	var ae *authn.Error
	require.ErrorAs(t, err, &ae)
	require.Equal(t, reason, ae.Reason, "error: %v", err)
}

func TestJWTAuthenticate(t *testing.T) {
	clk := newClock()
	now := clk.Now()
	ti := newTestIssuer(t, testIss)
	rsaKID := ti.addKey("rsa-1", jose.RS256)
	ecKID := ti.addKey("ec-1", jose.ES256)
	aud := []string{"istio-ca"}

	// A key that is not in the JWKS, for forged tokens.
	foreign, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	require.NoError(t, err)

	mod := func(f func(c *claims)) *claims {
		c := saClaims(testIss, "ns1", "sa1", aud, now, time.Hour)
		f(c)
		return c
	}
	valid := saClaims(testIss, "ns1", "sa1", aud, now, time.Hour)

	tests := []struct {
		name    string
		token   string
		want    *authn.Caller // nil when an error is expected
		reason  string        // expected authn.Error reason
		wantErr error         // expected sentinel when there is no reason
	}{
		{
			name:  "valid RS256 pod-bound token",
			token: ti.sign(rsaKID, valid),
			want: &authn.Caller{
				ID:                spiffeid.RequireFromString("spiffe://cluster.local/ns/ns1/sa/sa1"),
				Namespace:         "ns1",
				ServiceAccount:    "sa1",
				ServiceAccountUID: "sa-uid-sa1",
				PodName:           "pod-1",
				PodUID:            "pod-uid-1",
				Authenticator:     "jwt",
				ExpiresAt:         valid.Expiry.Time(),
			},
		},
		{
			name:  "valid ES256 token without pod, second of two audiences",
			token: ti.sign(ecKID, mod(func(c *claims) { c.Kubernetes.Pod = nil; c.Audience = []string{"other", "istio-ca"} })),
			want: &authn.Caller{
				ID:                spiffeid.RequireFromString("spiffe://cluster.local/ns/ns1/sa/sa1"),
				Namespace:         "ns1",
				ServiceAccount:    "sa1",
				ServiceAccountUID: "sa-uid-sa1",
				Authenticator:     "jwt",
				ExpiresAt:         valid.Expiry.Time(),
			},
		},
		{
			name:  "pod-bound token with the pod's node",
			token: ti.sign(ecKID, mod(func(c *claims) { c.Kubernetes.Node = &objectRef{Name: "node-a"} })),
			want: &authn.Caller{
				ID: spiffeid.RequireFromString("spiffe://cluster.local/ns/ns1/sa/sa1"), Namespace: "ns1", ServiceAccount: "sa1",
				ServiceAccountUID: "sa-uid-sa1", PodName: "pod-1", PodUID: "pod-uid-1", NodeName: "node-a", Authenticator: "jwt",
				ExpiresAt: valid.Expiry.Time(),
			},
		},
		{
			// A token bound to a Node alone: no pod, so no node is taken.
			name: "node-bound token without pod",
			token: ti.sign(ecKID, mod(func(c *claims) {
				c.Kubernetes.Pod, c.Kubernetes.Node = nil, &objectRef{Name: "node-a", UID: "node-uid-a"}
			})),
			want: &authn.Caller{
				ID: spiffeid.RequireFromString("spiffe://cluster.local/ns/ns1/sa/sa1"), Namespace: "ns1", ServiceAccount: "sa1",
				ServiceAccountUID: "sa-uid-sa1", Authenticator: "jwt", ExpiresAt: valid.Expiry.Time(),
			},
		},
		{name: "no token", token: "", wantErr: authn.ErrNoCredentials},
		{name: "not a JWT", token: "not-a-jwt", reason: authn.ReasonMalformed},
		{name: "three garbage segments", token: "a.b.c", reason: authn.ReasonMalformed},
		{name: "oversized", token: strings.Repeat("a", maxTokenBytes+1), reason: authn.ReasonMalformed},
		{name: "expired beyond skew", token: ti.sign(rsaKID, saClaims(testIss, "ns1", "sa1", aud, now.Add(-2*time.Hour), time.Hour)), reason: authn.ReasonExpired},
		{
			name:  "expired within skew is accepted",
			token: ti.sign(rsaKID, mod(func(c *claims) { c.Expiry = jwt.NewNumericDate(now.Add(-10 * time.Second)) })),
			want: &authn.Caller{
				ID: spiffeid.RequireFromString("spiffe://cluster.local/ns/ns1/sa/sa1"), Namespace: "ns1", ServiceAccount: "sa1",
				ServiceAccountUID: "sa-uid-sa1", PodName: "pod-1", PodUID: "pod-uid-1", Authenticator: "jwt",
				ExpiresAt: now.Add(-10 * time.Second).Truncate(time.Second),
			},
		},
		{name: "nbf in the future", token: ti.sign(rsaKID, mod(func(c *claims) { c.NotBefore = jwt.NewNumericDate(now.Add(time.Minute)) })), reason: authn.ReasonNotYetValid},
		{name: "iat in the future", token: ti.sign(rsaKID, mod(func(c *claims) { c.IssuedAt = jwt.NewNumericDate(now.Add(time.Minute)) })), reason: authn.ReasonNotYetValid},
		{name: "no exp", token: ti.sign(rsaKID, mod(func(c *claims) { c.Expiry = nil })), reason: authn.ReasonMalformed},
		{name: "wrong audience", token: ti.sign(rsaKID, mod(func(c *claims) { c.Audience = []string{"vault"} })), reason: authn.ReasonWrongAudience},
		{name: "no audience", token: ti.sign(rsaKID, mod(func(c *claims) { c.Audience = nil })), reason: authn.ReasonWrongAudience},
		{name: "other issuer", token: ti.sign(rsaKID, mod(func(c *claims) { c.Issuer = "https://other.test" })), reason: authn.ReasonUnknownIssuer},
		{
			name: "legacy secret-based token",
			token: ti.sign(rsaKID, map[string]any{
				"iss": legacyIssuer, "sub": "system:serviceaccount:ns1:sa1",
				"kubernetes.io/serviceaccount/namespace":            "ns1",
				"kubernetes.io/serviceaccount/service-account.name": "sa1",
			}),
			reason: authn.ReasonUnknownIssuer,
		},
		{name: "no kubernetes.io claim", token: ti.sign(rsaKID, mod(func(c *claims) { c.Kubernetes = nil })), reason: authn.ReasonNotServiceAccount},
		{name: "sub is not a service account", token: ti.sign(rsaKID, mod(func(c *claims) { c.Subject = "alice" })), reason: authn.ReasonNotServiceAccount},
		{name: "sub disagrees with kubernetes.io namespace", token: ti.sign(rsaKID, mod(func(c *claims) { c.Kubernetes.Namespace = "ns2" })), reason: authn.ReasonMalformed},
		{name: "sub disagrees with kubernetes.io service account", token: ti.sign(rsaKID, mod(func(c *claims) { c.Kubernetes.ServiceAccount.Name = "sa2" })), reason: authn.ReasonMalformed},
		{name: "no service account UID", token: ti.sign(rsaKID, mod(func(c *claims) { c.Kubernetes.ServiceAccount.UID = "" })), reason: authn.ReasonMalformed},
		{name: "pod without UID", token: ti.sign(rsaKID, mod(func(c *claims) { c.Kubernetes.Pod.UID = "" })), reason: authn.ReasonMalformed},
		{name: "signed by a foreign key with a known kid", token: signWith(t, jose.ES256, foreign, ecKID, valid), reason: authn.ReasonBadSignature},
		{name: "alg not the key's", token: signWith(t, jose.ES256, foreign, rsaKID, valid), reason: authn.ReasonBadSignature},
		{name: "HS256 with the public key as secret", token: signWith(t, jose.HS256, publicKeyBytes(t, ti, rsaKID), rsaKID, valid), reason: authn.ReasonBadSignature},
		{name: "tampered payload", token: tamper(t, ti.sign(rsaKID, valid)), reason: authn.ReasonBadSignature},
		{name: "unknown kid", token: signWith(t, jose.ES256, foreign, "who", valid), reason: authn.ReasonUnknownKey},
	}
	j := newLocalJWT(t, ti, func(c *JWTConfig) { c.Now = clk.Now })
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := j.Authenticate(t.Context(), authn.Credentials{Token: tt.token})
			switch {
			case tt.want != nil:
				require.NoError(t, err)
				require.Equal(t, tt.want, got)
			case tt.reason != "":
				requireReason(t, err, tt.reason)
				require.Nil(t, got)
			default:
				require.ErrorIs(t, err, tt.wantErr)
				require.Nil(t, got)
			}
			if err != nil && tt.token != "" {
				require.NotContains(t, err.Error(), tt.token)
			}
		})
	}
}

// publicKeyBytes is the DER of a JWKS key: what an attacker would use as the
// HMAC secret in an algorithm-confusion attack.
func publicKeyBytes(t *testing.T, ti *testIssuer, kid string) []byte {
	t.Helper()
	der, err := x509.MarshalPKIXPublicKey(ti.keys[kid].signer.Public())
	require.NoError(t, err)
	return der
}

// tamper changes the payload of a compact JWS, keeping the signature.
func tamper(t *testing.T, token string) string {
	t.Helper()
	parts := strings.Split(token, ".")
	require.Len(t, parts, 3)
	tok, err := jwt.ParseSigned(token, []jose.SignatureAlgorithm{jose.RS256})
	require.NoError(t, err)
	var c claims
	require.NoError(t, tok.UnsafeClaimsWithoutVerification(&c))
	c.Kubernetes.Namespace, c.Subject = "kube-system", "system:serviceaccount:kube-system:sa1"
	b, err := json.Marshal(c)
	require.NoError(t, err)
	parts[1] = base64.RawURLEncoding.EncodeToString(b)
	return strings.Join(parts, ".")
}

func TestJWTExpiredByClock(t *testing.T) {
	clk := newClock()
	ti := newTestIssuer(t, testIss)
	kid := ti.addKey("k", jose.ES256)
	j := newLocalJWT(t, ti, func(c *JWTConfig) { c.Now = clk.Now })
	token := ti.sign(kid, saClaims(testIss, "ns1", "sa1", []string{"istio-ca"}, clk.Now(), 10*time.Minute))

	_, err := j.Authenticate(t.Context(), authn.Credentials{Token: token})
	require.NoError(t, err)

	// The cached entry must not outlive exp: past exp+skew it is refused
	// as expired, not served from the cache.
	clk.Advance(10*time.Minute + 31*time.Second)
	_, err = j.Authenticate(t.Context(), authn.Credentials{Token: token})
	requireReason(t, err, authn.ReasonExpired)
	require.Zero(t, j.cache.len())
}

func TestJWTUnknownKIDRefetch(t *testing.T) {
	clk := newClock()
	ti := newTestIssuer(t, testIss)
	old := ti.addKey("old", jose.ES256)
	reg := prometheus.NewPedanticRegistry()
	j := newLocalJWT(t, ti, func(c *JWTConfig) { c.Now = clk.Now; c.Metrics = NewMetrics(reg) })
	fetches := func() float64 { return testutil.ToFloat64(j.fetches.WithLabelValues("ok")) }
	mint := func(kid, sa string) string {
		return ti.sign(kid, saClaims(testIss, "ns1", sa, []string{"istio-ca"}, clk.Now(), time.Hour))
	}

	_, err := j.Authenticate(t.Context(), authn.Credentials{Token: mint(old, "a")})
	require.NoError(t, err)
	require.Equal(t, 1.0, fetches(), "first use fetches the JWKS")

	// Rotation: a new key appears in the file. Refetches are rate-limited,
	// so within RefetchInterval of the last fetch its kid stays unknown...
	rotated := ti.addKey("new", jose.ES256)
	_, err = j.Authenticate(t.Context(), authn.Credentials{Token: mint(rotated, "b")})
	requireReason(t, err, authn.ReasonUnknownKey)
	require.Equal(t, 1.0, fetches(), "rate-limited: no refetch within RefetchInterval")

	// ... and once RefetchInterval has passed, concurrent callers with
	// tokens naming the new kid share exactly one refetch.
	clk.Advance(10 * time.Second)
	var wg sync.WaitGroup
	errs := make([]error, 20)
	for i := range errs {
		wg.Go(func() {
			_, errs[i] = j.Authenticate(t.Context(), authn.Credentials{Token: mint(rotated, fmt.Sprintf("c%d", i))})
		})
	}
	wg.Wait()
	for _, err := range errs {
		require.NoError(t, err)
	}
	require.Equal(t, 2.0, fetches(), "one refetch for all concurrent misses")

	// The old key still verifies, without a fetch.
	_, err = j.Authenticate(t.Context(), authn.Credentials{Token: mint(old, "d")})
	require.NoError(t, err)
	require.Equal(t, 2.0, fetches())

	// A kid that never appears: one refetch per interval at most, then
	// unknown_key.
	stranger, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	require.NoError(t, err)
	forged := signWith(t, jose.ES256, stranger, "stranger", saClaims(testIss, "ns1", "e", []string{"istio-ca"}, clk.Now(), time.Hour))
	clk.Advance(10 * time.Second)
	for range 5 {
		_, err = j.Authenticate(t.Context(), authn.Credentials{Token: forged})
		requireReason(t, err, authn.ReasonUnknownKey)
	}
	require.Equal(t, 3.0, fetches())
}

func TestJWTKeysRefreshedWhenStale(t *testing.T) {
	clk := newClock()
	ti := newTestIssuer(t, testIss)
	a := ti.addKey("a", jose.ES256)
	j := newLocalJWT(t, ti, func(c *JWTConfig) { c.Now = clk.Now; c.Cache.MaxTTL = -1 })
	token := ti.sign(a, saClaims(testIss, "ns1", "sa1", []string{"istio-ca"}, clk.Now(), 24*time.Hour))
	_, err := j.Authenticate(t.Context(), authn.Credentials{Token: token})
	require.NoError(t, err)

	// The issuer drops key a: once the key set is stale it is fetched
	// again, and a's tokens stop verifying.
	ti.mu.Lock()
	ti.kids = nil
	ti.mu.Unlock()
	ti.addKey("b", jose.ES256)
	clk.Advance(keysMaxAge)
	_, err = j.Authenticate(t.Context(), authn.Credentials{Token: token})
	requireReason(t, err, authn.ReasonUnknownKey)
}

func TestJWTSourceDown(t *testing.T) {
	ti := newTestIssuer(t, testIss)
	kid := ti.addKey("k", jose.ES256)
	token := ti.sign(kid, saClaims(testIss, "ns1", "sa1", []string{"istio-ca"}, time.Now(), time.Hour))

	t.Run("missing file", func(t *testing.T) {
		j, err := NewJWT(JWTConfig{TrustDomain: testTD, Issuer: testIss, JWKSFile: ti.path + ".missing"})
		require.NoError(t, err)
		_, err = j.Authenticate(t.Context(), authn.Credentials{Token: token})
		require.ErrorIs(t, err, authn.ErrUnavailable)
		require.NotErrorIs(t, err, authn.ErrUnauthenticated)
		require.Error(t, j.Refresh(t.Context()), "rate-limited retry reports the last error")
	})

	t.Run("URL answering 500, then the JWKS", func(t *testing.T) {
		var mu sync.Mutex
		status := http.StatusInternalServerError
		srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			mu.Lock()
			defer mu.Unlock()
			if status != http.StatusOK {
				w.WriteHeader(status)
				return
			}
			http.ServeFile(w, r, ti.path)
		}))
		t.Cleanup(srv.Close)
		clk := newClock()
		j, err := NewJWT(JWTConfig{TrustDomain: testTD, Issuer: testIss, JWKSURL: srv.URL, Now: clk.Now})
		require.NoError(t, err)
		_, err = j.Authenticate(t.Context(), authn.Credentials{Token: token})
		require.ErrorIs(t, err, authn.ErrUnavailable)

		mu.Lock()
		status = http.StatusOK
		mu.Unlock()
		_, err = j.Authenticate(t.Context(), authn.Credentials{Token: token})
		require.ErrorIs(t, err, authn.ErrUnavailable, "no refetch within RefetchInterval")
		clk.Advance(10 * time.Second)
		_, err = j.Authenticate(t.Context(), authn.Credentials{Token: token})
		require.NoError(t, err)

		// Later the source goes down again: the keys in hand stay in use
		// even once stale.
		mu.Lock()
		status = http.StatusServiceUnavailable
		mu.Unlock()
		clk.Advance(keysMaxAge)
		other := ti.sign(kid, saClaims(testIss, "ns1", "sa2", []string{"istio-ca"}, clk.Now(), time.Hour))
		_, err = j.Authenticate(t.Context(), authn.Credentials{Token: other})
		require.NoError(t, err)
	})

	t.Run("JWKS without usable key", func(t *testing.T) {
		path := ti.path + ".empty"
		require.NoError(t, os.WriteFile(path, []byte(`{"keys":[{"kty":"oct","k":"c2VjcmV0"}]}`), 0o600))
		j, err := NewJWT(JWTConfig{TrustDomain: testTD, Issuer: testIss, JWKSFile: path})
		require.NoError(t, err)
		_, err = j.Authenticate(t.Context(), authn.Credentials{Token: token})
		require.ErrorIs(t, err, authn.ErrUnavailable)
	})
}

func TestJWTServiceAccountLookup(t *testing.T) {
	ti := newTestIssuer(t, testIss)
	kid := ti.addKey("k", jose.ES256)
	sas := &fakeServiceAccounts{}
	reg := prometheus.NewPedanticRegistry()
	j := newLocalJWT(t, ti, func(c *JWTConfig) { c.ServiceAccounts = sas; c.Metrics = NewMetrics(reg) })
	token := ti.sign(kid, saClaims(testIss, "ns1", "sa1", []string{"istio-ca"}, time.Now(), time.Hour))
	auth := func() error {
		_, err := j.Authenticate(t.Context(), authn.Credentials{Token: token})
		return err
	}

	sas.set("ns1", "sa1", "sa-uid-sa1")
	require.NoError(t, auth())
	require.NoError(t, auth()) // from the cache
	require.Equal(t, 1.0, testutil.ToFloat64(j.cache.hits))

	// Re-created with another UID: refused, on a cache hit too.
	sas.set("ns1", "sa1", "another-uid")
	requireReason(t, auth(), authn.ReasonServiceAccountGone)
	require.Zero(t, j.cache.len(), "a refused entry is dropped")

	sas.set("ns1", "sa1", "")
	requireReason(t, auth(), authn.ReasonServiceAccountGone)

	sas.err = fmt.Errorf("%w: not synced", authn.ErrUnavailable)
	require.ErrorIs(t, auth(), authn.ErrUnavailable)
}

func TestNewJWTConfig(t *testing.T) {
	tests := []struct {
		name    string
		cfg     JWTConfig
		wantErr string
	}{
		{name: "no trust domain", cfg: JWTConfig{Issuer: "x", JWKSFile: "f"}, wantErr: "TrustDomain is required"},
		{name: "no key source", cfg: JWTConfig{TrustDomain: testTD, Issuer: "x"}, wantErr: "one of JWKSFile, JWKSURL or Kube is required"},
		{name: "two key sources", cfg: JWTConfig{TrustDomain: testTD, Issuer: "x", JWKSFile: "f", JWKSURL: "https://jwks.test"}, wantErr: "at most one of JWKSFile and JWKSURL"},
		{name: "no issuer without kube", cfg: JWTConfig{TrustDomain: testTD, JWKSFile: "f"}, wantErr: "Issuer is required without Kube"},
		{name: "negative skew", cfg: JWTConfig{TrustDomain: testTD, Issuer: "x", JWKSFile: "f", Skew: -1}, wantErr: "must not be negative"},
		{name: "ok", cfg: JWTConfig{TrustDomain: testTD, Issuer: "x", JWKSFile: "f"}},
		{name: "JWKSURL https", cfg: JWTConfig{TrustDomain: testTD, Issuer: "x", JWKSURL: "https://issuer.example.com/openid/v1/jwks"}},
		{name: "JWKSURL http to localhost", cfg: JWTConfig{TrustDomain: testTD, Issuer: "x", JWKSURL: "http://localhost:8080/jwks"}},
		{name: "JWKSURL http to 127.0.0.0/8", cfg: JWTConfig{TrustDomain: testTD, Issuer: "x", JWKSURL: "http://127.1.2.3:8080/jwks"}},
		{name: "JWKSURL http to ::1", cfg: JWTConfig{TrustDomain: testTD, Issuer: "x", JWKSURL: "http://[::1]:8080/jwks"}},
		{name: "JWKSURL http to a remote host", cfg: JWTConfig{TrustDomain: testTD, Issuer: "x", JWKSURL: "http://issuer.example.com/jwks"}, wantErr: "must be https"},
		{name: "JWKSURL http to a remote IP", cfg: JWTConfig{TrustDomain: testTD, Issuer: "x", JWKSURL: "http://10.0.0.1/jwks"}, wantErr: "must be https"},
		{name: "JWKSURL http to a name under localhost", cfg: JWTConfig{TrustDomain: testTD, Issuer: "x", JWKSURL: "http://localhost.example.com/jwks"}, wantErr: "must be https"},
		{name: "JWKSURL http to a name that looks loopback", cfg: JWTConfig{TrustDomain: testTD, Issuer: "x", JWKSURL: "http://127.0.0.1.nip.io/jwks"}, wantErr: "must be https"},
		{name: "JWKSURL other scheme", cfg: JWTConfig{TrustDomain: testTD, Issuer: "x", JWKSURL: "file:///etc/jwks.json"}, wantErr: "JWKSURL"},
		{name: "JWKSURL without scheme", cfg: JWTConfig{TrustDomain: testTD, Issuer: "x", JWKSURL: "issuer.example.com/jwks"}, wantErr: "JWKSURL"},
		{name: "JWKSURL unparsable", cfg: JWTConfig{TrustDomain: testTD, Issuer: "x", JWKSURL: "https://[::1"}, wantErr: "JWKSURL"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			j, err := NewJWT(tt.cfg)
			if tt.wantErr != "" {
				require.ErrorContains(t, err, tt.wantErr)
				return
			}
			require.NoError(t, err)
			require.Equal(t, "x", j.Issuer())
			require.Equal(t, []string{"istio-ca"}, j.audiences)
			require.Equal(t, 30*time.Second, j.skew)
			require.Equal(t, 10*time.Second, j.refetch)
		})
	}
}

// TestJWTCallerGivesUpDuringFetch: one JWKS fetch serves every token
// waiting for keys, so the caller whose verification started it giving up
// must not cancel it, nor leave behind a failure that the rate limit would
// serve to the others. The second caller is seen waiting for that fetch (in
// its goroutine's stack: no hook reports it) before the first gives up, and
// is served by it: one request in all.
func TestJWTCallerGivesUpDuringFetch(t *testing.T) {
	ti := newTestIssuer(t, testIss)
	kid := ti.addKey("k", jose.ES256)
	var requests atomic.Int32
	requested := make(chan struct{}, 1)
	release := make(chan struct{})
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		requests.Add(1)
		select {
		case requested <- struct{}{}:
		default:
		}
		select {
		case <-release:
		case <-r.Context().Done():
			return
		}
		http.ServeFile(w, r, ti.path)
	}))
	t.Cleanup(srv.Close)
	releaseFetch := sync.OnceFunc(func() { close(release) })
	t.Cleanup(releaseFetch) // runs before srv.Close, which waits for the handlers
	j, err := NewJWT(JWTConfig{TrustDomain: testTD, Issuer: testIss, JWKSURL: srv.URL})
	require.NoError(t, err)
	mint := func(sa string) authn.Credentials {
		return authn.Credentials{Token: ti.sign(kid, saClaims(testIss, "ns1", sa, []string{"istio-ca"}, time.Now(), time.Hour))}
	}
	// A verification waiting for the shared fetch; the fetch itself runs
	// in refresh.func1, which this name does not match.
	waitingForFetch := func() int { return goroutinesIn("github.com/meshca/meshca/authn/kube.(*JWT).refresh") }

	ctx, cancel := context.WithCancel(t.Context())
	first := make(chan error, 1)
	go func() {
		_, err := j.Authenticate(ctx, mint("a"))
		first <- err
	}()
	<-requested
	second := make(chan error, 1)
	go func() {
		_, err := j.Authenticate(t.Context(), mint("b"))
		second <- err
	}()
	require.Eventually(t, func() bool { return waitingForFetch() == 2 }, 10*time.Second, time.Millisecond,
		"both verifications wait for the one fetch")
	cancel()
	err = <-first
	require.ErrorIs(t, err, context.Canceled)
	require.NotErrorIs(t, err, authn.ErrUnavailable)
	// The first verification stops waiting; the second still waits, for
	// the same fetch, which goes on.
	require.Eventually(t, func() bool { return waitingForFetch() == 1 }, 10*time.Second, time.Millisecond)
	select {
	case err := <-second:
		require.FailNow(t, "the second caller returned before the fetch did", "error: %v", err)
	default:
	}
	releaseFetch()
	require.NoError(t, <-second)
	require.Equal(t, int32(1), requests.Load(), "one fetch served both")
}

// goroutinesIn counts the goroutines whose stack holds a call of fn, a
// function's full name as tracebacks print it ("pkg/path.(*T).method",
// inlined calls included). It shows a test where callers are blocked when
// no hook reports it; a rename makes the test fail, never pass wrongly.
func goroutinesIn(fn string) int {
	buf := make([]byte, 1<<16)
	for {
		n := runtime.Stack(buf, true)
		if n < len(buf) {
			buf = buf[:n]
			break
		}
		buf = make([]byte, 2*len(buf))
	}
	count := 0
	for g := range strings.SplitSeq(string(buf), "\n\n") {
		for line := range strings.SplitSeq(g, "\n") {
			if strings.HasPrefix(line, fn+"(") {
				count++
				break
			}
		}
	}
	return count
}

// TestJWTRefusesRedirectToHTTP: an https JWKSURL cannot hand the fetch over
// to plain http. The transport is replaced (the real one would need a
// certificate the system trusts), so the test sees what would be sent.
func TestJWTRefusesRedirectToHTTP(t *testing.T) {
	ti := newTestIssuer(t, testIss)
	kid := ti.addKey("k", jose.ES256)
	token := ti.sign(kid, saClaims(testIss, "ns1", "sa1", []string{"istio-ca"}, time.Now(), time.Hour))
	j, err := NewJWT(JWTConfig{TrustDomain: testTD, Issuer: testIss, JWKSURL: "https://jwks.test/keys"})
	require.NoError(t, err)
	var mu sync.Mutex
	var requested []string
	j.fetcher.(*urlFetcher).client.Transport = roundTripFunc(func(r *http.Request) (*http.Response, error) {
		mu.Lock()
		requested = append(requested, r.URL.String())
		mu.Unlock()
		rec := httptest.NewRecorder()
		http.Redirect(rec, r, "http://jwks.test/keys", http.StatusFound)
		return rec.Result(), nil
	})
	_, err = j.Authenticate(t.Context(), authn.Credentials{Token: token})
	require.ErrorIs(t, err, authn.ErrUnavailable)
	mu.Lock()
	defer mu.Unlock()
	require.Equal(t, []string{"https://jwks.test/keys"}, requested, "the http URL is never requested")
}

func TestSharedMetrics(t *testing.T) {
	ti := newTestIssuer(t, testIss)
	reg := prometheus.NewPedanticRegistry()
	m := NewMetrics(reg)
	a := newLocalJWT(t, ti, func(c *JWTConfig) { c.Metrics = m })
	b := newLocalJWT(t, ti, func(c *JWTConfig) { c.Metrics = m })
	// A real client to an address nobody answers: only its metrics are used.
	client, err := kubernetes.NewForConfig(&rest.Config{Host: "http://127.0.0.1:1"})
	require.NoError(t, err)
	r, err := NewTokenReview(TokenReviewConfig{Client: client, TrustDomain: testTD, Metrics: m})
	require.NoError(t, err)

	require.Same(t, a.fetches, b.fetches)
	a.cache.hits.Inc()
	b.cache.hits.Inc()
	r.cache.misses.Inc()
	require.Equal(t, 2.0, testutil.ToFloat64(a.cache.hits), "two JWT authenticators share one series")
	n, err := testutil.GatherAndCount(reg, "meshca_authn_cache_requests_total")
	require.NoError(t, err)
	require.Equal(t, 4, n, "jwt and tokenreview, hit and miss")
}
