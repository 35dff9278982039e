package kubeenv

import (
	"testing"
	"time"

	"strings"

	authenticationv1 "k8s.io/api/authentication/v1"
	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/rest"
)

// CreateNamespace creates namespace ns, or does nothing if it exists.
func (e *Env) CreateNamespace(t testing.TB, ns string) {
	t.Helper()
	_, err := e.Client.CoreV1().Namespaces().Create(t.Context(),
		&corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns}}, metav1.CreateOptions{})
	if err != nil && !apierrors.IsAlreadyExists(err) {
		t.Fatalf("kubeenv: create namespace %s: %v", ns, err)
	}
}

// CreateServiceAccount creates service account ns/name, creating the
// namespace first if needed, and returns it. If the service account exists,
// the existing one is returned.
func (e *Env) CreateServiceAccount(t testing.TB, ns, name string) *corev1.ServiceAccount {
	t.Helper()
	e.CreateNamespace(t, ns)
	sas := e.Client.CoreV1().ServiceAccounts(ns)
	sa, err := sas.Create(t.Context(),
		&corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: ns}}, metav1.CreateOptions{})
	if apierrors.IsAlreadyExists(err) {
		sa, err = sas.Get(t.Context(), name, metav1.GetOptions{})
	}
	if err != nil {
		t.Fatalf("kubeenv: create service account %s/%s: %v", ns, name, err)
	}
	return sa
}

// DeleteServiceAccount deletes service account ns/name; a missing one is not
// an error. Tokens issued for it then stop passing TokenReview, but the
// apiserver caches a successful review for 10s (keyed by token and
// audiences), so a token reviewed just before may pass for that long.
func (e *Env) DeleteServiceAccount(t testing.TB, ns, name string) {
	t.Helper()
	err := e.Client.CoreV1().ServiceAccounts(ns).Delete(t.Context(), name, metav1.DeleteOptions{})
	if err != nil && !apierrors.IsNotFound(err) {
		t.Fatalf("kubeenv: delete service account %s/%s: %v", ns, name, err)
	}
}

// CreatePod creates pod ns/name running as serviceAccount, which must exist
// (the apiserver's ServiceAccount admission refuses others). Nothing runs
// the pod, so it stays Pending; it exists for pod-bound tokens and
// informers.
func (e *Env) CreatePod(t testing.TB, ns, name, serviceAccount string) *corev1.Pod {
	t.Helper()
	return e.CreatePodOnNode(t, ns, name, serviceAccount, "")
}

// CreatePodOnNode is CreatePod with spec.nodeName set to node, as if the
// scheduler had bound it there ("" leaves it unscheduled). The node need not
// exist: the apiserver does not check, and a token bound to the pod still
// names the node (kubernetes.io claim, TokenReview's node-name extra), with
// no node UID.
func (e *Env) CreatePodOnNode(t testing.TB, ns, name, serviceAccount, node string) *corev1.Pod {
	t.Helper()
	pod := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: ns, Labels: map[string]string{"app": name}},
		Spec: corev1.PodSpec{
			ServiceAccountName: serviceAccount,
			NodeName:           node,
			Containers:         []corev1.Container{{Name: "app", Image: "example.invalid/app:test"}},
		},
	}
	pod, err := e.Client.CoreV1().Pods(ns).Create(t.Context(), pod, metav1.CreateOptions{})
	if err != nil {
		t.Fatalf("kubeenv: create pod %s/%s: %v", ns, name, err)
	}
	return pod
}

// Token requests a token for service account ns/sa through the TokenRequest
// API. Empty audiences mean the apiserver's default audience (Issuer). A
// zero ttl means the API's default (1h); the API refuses less than 10
// minutes. If pod is not nil the token is bound to it (kind Pod, name and
// UID), so it carries the pod's name in TokenReview's extra fields and dies
// with the pod.
func (e *Env) Token(t testing.TB, ns, sa string, audiences []string, ttl time.Duration, pod *corev1.Pod) string {
	t.Helper()
	req := &authenticationv1.TokenRequest{Spec: authenticationv1.TokenRequestSpec{Audiences: audiences}}
	if ttl != 0 {
		secs := int64(ttl / time.Second)
		req.Spec.ExpirationSeconds = &secs
	}
	if pod != nil {
		req.Spec.BoundObjectRef = &authenticationv1.BoundObjectReference{
			Kind:       "Pod",
			APIVersion: "v1",
			Name:       pod.Name,
			UID:        pod.UID,
		}
	}
	resp, err := e.Client.CoreV1().ServiceAccounts(ns).CreateToken(t.Context(), sa, req, metav1.CreateOptions{})
	if err != nil {
		t.Fatalf("kubeenv: request token for %s/%s: %v", ns, sa, err)
	}
	return resp.Status.Token
}

// ServiceAccountConfig returns a rest.Config that authenticates as service
// account ns/sa, with a one-hour token for the apiserver's default audience.
// The service account must exist; it has only the permissions RBAC grants
// it, which is how meshca is tested with limited rights.
func (e *Env) ServiceAccountConfig(t testing.TB, ns, sa string) *rest.Config {
	t.Helper()
	cfg := rest.AnonymousClientConfig(e.Config)
	cfg.BearerToken = e.Token(t, ns, sa, nil, time.Hour, nil)
	return cfg
}

// BindClusterRole binds the cluster role to the service account ns/sa.
func (e *Env) BindClusterRole(t testing.TB, role, ns, sa string) {
	t.Helper()
	_, err := e.Client.RbacV1().ClusterRoleBindings().Create(t.Context(), &rbacv1.ClusterRoleBinding{
		ObjectMeta: metav1.ObjectMeta{Name: "kubeenv-" + strings.ReplaceAll(role, ":", "-") + "-" + ns + "-" + sa},
		RoleRef:    rbacv1.RoleRef{APIGroup: "rbac.authorization.k8s.io", Kind: "ClusterRole", Name: role},
		Subjects:   []rbacv1.Subject{{Kind: "ServiceAccount", Namespace: ns, Name: sa}},
	}, metav1.CreateOptions{})
	if err != nil {
		t.Fatalf("kubeenv: bind %s to %s/%s: %v", role, ns, sa, err)
	}
}
