// Package chart_test checks the Helm chart in charts/meshca with the real
// tools: helm lint and helm template (helm built by test/tools/build.sh),
// meshca's own `config check` and `policy explain` on the configuration and
// policy the chart renders, and a strict server-side dry run of every
// rendered object against a real kube-apiserver (test/kubeenv).
package chart_test

import (
	"bufio"
	"bytes"
	"errors"
	"io"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"go.yaml.in/yaml/v3"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	policyv1 "k8s.io/api/policy/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"
	utilyaml "k8s.io/apimachinery/pkg/util/yaml"
	"k8s.io/client-go/discovery"
	"k8s.io/client-go/discovery/cached/memory"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/restmapper"

	"github.com/meshca/meshca/test/kubeenv"
)

const (
	chartDir = "../../charts/meshca"
	release  = "meshca"

	// What istio-agent and the kubelet rely on; the chart must keep them.
	configFile = "/etc/meshca/config.yaml"
	policyFile = "/etc/meshca/policy/policy.yaml"
	cacertsDir = "/etc/cacerts"
	// Where the vault backend's Secret and its projected service-account
	// token are mounted; the token path is written into the config.
	vaultDir       = "/etc/meshca/vault"
	vaultTokenFile = "/var/run/secrets/meshca/vault/token"
	grpcPort       = 15012
	adminPort      = 15014
)

// variant is one set of values the chart is rendered with, and what the
// rendered objects must then look like.
type variant struct {
	name      string
	values    string // file in testdata; "" renders the chart's defaults
	namespace string

	backend       string
	cacertsSecret string // the Secret mounted at cacertsDir; "" for none
	vaultSecret   string // the Secret mounted at vaultDir; "" for none
	vaultAudience string // audience of the projected token at vaultTokenFile; "" for none
	saAnnotations map[string]string
	dataClaim     string // the PVC holding the selfsigned root; "" for none
	replicas      int32
	tokenReview   bool // the system:auth-delegator binding exists
	watchSAs      bool // list/watch on serviceaccounts is granted
	watchPods     bool // list/watch on pods is granted (authn.trustedNodeAgents)
	dnsNames      []string

	// explain is a NAMESPACE/SA for `meshca policy explain`, and
	// wantSource the policy level that must set its defaultTTL.
	explain, wantSource string
}

var variants = []variant{
	{
		name: "defaults", namespace: "istio-system",
		backend: "selfsigned", replicas: 1, tokenReview: true, watchSAs: true, watchPods: true,
		dnsNames: []string{"meshca.istio-system.svc", "meshca.istio-system.svc.cluster.local"},
		explain:  "default/app", wantSource: "built-in",
	},
	{
		name: "plugged", values: "plugged.yaml", namespace: "mesh-plugged",
		backend: "plugged", cacertsSecret: "istio-cacerts", replicas: 2, tokenReview: true, watchSAs: true, watchPods: true,
		dnsNames: []string{"meshca.mesh-plugged.svc", "meshca.mesh-plugged.svc.cluster.local"},
		explain:  "payments/ledger", wantSource: "serviceAccounts.payments/ledger",
	},
	{
		name: "jwt", values: "jwt.yaml", namespace: "mesh-jwt",
		backend: "selfsigned", dataClaim: "meshca-root", replicas: 1,
		dnsNames: []string{"ca.example.org"},
		explain:  "default/app", wantSource: "built-in",
	},
	{
		name: "vault", values: "vault.yaml", namespace: "mesh-vault",
		backend: "vault", vaultSecret: "meshca-vault", vaultAudience: "vault.example.org", replicas: 2,
		tokenReview: true, watchSAs: true, watchPods: true,
		dnsNames: []string{"meshca.mesh-vault.svc", "meshca.mesh-vault.svc.cluster.local"},
		explain:  "default/app", wantSource: "built-in",
	},
	{
		name: "awspca", values: "awspca.yaml", namespace: "mesh-awspca",
		backend: "awspca", replicas: 2, tokenReview: true, watchSAs: true, watchPods: true,
		saAnnotations: map[string]string{"eks.amazonaws.com/role-arn": "arn:aws:iam::111122223333:role/meshca"},
		dnsNames:      []string{"meshca.mesh-awspca.svc", "meshca.mesh-awspca.svc.cluster.local"},
		explain:       "default/app", wantSource: "built-in",
	},
}

