package config

import (
	"bytes"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"testing/synctest"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/stretchr/testify/require"

	"github.com/meshca/meshca/backends"
	"github.com/meshca/meshca/backends/selfsigned"
	"github.com/meshca/meshca/ca"
	"github.com/meshca/meshca/ca/reload"
)

func TestParseRejectsUnknownKeysByPath(t *testing.T) {
	tests := []struct {
		name    string
		yaml    string
		wantErr []string
	}{
		{"top level", "trustDomian: cluster.local\n", []string{"trustDomian: unknown key (line 1)", "trustDomain"}},
		{"nested", "authn:\n  jwt:\n    jwksFil: /x\n", []string{"authn.jwt.jwksFil: unknown key (line 3)"}},
		{"backend section", "backend:\n  type: selfsigned\n  selfSigned:\n    keytype: RSA-2048\n", []string{"backend.selfSigned.keytype: unknown key"}},
		{"two at once", "server:\n  grpcAdress: x\nlog:\n  lvl: info\n", []string{"server.grpcAdress", "log.lvl"}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			_, err := Parse([]byte(tc.yaml))
			require.Error(t, err)
			for _, want := range tc.wantErr {
				require.ErrorContains(t, err, want)
			}
		})
	}
}

func TestParseDefaultsAndValidation(t *testing.T) {
	c, err := Parse([]byte("authn:\n  kubeconfig: /etc/kube\n"))
	require.NoError(t, err)
	require.Equal(t, "cluster.local", c.TrustDomain)
	require.Equal(t, ":15012", c.Server.GRPCAddress)
	require.Equal(t, []string{AuthClientCert, AuthTokenReview}, c.Authn.Chain)
	require.Equal(t, []string{"istio-ca"}, c.Authn.Audiences)
	require.True(t, *c.Authn.CheckServiceAccounts)
	require.Equal(t, []string{"istio-system/ztunnel"}, c.Authn.TrustedNodeAgents)
	require.Equal(t, 128, c.Server.GCHeapFloorMiB)
	require.Equal(t, "selfsigned", c.Backend.Type)
	require.True(t, c.NeedsKube())

	tests := []struct {
		name    string
		yaml    string
		wantErr []string
	}{
		{"bad trust domain", "trustDomain: 'Not A Domain!'\n", []string{"trustDomain:"}},
		{"unknown authenticator", "authn:\n  chain: [jwt, ldap]\n", []string{"authn.chain[1]: unknown authenticator \"ldap\""}},
		{"duplicate authenticator", "authn:\n  chain: [jwt, jwt]\n", []string{"authn.chain[1]: \"jwt\" is listed twice"}},
		{"jwks file without issuer", "authn:\n  chain: [jwt]\n  jwt:\n    jwksFile: /k.json\n", []string{"authn.issuer: is required"}},
		{"bad duration", "server:\n  servingTTL: forever\n", []string{"servingTTL"}},
		{"bad address", "server:\n  grpcAddress: 15012\n", []string{"server.grpcAddress: want host:port"}},
		{"unknown backend", "backend:\n  type: hsm\n", []string{"backend.type"}},
		{"bad log level", "log:\n  level: loud\n", []string{"log.level"}},
		{"several at once", "log:\n  level: loud\n  format: xml\n", []string{"log.level", "log.format"}},
		{"refetch interval that would let forged key IDs hammer the JWKS source", "authn:\n  jwt:\n    refetchInterval: 10ms\n", []string{"authn.jwt.refetchInterval: must be at least 1s"}},
		{"header list too small for a token", "server:\n  maxHeaderListBytes: 1024\n", []string{"server.maxHeaderListBytes: must be at least 20480"}},
		{"client chain limit out of range", "server:\n  maxClientChain: 50\n", []string{"server.maxClientChain: must be between 1 and 10"}},
		{"heap floor out of range", "server:\n  gcHeapFloorMiB: -2\n", []string{"server.gcHeapFloorMiB: must be -1 (off) or between 1 and 1048576, got -2"}},
		{"request timeout too short", "server:\n  requestTimeout: 1ms\n", []string{"server.requestTimeout: must be at least 1s"}},
		{"sds limits", "sds:\n  maxStreams: -1\n  recheckInterval: 1ms\n", []string{"sds.maxStreams: must be at least 1", "sds.recheckInterval: must be at least 1s"}},
		{"admission rates", "admission:\n  peerRate: -5\n  queueWait: 2m\n", []string{"admission: peerRate and identityRate must be positive", "admission.queueWait: must be between 1ms and 1m"}},
		{"node agent without namespace", "authn:\n  trustedNodeAgents: [ztunnel]\n", []string{`authn.trustedNodeAgents[0]: "ztunnel": want namespace/serviceaccount`}},
		{"node agent with a bad namespace", "authn:\n  trustedNodeAgents: [istio-system/ztunnel, Istio_System/ztunnel]\n",
			[]string{`authn.trustedNodeAgents[1]: "Istio_System/ztunnel": namespace "Istio_System"`}},
		{"node agent with a bad name", "authn:\n  trustedNodeAgents: [istio-system/ZT]\n", []string{`authn.trustedNodeAgents[0]: "istio-system/ZT": service account "ZT"`}},
		{"node agent listed twice", "authn:\n  trustedNodeAgents: [a/b, a/b]\n", []string{`authn.trustedNodeAgents[1]: "a/b" is listed twice`}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			_, err := Parse([]byte(tc.yaml))
			require.Error(t, err)
			for _, want := range tc.wantErr {
				require.ErrorContains(t, err, want)
			}
		})
	}
}

