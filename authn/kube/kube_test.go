package kube

import (
	"context"
	crand "crypto/rand"
	"crypto/rsa"
	"fmt"
	"math/rand/v2"
	"net"
	"net/http"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/go-jose/go-jose/v4"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"google.golang.org/grpc/peer"
	authenticationv1 "k8s.io/api/authentication/v1"
	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"

	"github.com/meshca/meshca/authn"
	"github.com/meshca/meshca/test/kubeenv"
)

// The tests below run against a real etcd + kube-apiserver (test/kubeenv),
// one per test binary, started on first use so that the unit tests alone do
// not pay for it, and stopped by TestMain.
var testKube struct {
	once sync.Once
	env  *kubeenv.Env
	stop func()
	err  error
}

func TestMain(m *testing.M) {
	code := m.Run()
	if testKube.stop != nil {
		testKube.stop()
	}
	os.Exit(code)
}

// kubeEnv returns the package's Env, starting it if needed. A missing binary
// fails the test rather than skipping it: run test/tools/build.sh. Under
// go test -short (make test-unit) it skips the test.
func kubeEnv(t *testing.T) *kubeenv.Env {
	t.Helper()
	kubeenv.SkipIfShort(t)
	testKube.once.Do(func() {
		testKube.env, testKube.stop, testKube.err = kubeenv.StartMain()
	})
	require.NoError(t, testKube.err, "start kube-apiserver (built by test/tools/build.sh)")
	return testKube.env
}

const meshcaNS, meshcaSA = "meshca-system", "meshca"

// meshcaConfig returns a rest.Config for meshca's own service account, with
// the RBAC the chart grants it: system:auth-delegator (tokenreviews),
// system:service-account-issuer-discovery (JWKS) and list/watch of
// serviceaccounts (ServiceAccountIndex). count, if not nil, counts the
// TokenReviews sent over the wire.
func meshcaConfig(t *testing.T, env *kubeenv.Env, count *atomic.Int32) *rest.Config {
	t.Helper()
	env.CreateServiceAccount(t, meshcaNS, meshcaSA)
	ensureClusterRole(t, env, &rbacv1.ClusterRole{
		ObjectMeta: metav1.ObjectMeta{Name: "meshca-serviceaccounts"},
		Rules:      []rbacv1.PolicyRule{{APIGroups: []string{""}, Resources: []string{"serviceaccounts"}, Verbs: []string{"list", "watch"}}},
	})
	for _, role := range []string{"system:auth-delegator", "system:service-account-issuer-discovery", "meshca-serviceaccounts"} {
		bindClusterRole(t, env, role, meshcaNS, meshcaSA)
	}
	cfg := env.ServiceAccountConfig(t, meshcaNS, meshcaSA)
	if count != nil {
		cfg.Wrap(func(rt http.RoundTripper) http.RoundTripper {
			return roundTripFunc(func(r *http.Request) (*http.Response, error) {
				if r.Method == http.MethodPost && strings.HasSuffix(r.URL.Path, "/tokenreviews") {
					count.Add(1)
				}
				return rt.RoundTrip(r)
			})
		})
	}
	return cfg
}

type roundTripFunc func(*http.Request) (*http.Response, error)

func (f roundTripFunc) RoundTrip(r *http.Request) (*http.Response, error) { return f(r) }

func ensureClusterRole(t *testing.T, env *kubeenv.Env, role *rbacv1.ClusterRole) {
	t.Helper()
	_, err := env.Client.RbacV1().ClusterRoles().Create(t.Context(), role, metav1.CreateOptions{})
	if !apierrors.IsAlreadyExists(err) {
		require.NoError(t, err)
	}
}

func bindClusterRole(t *testing.T, env *kubeenv.Env, role, ns, sa string) {
	t.Helper()
	_, err := env.Client.RbacV1().ClusterRoleBindings().Create(t.Context(), &rbacv1.ClusterRoleBinding{
		ObjectMeta: metav1.ObjectMeta{Name: strings.ReplaceAll(role, ":", "-") + "-" + ns + "-" + sa},
		RoleRef:    rbacv1.RoleRef{APIGroup: "rbac.authorization.k8s.io", Kind: "ClusterRole", Name: role},
		Subjects:   []rbacv1.Subject{{Kind: "ServiceAccount", Namespace: ns, Name: sa}},
	}, metav1.CreateOptions{})
	if !apierrors.IsAlreadyExists(err) {
		require.NoError(t, err)
	}
}

// uniqueName returns prefix with a random suffix, so that the tests can run
// again (go test -count) against the same apiserver.
func uniqueName(prefix string) string {
	return fmt.Sprintf("%s-%08x", prefix, rand.Uint32())
}

// startIndex runs a ServiceAccountIndex until the test ends and waits for
// its first sync.
func startIndex(t *testing.T, client kubernetes.Interface) *ServiceAccountIndex {
	t.Helper()
	idx := NewServiceAccountIndex(client, nil)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- idx.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		require.NoError(t, <-done)
	})
	require.Eventually(t, idx.HasSynced, 10*time.Second, 10*time.Millisecond)
	return idx
}

// waitIndex waits until idx reports ns/name with uid ("" for absent).
func waitIndex(t *testing.T, idx ServiceAccountLookup, ns, name, uid string) {
	t.Helper()
	require.Eventually(t, func() bool {
		got, found, err := idx.ServiceAccountUID(ns, name)
		return err == nil && found == (uid != "") && got == uid
	}, 10*time.Second, 10*time.Millisecond)
}

