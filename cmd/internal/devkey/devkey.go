// Package devkey is the development-mode token signer: with no cluster to
// issue service-account tokens, `meshca serve --dev` creates a signing key
// and publishes its JWKS, and `meshctl dev-token` mints tokens shaped like
// Kubernetes projected service-account tokens with it.
package devkey

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"encoding/hex"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"time"

	jose "github.com/go-jose/go-jose/v4"
	"github.com/go-jose/go-jose/v4/jwt"
	"github.com/google/renameio/v2"
)

// File names inside the development directory.
const (
	KeyFile  = "token-signer.pem"
	JWKSFile = "jwks.json"
	RootFile = "root-cert.pem"
)

// Key is the development token-signing key.
type Key struct {
	signer crypto.Signer
	kid    string
}

// Ensure loads the key in dir, or creates it (and dir) when absent, and
// (re)writes the public JWKS beside it.
func Ensure(dir string) (*Key, error) {
	k, err := Load(dir)
	if errors.Is(err, fs.ErrNotExist) {
		if err := os.MkdirAll(dir, 0o700); err != nil {
			return nil, fmt.Errorf("create dev dir: %w", err)
		}
		priv, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		if err != nil {
			return nil, fmt.Errorf("generate dev key: %w", err)
		}
		der, err := x509.MarshalPKCS8PrivateKey(priv)
		if err != nil {
			return nil, fmt.Errorf("encode dev key: %w", err)
		}
		if err := renameio.WriteFile(filepath.Join(dir, KeyFile), pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der}), 0o600); err != nil {
			return nil, err
		}
		k, err = Load(dir)
		if err != nil {
			return nil, err
		}
	} else if err != nil {
		return nil, err
	}
	jwks := jose.JSONWebKeySet{Keys: []jose.JSONWebKey{{Key: k.signer.Public(), KeyID: k.kid, Algorithm: string(jose.ES256), Use: "sig"}}}
	data, err := json.MarshalIndent(jwks, "", "  ")
	if err != nil {
		return nil, fmt.Errorf("encode dev JWKS: %w", err)
	}
	if err := renameio.WriteFile(filepath.Join(dir, JWKSFile), data, 0o644); err != nil {
		return nil, err
	}
	return k, nil
}

// Load reads the key in dir. The error wraps fs.ErrNotExist when there is
// none yet.
func Load(dir string) (*Key, error) {
	data, err := os.ReadFile(filepath.Join(dir, KeyFile))
	if err != nil {
		return nil, fmt.Errorf("read dev key: %w", err)
	}
	block, _ := pem.Decode(data)
	if block == nil {
		return nil, fmt.Errorf("dev key %s is not PEM", filepath.Join(dir, KeyFile))
	}
	priv, err := x509.ParsePKCS8PrivateKey(block.Bytes)
	if err != nil {
		return nil, fmt.Errorf("parse dev key: %w", err)
	}
	ec, ok := priv.(*ecdsa.PrivateKey)
	if !ok || ec.Curve != elliptic.P256() {
		return nil, fmt.Errorf("dev key %s is not an ECDSA P-256 key", filepath.Join(dir, KeyFile))
	}
	spki, err := x509.MarshalPKIXPublicKey(ec.Public())
	if err != nil {
		return nil, fmt.Errorf("encode dev public key: %w", err)
	}
	sum := sha256.Sum256(spki)
	return &Key{signer: ec, kid: hex.EncodeToString(sum[:8])}, nil
}

// Claims describe the token to mint.
type Claims struct {
	Issuer         string
	Audiences      []string
	Namespace      string
	ServiceAccount string
	// PodName is optional; a pod UID is made up for it.
	PodName string
	TTL     time.Duration
	Now     time.Time
}

type kubeClaims struct {
	Namespace      string `json:"namespace"`
	ServiceAccount ref    `json:"serviceaccount"`
	Pod            *ref   `json:"pod,omitempty"`
}

type ref struct {
	Name string `json:"name"`
	UID  string `json:"uid"`
}

// Mint returns a signed token with the claims Kubernetes puts in a
// projected service-account token.
func (k *Key) Mint(c Claims) (string, error) {
	if c.Namespace == "" || c.ServiceAccount == "" {
		return "", errors.New("mint: namespace and service account are required")
	}
	if c.Now.IsZero() {
		c.Now = time.Now()
	}
	sig, err := jose.NewSigner(jose.SigningKey{Algorithm: jose.ES256, Key: k.signer},
		(&jose.SignerOptions{}).WithType("JWT").WithHeader("kid", k.kid))
	if err != nil {
		return "", fmt.Errorf("mint: %w", err)
	}
	kc := kubeClaims{Namespace: c.Namespace, ServiceAccount: ref{Name: c.ServiceAccount, UID: madeUpUID("sa/" + c.Namespace + "/" + c.ServiceAccount)}}
	if c.PodName != "" {
		kc.Pod = &ref{Name: c.PodName, UID: madeUpUID("pod/" + c.Namespace + "/" + c.PodName)}
	}
	std := jwt.Claims{
		Issuer:    c.Issuer,
		Subject:   "system:serviceaccount:" + c.Namespace + ":" + c.ServiceAccount,
		Audience:  jwt.Audience(c.Audiences),
		IssuedAt:  jwt.NewNumericDate(c.Now),
		NotBefore: jwt.NewNumericDate(c.Now),
		Expiry:    jwt.NewNumericDate(c.Now.Add(c.TTL)),
	}
	extra := map[string]any{"kubernetes.io": kc}
	if len(c.Audiences) > 0 {
		// The apiserver writes aud as an array even for one audience;
		// go-jose writes a lone audience as a string, which some verifiers
		// (istiod's JWT authenticator) refuse.
		extra["aud"] = c.Audiences
	}
	tok, err := jwt.Signed(sig).Claims(std).Claims(extra).Serialize()
	if err != nil {
		return "", fmt.Errorf("mint: %w", err)
	}
	return tok, nil
}

// madeUpUID derives a stable UUID-shaped string, standing in for the UIDs
// the apiserver would assign.
func madeUpUID(name string) string {
	s := sha256.Sum256([]byte(name))
	h := hex.EncodeToString(s[:16])
	return h[0:8] + "-" + h[8:12] + "-" + h[12:16] + "-" + h[16:20] + "-" + h[20:32]
}
