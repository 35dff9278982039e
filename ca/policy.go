package ca

import (
	"errors"
	"fmt"
	"slices"
	"sort"
	"strings"
	"time"
)

// Rule is one level of the rotation policy. A nil or zero field is unset and
// inherits from the next wider level: service account, then namespace, then
// the mesh-wide default, the way Istio layers PeerAuthentication.
type Rule struct {
	// DefaultTTL is the lifetime given when a request asks for none.
	DefaultTTL time.Duration `yaml:"defaultTTL"`
	// MinTTL and MaxTTL bound a requested lifetime; requests outside are
	// clamped, and the clamp is counted.
	MinTTL time.Duration `yaml:"minTTL"`
	MaxTTL time.Duration `yaml:"maxTTL"`
	// RenewFraction is the point in a certificate's life, in (0, 1], at
	// which SDS pushes a new one and agents are told to renew.
	RenewFraction *float64 `yaml:"renewFraction"`
	// RenewJitter moves each renewal earlier by a random amount up to it.
	RenewJitter *time.Duration `yaml:"renewJitter"`
	// KeyTypes is the allow-list of leaf key types.
	KeyTypes []KeyType `yaml:"keyTypes"`
}

// Policy is the rotation policy the security team owns.
type Policy struct {
	// Default is the mesh-wide rule. Its unset fields take built-in defaults.
	Default Rule `yaml:"default"`
	// Namespaces holds per-namespace rules, keyed by namespace.
	Namespaces map[string]Rule `yaml:"namespaces"`
	// ServiceAccounts holds per-service-account rules keyed "namespace/name".
	ServiceAccounts map[string]Rule `yaml:"serviceAccounts"`
}

// Built-in defaults, used where even the mesh-wide rule is silent. They
// match Istio's: 24h leaves, renewed at half-life.
const (
	DefaultTTL           = 24 * time.Hour
	DefaultMinTTL        = 10 * time.Minute
	DefaultMaxTTL        = 7 * 24 * time.Hour
	DefaultRenewFraction = 0.5
	DefaultRenewJitter   = 5 * time.Minute
)

// DefaultKeyTypes is the built-in key allow-list: ECDSA P-256/P-384 and
// RSA 2048/3072/4096. Ed25519 must be allowed explicitly.
var DefaultKeyTypes = []KeyType{KeyECDSAP256, KeyECDSAP384, KeyRSA2048, KeyRSA3072, KeyRSA4096}

// Effective is the resolved rule for one service account, with the level
// each value came from ("built-in", "default", "namespaces.<ns>",
// "serviceAccounts.<ns>/<sa>") for `meshca policy explain`.
type Effective struct {
	DefaultTTL    time.Duration
	MinTTL        time.Duration
	MaxTTL        time.Duration
	RenewFraction float64
	RenewJitter   time.Duration
	KeyTypes      []KeyType
	// Source maps a field's YAML name to the level that set it.
	Source map[string]string
}

// Resolve returns the effective rule for namespace/serviceAccount: each
// field from the narrowest level that sets it. It is on the issuance hot
// path, so it records no sources; Explain does.
func (p *Policy) Resolve(namespace, serviceAccount string) Effective {
	return p.resolve(namespace, serviceAccount, false)
}

// Explain is Resolve with Effective.Source filled in.
func (p *Policy) Explain(namespace, serviceAccount string) Effective {
	return p.resolve(namespace, serviceAccount, true)
}

func (p *Policy) resolve(namespace, serviceAccount string, explain bool) Effective {
	e := Effective{
		DefaultTTL: DefaultTTL, MinTTL: DefaultMinTTL, MaxTTL: DefaultMaxTTL,
		RenewFraction: DefaultRenewFraction, RenewJitter: DefaultRenewJitter,
		KeyTypes: DefaultKeyTypes,
	}
	if explain {
		e.Source = map[string]string{
			"defaultTTL": "built-in", "minTTL": "built-in", "maxTTL": "built-in",
			"renewFraction": "built-in", "renewJitter": "built-in", "keyTypes": "built-in",
		}
	}
	e.apply(p.Default, "default")
	if r, ok := p.Namespaces[namespace]; ok {
		e.apply(r, "namespaces."+namespace)
	}
	if len(p.ServiceAccounts) > 0 {
		key := namespace + "/" + serviceAccount
		if r, ok := p.ServiceAccounts[key]; ok {
			e.apply(r, "serviceAccounts."+key)
		}
	}
	return e
}