func TestChart(t *testing.T) {
	env := kubeenv.Start(t)
	h := newHelm(t)
	meshca := buildMeshca(t)

	for _, v := range variants {
		t.Run(v.name, func(t *testing.T) {
			// helm checks the chart against the Kubernetes version it was
			// built with (as a released helm does); the dry run below checks
			// it against the real apiserver, whose source build reports no
			// version.
			args := []string{"--namespace", v.namespace}
			if v.values != "" {
				args = append(args, "--values", filepath.Join("testdata", v.values))
			}
			_, err := h.run(t, append([]string{"lint", "--strict", chartDir}, args...)...)
			require.NoError(t, err)
			out, err := h.run(t, append([]string{"template", release, chartDir}, args...)...)
			require.NoError(t, err)
			objs := decode(t, out)

			checkConfig(t, meshca, objs, v)

			env.CreateNamespace(t, v.namespace)
			applied := dryRun(t, env, objs)
			checkObjects(t, applied, v)
		})
	}
}

// TestChartRefuses checks that values the chart cannot honour fail
// rendering with a message naming the value, rather than deploying a CA
// that splits the mesh or is killed mid-request.
func TestChartRefuses(t *testing.T) {
	h := newHelm(t)
	for _, tc := range []struct {
		name    string
		set     []string
		wantMsg string
	}{
		{name: "selfsigned root per replica", set: []string{"replicaCount=2"}, wantMsg: "replicaCount 2"},
		{name: "selfsigned root per replica on emptyDir", set: []string{"replicaCount=3", "persistence.type=emptyDir"}, wantMsg: "replicaCount 3"},
		{name: "grace period not above shutdownGrace", set: []string{"terminationGracePeriodSeconds=10"}, wantMsg: "terminationGracePeriodSeconds"},
		{name: "grace period below a longer shutdownGrace", set: []string{"config.server.shutdownGrace=1m", "terminationGracePeriodSeconds=45"}, wantMsg: "terminationGracePeriodSeconds"},
		{name: "grpc address is the chart's", set: []string{"config.server.grpcAddress=:8443"}, wantMsg: "config.server.grpcAddress"},
		{name: "admin address is the chart's", set: []string{"config.server.adminAddress=:9090"}, wantMsg: "config.server.adminAddress"},
		{name: "policy file is the chart's", set: []string{"config.policy.file=/tmp/p.yaml"}, wantMsg: "config.policy.file"},
		{name: "plugged dir is the chart's", set: []string{"config.backend.type=plugged", "config.backend.plugged.dir=/certs"}, wantMsg: "config.backend.plugged.dir"},
		{name: "dev mode", set: []string{"config.dev.enabled=true"}, wantMsg: "config.dev"},
		{name: "unknown persistence", set: []string{"persistence.type=hostPath"}, wantMsg: "persistence.type"},
		{name: "unknown backend", set: []string{"config.backend.type=hsm"}, wantMsg: "config.backend.type"},
		{name: "vault file without its Secret", set: []string{"config.backend.type=vault", "config.backend.vault.auth.method=token", "config.backend.vault.auth.tokenFile=/etc/meshca/vault/token"}, wantMsg: "vault.secretName"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			args := []string{"template", release, chartDir}
			for _, s := range tc.set {
				args = append(args, "--set", s)
			}
			_, err := h.run(t, args...)
			require.ErrorContains(t, err, tc.wantMsg)
		})
	}
}