func TestDevConfig(t *testing.T) {
	c, err := LoadDev()
	require.NoError(t, err)
	require.True(t, c.Dev.Enabled)
	require.False(t, c.NeedsKube(), "dev mode runs without a cluster")
	require.Equal(t, "127.0.0.1:15012", c.Server.GRPCAddress)
	require.Empty(t, c.Authn.TrustedNodeAgents, "no cluster, no pods to watch")
}

func TestTrustedNodeAgents(t *testing.T) {
	// [] turns impersonation off; with nothing else needing the cluster,
	// meshca then runs without one.
	off := "authn:\n  chain: [jwt]\n  checkServiceAccounts: false\n  trustedNodeAgents: []\n  issuer: https://i.example\n  jwt:\n    jwksFile: /k.json\n"
	c, err := Parse([]byte(off))
	require.NoError(t, err)
	require.Empty(t, c.Authn.TrustedNodeAgents)
	require.False(t, c.NeedsKube())
	// Left unset, the default (ztunnel) needs the pod watch.
	c, err = Parse([]byte(strings.Replace(off, "  trustedNodeAgents: []\n", "", 1)))
	require.NoError(t, err)
	require.Equal(t, []string{DefaultNodeAgent}, c.Authn.TrustedNodeAgents)
	require.True(t, c.NeedsKube())
	// Dev mode has no default agent; it may still list one.
	c, err = Parse([]byte("dev:\n  enabled: true\nauthn:\n  trustedNodeAgents: [mesh/agent]\n"))
	require.NoError(t, err)
	require.Equal(t, []string{"mesh/agent"}, c.Authn.TrustedNodeAgents)
}

func TestParsePolicyStrict(t *testing.T) {
	p, err := ParsePolicy([]byte(`
default:
  defaultTTL: 12h
namespaces:
  payments:
    maxTTL: 6h
    defaultTTL: 1h
serviceAccounts:
  payments/api:
    keyTypes: [ECDSA-P384]
`))
	require.NoError(t, err)
	e := p.Explain("payments", "api")
	require.Equal(t, time.Hour, e.DefaultTTL)
	require.Equal(t, []ca.KeyType{ca.KeyECDSAP384}, e.KeyTypes)

	_, err = ParsePolicy([]byte("namespaces:\n  payments:\n    maxTTl: 6h\n"))
	require.ErrorContains(t, err, "namespaces.payments.maxTTl: unknown key")
	_, err = ParsePolicy([]byte("default:\n  renewFraction: 3\n"))
	require.ErrorContains(t, err, "default.renewFraction")
	_, err = ParsePolicy([]byte("  \n# nothing\n"))
	require.Error(t, err, "an empty (or comment-only) policy is refused")
}

