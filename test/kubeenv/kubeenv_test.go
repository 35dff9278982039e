package kubeenv_test

import (
	"encoding/json"
	"os"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	authenticationv1 "k8s.io/api/authentication/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/clientcmd"

	"github.com/meshca/meshca/test/kubeenv"
)

func TestEnv(t *testing.T) {
	t0 := time.Now()
	env := kubeenv.Start(t)
	t.Logf("etcd + kube-apiserver ready in %v", time.Since(t0))
	require.Equal(t, kubeenv.Issuer, env.Issuer)
	require.DirExists(t, env.Dir)

	const ns, sa = "demo", "workload"
	env.CreateNamespace(t, ns)
	env.CreateNamespace(t, ns) // idempotent
	created := env.CreateServiceAccount(t, ns, sa)
	require.Equal(t, created.UID, env.CreateServiceAccount(t, ns, sa).UID, "existing account is returned")
	pod := env.CreatePod(t, ns, "p1", sa)
	require.NotEmpty(t, pod.UID)

	token := env.Token(t, ns, sa, []string{"istio-ca"}, time.Hour, pod)

	review := func(t *testing.T, token string, audiences ...string) authenticationv1.TokenReviewStatus {
		t.Helper()
		tr, err := env.Client.AuthenticationV1().TokenReviews().Create(t.Context(), &authenticationv1.TokenReview{
			Spec: authenticationv1.TokenReviewSpec{Token: token, Audiences: audiences},
		}, metav1.CreateOptions{})
		require.NoError(t, err)
		return tr.Status
	}

	t.Run("bound token passes review for its audience", func(t *testing.T) {
		st := review(t, token, "istio-ca")
		require.True(t, st.Authenticated, st.Error)
		require.Equal(t, "system:serviceaccount:demo:workload", st.User.Username)
		require.Equal(t, string(created.UID), st.User.UID)
		require.Equal(t, authenticationv1.ExtraValue{"p1"}, st.User.Extra["authentication.kubernetes.io/pod-name"])
		require.Equal(t, authenticationv1.ExtraValue{string(pod.UID)}, st.User.Extra["authentication.kubernetes.io/pod-uid"])
		require.Equal(t, []string{"istio-ca"}, st.Audiences)
	})

	t.Run("wrong audience fails review", func(t *testing.T) {
		st := review(t, token, "someone-else")
		require.False(t, st.Authenticated)
		require.NotEmpty(t, st.Error)
	})

	t.Run("jwks readable with admin credentials", func(t *testing.T) {
		body, err := env.Client.CoreV1().RESTClient().Get().AbsPath("/openid/v1/jwks").DoRaw(t.Context())
		require.NoError(t, err)
		var jwks struct {
			Keys []struct {
				Kty string `json:"kty"`
				Alg string `json:"alg"`
			} `json:"keys"`
		}
		require.NoError(t, json.Unmarshal(body, &jwks))
		require.Len(t, jwks.Keys, 1)
		require.Equal(t, "RSA", jwks.Keys[0].Kty)
		require.Equal(t, "RS256", jwks.Keys[0].Alg)

		body, err = env.Client.CoreV1().RESTClient().Get().AbsPath("/.well-known/openid-configuration").DoRaw(t.Context())
		require.NoError(t, err)
		var disco struct {
			Issuer string `json:"issuer"`
		}
		require.NoError(t, json.Unmarshal(body, &disco))
		require.Equal(t, env.Issuer, disco.Issuer)
	})

	t.Run("kubeconfig has admin rights", func(t *testing.T) {
		cfg, err := clientcmd.BuildConfigFromFlags("", env.Kubeconfig)
		require.NoError(t, err)
		require.Equal(t, env.Host, cfg.Host)
		client, err := kubernetes.NewForConfig(cfg)
		require.NoError(t, err)
		_, err = client.CoreV1().Namespaces().Get(t.Context(), ns, metav1.GetOptions{})
		require.NoError(t, err)
	})

	t.Run("service account config has only RBAC rights", func(t *testing.T) {
		client, err := kubernetes.NewForConfig(env.ServiceAccountConfig(t, ns, sa))
		require.NoError(t, err)
		_, err = client.CoreV1().Namespaces().Get(t.Context(), ns, metav1.GetOptions{})
		require.True(t, apierrors.IsForbidden(err), "got %v", err)
		// Any authenticated caller may ask who it is.
		ssr, err := client.AuthenticationV1().SelfSubjectReviews().Create(t.Context(),
			&authenticationv1.SelfSubjectReview{}, metav1.CreateOptions{})
		require.NoError(t, err)
		require.Equal(t, "system:serviceaccount:demo:workload", ssr.Status.UserInfo.Username)
	})

	t.Run("deleted service account fails review", func(t *testing.T) {
		env.CreateServiceAccount(t, ns, "short-lived")
		tok := env.Token(t, ns, "short-lived", []string{"istio-ca"}, 0, nil)
		require.True(t, review(t, tok, "istio-ca").Authenticated)
		env.DeleteServiceAccount(t, ns, "short-lived")
		env.DeleteServiceAccount(t, ns, "short-lived") // missing is fine
		// The apiserver caches successful reviews for 10s, keyed by token and
		// audiences; a new audience list misses that cache.
		require.Eventually(t, func() bool { return !review(t, tok, "istio-ca", "other").Authenticated },
			5*time.Second, 50*time.Millisecond)
	})
}

func TestStartMainStopRemovesDir(t *testing.T) {
	kubeenv.SkipIfShort(t)
	env, stop, err := kubeenv.StartMain()
	require.NoError(t, err)
	_, err = env.Client.CoreV1().Namespaces().Get(t.Context(), "default", metav1.GetOptions{})
	require.NoError(t, err)
	stop()
	_, err = os.Stat(env.Dir)
	require.True(t, os.IsNotExist(err), "dir still there: %v", err)
}
