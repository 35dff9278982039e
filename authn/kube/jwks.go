package kube

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rsa"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"slices"
	"time"

	"github.com/go-jose/go-jose/v4"
	"k8s.io/client-go/discovery"
	"k8s.io/client-go/rest"
)

const (
	// maxJWKSBytes bounds a fetched JWKS or discovery document.
	maxJWKSBytes = 1 << 20
	// keysMaxAge is how long a fetched JWKS is used before it is fetched
	// again (keys the issuer dropped stop verifying within about this long).
	// If that fetch fails, the old keys stay in use.
	keysMaxAge = 5 * time.Minute
	// fetchTimeout bounds one HTTP fetch of a JWKS URL.
	fetchTimeout = 10 * time.Second
	// apiserver paths of service-account issuer discovery.
	discoveryPath = "/.well-known/openid-configuration"
	jwksPath      = "/openid/v1/jwks"
)

// verifyKey is one public key of a JWKS and the algorithms it may verify.
type verifyKey struct {
	kid  string
	key  crypto.PublicKey
	algs []jose.SignatureAlgorithm
}

// keySet is an immutable, parsed JWKS.
type keySet struct {
	keys      []verifyKey
	fetchedAt time.Time
}

// lookup returns the keys with kid; a token without kid may be verified by
// any key.
func (s *keySet) lookup(kid string) []verifyKey {
	if s == nil {
		return nil
	}
	if kid == "" {
		return s.keys
	}
	var out []verifyKey
	for _, k := range s.keys {
		if k.kid == kid {
			out = append(out, k)
		}
	}
	return out
}

// parseJWKS parses a JSON Web Key Set, keeping the public signing keys it
// can use and skipping the others (unknown key types, encryption keys,
// symmetric keys). It fails if no key is left.
func parseJWKS(data []byte, fetchedAt time.Time) (*keySet, int, error) {
	var raw struct {
		Keys []json.RawMessage `json:"keys"`
	}
	if err := json.Unmarshal(data, &raw); err != nil {
		return nil, 0, fmt.Errorf("parse JWKS: %w", err)
	}
	set := &keySet{fetchedAt: fetchedAt}
	skipped := 0
	for _, r := range raw.Keys {
		var k jose.JSONWebKey
		if err := k.UnmarshalJSON(r); err != nil || !k.Valid() || (k.Use != "" && k.Use != "sig") {
			skipped++
			continue
		}
		// Never hold private material, even if a careless JWKS carries it.
		pub := k.Public()
		algs := keyAlgorithms(pub.Key, k.Algorithm)
		if !pub.Valid() || len(algs) == 0 {
			skipped++
			continue
		}
		set.keys = append(set.keys, verifyKey{kid: k.KeyID, key: pub.Key, algs: algs})
	}
	if len(set.keys) == 0 {
		return nil, skipped, errors.New("parse JWKS: no usable signing key")
	}
	return set, skipped, nil
}

// keyAlgorithms returns the algorithms key may verify: alg if the JWK names
// one that fits the key, else the one algorithm the kube-apiserver signs
// with for such a key.
func keyAlgorithms(key crypto.PublicKey, alg string) []jose.SignatureAlgorithm {
	var fits []jose.SignatureAlgorithm
	switch k := key.(type) {
	case *rsa.PublicKey:
		fits = []jose.SignatureAlgorithm{jose.RS256, jose.RS384, jose.RS512, jose.PS256, jose.PS384, jose.PS512}
	case *ecdsa.PublicKey:
		switch k.Curve {
		case elliptic.P256():
			fits = []jose.SignatureAlgorithm{jose.ES256}
		case elliptic.P384():
			fits = []jose.SignatureAlgorithm{jose.ES384}
		case elliptic.P521():
			fits = []jose.SignatureAlgorithm{jose.ES512}
		}
	case ed25519.PublicKey:
		fits = []jose.SignatureAlgorithm{jose.EdDSA}
	}
	if len(fits) == 0 {
		return nil
	}
	if alg == "" {
		return fits[:1]
	}
	if a := jose.SignatureAlgorithm(alg); slices.Contains(fits, a) {
		return []jose.SignatureAlgorithm{a}
	}
	return nil
}

// A fetcher reads the issuer's discovery document and JWKS.
type fetcher interface {
	// jwks returns the raw JWKS.
	jwks(ctx context.Context) ([]byte, error)
	// issuer returns the issuer named by the discovery document.
	issuer(ctx context.Context) (string, error)
	// String names the source for logs.
	String() string
}