func TestPolicyWatcherReloads(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		path := filepath.Join(t.TempDir(), "policy.yaml")
		write := func(s string) { require.NoError(t, os.WriteFile(path, []byte(s), 0o644)) }
		write("default:\n  defaultTTL: 12h\n")
		p, loaded, err := LoadPolicy(path)
		require.NoError(t, err)
		store, err := ca.NewPolicyStore(p)
		require.NoError(t, err)
		var logs syncBuffer
		metrics := reload.NewMetrics(nil)
		count := func(result string) float64 {
			return testutil.ToFloat64(metrics.Reloads.WithLabelValues("policy", result))
		}
		// An edit between loading and Run is still picked up.
		write("default:\n  defaultTTL: 11h\n")
		w := &PolicyWatcher{Path: path, Store: store, Loaded: loaded, Interval: 5 * time.Second, Metrics: metrics,
			Log: slog.New(slog.NewTextHandler(&logs, nil))}
		go w.Run(t.Context())
		ttl := func() time.Duration { return store.Policy().Resolve("a", "b").DefaultTTL }

		require.Equal(t, 12*time.Hour, ttl())
		time.Sleep(11 * time.Second) // two checks: seen, then settled
		synctest.Wait()
		require.Equal(t, 11*time.Hour, ttl(), "the edit made before Run is applied")
		time.Sleep(20 * time.Second)
		synctest.Wait()
		require.Equal(t, 1.0, count("success"), "an unchanged file is not reloaded again")

		write("default:\n  defaultTTL: 6h\n")
		time.Sleep(5 * time.Second)
		synctest.Wait()
		require.Equal(t, 11*time.Hour, ttl(), "a change seen once is not applied yet")
		time.Sleep(5 * time.Second)
		synctest.Wait()
		require.Equal(t, 6*time.Hour, ttl())

		// A file caught half-written (here: truncated) between two checks
		// is never applied.
		write("")
		time.Sleep(5 * time.Second)
		synctest.Wait()
		write("default:\n  defaultTTL: 6h\n")
		time.Sleep(10 * time.Second)
		synctest.Wait()
		require.Equal(t, 6*time.Hour, ttl())

		write("default:\n  defaultTTL: 6h\n  renewFraction: 7\n")
		time.Sleep(30 * time.Second)
		synctest.Wait()
		require.Equal(t, 6*time.Hour, ttl(), "the last good policy stays in force")

		write("default:\n  defaultTTL: 2h\n")
		time.Sleep(10 * time.Second)
		synctest.Wait()
		require.Equal(t, 2*time.Hour, ttl())

		// One report per change; the bad version is reported once.
		require.Equal(t, 3.0, count("success"))
		require.Equal(t, 1.0, count("failure"))
		require.Equal(t, 1, strings.Count(logs.String(), "renewFraction"), logs.String())
	})
}

// syncBuffer is a log sink safe for the watcher's goroutine.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

func TestKubeQPSNotANumber(t *testing.T) {
	for _, v := range []string{".nan", ".inf", "-1"} {
		_, err := Parse([]byte("authn:\n  kubeQPS: " + v + "\n"))
		require.ErrorContains(t, err, "authn.kubeQPS", v)
	}
}

// TestPolicyWatcherChecksBackend: a new policy whose maxTTL the backend's
// intermediate cannot hold is refused, and the last good one stays.
func TestPolicyWatcherChecksBackend(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		path := filepath.Join(t.TempDir(), "policy.yaml")
		write := func(s string) { require.NoError(t, os.WriteFile(path, []byte(s), 0o644)) }
		write("default:\n  maxTTL: 24h\n")
		p, loaded, err := LoadPolicy(path)
		require.NoError(t, err)
		store, err := ca.NewPolicyStore(p)
		require.NoError(t, err)
		metrics := reload.NewMetrics(nil)
		b := backends.Config{Type: backends.TypeSelfSigned, SelfSigned: selfsigned.Config{Intermediate: true, IntermediateTTL: 96 * time.Hour}}
		require.NoError(t, b.CheckPolicy(p))
		w := &PolicyWatcher{Path: path, Store: store, Loaded: loaded, Interval: time.Second, Metrics: metrics,
			Log: slog.New(slog.DiscardHandler), Check: b.CheckPolicy}
		go w.Run(t.Context())
		write("default:\n  maxTTL: 48h\n")
		time.Sleep(3 * time.Second)
		synctest.Wait()
		require.Equal(t, 24*time.Hour, store.Policy().Resolve("a", "b").MaxTTL, "the policy that does not fit is refused")
		require.Equal(t, 1.0, testutil.ToFloat64(metrics.Reloads.WithLabelValues("policy", "failure")))
	})
}