// TestVaultOwnTokenFile checks that a Kubernetes login with a token file of
// its own gets no projected token, and keeps its path in the config.
func TestVaultOwnTokenFile(t *testing.T) {
	h := newHelm(t)
	const own = "/var/run/secrets/kubernetes.io/serviceaccount/token"
	out, err := h.run(t, "template", release, chartDir, "--values", filepath.Join("testdata", "vault.yaml"),
		"--set", "config.backend.vault.auth.kubernetes.tokenFile="+own)
	require.NoError(t, err)
	objs := objects(decode(t, out))
	cm := one[corev1.ConfigMap](t, objs, "ConfigMap")
	var cfg map[string]any
	require.NoError(t, yaml.Unmarshal([]byte(cm.Data[path.Base(configFile)]), &cfg))
	require.Equal(t, own, lookup(t, cfg, "backend", "vault", "auth", "kubernetes", "tokenFile"))
	dep := one[appsv1.Deployment](t, objs, "Deployment")
	for _, vol := range dep.Spec.Template.Spec.Volumes {
		require.Nil(t, vol.Projected, "volume %s: no projected token with a tokenFile of its own", vol.Name)
	}
}

// TestServiceMonitor checks the optional ServiceMonitor: absent by default
// (its CRD may not exist), and scraping the admin port when enabled.
func TestServiceMonitor(t *testing.T) {
	h := newHelm(t)
	out, err := h.run(t, "template", release, chartDir, "--set", "serviceMonitor.enabled=true", "--set", "serviceMonitor.labels.release=prom")
	require.NoError(t, err)
	var sm *unstructured.Unstructured
	for _, o := range decode(t, out) {
		if o.GetKind() == "ServiceMonitor" {
			sm = o
		}
	}
	require.NotNil(t, sm, "no ServiceMonitor rendered")
	require.Equal(t, "monitoring.coreos.com/v1", sm.GetAPIVersion())
	require.Equal(t, "prom", sm.GetLabels()["release"])
	endpoints, _, err := unstructured.NestedSlice(sm.Object, "spec", "endpoints")
	require.NoError(t, err)
	require.Len(t, endpoints, 1)
	ep := endpoints[0].(map[string]any)
	require.Equal(t, "http-monitoring", ep["port"])
	require.Equal(t, "/metrics", ep["path"])
}

// helm runs the helm binary built by test/tools/build.sh, isolated from the
// user's helm configuration and kubeconfig.
type helm struct {
	bin string
	env []string
}

func newHelm(t *testing.T) *helm {
	t.Helper()
	kubeenv.SkipIfShort(t)
	dir, err := kubeenv.BinDir()
	require.NoError(t, err)
	bin := filepath.Join(dir, "helm")
	if _, err := os.Stat(bin); err != nil {
		t.Fatalf("helm not found (run test/tools/build.sh helm): %v", err)
	}
	home := t.TempDir()
	return &helm{bin: bin, env: []string{
		"PATH=" + os.Getenv("PATH"),
		"HOME=" + home,
		"XDG_CACHE_HOME=" + filepath.Join(home, "cache"),
		"XDG_CONFIG_HOME=" + filepath.Join(home, "config"),
		"XDG_DATA_HOME=" + filepath.Join(home, "data"),
		"KUBECONFIG=" + filepath.Join(home, "no-kubeconfig"),
	}}
}

// run returns helm's stdout; a failure's error includes its stderr.
func (h *helm) run(t *testing.T, args ...string) ([]byte, error) {
	t.Helper()
	cmd := exec.CommandContext(t.Context(), h.bin, args...)
	cmd.Env = h.env
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		return nil, errors.New("helm " + strings.Join(args, " ") + ": " + err.Error() + "\n" + stdout.String() + stderr.String())
	}
	return stdout.Bytes(), nil
}

// buildMeshca builds the meshca command once for the test.
func buildMeshca(t *testing.T) string {
	t.Helper()
	bin := filepath.Join(t.TempDir(), "meshca")
	out, err := exec.CommandContext(t.Context(), "go", "build", "-o", bin, "github.com/meshca/meshca/cmd/meshca").CombinedOutput()
	require.NoError(t, err, "build meshca:\n%s", out)
	return bin
}