// waitGone waits until get reports NotFound.
func waitGone(t *testing.T, get func(context.Context) error) {
	t.Helper()
	require.EventuallyWithT(t, func(c *assert.CollectT) {
		err := get(t.Context())
		require.True(c, apierrors.IsNotFound(err), "still there (err %v)", err)
	}, 10*time.Second, 10*time.Millisecond)
}

// waitReviewRefused waits until the apiserver, asked by the admin client,
// no longer authenticates token for audiences. After a service account or
// pod is deleted it keeps accepting the token until its informers see the
// deletion, and for up to 10s more if it reviewed the token successfully
// meanwhile (its cache of successful reviews, keyed by token and
// audiences): 30s bounds both. A refusal is not cached, and its informers
// do not go back in time, so once refused the token stays refused.
func waitReviewRefused(t *testing.T, env *kubeenv.Env, token string, audiences []string) {
	t.Helper()
	require.EventuallyWithT(t, func(c *assert.CollectT) {
		res, err := env.Client.AuthenticationV1().TokenReviews().Create(t.Context(), &authenticationv1.TokenReview{
			Spec: authenticationv1.TokenReviewSpec{Token: token, Audiences: audiences},
		}, metav1.CreateOptions{})
		require.NoError(c, err)
		require.False(c, res.Status.Authenticated, "the apiserver still accepts the token")
	}, 30*time.Second, 50*time.Millisecond)
}

// outcome is what one authenticator should answer.
type outcome struct {
	ok     bool   // success; the Caller is checked against the case's objects
	reason string // the authn.Error reason expected
	err    error  // the sentinel expected when there is no reason
}

// kubeCase is one token and what each authenticator makes of it.
type kubeCase struct {
	name string
	// token mints the token; it may create, delete and wait for objects.
	token func(t *testing.T, f *kubeFixture) string
	// later moves the authenticators' clocks forward.
	later time.Duration
	// audiences, if set, replaces the authenticators' Audiences.
	audiences   []string
	jwt, review outcome
}

// kubeFixture is one case's objects.
type kubeFixture struct {
	env   *kubeenv.Env
	index *ServiceAccountIndex
	ns    string
	sa    *corev1.ServiceAccount
	pod   *corev1.Pod // nil for a token not bound to a pod
	node  string      // the node pod is scheduled on, if any
}

var istioCA = []string{"istio-ca"}

