package ca_test

import (
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/meshca/meshca/ca"
)

func ptr[T any](v T) *T { return &v }

func TestPolicyResolveNarrowestWins(t *testing.T) {
	p := &ca.Policy{
		Default: ca.Rule{DefaultTTL: 12 * time.Hour, MaxTTL: 48 * time.Hour},
		Namespaces: map[string]ca.Rule{
			"payments": {DefaultTTL: 2 * time.Hour, MaxTTL: 6 * time.Hour, KeyTypes: []ca.KeyType{ca.KeyECDSAP384}},
		},
		ServiceAccounts: map[string]ca.Rule{
			"payments/api": {DefaultTTL: time.Hour, RenewFraction: ptr(0.8)},
		},
	}
	require.NoError(t, p.Validate())
	tests := []struct {
		name         string
		ns, sa       string
		wantDefault  time.Duration
		wantMax      time.Duration
		wantFraction float64
		wantKeys     []ca.KeyType
		wantSource   map[string]string
	}{
		{
			name: "mesh default", ns: "web", sa: "frontend",
			wantDefault: 12 * time.Hour, wantMax: 48 * time.Hour, wantFraction: ca.DefaultRenewFraction, wantKeys: ca.DefaultKeyTypes,
			wantSource: map[string]string{"defaultTTL": "default", "maxTTL": "default", "minTTL": "built-in", "keyTypes": "built-in"},
		},
		{
			name: "namespace rule", ns: "payments", sa: "worker",
			wantDefault: 2 * time.Hour, wantMax: 6 * time.Hour, wantFraction: ca.DefaultRenewFraction, wantKeys: []ca.KeyType{ca.KeyECDSAP384},
			wantSource: map[string]string{"defaultTTL": "namespaces.payments", "keyTypes": "namespaces.payments"},
		},
		{
			name: "service account rule inherits unset fields from its namespace", ns: "payments", sa: "api",
			wantDefault: time.Hour, wantMax: 6 * time.Hour, wantFraction: 0.8, wantKeys: []ca.KeyType{ca.KeyECDSAP384},
			wantSource: map[string]string{"defaultTTL": "serviceAccounts.payments/api", "maxTTL": "namespaces.payments", "renewFraction": "serviceAccounts.payments/api", "renewJitter": "built-in"},
		},
		{
			name: "same service account name in another namespace does not match", ns: "web", sa: "api",
			wantDefault: 12 * time.Hour, wantMax: 48 * time.Hour, wantFraction: ca.DefaultRenewFraction, wantKeys: ca.DefaultKeyTypes,
			wantSource: map[string]string{"defaultTTL": "default"},
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			e := p.Explain(tc.ns, tc.sa)
			require.Equal(t, tc.wantDefault, e.DefaultTTL)
			require.Equal(t, tc.wantMax, e.MaxTTL)
			require.Equal(t, tc.wantFraction, e.RenewFraction)
			require.Equal(t, tc.wantKeys, e.KeyTypes)
			for field, src := range tc.wantSource {
				require.Equal(t, src, e.Source[field], field)
			}
			// Resolve is Explain without the bookkeeping.
			r := p.Resolve(tc.ns, tc.sa)
			require.Nil(t, r.Source)
			e.Source = nil
			require.Equal(t, e, r)
		})
	}
}

func TestEffectiveTTLClamps(t *testing.T) {
	e := (&ca.Policy{Default: ca.Rule{DefaultTTL: 24 * time.Hour, MinTTL: time.Hour, MaxTTL: 48 * time.Hour}}).Resolve("a", "b")
	tests := []struct {
		name      string
		requested time.Duration
		want      time.Duration
		wantClamp ca.Clamp
	}{
		{"zero means default", 0, 24 * time.Hour, ca.ClampNone},
		{"inside bounds", 2 * time.Hour, 2 * time.Hour, ca.ClampNone},
		{"at min", time.Hour, time.Hour, ca.ClampNone},
		{"below min", time.Minute, time.Hour, ca.ClampMin},
		{"above max", 90 * 24 * time.Hour, 48 * time.Hour, ca.ClampMax},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got, clamp := e.TTL(tc.requested)
			require.Equal(t, tc.want, got)
			require.Equal(t, tc.wantClamp, clamp)
		})
	}
}