// decode splits helm's output into objects, skipping empty documents.
func decode(t *testing.T, manifest []byte) []*unstructured.Unstructured {
	t.Helper()
	r := utilyaml.NewYAMLReader(bufio.NewReader(bytes.NewReader(manifest)))
	var objs []*unstructured.Unstructured
	for {
		doc, err := r.Read()
		if errors.Is(err, io.EOF) {
			return objs
		}
		require.NoError(t, err)
		js, err := utilyaml.ToJSON(doc)
		require.NoError(t, err)
		if s := string(bytes.TrimSpace(js)); s == "null" || s == "{}" {
			continue
		}
		o := &unstructured.Unstructured{}
		require.NoError(t, o.UnmarshalJSON(js), "decode:\n%s", doc)
		objs = append(objs, o)
	}
}

// dryRun creates every object with a strict server-side dry run (unknown or
// duplicate fields are errors) and returns the objects as the apiserver
// would have stored them, defaults filled in.
func dryRun(t *testing.T, env *kubeenv.Env, objs []*unstructured.Unstructured) []*unstructured.Unstructured {
	t.Helper()
	dc, err := discovery.NewDiscoveryClientForConfig(env.Config)
	require.NoError(t, err)
	mapper := restmapper.NewDeferredDiscoveryRESTMapper(memory.NewMemCacheClient(dc))
	dyn, err := dynamic.NewForConfig(env.Config)
	require.NoError(t, err)
	opts := metav1.CreateOptions{DryRun: []string{metav1.DryRunAll}, FieldValidation: metav1.FieldValidationStrict}
	var applied []*unstructured.Unstructured
	for _, o := range objs {
		gvk := o.GroupVersionKind()
		m, err := mapper.RESTMapping(gvk.GroupKind(), gvk.Version)
		require.NoError(t, err, "map %s", gvk)
		var ri dynamic.ResourceInterface = dyn.Resource(m.Resource)
		if m.Scope.Name() == meta.RESTScopeNameNamespace {
			require.NotEmpty(t, o.GetNamespace(), "%s %s: the chart must set metadata.namespace", o.GetKind(), o.GetName())
			ri = dyn.Resource(m.Resource).Namespace(o.GetNamespace())
		}
		got, err := ri.Create(t.Context(), o, opts)
		require.NoError(t, err, "dry-run create %s %s", o.GetKind(), o.GetName())
		applied = append(applied, got)
	}
	return applied
}

// objects indexes rendered objects by kind and name.
type objects []*unstructured.Unstructured

func (objs objects) ofKind(kind string) []*unstructured.Unstructured {
	var out []*unstructured.Unstructured
	for _, o := range objs {
		if o.GetKind() == kind {
			out = append(out, o)
		}
	}
	return out
}

// one returns the single object of kind, converted to T.
func one[T any](t *testing.T, objs objects, kind string) *T {
	t.Helper()
	of := objs.ofKind(kind)
	require.Len(t, of, 1, "want exactly one %s", kind)
	return convert[T](t, of[0])
}

func convert[T any](t *testing.T, u *unstructured.Unstructured) *T {
	t.Helper()
	var v T
	require.NoError(t, runtime.DefaultUnstructuredConverter.FromUnstructured(u.Object, &v), "convert %s %s", u.GetKind(), u.GetName())
	return &v
}