func kubeCases() []kubeCase {
	return []kubeCase{
		{
			name: "valid pod-bound token",
			token: func(t *testing.T, f *kubeFixture) string {
				f.pod = f.env.CreatePod(t, f.ns, "pod-"+f.sa.Name, f.sa.Name)
				return f.env.Token(t, f.ns, f.sa.Name, istioCA, time.Hour, f.pod)
			},
			jwt:    outcome{ok: true},
			review: outcome{ok: true},
		},
		{
			// The apiserver names the pod's node in the token (the
			// kubernetes.io claim; TokenReview's node-name extra), with
			// no Node object behind it.
			name: "valid token bound to a pod on a node",
			token: func(t *testing.T, f *kubeFixture) string {
				f.node = "node-" + f.sa.Name
				f.pod = f.env.CreatePodOnNode(t, f.ns, "pod-"+f.sa.Name, f.sa.Name, f.node)
				return f.env.Token(t, f.ns, f.sa.Name, istioCA, time.Hour, f.pod)
			},
			jwt:    outcome{ok: true},
			review: outcome{ok: true},
		},
		{
			name: "valid token not bound to a pod, one of two audiences",
			token: func(t *testing.T, f *kubeFixture) string {
				return f.env.Token(t, f.ns, f.sa.Name, []string{"vault", "istio-ca"}, time.Hour, nil)
			},
			jwt:    outcome{ok: true},
			review: outcome{ok: true},
		},
		{
			name: "wrong audience",
			token: func(t *testing.T, f *kubeFixture) string {
				return f.env.Token(t, f.ns, f.sa.Name, []string{"vault"}, time.Hour, nil)
			},
			jwt:    outcome{reason: authn.ReasonWrongAudience},
			review: outcome{reason: authn.ReasonWrongAudience},
		},
		{
			name: "the apiserver's default audience",
			token: func(t *testing.T, f *kubeFixture) string {
				return f.env.Token(t, f.ns, f.sa.Name, nil, time.Hour, nil)
			},
			jwt:    outcome{reason: authn.ReasonWrongAudience},
			review: outcome{reason: authn.ReasonWrongAudience},
		},
		{
			name: "expired",
			token: func(t *testing.T, f *kubeFixture) string {
				return f.env.Token(t, f.ns, f.sa.Name, istioCA, time.Hour, nil)
			},
			later: 2 * time.Hour,
			jwt:   outcome{reason: authn.ReasonExpired},
			// Refused by TokenReview's local pre-check, before any
			// review: the apiserver's clock cannot be moved, and
			// TokenRequest's minimum lifetime is 10 minutes.
			review: outcome{reason: authn.ReasonExpired},
		},
		{
			name: "signed by another issuer",
			token: func(t *testing.T, f *kubeFixture) string {
				ti := newTestIssuer(t, "https://other-cluster.test")
				kid := ti.addKey("other", jose.ES256)
				return ti.sign(kid, saClaims(ti.iss, f.ns, f.sa.Name, istioCA, time.Now(), time.Hour))
			},
			jwt:    outcome{reason: authn.ReasonUnknownIssuer},
			review: outcome{reason: authn.ReasonUnknownIssuer},
		},
		{
			name: "forged with this cluster's issuer and an unknown key",
			token: func(t *testing.T, f *kubeFixture) string {
				ti := newTestIssuer(t, f.env.Issuer)
				kid := ti.addKey("forged", jose.ES256)
				return ti.sign(kid, saClaims(ti.iss, f.ns, f.sa.Name, istioCA, time.Now(), time.Hour))
			},
			jwt:    outcome{reason: authn.ReasonUnknownKey},
			review: outcome{reason: authn.ReasonRejected},
		},
		{
			name:   "malformed",
			token:  func(*testing.T, *kubeFixture) string { return "not.a-jwt" },
			jwt:    outcome{reason: authn.ReasonMalformed},
			review: outcome{reason: authn.ReasonMalformed},
		},
		{
			name:   "no token",
			token:  func(*testing.T, *kubeFixture) string { return "" },
			jwt:    outcome{err: authn.ErrNoCredentials},
			review: outcome{err: authn.ErrNoCredentials},
		},
		{
			// The apiserver accepts its audience-agnostic static tokens
			// for its own --api-audiences, so the authenticators ask for
			// that one too. Not a JWT: TokenReview refuses it without a
			// review (TestKubeTokenReviewPrecheck checks that the
			// apiserver would call it no service account).
			name: "admin static token",
			token: func(_ *testing.T, f *kubeFixture) string {
				return f.env.Config.BearerToken
			},
			audiences: []string{"istio-ca", kubeenv.Issuer},
			jwt:       outcome{reason: authn.ReasonMalformed},
			review:    outcome{reason: authn.ReasonMalformed},
		},
		{
			name: "service account deleted after the token was minted",
			token: func(t *testing.T, f *kubeFixture) string {
				tok := f.env.Token(t, f.ns, f.sa.Name, istioCA, time.Hour, nil)
				f.env.DeleteServiceAccount(t, f.ns, f.sa.Name)
				// jwt's answer depends on meshca's index, tokenreview's on
				// the apiserver's own informers: wait for both.
				waitIndex(t, f.index, f.ns, f.sa.Name, "")
				waitGone(t, func(ctx context.Context) error {
					_, err := f.env.Client.CoreV1().ServiceAccounts(f.ns).Get(ctx, f.sa.Name, metav1.GetOptions{})
					return err
				})
				waitReviewRefused(t, f.env, tok, istioCA)
				return tok
			},
			jwt:    outcome{reason: authn.ReasonServiceAccountGone},
			review: outcome{reason: authn.ReasonRejected},
		},
		{
			name: "service account deleted and re-created",
			token: func(t *testing.T, f *kubeFixture) string {
				tok := f.env.Token(t, f.ns, f.sa.Name, istioCA, time.Hour, nil)
				f.env.DeleteServiceAccount(t, f.ns, f.sa.Name)
				again := f.env.CreateServiceAccount(t, f.ns, f.sa.Name)
				require.NotEqual(t, f.sa.UID, again.UID)
				waitIndex(t, f.index, f.ns, f.sa.Name, string(again.UID))
				// Until the apiserver's informer sees the deletion, the old
				// service account (UID and all) still vouches for the token.
				waitReviewRefused(t, f.env, tok, istioCA)
				return tok
			},
			jwt:    outcome{reason: authn.ReasonServiceAccountGone},
			review: outcome{reason: authn.ReasonRejected},
		},
		{
			name: "pod deleted after the token was minted",
			token: func(t *testing.T, f *kubeFixture) string {
				pod := f.env.CreatePod(t, f.ns, "gone-"+f.sa.Name, f.sa.Name)
				tok := f.env.Token(t, f.ns, f.sa.Name, istioCA, time.Hour, pod)
				err := f.env.Client.CoreV1().Pods(f.ns).Delete(t.Context(), pod.Name, metav1.DeleteOptions{GracePeriodSeconds: new(int64)})
				require.NoError(t, err)
				// The apiserver checks a pod-bound token against its pod
				// informer, which learns of the deletion a moment after the
				// Delete returns: wait until the deletion is stored, then
				// until the apiserver itself refuses the token.
				waitGone(t, func(ctx context.Context) error {
					_, err := f.env.Client.CoreV1().Pods(f.ns).Get(ctx, pod.Name, metav1.GetOptions{})
					return err
				})
				waitReviewRefused(t, f.env, tok, istioCA)
				f.pod = pod
				return tok
			},
			// The local path checks no pod: a pod-bound token stays valid
			// on it until exp. Only the apiserver knows the pod is gone.
			jwt:    outcome{ok: true},
			review: outcome{reason: authn.ReasonRejected},
		},
	}
}

