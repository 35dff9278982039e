package vault_test

import (
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/meshca/meshca/backends/vault"
	"github.com/meshca/meshca/ca/catest"
)

// TestNamespaceHeader: Vault Enterprise namespaces cannot run here (the
// open-source server has none), so a recording server stands in for
// Vault's side of the wire: every request meshca makes, the login
// included, carries the configured namespace, and none carries one from
// VAULT_NAMESPACE.
func TestNamespaceHeader(t *testing.T) {
	now := time.Now()
	key := catest.Key(t, "P-256")
	root := catest.Issue(t, catest.CATemplate("ns root", now.Add(-time.Hour), now.Add(24*time.Hour)), key, nil, nil)
	var (
		mu   sync.Mutex
		seen = map[string]string{} // path -> namespace header
	)
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		seen[r.URL.Path] = r.Header.Get("X-Vault-Namespace")
		mu.Unlock()
		w.Header().Set("Content-Type", "application/json")
		switch {
		case r.URL.Path == "/v1/sys/health":
			_ = json.NewEncoder(w).Encode(map[string]any{"initialized": true, "sealed": false})
		case strings.HasSuffix(r.URL.Path, "/login"):
			_ = json.NewEncoder(w).Encode(map[string]any{"auth": map[string]any{"client_token": "t", "lease_duration": 3600, "renewable": true}})
		case strings.HasSuffix(r.URL.Path, "/issuer/default/json"):
			_ = json.NewEncoder(w).Encode(map[string]any{"data": map[string]any{"ca_chain": []string{string(certPEM(root))}}})
		case strings.HasSuffix(r.URL.Path, "/tune"):
			_ = json.NewEncoder(w).Encode(map[string]any{"data": map[string]any{"max_lease_ttl": 315360000}})
		default:
			http.Error(w, `{"errors":["not here"]}`, http.StatusNotFound)
		}
	}))
	defer srv.Close()
	t.Setenv("VAULT_NAMESPACE", "from-the-environment")
	sf := filepath.Join(t.TempDir(), "secret-id")
	require.NoError(t, os.WriteFile(sf, []byte("s"), 0o600))
	_, err := vault.New(t.Context(), vault.Config{Address: srv.URL, Namespace: "team-a",
		Auth: vault.Auth{Method: vault.AuthAppRole, AppRole: vault.AppRoleAuth{RoleID: "r", SecretIDFile: sf}}}, vault.Deps{})
	require.NoError(t, err)
	mu.Lock()
	defer mu.Unlock()
	require.Equal(t, "team-a", seen["/v1/auth/approle/login"])
	require.Equal(t, "team-a", seen["/v1/pki/issuer/default/json"])
	require.Equal(t, "team-a", seen["/v1/sys/mounts/pki/tune"])
}

func certPEM(c *x509.Certificate) []byte {
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: c.Raw})
}