func TestPolicyValidate(t *testing.T) {
	tests := []struct {
		name    string
		policy  ca.Policy
		wantErr string // a dotted path the message must name
	}{
		{"empty policy is valid", ca.Policy{}, ""},
		{"negative TTL", ca.Policy{Default: ca.Rule{MinTTL: -time.Hour}}, "default.minTTL"},
		{"fraction above one", ca.Policy{Default: ca.Rule{RenewFraction: ptr(1.5)}}, "default.renewFraction"},
		{"fraction zero", ca.Policy{Namespaces: map[string]ca.Rule{"a": {RenewFraction: ptr(0.0)}}}, "namespaces.a.renewFraction"},
		{"unknown key type", ca.Policy{Default: ca.Rule{KeyTypes: []ca.KeyType{"DSA-1024"}}}, "default.keyTypes[0]"},
		{"empty key list", ca.Policy{Default: ca.Rule{KeyTypes: []ca.KeyType{}}}, "default.keyTypes"},
		{"bad service account key", ca.Policy{ServiceAccounts: map[string]ca.Rule{"nonamespace": {}}}, "serviceAccounts.nonamespace"},
		{
			"namespace max below inherited default",
			ca.Policy{Default: ca.Rule{DefaultTTL: 24 * time.Hour}, Namespaces: map[string]ca.Rule{"tight": {MaxTTL: time.Hour}}},
			"namespaces.tight: defaultTTL 24h0m0s (from default)",
		},
		{"min above max", ca.Policy{Default: ca.Rule{MinTTL: 10 * time.Hour, MaxTTL: time.Hour, DefaultTTL: 5 * time.Hour}}, "default: minTTL 10h0m0s"},
		{"jitter longer than shortest lifetime", ca.Policy{Default: ca.Rule{RenewJitter: ptr(time.Hour)}}, "default: renewJitter 1h0m0s (from default) must be shorter than minTTL 10m0s (from built-in)"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			err := tc.policy.Validate()
			if tc.wantErr == "" {
				require.NoError(t, err)
				return
			}
			require.ErrorContains(t, err, tc.wantErr)
		})
	}
}

func TestPolicyStoreKeepsLastGood(t *testing.T) {
	good := &ca.Policy{Default: ca.Rule{DefaultTTL: time.Hour}}
	s, err := ca.NewPolicyStore(good)
	require.NoError(t, err)
	require.Error(t, s.Store(&ca.Policy{Default: ca.Rule{RenewFraction: ptr(2.0)}}))
	require.Same(t, good, s.Policy())
	next := &ca.Policy{Default: ca.Rule{DefaultTTL: 2 * time.Hour}}
	require.NoError(t, s.Store(next))
	require.Same(t, next, s.Policy())
}

func TestRenewAt(t *testing.T) {
	nb := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	na := nb.Add(24 * time.Hour)
	require.Equal(t, nb.Add(12*time.Hour), ca.RenewAt(nb, na, 0.5, 0))
	require.Equal(t, na, ca.RenewAt(nb, na, 7, 0), "out-of-range fraction means end of life")
	for range 100 {
		at := ca.RenewAt(nb, na, 0.5, time.Hour)
		require.False(t, at.After(nb.Add(12*time.Hour)))
		require.True(t, at.After(nb.Add(11*time.Hour)))
	}
	for range 1000 {
		at := ca.RenewAt(nb, na, 0.01, 48*time.Hour)
		require.False(t, at.Before(nb), "jitter never moves renewal before NotBefore")
		require.False(t, at.After(nb.Add(24*time.Hour/100)), "nor after the renewal point")
	}
}

// TestIntermediateRoom: an intermediate must hold several of the longest
// maxTTL leaves, and what is left at its renewal point must hold one; the
// error names both settings and where maxTTL comes from.
func TestIntermediateRoom(t *testing.T) {
	p := &ca.Policy{
		Default:         ca.Rule{MaxTTL: 24 * time.Hour},
		Namespaces:      map[string]ca.Rule{"batch": {MaxTTL: 48 * time.Hour}},
		ServiceAccounts: map[string]ca.Rule{"batch/short": {MaxTTL: time.Hour}},
	}
	longest, from := p.LongestMaxTTL()
	require.Equal(t, 48*time.Hour, longest)
	require.Equal(t, "namespaces.batch", from)

	require.NoError(t, p.CheckIntermediateRoom(ca.IntermediateConfig{TTL: 144 * time.Hour}, "backend.vault.intermediateTTL"))
	err := p.CheckIntermediateRoom(ca.IntermediateConfig{TTL: 143 * time.Hour}, "backend.vault.intermediateTTL")
	require.ErrorContains(t, err, "backend.vault.intermediateTTL (143h0m0s) must be at least 3 × policy maxTTL (48h0m0s, from namespaces.batch)")
	err = p.CheckIntermediateRoom(ca.IntermediateConfig{TTL: 200 * time.Hour, RenewFraction: 0.9}, "backend.awsPCA.intermediateTTL")
	require.ErrorContains(t, err, "backend.awsPCA.intermediateTTL (200h0m0s) leaves 20h0m0s after its renewal point")
	// The built-in defaults fit: 30 days against 7.
	require.NoError(t, (&ca.Policy{}).CheckIntermediateRoom(ca.IntermediateConfig{}, "x"))
}
