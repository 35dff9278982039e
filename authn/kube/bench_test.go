package kube

import (
	"testing"
	"time"

	"github.com/go-jose/go-jose/v4"

	"github.com/meshca/meshca/authn"
)

// BenchmarkJWTAuthenticate measures one Authenticate of a projected token
// signed with a local RS256 key (2048 bits, as the kube-apiserver's): "hit"
// answers from the cache, "miss" verifies in full every time (cache off).
func BenchmarkJWTAuthenticate(b *testing.B) {
	ti := newTestIssuer(b, testIss)
	kid := ti.addKey("rsa", jose.RS256)
	token := ti.sign(kid, saClaims(testIss, "ns1", "sa1", []string{"istio-ca"}, time.Now(), time.Hour))
	sas := &fakeServiceAccounts{}
	sas.set("ns1", "sa1", "sa-uid-sa1")
	for _, bc := range []struct {
		name  string
		cache CacheConfig
	}{
		{name: "hit", cache: CacheConfig{}},
		{name: "miss", cache: CacheConfig{MaxTTL: -1}},
	} {
		b.Run(bc.name, func(b *testing.B) {
			j, err := NewJWT(JWTConfig{TrustDomain: testTD, Issuer: testIss, JWKSFile: ti.path, Cache: bc.cache, ServiceAccounts: sas})
			if err != nil {
				b.Fatal(err)
			}
			creds := authn.Credentials{Token: token}
			if _, err := j.Authenticate(b.Context(), creds); err != nil {
				b.Fatal(err)
			}
			b.ReportAllocs()
			for b.Loop() {
				if _, err := j.Authenticate(b.Context(), creds); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