// TestKubeAuthenticators runs every case through both authenticators, each
// as meshca's own service account with the chart's RBAC.
func TestKubeAuthenticators(t *testing.T) {
	env := kubeEnv(t)
	meshca := meshcaConfig(t, env, nil)
	client, err := kubernetes.NewForConfig(meshca)
	require.NoError(t, err)
	index := startIndex(t, client)
	ns := uniqueName("authn")
	td := spiffeid.RequireTrustDomainFromString("cluster.local")

	type authenticator struct {
		name string
		new  func(t *testing.T, now func() time.Time, audiences []string) authn.Authenticator
		want func(kubeCase) outcome
	}
	authenticators := []authenticator{
		{
			name: "jwt",
			new: func(t *testing.T, now func() time.Time, audiences []string) authn.Authenticator {
				j, err := NewJWT(JWTConfig{TrustDomain: td, Kube: meshca, ServiceAccounts: index, Now: now, Audiences: audiences})
				require.NoError(t, err)
				return j
			},
			want: func(c kubeCase) outcome { return c.jwt },
		},
		{
			name: "tokenreview",
			new: func(t *testing.T, now func() time.Time, audiences []string) authn.Authenticator {
				r, err := NewTokenReview(TokenReviewConfig{Client: client, TrustDomain: td, Issuer: env.Issuer, Now: now, Audiences: audiences})
				require.NoError(t, err)
				return r
			},
			want: func(c kubeCase) outcome { return c.review },
		},
	}
	for _, a := range authenticators {
		t.Run(a.name, func(t *testing.T) {
			for i, c := range kubeCases() {
				t.Run(c.name, func(t *testing.T) {
					want := a.want(c)
					sa := fmt.Sprintf("%s-%d", a.name, i)
					f := &kubeFixture{env: env, index: index, ns: ns, sa: env.CreateServiceAccount(t, ns, sa)}
					waitIndex(t, index, ns, sa, string(f.sa.UID))
					token := c.token(t, f)
					clk := newClock()
					clk.Advance(c.later)
					auth := a.new(t, clk.Now, c.audiences)

					got, err := auth.Authenticate(t.Context(), authn.Credentials{Token: token})
					switch {
					case want.ok:
						require.NoError(t, err)
						require.Equal(t, "spiffe://cluster.local/ns/"+ns+"/sa/"+sa, got.ID.String())
						require.Equal(t, ns, got.Namespace)
						require.Equal(t, sa, got.ServiceAccount)
						require.Equal(t, string(f.sa.UID), got.ServiceAccountUID)
						require.Equal(t, a.name, got.Authenticator)
						require.WithinDuration(t, time.Now().Add(time.Hour), got.ExpiresAt, time.Minute)
						if f.pod != nil {
							require.Equal(t, f.pod.Name, got.PodName)
							require.Equal(t, string(f.pod.UID), got.PodUID)
							require.Equal(t, f.node, got.NodeName)
						} else {
							require.Empty(t, got.PodName)
							require.Empty(t, got.PodUID)
							require.Empty(t, got.NodeName)
						}
					case want.reason != "":
						requireReason(t, err, want.reason)
					default:
						require.ErrorIs(t, err, want.err)
					}
					if err != nil && token != "" {
						require.NotContains(t, err.Error(), token)
					}
				})
			}
		})
	}
}

func TestKubeJWTDiscoversIssuer(t *testing.T) {
	env := kubeEnv(t)
	j, err := NewJWT(JWTConfig{TrustDomain: testTD, Kube: meshcaConfig(t, env, nil)})
	require.NoError(t, err)
	require.Empty(t, j.Issuer(), "no I/O before first use")
	require.NoError(t, j.Refresh(t.Context()))
	require.Equal(t, env.Issuer, j.Issuer())
}

// TestKubeCache checks, for both authenticators, that a second call is a
// cache hit, that 50 concurrent calls with one new token cost one
// verification (for TokenReview: one TokenReview on the wire), and that a
// cache hit still refuses the token of a service account deleted since.
func TestKubeCache(t *testing.T) {
	env := kubeEnv(t)
	var reviews atomic.Int32
	meshca := meshcaConfig(t, env, &reviews)
	client, err := kubernetes.NewForConfig(meshca)
	require.NoError(t, err)
	index := startIndex(t, client)
	ns := uniqueName("authn-cache")

	type authenticator struct {
		name string
		new  func(t *testing.T, reg prometheus.Registerer) (authn.Authenticator, *cache)
		// verifications returns how many verifications reached the
		// authority so far.
		verifications func() int
	}
	authenticators := []authenticator{
		{
			name: "jwt",
			new: func(t *testing.T, reg prometheus.Registerer) (authn.Authenticator, *cache) {
				j, err := NewJWT(JWTConfig{TrustDomain: testTD, Kube: meshca, ServiceAccounts: index, Metrics: NewMetrics(reg)})
				require.NoError(t, err)
				return j, j.cache
			},
		},
		{
			name: "tokenreview",
			new: func(t *testing.T, reg prometheus.Registerer) (authn.Authenticator, *cache) {
				r, err := NewTokenReview(TokenReviewConfig{Client: client, TrustDomain: testTD, ServiceAccounts: index, Metrics: NewMetrics(reg)})
				require.NoError(t, err)
				return r, r.cache
			},
			verifications: func() int { return int(reviews.Load()) },
		},
	}
	for _, a := range authenticators {
		t.Run(a.name, func(t *testing.T) {
			reg := prometheus.NewPedanticRegistry()
			auth, c := a.new(t, reg)
			hits := func() float64 { return testutil.ToFloat64(c.hits) }
			misses := func() float64 { return testutil.ToFloat64(c.misses) }
			sa := env.CreateServiceAccount(t, ns, "cached-"+a.name)
			waitIndex(t, index, ns, sa.Name, string(sa.UID))
			token := env.Token(t, ns, sa.Name, istioCA, time.Hour, nil)
			before := 0
			if a.verifications != nil {
				before = a.verifications()
			}

			t.Run("second call hits", func(t *testing.T) {
				first, err := auth.Authenticate(t.Context(), authn.Credentials{Token: token})
				require.NoError(t, err)
				second, err := auth.Authenticate(t.Context(), authn.Credentials{Token: token})
				require.NoError(t, err)
				require.Equal(t, first, second)
				require.Equal(t, 1.0, hits())
				require.Equal(t, 1.0, misses())
				if a.verifications != nil {
					require.Equal(t, before+1, a.verifications())
				}
				want := fmt.Sprintf(`
# HELP meshca_authn_cache_requests_total Lookups in the cache of authenticated tokens, by authenticator and result (hit or miss).
# TYPE meshca_authn_cache_requests_total counter
meshca_authn_cache_requests_total{authenticator=%q,result="hit"} 1
meshca_authn_cache_requests_total{authenticator=%q,result="miss"} 1
`, a.name, a.name)
				require.NoError(t, testutil.GatherAndCompare(reg, strings.NewReader(want), "meshca_authn_cache_requests_total"))
			})

			t.Run("50 concurrent calls, one verification", func(t *testing.T) {
				fresh := env.Token(t, ns, sa.Name, istioCA, time.Hour, nil)
				if a.verifications != nil {
					before = a.verifications()
				}
				var wg sync.WaitGroup
				errs := make([]error, 50)
				for i := range errs {
					wg.Go(func() {
						_, errs[i] = auth.Authenticate(t.Context(), authn.Credentials{Token: fresh})
					})
				}
				wg.Wait()
				for _, err := range errs {
					require.NoError(t, err)
				}
				if a.verifications != nil {
					require.Equal(t, before+1, a.verifications(), "exactly one TokenReview")
				}
				require.Equal(t, 52.0, hits()+misses())
			})

			t.Run("cache hit after the service account was deleted", func(t *testing.T) {
				env.DeleteServiceAccount(t, ns, sa.Name)
				waitIndex(t, index, ns, sa.Name, "")
				_, err := auth.Authenticate(t.Context(), authn.Credentials{Token: token})
				requireReason(t, err, authn.ReasonServiceAccountGone)
			})
		})
	}
}