// set records that level set field, when explaining.
func (e *Effective) set(field, level string) {
	if e.Source != nil {
		e.Source[field] = level
	}
}

func (e *Effective) apply(r Rule, level string) {
	if r.DefaultTTL != 0 {
		e.DefaultTTL = r.DefaultTTL
		e.set("defaultTTL", level)
	}
	if r.MinTTL != 0 {
		e.MinTTL = r.MinTTL
		e.set("minTTL", level)
	}
	if r.MaxTTL != 0 {
		e.MaxTTL = r.MaxTTL
		e.set("maxTTL", level)
	}
	if r.RenewFraction != nil {
		e.RenewFraction = *r.RenewFraction
		e.set("renewFraction", level)
	}
	if r.RenewJitter != nil {
		e.RenewJitter = *r.RenewJitter
		e.set("renewJitter", level)
	}
	if r.KeyTypes != nil {
		e.KeyTypes = r.KeyTypes
		e.set("keyTypes", level)
	}
}

// Clamp is what TTL did to a requested lifetime.
type Clamp string

// Clamp outcomes; also the values of the metric label "bound".
const (
	ClampNone Clamp = ""
	ClampMin  Clamp = "min"
	ClampMax  Clamp = "max"
)

// TTL returns the lifetime for a request of requested (0 means "the
// default") and whether it was clamped into [MinTTL, MaxTTL].
func (e Effective) TTL(requested time.Duration) (time.Duration, Clamp) {
	switch {
	case requested == 0:
		return e.DefaultTTL, ClampNone
	case requested < e.MinTTL:
		return e.MinTTL, ClampMin
	case requested > e.MaxTTL:
		return e.MaxTTL, ClampMax
	default:
		return requested, ClampNone
	}
}

// Allows reports whether key type k is on the allow-list.
func (e Effective) Allows(k KeyType) bool { return slices.Contains(e.KeyTypes, k) }

// Validate checks the policy and every rule as it resolves, and names the
// offending field by its dotted path.
func (p *Policy) Validate() error {
	var errs []error
	errs = append(errs, validateRule("default", p.Default))
	for _, ns := range sortedKeys(p.Namespaces) {
		if ns == "" || strings.Contains(ns, "/") {
			errs = append(errs, fmt.Errorf("namespaces.%s: not a namespace name", ns))
		}
		errs = append(errs, validateRule("namespaces."+ns, p.Namespaces[ns]))
	}
	for _, key := range sortedKeys(p.ServiceAccounts) {
		ns, sa, ok := strings.Cut(key, "/")
		if !ok || ns == "" || sa == "" || strings.Contains(sa, "/") {
			errs = append(errs, fmt.Errorf("serviceAccounts.%s: key must be <namespace>/<serviceaccount>", key))
		}
		errs = append(errs, validateRule("serviceAccounts."+key, p.ServiceAccounts[key]))
	}
	// Levels may each be valid and still combine badly (a namespace maxTTL
	// below the mesh default TTL): check every resolved combination.
	check := func(path, ns, sa string) {
		e := p.Explain(ns, sa)
		if e.MinTTL > e.MaxTTL {
			errs = append(errs, fmt.Errorf("%s: minTTL %s (from %s) exceeds maxTTL %s (from %s)", path, e.MinTTL, e.Source["minTTL"], e.MaxTTL, e.Source["maxTTL"]))
		}
		if e.DefaultTTL < e.MinTTL || e.DefaultTTL > e.MaxTTL {
			errs = append(errs, fmt.Errorf("%s: defaultTTL %s (from %s) is outside [minTTL %s (from %s), maxTTL %s (from %s)]",
				path, e.DefaultTTL, e.Source["defaultTTL"], e.MinTTL, e.Source["minTTL"], e.MaxTTL, e.Source["maxTTL"]))
		}
		if e.RenewJitter >= e.MinTTL {
			errs = append(errs, fmt.Errorf("%s: renewJitter %s (from %s) must be shorter than minTTL %s (from %s)", path, e.RenewJitter, e.Source["renewJitter"], e.MinTTL, e.Source["minTTL"]))
		}
	}
	check("default", "", "")
	for _, ns := range sortedKeys(p.Namespaces) {
		check("namespaces."+ns, ns, "")
	}
	for _, key := range sortedKeys(p.ServiceAccounts) {
		ns, sa, _ := strings.Cut(key, "/")
		check("serviceAccounts."+key, ns, sa)
	}
	return errors.Join(errs...)
}

