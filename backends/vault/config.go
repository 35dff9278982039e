package vault

import (
	"crypto/x509/pkix"
	"errors"
	"fmt"
	"net/url"
	"strings"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/meshca/meshca/ca"
)

// Modes, for Config.Mode.
const (
	// ModeIntermediate has Vault sign an intermediate whose key meshca
	// keeps in memory; meshca signs leaves with it.
	ModeIntermediate = "intermediate"
	// ModeDirect has Vault sign every leaf.
	ModeDirect = "direct"
)

// Auth methods, for Auth.Method.
const (
	AuthToken      = "token"
	AuthKubernetes = "kubernetes"
	AuthAppRole    = "approle"
)

// Defaults for the zero fields of Config.
const (
	DefaultMount                     = "pki"
	DefaultIntermediateTTL           = ca.DefaultIntermediateTTL
	DefaultIntermediateRenewFraction = ca.DefaultIntermediateRenewFraction
	DefaultIntermediateKeyType       = ca.KeyECDSAP256
	DefaultRequestTimeout            = 10 * time.Second
	DefaultKubernetesMount           = "kubernetes"
	DefaultKubernetesTokenFile       = "/var/run/secrets/kubernetes.io/serviceaccount/token"
	DefaultAppRoleMount              = "approle"
	// DefaultMinLoginInterval is the least time between two logins that
	// a refused request (HTTP 403) triggers.
	DefaultMinLoginInterval = 5 * time.Second
)

const configPath = "backend.vault."

// Config configures the vault backend. Secrets (a token, an AppRole secret
// ID) are read from files, never written in the configuration.
type Config struct {
	// Mode is "intermediate" (default) or "direct".
	Mode string `yaml:"mode"`
	// Address is Vault's URL, such as https://vault.vault.svc:8200.
	// Required.
	Address string `yaml:"address"`
	// CACertFile is the PEM bundle Vault's TLS certificate chains to.
	// Default: the system roots.
	CACertFile string `yaml:"caCertFile"`
	// TLSServerName overrides the name checked in Vault's certificate.
	TLSServerName string `yaml:"tlsServerName"`
	// Namespace is the Vault Enterprise namespace; "" for none.
	Namespace string `yaml:"namespace"`
	// Mount is the PKI secrets engine's mount path. Default "pki".
	Mount string `yaml:"mount"`
	// Role is the PKI role leaves are signed under. Required in direct
	// mode; unused in intermediate mode.
	Role string `yaml:"role"`
	// SignVerbatim signs leaves with sign-verbatim/<role> instead of
	// sign/<role> (direct mode).
	SignVerbatim bool `yaml:"signVerbatim"`
	// Issuer names the mount's issuer that signs (its ID or name).
	// Default: the mount's default issuer (root/sign-intermediate,
	// sign/<role>).
	Issuer string `yaml:"issuer"`
	// Auth says how meshca logs in.
	Auth Auth `yaml:"auth"`
	// IntermediateSettings shape the intermediate (intermediate mode);
	// New refuses an intermediateTTL above the mount's max_lease_ttl.
	ca.IntermediateSettings `yaml:",inline"`
	// RequestTimeout bounds each HTTP request to Vault. Default 10s.
	RequestTimeout time.Duration `yaml:"requestTimeout"`
	// TrustDomain is the trust domain of the leaves; the role must allow
	// its URI SANs. Set from the top-level trustDomain.
	TrustDomain string `yaml:"trustDomain"`
}

// Auth configures the login. Exactly one method's fields are used.
type Auth struct {
	// Method is token, kubernetes or approle. Required.
	Method string `yaml:"method"`
	// TokenFile holds a Vault token (method token). It is read again for
	// each login, so a rotated file is picked up.
	TokenFile string `yaml:"tokenFile"`
	// Kubernetes logs in with meshca's service-account token.
	Kubernetes KubernetesAuth `yaml:"kubernetes"`
	// AppRole logs in with a role ID and a secret ID.
	AppRole AppRoleAuth `yaml:"appRole"`
}

// KubernetesAuth is Vault's Kubernetes auth method.
type KubernetesAuth struct {
	// Role is the Vault role to log in to. Required.
	Role string `yaml:"role"`
	// Mount is the auth method's mount path. Default "kubernetes".
	Mount string `yaml:"mount"`
	// TokenFile is meshca's service-account token, read for each login.
	// Default: the token Kubernetes mounts in every pod.
	TokenFile string `yaml:"tokenFile"`
}