// TestKubeTokenReviewPrecheck: TokenReview refuses a token that the
// apiserver would refuse anyway with the reason it would give, and with no
// TokenReview on the wire; a token that passes the pre-check still goes to
// the apiserver, which decides.
func TestKubeTokenReviewPrecheck(t *testing.T) {
	env := kubeEnv(t)
	var reviews atomic.Int32
	client, err := kubernetes.NewForConfig(meshcaConfig(t, env, &reviews))
	require.NoError(t, err)
	ns := uniqueName("authn-precheck")
	env.CreateServiceAccount(t, ns, "workload")
	valid := env.Token(t, ns, "workload", istioCA, time.Hour, nil)
	other := newTestIssuer(t, "https://other-cluster.test")
	otherKID := other.addKey("other", jose.ES256)
	forger := newTestIssuer(t, env.Issuer)
	forgedKID := forger.addKey("forged", jose.ES256)
	forgedRSA, err := rsa.GenerateKey(crand.Reader, 2048)
	require.NoError(t, err)

	tests := []struct {
		name     string
		token    string
		later    time.Duration // moves the authenticator's clock forward
		noIssuer bool          // leave TokenReviewConfig.Issuer unset
		sigs     bool          // check signatures locally first, as New sets it up
		reason   string        // "" for success
		reviewed bool          // whether a TokenReview is sent
	}{
		{name: "not a JWT", token: "not.a-jwt", reason: authn.ReasonMalformed},
		{name: "opaque static token", token: env.Config.BearerToken, reason: authn.ReasonMalformed},
		{name: "expired beyond skew", token: valid, later: time.Hour + time.Minute, reason: authn.ReasonExpired},
		{name: "wrong audience", token: env.Token(t, ns, "workload", []string{"vault"}, time.Hour, nil), reason: authn.ReasonWrongAudience},
		{name: "the apiserver's default audience", token: env.Token(t, ns, "workload", nil, time.Hour, nil), reason: authn.ReasonWrongAudience},
		{
			name:   "another issuer",
			token:  other.sign(otherKID, saClaims(other.iss, ns, "workload", istioCA, time.Now(), time.Hour)),
			reason: authn.ReasonUnknownIssuer,
		},
		{
			name:     "another issuer, Issuer unset: the apiserver decides",
			token:    other.sign(otherKID, saClaims(other.iss, ns, "workload", istioCA, time.Now(), time.Hour)),
			noIssuer: true,
			reason:   authn.ReasonRejected,
			reviewed: true,
		},
		{
			name:     "forged with this cluster's issuer: the apiserver decides",
			token:    forger.sign(forgedKID, saClaims(forger.iss, ns, "workload", istioCA, time.Now(), time.Hour)),
			reason:   authn.ReasonRejected,
			reviewed: true,
		},
		{
			name:   "forged with this cluster's issuer, signatures checked: refused locally",
			token:  forger.sign(forgedKID, saClaims(forger.iss, ns, "workload", istioCA, time.Now(), time.Hour)),
			sigs:   true,
			reason: authn.ReasonUnknownKey,
		},
		{
			name:   "forged with a real key ID, signatures checked: refused locally",
			token:  signWith(t, jose.RS256, forgedRSA, realKID(t, valid), saClaims(forger.iss, ns, "workload", istioCA, time.Now(), time.Hour)),
			sigs:   true,
			reason: authn.ReasonBadSignature,
		},
		{name: "expired within skew: the apiserver decides", token: valid, later: time.Hour + 10*time.Second, reviewed: true},
		{name: "valid", token: valid, reviewed: true},
		{name: "valid, signatures checked", token: valid, sigs: true, reviewed: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			clk := newClock()
			clk.Advance(tt.later)
			cfg := TokenReviewConfig{Client: client, TrustDomain: testTD, Issuer: env.Issuer, Now: clk.Now}
			if tt.noIssuer {
				cfg.Issuer = ""
			}
			if tt.sigs {
				sigs, err := NewJWT(JWTConfig{TrustDomain: testTD, Issuer: env.Issuer, Kube: meshcaConfig(t, env, nil), Cache: CacheConfig{MaxTTL: -1}})
				require.NoError(t, err)
				cfg.Signatures = sigs
			}
			r, err := NewTokenReview(cfg)
			require.NoError(t, err)
			before := reviews.Load()
			_, err = r.Authenticate(t.Context(), authn.Credentials{Token: tt.token})
			if tt.reason == "" {
				require.NoError(t, err)
			} else {
				requireReason(t, err, tt.reason)
				require.NotContains(t, err.Error(), tt.token)
			}
			want := before
			if tt.reviewed {
				want++
			}
			require.Equal(t, want, reviews.Load(), "TokenReviews sent")
		})
	}

	// The pre-check is only an early refusal: what it refuses, the
	// apiserver refuses too, here with the reason the review path gives.
	t.Run("the apiserver refuses the static token too", func(t *testing.T) {
		r, err := NewTokenReview(TokenReviewConfig{Client: client, TrustDomain: testTD, Audiences: []string{"istio-ca", kubeenv.Issuer}})
		require.NoError(t, err)
		_, err = r.review(t.Context(), env.Config.BearerToken)
		requireReason(t, err, authn.ReasonNotServiceAccount)
	})
}