// fileFetcher reads the JWKS from a file, again on every fetch, so that
// rotating the file's content is picked up.
type fileFetcher struct {
	path string
	kube *kubeFetcher // for issuer discovery; nil if not configured
}

func (f *fileFetcher) jwks(context.Context) ([]byte, error) {
	b, err := os.ReadFile(f.path)
	if err != nil {
		return nil, fmt.Errorf("read JWKS file: %w", err)
	}
	return b, nil
}

func (f *fileFetcher) issuer(ctx context.Context) (string, error) {
	if f.kube == nil {
		return "", errors.New("discover issuer: no Kube config")
	}
	return f.kube.issuer(ctx)
}

func (f *fileFetcher) String() string { return "file " + f.path }

// urlFetcher GETs the JWKS from a URL.
type urlFetcher struct {
	url    string
	client *http.Client
	kube   *kubeFetcher // for issuer discovery; nil if not configured
}

func (f *urlFetcher) jwks(ctx context.Context) ([]byte, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, f.url, nil)
	if err != nil {
		return nil, fmt.Errorf("fetch JWKS: %w", err)
	}
	req.Header.Set("Accept", "application/json, application/jwk-set+json")
	resp, err := f.client.Do(req)
	if err != nil {
		return nil, fmt.Errorf("fetch JWKS: %w", err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("fetch JWKS: %s answered %s", f.url, resp.Status)
	}
	b, err := io.ReadAll(io.LimitReader(resp.Body, maxJWKSBytes))
	if err != nil {
		return nil, fmt.Errorf("fetch JWKS: %w", err)
	}
	return b, nil
}

func (f *urlFetcher) issuer(ctx context.Context) (string, error) {
	if f.kube == nil {
		return "", errors.New("discover issuer: no Kube config")
	}
	return f.kube.issuer(ctx)
}

func (f *urlFetcher) String() string { return "url " + f.url }

// kubeFetcher reads the kube-apiserver's service-account issuer discovery
// endpoints with the client's credentials (meshca needs the ClusterRole
// system:service-account-issuer-discovery, or an equivalent).
type kubeFetcher struct {
	rest rest.Interface
	host string
}

func newKubeFetcher(cfg *rest.Config) (*kubeFetcher, error) {
	dc, err := discovery.NewDiscoveryClientForConfig(cfg)
	if err != nil {
		return nil, fmt.Errorf("create kube client: %w", err)
	}
	return &kubeFetcher{rest: dc.RESTClient(), host: cfg.Host}, nil
}

func (f *kubeFetcher) get(ctx context.Context, path string) ([]byte, error) {
	b, err := f.rest.Get().AbsPath(path).DoRaw(ctx)
	if err != nil {
		return nil, fmt.Errorf("get %s from the kube-apiserver: %w", path, err)
	}
	if len(b) > maxJWKSBytes {
		return nil, fmt.Errorf("get %s from the kube-apiserver: answer larger than %d bytes", path, maxJWKSBytes)
	}
	return b, nil
}

func (f *kubeFetcher) jwks(ctx context.Context) ([]byte, error) { return f.get(ctx, jwksPath) }

func (f *kubeFetcher) issuer(ctx context.Context) (string, error) {
	b, err := f.get(ctx, discoveryPath)
	if err != nil {
		return "", fmt.Errorf("discover issuer: %w", err)
	}
	var doc struct {
		Issuer string `json:"issuer"`
	}
	if err := json.Unmarshal(b, &doc); err != nil {
		return "", fmt.Errorf("discover issuer: parse %s: %w", discoveryPath, err)
	}
	if doc.Issuer == "" {
		return "", fmt.Errorf("discover issuer: %s names no issuer", discoveryPath)
	}
	return doc.Issuer, nil
}

func (f *kubeFetcher) String() string { return "kube-apiserver " + f.host + jwksPath }

// DiscoverIssuer reads the cluster's service-account issuer from the
// kube-apiserver's /.well-known/openid-configuration, with cfg's
// credentials.
func DiscoverIssuer(ctx context.Context, cfg *rest.Config) (string, error) {
	f, err := newKubeFetcher(cfg)
	if err != nil {
		return "", err
	}
	return f.issuer(ctx)
}