// AppRoleAuth is Vault's AppRole auth method.
type AppRoleAuth struct {
	// RoleID is the role ID (not a secret). Required.
	RoleID string `yaml:"roleID"`
	// SecretIDFile holds the secret ID. Required.
	SecretIDFile string `yaml:"secretIDFile"`
	// Mount is the auth method's mount path. Default "approle".
	Mount string `yaml:"mount"`
}

// Validate reports every problem with c by dotted path, joined with
// errors.Join. It reads no file and calls no server: New does.
func (c Config) Validate() error {
	var errs []error
	bad := func(field, format string, args ...any) {
		errs = append(errs, fmt.Errorf("%s%s: %s", configPath, field, fmt.Sprintf(format, args...)))
	}
	switch c.Mode {
	case "", ModeIntermediate, ModeDirect:
	default:
		bad("mode", "unknown mode %q, want intermediate or direct", c.Mode)
	}
	if c.Address == "" {
		bad("address", "is required (Vault's URL, such as https://vault.vault.svc:8200)")
	} else if u, err := url.Parse(c.Address); err != nil || (u.Scheme != "https" && u.Scheme != "http") || u.Host == "" {
		bad("address", "want an http or https URL, got %q", c.Address)
	}
	if strings.Trim(c.Mount, "/") != c.Mount {
		bad("mount", "must not start or end with a slash, got %q", c.Mount)
	}
	if c.Mode == ModeDirect && c.Role == "" {
		bad("role", "is required in direct mode (the PKI role leaves are signed under)")
	}
	if c.SignVerbatim && c.Mode != ModeDirect {
		bad("signVerbatim", "only applies in direct mode")
	}
	switch c.Auth.Method {
	case AuthToken:
		if c.Auth.TokenFile == "" {
			bad("auth.tokenFile", "is required with method token (a file holding the Vault token)")
		}
	case AuthKubernetes:
		if c.Auth.Kubernetes.Role == "" {
			bad("auth.kubernetes.role", "is required with method kubernetes (the Vault role to log in to)")
		}
	case AuthAppRole:
		if c.Auth.AppRole.RoleID == "" {
			bad("auth.appRole.roleID", "is required with method approle")
		}
		if c.Auth.AppRole.SecretIDFile == "" {
			bad("auth.appRole.secretIDFile", "is required with method approle (a file holding the secret ID)")
		}
	case "":
		bad("auth.method", "is required: token, kubernetes or approle")
	default:
		bad("auth.method", "unknown method %q, want token, kubernetes or approle", c.Auth.Method)
	}
	errs = append(errs, c.IntermediateSettings.Validate(configPath)...)
	if c.RequestTimeout < 0 {
		bad("requestTimeout", "must not be negative (0 means the default, %s)", DefaultRequestTimeout)
	}
	if c.TrustDomain != "" {
		if _, err := spiffeid.TrustDomainFromString(c.TrustDomain); err != nil {
			bad("trustDomain", "%q is not a valid trust domain name", c.TrustDomain)
		}
	}
	return errors.Join(errs...)
}

func (c Config) withDefaults() Config {
	if c.Mode == "" {
		c.Mode = ModeIntermediate
	}
	if c.Mount == "" {
		c.Mount = DefaultMount
	}
	c.IntermediateSettings = c.IntermediateSettings.WithDefaults()
	if c.RequestTimeout == 0 {
		c.RequestTimeout = DefaultRequestTimeout
	}
	if c.Auth.Kubernetes.Mount == "" {
		c.Auth.Kubernetes.Mount = DefaultKubernetesMount
	}
	if c.Auth.Kubernetes.TokenFile == "" {
		c.Auth.Kubernetes.TokenFile = DefaultKubernetesTokenFile
	}
	if c.Auth.AppRole.Mount == "" {
		c.Auth.AppRole.Mount = DefaultAppRoleMount
	}
	return c
}

// IntermediateConfig is the shape of the intermediates meshca generates in
// intermediate mode.
func (c Config) IntermediateConfig() ca.IntermediateConfig {
	cn := "meshca intermediate (Vault)"
	if c.TrustDomain != "" {
		cn = "meshca intermediate for " + c.TrustDomain + " (Vault)"
	}
	return c.IntermediateSettings.Config(pkix.Name{CommonName: cn, Organization: []string{"meshca"}})
}