// checkConfig validates the rendered configuration and policy with meshca
// itself, after checking the keys the Deployment and istio-agent rely on.
func checkConfig(t *testing.T, meshca string, objs objects, v variant) {
	t.Helper()
	cm := one[corev1.ConfigMap](t, objs, "ConfigMap")
	rendered := cm.Data[path.Base(configFile)]
	require.NotEmpty(t, rendered, "ConfigMap has no %s", path.Base(configFile))
	policy, ok := cm.Data[path.Base(policyFile)]
	require.True(t, ok, "ConfigMap has no %s", path.Base(policyFile))

	var cfg map[string]any
	require.NoError(t, yaml.Unmarshal([]byte(rendered), &cfg))
	require.Equal(t, ":15012", lookup(t, cfg, "server", "grpcAddress"))
	require.Equal(t, ":15014", lookup(t, cfg, "server", "adminAddress"))
	require.Equal(t, policyFile, lookup(t, cfg, "policy", "file"))
	require.Equal(t, v.backend, lookup(t, cfg, "backend", "type"))
	var dnsNames []string
	for _, n := range lookup(t, cfg, "server", "dnsNames").([]any) {
		dnsNames = append(dnsNames, n.(string))
	}
	require.Equal(t, v.dnsNames, dnsNames)

	// The policy lives at its mount path in the pod; here it is a file
	// beside the configuration.
	dir := t.TempDir()
	localPolicy := filepath.Join(dir, "policy.yaml")
	require.NoError(t, os.WriteFile(localPolicy, []byte(policy), 0o600))
	cfg["policy"].(map[string]any)["file"] = localPolicy
	data, err := yaml.Marshal(cfg)
	require.NoError(t, err)
	localConfig := filepath.Join(dir, "config.yaml")
	require.NoError(t, os.WriteFile(localConfig, data, 0o600))

	out, err := exec.CommandContext(t.Context(), meshca, "config", "check", "--config", localConfig).CombinedOutput()
	require.NoError(t, err, "meshca config check:\n%s\nconfig:\n%s", out, data)
	out, err = exec.CommandContext(t.Context(), meshca, "policy", "explain", "--config", localConfig, v.explain).CombinedOutput()
	require.NoError(t, err, "meshca policy explain:\n%s", out)
	var source string
	for line := range strings.Lines(string(out)) {
		if f := strings.Fields(line); len(f) == 3 && f[0] == "defaultTTL" {
			source = f[2]
		}
	}
	require.Equal(t, v.wantSource, source, "policy explain:\n%s", out)
}

// lookup returns the value at a path of map keys, failing if one is missing.
func lookup(t *testing.T, m map[string]any, keys ...string) any {
	t.Helper()
	var cur any = m
	for i, k := range keys {
		mm, ok := cur.(map[string]any)
		require.True(t, ok, "%s is not a mapping", strings.Join(keys[:i], "."))
		cur, ok = mm[k]
		require.True(t, ok, "%s is missing", strings.Join(keys[:i+1], "."))
	}
	return cur
}

