package kube

import (
	"strings"
	"testing"
	"time"

	"github.com/go-jose/go-jose/v4"
	"github.com/go-jose/go-jose/v4/jwt"
	"github.com/stretchr/testify/require"

	"github.com/meshca/meshca/authn"
)

func TestSplitServiceAccountUser(t *testing.T) {
	tests := []struct {
		user   string
		ns, sa string
		ok     bool
	}{
		{user: "system:serviceaccount:ns1:sa1", ns: "ns1", sa: "sa1", ok: true},
		{user: "system:serviceaccount:ns1"},
		{user: "system:serviceaccount::sa1"},
		{user: "system:serviceaccount:ns1:"},
		{user: "system:serviceaccount:ns1:sa1:extra"},
		{user: "system:serviceaccounts:ns1:sa1"},
		{user: "admin"},
		{user: ""},
	}
	for _, tt := range tests {
		t.Run(tt.user, func(t *testing.T) {
			ns, sa, ok := splitServiceAccountUser(tt.user)
			require.Equal(t, tt.ok, ok)
			require.Equal(t, tt.ns, ns)
			require.Equal(t, tt.sa, sa)
		})
	}
}

// TestExplainRejection covers the reasons TokenReview gives for a token the
// apiserver refused. A real apiserver token cannot be made to expire within a
// test (TokenRequest's minimum lifetime is 10 minutes, and the apiserver's
// clock cannot be moved), so "expired" is covered here, and on real tokens in
// TestExplainRejectionRealToken, by moving the local clock instead.
func TestExplainRejection(t *testing.T) {
	now := time.Now()
	ti := newTestIssuer(t, testIss)
	kid := ti.addKey("k", jose.ES256)
	aud := []string{"istio-ca"}
	mod := func(f func(c *claims)) string {
		c := saClaims(testIss, "ns1", "sa1", aud, now, time.Hour)
		f(c)
		return ti.sign(kid, c)
	}
	valid := mod(func(*claims) {})

	tests := []struct {
		name   string
		token  string
		now    time.Time
		issuer string
		reason string
	}{
		{name: "not a JWT", token: "opaque-static-token", now: now, reason: authn.ReasonRejected},
		{name: "expired", token: valid, now: now.Add(2 * time.Hour), reason: authn.ReasonExpired},
		{name: "not yet valid", token: mod(func(c *claims) { c.NotBefore = jwt.NewNumericDate(now.Add(time.Hour)) }), now: now, reason: authn.ReasonNotYetValid},
		{name: "wrong audience", token: mod(func(c *claims) { c.Audience = []string{"vault"} }), now: now, reason: authn.ReasonWrongAudience},
		{name: "other issuer, issuer known", token: mod(func(c *claims) { c.Issuer = "https://other.test" }), now: now, issuer: testIss, reason: authn.ReasonUnknownIssuer},
		{name: "other issuer, issuer not configured", token: mod(func(c *claims) { c.Issuer = "https://other.test" }), now: now, reason: authn.ReasonRejected},
		{name: "not a kube token", token: mod(func(c *claims) { c.Kubernetes = nil }), now: now, reason: authn.ReasonUnknownIssuer},
		{name: "legacy token, issuer known", token: ti.sign(kid, map[string]any{"iss": legacyIssuer, "sub": "system:serviceaccount:a:b"}), now: now, issuer: testIss, reason: authn.ReasonUnknownIssuer},
		// Legacy tokens carry no aud: the apiserver refuses them for istio-ca.
		{name: "legacy token, issuer not configured", token: ti.sign(kid, map[string]any{"iss": legacyIssuer, "sub": "system:serviceaccount:a:b"}), now: now, reason: authn.ReasonWrongAudience},
		{name: "looks fine: the apiserver knows better", token: valid, now: now, issuer: testIss, reason: authn.ReasonRejected},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := explainRejection(tt.token, tt.now, tt.issuer, aud)
			requireReason(t, err, tt.reason)
			require.NotContains(t, err.Error(), tt.token)
		})
	}
}

// TestPrecheck covers TokenReview's local refusals; TestKubeTokenReviewPrecheck
// checks that they send no TokenReview.
func TestPrecheck(t *testing.T) {
	now := time.Now()
	ti := newTestIssuer(t, testIss)
	kid := ti.addKey("k", jose.ES256)
	aud := []string{"istio-ca"}
	mod := func(f func(c *claims)) string {
		c := saClaims(testIss, "ns1", "sa1", aud, now, time.Hour)
		f(c)
		return ti.sign(kid, c)
	}
	legacy := ti.sign(kid, map[string]any{"iss": legacyIssuer, "sub": "system:serviceaccount:a:b", "aud": "istio-ca"})

	tests := []struct {
		name   string
		token  string
		now    time.Time
		issuer string
		reason string // "" when the token goes on to the apiserver
	}{
		{name: "not a JWT", token: "opaque-static-token", now: now, reason: authn.ReasonMalformed},
		{name: "three garbage segments", token: "a.b.c", now: now, reason: authn.ReasonMalformed},
		{name: "oversized", token: strings.Repeat("a", maxTokenBytes+1), now: now, reason: authn.ReasonMalformed},
		{name: "expired beyond skew", token: mod(func(*claims) {}), now: now.Add(time.Hour + 31*time.Second), reason: authn.ReasonExpired},
		{name: "expired within skew", token: mod(func(*claims) {}), now: now.Add(time.Hour + 29*time.Second)},
		{name: "wrong audience", token: mod(func(c *claims) { c.Audience = []string{"vault"} }), now: now, reason: authn.ReasonWrongAudience},
		{name: "no audience", token: mod(func(c *claims) { c.Audience = nil }), now: now, reason: authn.ReasonWrongAudience},
		{name: "other issuer, issuer known", token: mod(func(c *claims) { c.Issuer = "https://other.test" }), now: now, issuer: testIss, reason: authn.ReasonUnknownIssuer},
		{name: "other issuer, issuer not configured", token: mod(func(c *claims) { c.Issuer = "https://other.test" }), now: now},
		{name: "issuer checked first", token: mod(func(c *claims) { c.Issuer = "https://other.test"; c.Audience = nil }), now: now.Add(2 * time.Hour), issuer: testIss, reason: authn.ReasonUnknownIssuer},
		{name: "no exp: left to the apiserver", token: legacy, now: now},
		{name: "not yet valid: left to the apiserver", token: mod(func(c *claims) { c.NotBefore = jwt.NewNumericDate(now.Add(time.Hour)) }), now: now},
		{name: "no kubernetes.io claim: left to the apiserver", token: mod(func(c *claims) { c.Kubernetes = nil }), now: now, issuer: testIss},
		{name: "looks fine", token: mod(func(*claims) {}), now: now, issuer: testIss},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := precheck(tt.token, tt.now, 30*time.Second, tt.issuer, aud)
			if tt.reason == "" {
				require.NoError(t, err)
				return
			}
			requireReason(t, err, tt.reason)
			require.NotContains(t, err.Error(), tt.token)
		})
	}
}