func validateRule(path string, r Rule) error {
	var errs []error
	for name, d := range map[string]time.Duration{"defaultTTL": r.DefaultTTL, "minTTL": r.MinTTL, "maxTTL": r.MaxTTL} {
		if d < 0 {
			errs = append(errs, fmt.Errorf("%s.%s: must not be negative, got %s", path, name, d))
		}
	}
	if r.RenewFraction != nil && (*r.RenewFraction <= 0 || *r.RenewFraction > 1) {
		errs = append(errs, fmt.Errorf("%s.renewFraction: must be in (0, 1], got %v", path, *r.RenewFraction))
	}
	if r.RenewJitter != nil && *r.RenewJitter < 0 {
		errs = append(errs, fmt.Errorf("%s.renewJitter: must not be negative, got %s", path, *r.RenewJitter))
	}
	if r.KeyTypes != nil && len(r.KeyTypes) == 0 {
		errs = append(errs, fmt.Errorf("%s.keyTypes: must allow at least one key type (omit it to inherit)", path))
	}
	for i, k := range r.KeyTypes {
		if !slices.Contains(knownKeyTypes, k) {
			errs = append(errs, fmt.Errorf("%s.keyTypes[%d]: unknown key type %q, want one of %s", path, i, k, keyTypeList(knownKeyTypes)))
		}
	}
	sortErrs(errs)
	return errors.Join(errs...)
}

func keyTypeList(ks []KeyType) string {
	s := make([]string, len(ks))
	for i, k := range ks {
		s[i] = string(k)
	}
	return strings.Join(s, ", ")
}

func sortedKeys[V any](m map[string]V) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	return keys
}

// sortErrs orders errors built from map iteration so messages are stable.
func sortErrs(errs []error) {
	sort.Slice(errs, func(i, j int) bool { return errs[i].Error() < errs[j].Error() })
}

// LongestMaxTTL returns the largest maxTTL any service account can get
// under p, and the level that sets it ("built-in", "default",
// "namespaces.<ns>", "serviceAccounts.<ns>/<sa>"), for checks of what a
// backend must cover.
func (p *Policy) LongestMaxTTL() (time.Duration, string) {
	longest := p.Explain("", "")
	best, from := longest.MaxTTL, longest.Source["maxTTL"]
	for _, ns := range sortedKeys(p.Namespaces) {
		if e := p.Explain(ns, ""); e.MaxTTL > best {
			best, from = e.MaxTTL, e.Source["maxTTL"]
		}
	}
	for _, key := range sortedKeys(p.ServiceAccounts) {
		ns, sa, _ := strings.Cut(key, "/")
		if e := p.Explain(ns, sa); e.MaxTTL > best {
			best, from = e.MaxTTL, e.Source["maxTTL"]
		}
	}
	return best, from
}

// CheckIntermediateRoom refuses an intermediate that leaves no room for
// the policy's leaves: it must live at least MinLeavesPerIntermediate
// times the longest maxTTL, and what is left of it at its renewal point
// must cover one maxTTL leaf, so that leaves are not cut short by their
// issuer's NotAfter. ttlSetting names the intermediate TTL setting in the
// error.
func (p *Policy) CheckIntermediateRoom(ic IntermediateConfig, ttlSetting string) error {
	ic, err := ic.withDefaults()
	if err != nil {
		return err
	}
	maxTTL, from := p.LongestMaxTTL()
	if ic.TTL < MinLeavesPerIntermediate*maxTTL {
		return fmt.Errorf("%s (%s) must be at least %d × policy maxTTL (%s, from %s) = %s, so that several leaves fit in one intermediate's life; raise %s or lower maxTTL",
			ttlSetting, ic.TTL, MinLeavesPerIntermediate, maxTTL, from, MinLeavesPerIntermediate*maxTTL, ttlSetting)
	}
	if left := time.Duration(float64(ic.TTL) * (1 - ic.RenewFraction)).Round(time.Second); left < maxTTL {
		return fmt.Errorf("%s (%s) leaves %s after its renewal point (renew fraction %v), less than policy maxTTL (%s, from %s): leaves would be cut short; raise %s or lower the renew fraction",
			ttlSetting, ic.TTL, left, ic.RenewFraction, maxTTL, from, ttlSetting)
	}
	return nil
}

// MinLeavesPerIntermediate is how many maxTTL leaves an intermediate's
// lifetime must hold (CheckIntermediateRoom).
const MinLeavesPerIntermediate = 3