// realKID is the key ID in a token's header.
func realKID(t *testing.T, token string) string {
	t.Helper()
	tok, _, err := parseToken(token)
	require.NoError(t, err)
	return tok.Headers[0].KeyID
}

// reviewGate holds the TokenReviews a client sends in its transport until
// let through, counting them.
type reviewGate struct {
	pass   chan struct{} // each value sent lets one held review through
	open   func()        // lets every review through from now on; idempotent
	opened chan struct{}

	mu                        sync.Mutex
	sent, inFlight, maxFlight int
}

func newReviewGate(t *testing.T) *reviewGate {
	t.Helper()
	opened := make(chan struct{})
	g := &reviewGate{pass: make(chan struct{}), opened: opened, open: sync.OnceFunc(func() { close(opened) })}
	t.Cleanup(g.open)
	return g
}

func (g *reviewGate) wrap(rt http.RoundTripper) http.RoundTripper {
	return roundTripFunc(func(r *http.Request) (*http.Response, error) {
		if r.Method != http.MethodPost || !strings.HasSuffix(r.URL.Path, "/tokenreviews") {
			return rt.RoundTrip(r)
		}
		g.mu.Lock()
		g.sent++
		g.inFlight++
		g.maxFlight = max(g.maxFlight, g.inFlight)
		g.mu.Unlock()
		defer func() {
			g.mu.Lock()
			g.inFlight--
			g.mu.Unlock()
		}()
		select {
		case <-g.opened:
		case <-g.pass:
		case <-r.Context().Done():
			return nil, r.Context().Err()
		}
		return rt.RoundTrip(r)
	})
}

func (g *reviewGate) counts() (sent, inFlight, maxFlight int) {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.sent, g.inFlight, g.maxFlight
}

// TestKubeTokenReviewFairShare: one address cannot take more than its
// share of the review capacity; others' reviews still go through.
func TestKubeTokenReviewFairShare(t *testing.T) {
	env := kubeEnv(t)
	cfg := meshcaConfig(t, env, nil)
	gate := newReviewGate(t)
	cfg.Wrap(gate.wrap)
	client, err := kubernetes.NewForConfig(cfg)
	require.NoError(t, err)
	r, err := NewTokenReview(TokenReviewConfig{Client: client, TrustDomain: testTD, Issuer: env.Issuer, MaxInFlight: 8, MaxPerPeer: 2})
	require.NoError(t, err)
	ns := uniqueName("authn-fair")
	env.CreateServiceAccount(t, ns, "workload")
	from := func(ip string) context.Context {
		return peer.NewContext(t.Context(), &peer.Peer{Addr: &net.TCPAddr{IP: net.ParseIP(ip), Port: 4000}})
	}
	sent := func() int { n, _, _ := gate.counts(); return n }
	var wg sync.WaitGroup
	for range 2 {
		tok := env.Token(t, ns, "workload", istioCA, time.Hour, nil)
		wg.Go(func() {
			_, err := r.Authenticate(from("10.0.0.1"), authn.Credentials{Token: tok})
			assert.NoError(t, err)
		})
	}
	require.Eventually(t, func() bool { return sent() == 2 }, 10*time.Second, time.Millisecond)
	// A third review from the same address is refused at once...
	_, err = r.Authenticate(from("10.0.0.1"), authn.Credentials{Token: env.Token(t, ns, "workload", istioCA, time.Hour, nil)})
	require.ErrorIs(t, err, authn.ErrUnavailable)
	require.Contains(t, err.Error(), "10.0.0.1")
	require.Equal(t, 2, sent())
	// ...while another address's review goes to the apiserver.
	wg.Go(func() {
		_, err := r.Authenticate(from("10.0.0.2"), authn.Credentials{Token: env.Token(t, ns, "workload", istioCA, time.Hour, nil)})
		assert.NoError(t, err)
	})
	require.Eventually(t, func() bool { return sent() == 3 }, 10*time.Second, time.Millisecond)
	gate.open()
	wg.Wait()
}