// checkObjects asserts the properties of the applied objects that a
// careless change to the chart could break.
func checkObjects(t *testing.T, objs objects, v variant) {
	t.Helper()
	require.Empty(t, objs.ofKind("ServiceMonitor"), "ServiceMonitor is off by default")

	sa := one[corev1.ServiceAccount](t, objs, "ServiceAccount")
	if len(v.saAnnotations) == 0 {
		require.Empty(t, sa.Annotations)
	} else {
		require.Equal(t, v.saAnnotations, sa.Annotations, "ServiceAccount annotations (IRSA)")
	}
	cm := one[corev1.ConfigMap](t, objs, "ConfigMap")
	var cfg map[string]any
	require.NoError(t, yaml.Unmarshal([]byte(cm.Data[path.Base(configFile)]), &cfg))

	dep := one[appsv1.Deployment](t, objs, "Deployment")
	require.Equal(t, v.replicas, *dep.Spec.Replicas)
	pod := dep.Spec.Template.Spec
	require.Equal(t, sa.Name, pod.ServiceAccountName)
	require.Equal(t, "false", dep.Spec.Template.Labels["sidecar.istio.io/inject"], "the CA must not get a sidecar")
	require.Len(t, pod.Containers, 1)
	c := pod.Containers[0]
	require.Equal(t, []string{"serve", "--config", configFile}, c.Args)

	// Non-root, read-only, no capabilities, default seccomp.
	require.NotNil(t, c.SecurityContext)
	require.True(t, nonRoot(pod.SecurityContext, c.SecurityContext), "meshca must run as non-root")
	require.Equal(t, ptrTrue, c.SecurityContext.ReadOnlyRootFilesystem)
	require.Equal(t, ptrFalse, c.SecurityContext.AllowPrivilegeEscalation)
	require.NotNil(t, c.SecurityContext.Capabilities)
	require.Contains(t, c.SecurityContext.Capabilities.Drop, corev1.Capability("ALL"))
	require.NotNil(t, pod.SecurityContext.SeccompProfile)
	require.Equal(t, corev1.SeccompProfileTypeRuntimeDefault, pod.SecurityContext.SeccompProfile.Type)
	require.NotEmpty(t, c.Resources.Requests)
	require.NotEmpty(t, c.Resources.Limits)

	// Ports and probes.
	ports := map[string]int32{}
	for _, p := range c.Ports {
		ports[p.Name] = p.ContainerPort
	}
	require.Equal(t, map[string]int32{"grpc": grpcPort, "http-monitoring": adminPort}, ports)
	for probe, wantPath := range map[*corev1.Probe]string{c.LivenessProbe: "/healthz", c.ReadinessProbe: "/readyz"} {
		require.NotNil(t, probe)
		require.NotNil(t, probe.HTTPGet)
		require.Equal(t, wantPath, probe.HTTPGet.Path)
		port := probe.HTTPGet.Port.IntVal
		if probe.HTTPGet.Port.StrVal != "" {
			port = ports[probe.HTTPGet.Port.StrVal]
		}
		require.EqualValues(t, adminPort, port, "probe %s", wantPath)
	}

	// The kubelet must wait out meshca's graceful shutdown.
	grace, err := time.ParseDuration(lookup(t, cfg, "server", "shutdownGrace").(string))
	require.NoError(t, err)
	require.NotNil(t, pod.TerminationGracePeriodSeconds)
	require.Greater(t, time.Duration(*pod.TerminationGracePeriodSeconds)*time.Second, grace)

	// Mounts: the config file, the policy directory (not a subPath, so
	// updates arrive), cacerts only for plugged, the vault Secret and
	// projected token only for vault, the root volume only with persistence.
	volumes := map[string]corev1.Volume{}
	for _, vol := range pod.Volumes {
		volumes[vol.Name] = vol
	}
	mounts := map[string]corev1.VolumeMount{}
	for _, m := range c.VolumeMounts {
		mounts[m.MountPath] = m
	}
	cfgMount, ok := mounts[configFile]
	require.True(t, ok, "nothing mounted at %s", configFile)
	require.Equal(t, path.Base(configFile), cfgMount.SubPath)
	requireConfigMapItem(t, volumes[cfgMount.Name], cm.Name, path.Base(configFile), cfgMount.SubPath)
	polMount, ok := mounts[path.Dir(policyFile)]
	require.True(t, ok, "nothing mounted at %s", path.Dir(policyFile))
	require.Empty(t, polMount.SubPath, "a subPath mount never sees ConfigMap updates")
	requireConfigMapItem(t, volumes[polMount.Name], cm.Name, path.Base(policyFile), path.Base(policyFile))

	var secrets, wantSecrets []string
	for _, vol := range pod.Volumes {
		if vol.Secret != nil {
			secrets = append(secrets, vol.Secret.SecretName)
		}
	}
	for _, s := range []string{v.cacertsSecret, v.vaultSecret} {
		if s != "" {
			wantSecrets = append(wantSecrets, s)
		}
	}
	require.ElementsMatch(t, wantSecrets, secrets, "mounted Secrets")
	requireSecretMount(t, mounts, volumes, cacertsDir, v.cacertsSecret)
	if v.cacertsSecret != "" {
		require.Equal(t, cacertsDir, lookup(t, cfg, "backend", "plugged", "dir"))
	}
	requireSecretMount(t, mounts, volumes, vaultDir, v.vaultSecret)

	// Vault's Kubernetes login: a projected token for Vault's audience,
	// whose path the config names. No other projected volume.
	var projected []string
	for _, vol := range pod.Volumes {
		if vol.Projected != nil {
			projected = append(projected, vol.Name)
		}
	}
	tokenMount, ok := mounts[path.Dir(vaultTokenFile)]
	if v.vaultAudience == "" {
		require.Empty(t, projected, "a projected token without Vault's Kubernetes login")
		require.False(t, ok, "%s is mounted without Vault's Kubernetes login", path.Dir(vaultTokenFile))
	} else {
		require.True(t, ok, "no token mounted at %s", path.Dir(vaultTokenFile))
		require.True(t, tokenMount.ReadOnly)
		require.Equal(t, []string{tokenMount.Name}, projected)
		sources := volumes[tokenMount.Name].Projected.Sources
		require.Len(t, sources, 1)
		tok := sources[0].ServiceAccountToken
		require.NotNil(t, tok, "volume %s projects no service-account token", tokenMount.Name)
		require.Equal(t, v.vaultAudience, tok.Audience)
		require.Equal(t, path.Base(vaultTokenFile), tok.Path)
		require.NotNil(t, tok.ExpirationSeconds)
		require.EqualValues(t, 3600, *tok.ExpirationSeconds)
		require.Equal(t, vaultTokenFile, lookup(t, cfg, "backend", "vault", "auth", "kubernetes", "tokenFile"))
	}
	claims := objs.ofKind("PersistentVolumeClaim")
	if v.dataClaim == "" {
		require.Empty(t, claims)
	} else {
		require.Len(t, claims, 1)
		require.Equal(t, v.dataClaim, claims[0].GetName())
		dir := lookup(t, cfg, "backend", "selfSigned", "dir").(string)
		m, ok := mounts[dir]
		require.True(t, ok, "backend.selfSigned.dir %s is not mounted", dir)
		require.False(t, m.ReadOnly)
		require.NotNil(t, volumes[m.Name].PersistentVolumeClaim)
		require.Equal(t, v.dataClaim, volumes[m.Name].PersistentVolumeClaim.ClaimName)
		require.Equal(t, appsv1.RecreateDeploymentStrategyType, dep.Spec.Strategy.Type, "one pod at a time on the root volume")
	}
	if v.replicas > 1 {
		require.Equal(t, appsv1.RollingUpdateDeploymentStrategyType, dep.Spec.Strategy.Type, "replicas sharing a root roll one at a time")
	}

	// The Service selects the pods and exposes gRPC and monitoring.
	svc := one[corev1.Service](t, objs, "Service")
	require.Equal(t, "meshca", svc.Name, "istio-agent's CA_ADDR names this Service")
	requireSelects(t, svc.Spec.Selector, dep.Spec.Template.Labels)
	type svcPort struct {
		port        int32
		target      string
		appProtocol string
	}
	gotPorts := map[string]svcPort{}
	for _, p := range svc.Spec.Ports {
		var ap string
		if p.AppProtocol != nil {
			ap = *p.AppProtocol
		}
		gotPorts[p.Name] = svcPort{p.Port, p.TargetPort.String(), ap}
	}
	require.Equal(t, map[string]svcPort{
		"grpc":            {grpcPort, "grpc", "grpc"},
		"http-monitoring": {adminPort, "http-monitoring", "http"},
	}, gotPorts)

	// RBAC.
	subject := rbacv1.Subject{Kind: "ServiceAccount", Name: sa.Name, Namespace: v.namespace}
	bound := map[string]bool{}
	for _, u := range objs.ofKind("ClusterRoleBinding") {
		b := convert[rbacv1.ClusterRoleBinding](t, u)
		require.Equal(t, []rbacv1.Subject{subject}, b.Subjects, "binding %s", b.Name)
		bound[b.RoleRef.Name] = true
	}
	require.Equal(t, v.tokenReview, bound["system:auth-delegator"], "ClusterRoleBinding to system:auth-delegator (TokenReview)")
	var saWatch, podWatch bool
	for _, u := range objs.ofKind("ClusterRole") {
		r := convert[rbacv1.ClusterRole](t, u)
		require.True(t, bound[r.Name], "ClusterRole %s is not bound", r.Name)
		for _, rule := range r.Rules {
			listWatch := slices.Contains(rule.Verbs, "list") && slices.Contains(rule.Verbs, "watch")
			if slices.Contains(rule.Resources, "serviceaccounts") && listWatch {
				saWatch = true
			}
			if slices.Contains(rule.Resources, "pods") && listWatch {
				podWatch = true
			}
		}
	}
	require.Equal(t, v.watchSAs, saWatch, "list/watch on serviceaccounts (authn.checkServiceAccounts)")
	require.Equal(t, v.watchSAs, lookup(t, cfg, "authn", "checkServiceAccounts"))
	require.Equal(t, v.watchPods, podWatch, "list/watch on pods (authn.trustedNodeAgents)")
	require.Equal(t, v.watchPods, len(lookup(t, cfg, "authn", "trustedNodeAgents").([]any)) > 0)

	// A disruption budget only where there is something to keep up.
	pdbs := objs.ofKind("PodDisruptionBudget")
	if v.replicas > 1 {
		require.Len(t, pdbs, 1)
		pdb := convert[policyv1.PodDisruptionBudget](t, pdbs[0])
		requireSelects(t, pdb.Spec.Selector.MatchLabels, dep.Spec.Template.Labels)
		require.Less(t, pdb.Spec.MinAvailable.IntValue(), int(v.replicas))
	} else {
		require.Empty(t, pdbs, "a PodDisruptionBudget on one replica blocks node drains")
	}
}

