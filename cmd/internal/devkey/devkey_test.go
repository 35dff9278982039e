package devkey

import (
	"encoding/json"
	"io/fs"
	"os"
	"path/filepath"
	"testing"
	"time"

	jose "github.com/go-jose/go-jose/v4"
	"github.com/go-jose/go-jose/v4/jwt"
	"github.com/stretchr/testify/require"
)

func TestEnsureMintVerify(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "dev")
	_, err := Load(dir)
	require.ErrorIs(t, err, fs.ErrNotExist)

	k, err := Ensure(dir)
	require.NoError(t, err)
	st, err := os.Stat(filepath.Join(dir, KeyFile))
	require.NoError(t, err)
	require.Equal(t, os.FileMode(0o600), st.Mode().Perm(), "the signing key is private")
	again, err := Ensure(dir)
	require.NoError(t, err)
	require.Equal(t, k.kid, again.kid, "a second start reuses the key, so minted tokens stay valid")

	now := time.Now()
	tok, err := k.Mint(Claims{Issuer: "https://dev.invalid", Audiences: []string{"istio-ca"}, Namespace: "demo", ServiceAccount: "web", PodName: "web-0", TTL: time.Hour, Now: now})
	require.NoError(t, err)

	var jwks jose.JSONWebKeySet
	data, err := os.ReadFile(filepath.Join(dir, JWKSFile))
	require.NoError(t, err)
	require.NoError(t, json.Unmarshal(data, &jwks))
	parsed, err := jwt.ParseSigned(tok, []jose.SignatureAlgorithm{jose.ES256})
	require.NoError(t, err)
	keys := jwks.Key(parsed.Headers[0].KeyID)
	require.Len(t, keys, 1, "the token's kid is in the published JWKS")
	var std jwt.Claims
	var kube struct {
		K kubeClaims `json:"kubernetes.io"`
	}
	require.NoError(t, parsed.Claims(keys[0].Key, &std, &kube))
	require.Equal(t, "system:serviceaccount:demo:web", std.Subject)
	require.Equal(t, jwt.Audience{"istio-ca"}, std.Audience)
	var raw struct {
		Aud json.RawMessage `json:"aud"`
	}
	require.NoError(t, parsed.Claims(keys[0].Key, &raw))
	require.JSONEq(t, `["istio-ca"]`, string(raw.Aud), "aud is an array, as in a Kubernetes token")
	require.Equal(t, now.Add(time.Hour).Unix(), std.Expiry.Time().Unix())
	require.Equal(t, "demo", kube.K.Namespace)
	require.Equal(t, "web", kube.K.ServiceAccount.Name)
	require.NotEmpty(t, kube.K.ServiceAccount.UID)
	require.Equal(t, "web-0", kube.K.Pod.Name)

	_, err = k.Mint(Claims{Namespace: "demo"})
	require.Error(t, err)
}