// TestKubeTokenReviewMaxInFlight holds TokenReviews on the wire to check
// that no more than MaxInFlight are under way at once: the callers beyond
// it wait for a slot short of the wire (seen in their goroutines' stacks,
// as no hook reports it), and one review finishing lets exactly one of them
// through. A caller waiting for a slot may give up: it gets its own
// context's error (not ErrUnavailable), and its review is never sent.
func TestKubeTokenReviewMaxInFlight(t *testing.T) {
	env := kubeEnv(t)
	cfg := meshcaConfig(t, env, nil)
	gate := newReviewGate(t)
	cfg.Wrap(gate.wrap)
	client, err := kubernetes.NewForConfig(cfg)
	require.NoError(t, err)
	r, err := NewTokenReview(TokenReviewConfig{Client: client, TrustDomain: testTD, Issuer: env.Issuer, MaxInFlight: 2})
	require.NoError(t, err)
	ns := uniqueName("authn-inflight")
	env.CreateServiceAccount(t, ns, "workload")
	// Distinct tokens, so that they do not share one verification.
	tokens := make([]string, 5)
	for i := range tokens {
		tokens[i] = env.Token(t, ns, "workload", istioCA, time.Hour, nil)
	}
	sent := func() int { n, _, _ := gate.counts(); return n }
	waiting := func() int { return goroutinesIn("github.com/meshca/meshca/authn/kube.(*TokenReview).acquire") }

	var wg sync.WaitGroup
	errs := make([]error, 4)
	for i := range errs {
		wg.Go(func() {
			_, errs[i] = r.Authenticate(t.Context(), authn.Credentials{Token: tokens[i]})
		})
	}
	// Without the cap all four would reach the gate and none would wait.
	require.Eventually(t, func() bool { return sent() == 2 && waiting() == 2 }, 10*time.Second, time.Millisecond,
		"two reviews on the wire, two waiting for a slot")

	// A fifth caller waits for a slot too, and has not reached the wire...
	ctx, cancel := context.WithCancel(t.Context())
	quitter := make(chan error, 1)
	go func() {
		_, err := r.Authenticate(ctx, authn.Credentials{Token: tokens[4]})
		quitter <- err
	}()
	require.Eventually(t, func() bool { return waiting() == 3 }, 10*time.Second, time.Millisecond, "the fifth review waits for a slot")
	require.Equal(t, 2, sent(), "MaxInFlight")
	select {
	case err := <-quitter:
		require.FailNow(t, "the fifth caller returned while every slot was taken", "error: %v", err)
	default:
	}
	// ...then gives up, and its review leaves the queue.
	cancel()
	err = <-quitter
	require.ErrorIs(t, err, context.Canceled)
	require.NotErrorIs(t, err, authn.ErrUnavailable)
	require.Eventually(t, func() bool { return waiting() == 2 }, 10*time.Second, time.Millisecond)

	// One review finishing frees one slot, which exactly one waiting
	// review takes.
	gate.pass <- struct{}{}
	require.Eventually(t, func() bool { return sent() == 3 && waiting() == 1 }, 10*time.Second, time.Millisecond)
	_, inFlight, _ := gate.counts()
	require.Equal(t, 2, inFlight)

	gate.open()
	wg.Wait()
	for _, err := range errs {
		require.NoError(t, err)
	}
	total, _, maxFlight := gate.counts()
	require.Equal(t, 2, maxFlight)
	require.Equal(t, 4, total, "the review nobody waits for any more is never sent")
}

// TestKubeWithoutRBAC runs meshca as a service account with no grants of its
// own: TokenReview and the index answer ErrUnavailable, TokenReview's saying
// what to bind. JWT works: the default ClusterRoleBinding
// system:service-account-issuer-discovery lets every service account read
// the issuer's discovery document and keys.
func TestKubeWithoutRBAC(t *testing.T) {
	env := kubeEnv(t)
	env.CreateServiceAccount(t, meshcaNS, "unprivileged")
	cfg := env.ServiceAccountConfig(t, meshcaNS, "unprivileged")
	client, err := kubernetes.NewForConfig(cfg)
	require.NoError(t, err)
	ns := uniqueName("authn")
	env.CreateServiceAccount(t, ns, "workload")
	token := env.Token(t, ns, "workload", istioCA, time.Hour, nil)

	t.Run("tokenreview", func(t *testing.T) {
		r, err := NewTokenReview(TokenReviewConfig{Client: client, TrustDomain: testTD})
		require.NoError(t, err)
		_, err = r.Authenticate(t.Context(), authn.Credentials{Token: token})
		require.ErrorIs(t, err, authn.ErrUnavailable)
		require.NotErrorIs(t, err, authn.ErrUnauthenticated)
		require.ErrorContains(t, err, "system:auth-delegator")
		require.NotContains(t, err.Error(), token)
	})
	t.Run("jwt", func(t *testing.T) {
		j, err := NewJWT(JWTConfig{TrustDomain: testTD, Kube: cfg})
		require.NoError(t, err)
		_, err = j.Authenticate(t.Context(), authn.Credentials{Token: token})
		require.NoError(t, err)
	})
	t.Run("index", func(t *testing.T) {
		idx := NewServiceAccountIndex(client, nil)
		ctx, cancel := context.WithTimeout(t.Context(), 300*time.Millisecond)
		defer cancel()
		require.NoError(t, idx.Run(ctx))
		require.False(t, idx.HasSynced())
		_, _, err := idx.ServiceAccountUID(ns, "workload")
		require.ErrorIs(t, err, authn.ErrUnavailable)
	})
}

// TestKubeAPIServerDown: an apiserver that cannot be reached makes both
// authenticators answer ErrUnavailable, not a rejection.
func TestKubeAPIServerDown(t *testing.T) {
	env := kubeEnv(t)
	ns := uniqueName("authn")
	env.CreateServiceAccount(t, ns, "workload")
	token := env.Token(t, ns, "workload", istioCA, time.Hour, nil)
	down := &rest.Config{Host: "https://127.0.0.1:1", Timeout: time.Second}
	client, err := kubernetes.NewForConfig(down)
	require.NoError(t, err)

	r, err := NewTokenReview(TokenReviewConfig{Client: client, TrustDomain: testTD})
	require.NoError(t, err)
	_, err = r.Authenticate(t.Context(), authn.Credentials{Token: token})
	require.ErrorIs(t, err, authn.ErrUnavailable)

	j, err := NewJWT(JWTConfig{TrustDomain: testTD, Kube: down, Issuer: env.Issuer})
	require.NoError(t, err)
	_, err = j.Authenticate(t.Context(), authn.Credentials{Token: token})
	require.ErrorIs(t, err, authn.ErrUnavailable)
}