var (
	ptrTrue  = new(true)
	ptrFalse = new(false)
)

// nonRoot reports whether the container is required to run as non-root,
// by its own security context or the pod's.
func nonRoot(pod *corev1.PodSecurityContext, c *corev1.SecurityContext) bool {
	if c != nil && c.RunAsNonRoot != nil {
		return *c.RunAsNonRoot
	}
	return pod != nil && pod.RunAsNonRoot != nil && *pod.RunAsNonRoot
}

// requireSecretMount asserts that Secret name is mounted read-only at dir,
// group-readable (podSecurityContext.fsGroup) and no more, or that nothing
// is mounted there when name is "".
func requireSecretMount(t *testing.T, mounts map[string]corev1.VolumeMount, volumes map[string]corev1.Volume, dir, name string) {
	t.Helper()
	m, ok := mounts[dir]
	if name == "" {
		require.False(t, ok, "%s is mounted", dir)
		return
	}
	require.True(t, ok, "Secret %s not mounted at %s", name, dir)
	require.True(t, m.ReadOnly, "%s must be read-only", dir)
	sec := volumes[m.Name].Secret
	require.NotNil(t, sec, "volume %s at %s is not a Secret", m.Name, dir)
	require.Equal(t, name, sec.SecretName)
	require.NotNil(t, sec.DefaultMode)
	require.EqualValues(t, 0o440, *sec.DefaultMode, "mode of the files in %s", dir)
}

// requireConfigMapItem asserts that vol projects key of ConfigMap name to
// file path.
func requireConfigMapItem(t *testing.T, vol corev1.Volume, name, key, path string) {
	t.Helper()
	require.NotNil(t, vol.ConfigMap, "volume %s is not a ConfigMap", vol.Name)
	require.Equal(t, name, vol.ConfigMap.Name)
	require.Contains(t, vol.ConfigMap.Items, corev1.KeyToPath{Key: key, Path: path})
}

// requireSelects asserts that selector matches labels.
func requireSelects(t *testing.T, selector, labels map[string]string) {
	t.Helper()
	require.NotEmpty(t, selector)
	for k, v := range selector {
		require.Equal(t, v, labels[k], "selector %s=%s does not match the pod labels", k, v)
	}
}