// TestExplainRejectionRealToken classifies real apiserver tokens the way
// TokenReview does after a rejection. "expired" cannot be produced by the
// apiserver within a test, so the local clock is moved instead.
func TestExplainRejectionRealToken(t *testing.T) {
	env := kubeEnv(t)
	ns := uniqueName("authn")
	env.CreateServiceAccount(t, ns, "workload")
	token := env.Token(t, ns, "workload", istioCA, time.Hour, nil)
	requireReason(t, explainRejection(token, time.Now().Add(2*time.Hour), env.Issuer, istioCA), authn.ReasonExpired)
	requireReason(t, explainRejection(token, time.Now(), env.Issuer, []string{"vault"}), authn.ReasonWrongAudience)
	requireReason(t, explainRejection(token, time.Now(), "https://elsewhere.test", istioCA), authn.ReasonUnknownIssuer)
	requireReason(t, explainRejection(token, time.Now(), env.Issuer, istioCA), authn.ReasonRejected)
}

func TestKubeServiceAccountIndex(t *testing.T) {
	env := kubeEnv(t)
	idx := NewServiceAccountIndex(env.Client, nil)
	_, _, err := idx.ServiceAccountUID("authn", "x")
	require.ErrorIs(t, err, authn.ErrUnavailable, "before sync")

	ctx, cancel := context.WithCancel(t.Context())
	done := make(chan error, 1)
	go func() { done <- idx.Run(ctx) }()
	require.Eventually(t, idx.HasSynced, 10*time.Second, 10*time.Millisecond)
	require.ErrorContains(t, idx.Run(ctx), "already running")

	ns := uniqueName("authn-index")
	sa := env.CreateServiceAccount(t, ns, "indexed")
	waitIndex(t, idx, ns, "indexed", string(sa.UID))
	_, found, err := idx.ServiceAccountUID(ns, "absent")
	require.NoError(t, err)
	require.False(t, found)
	env.DeleteServiceAccount(t, ns, "indexed")
	waitIndex(t, idx, ns, "indexed", "")

	cancel()
	require.NoError(t, <-done)
}

func TestKubePodIndex(t *testing.T) {
	env := kubeEnv(t)
	idx := NewPodIndex(env.Client, nil)
	_, _, err := idx.Pod("authn", "x")
	require.ErrorIs(t, err, authn.ErrUnavailable, "before sync")
	_, err = idx.ServiceAccountOnNode("node-a", "authn", "x")
	require.ErrorIs(t, err, authn.ErrUnavailable, "before sync")

	ctx, cancel := context.WithCancel(t.Context())
	done := make(chan error, 1)
	go func() { done <- idx.Run(ctx) }()
	require.Eventually(t, idx.HasSynced, 10*time.Second, 10*time.Millisecond)
	require.ErrorContains(t, idx.Run(ctx), "already running")

	ns := uniqueName("authn-pods")
	env.CreateServiceAccount(t, ns, "web")
	env.CreateServiceAccount(t, ns, "db")
	web := env.CreatePodOnNode(t, ns, "web-0", "web", "node-a")
	env.CreatePodOnNode(t, ns, "db-0", "db", "node-b")
	env.CreatePod(t, ns, "db-pending", "db")
	require.Eventually(t, func() bool {
		on, err := idx.ServiceAccountOnNode("node-b", ns, "db")
		return err == nil && on
	}, 10*time.Second, 10*time.Millisecond)
	require.Eventually(t, func() bool {
		_, found, err := idx.Pod(ns, "db-pending")
		return err == nil && found
	}, 10*time.Second, 10*time.Millisecond)

	got, found, err := idx.Pod(ns, "web-0")
	require.NoError(t, err)
	require.True(t, found)
	require.Equal(t, authn.Pod{UID: string(web.UID), NodeName: "node-a", ServiceAccount: "web"}, got)
	for _, c := range []struct {
		node, sa string
		want     bool
	}{{"node-a", "web", true}, {"node-b", "db", true}, {"node-a", "db", false}, {"node-b", "web", false}, {"", "db", false}} {
		on, err := idx.ServiceAccountOnNode(c.node, ns, c.sa)
		require.NoError(t, err)
		require.Equal(t, c.want, on, "%s on %q", c.sa, c.node)
	}
	on, err := idx.ServiceAccountOnNode("node-a", "other", "web")
	require.NoError(t, err)
	require.False(t, on, "the same name in another namespace")

	// Only the five fields are kept.
	obj, found, err := idx.informer.GetStore().GetByKey(ns + "/web-0")
	require.NoError(t, err)
	require.True(t, found)
	stored := obj.(*corev1.Pod)
	require.Empty(t, stored.Labels)
	require.Empty(t, stored.Spec.Containers)

	err = env.Client.CoreV1().Pods(ns).Delete(t.Context(), "web-0", metav1.DeleteOptions{GracePeriodSeconds: new(int64)})
	require.NoError(t, err)
	require.Eventually(t, func() bool {
		on, err := idx.ServiceAccountOnNode("node-a", ns, "web")
		_, found, _ := idx.Pod(ns, "web-0")
		return err == nil && !on && !found
	}, 10*time.Second, 10*time.Millisecond)

	cancel()
	require.NoError(t, <-done)
}
