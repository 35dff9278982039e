// Package vaultenv runs a real HashiCorp Vault server (dev mode, in memory)
// on loopback for Go tests, and sets up what meshca's Vault backend needs:
// a PKI mount with a root and a role, policies, tokens, AppRole, and the
// Kubernetes auth method pointed at a real kube-apiserver.
//
// The vault binary is built by `test/tools/build.sh vault` into
// $MESHCA_BIN or <repo root>/.cache/bin. Vault is BUSL-1.1 licensed: it is
// a test dependency only.
package vaultenv

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"testing"
	"time"

	"github.com/hashicorp/vault/api"

	"github.com/meshca/meshca/test/internal/proc"
	"github.com/meshca/meshca/test/kubeenv"
)

// RootToken is the dev server's root token.
const RootToken = "meshca-test-root"

const (
	readyTimeout  = 30 * time.Second
	startAttempts = 3
)

// Env is a running Vault dev server. Its fields are read-only.
type Env struct {
	// Addr is Vault's URL, http://127.0.0.1:PORT.
	Addr string
	// Client is an API client holding the root token.
	Client *api.Client
	// Dir is the server's working directory, holding vault.log.
	Dir string
	// CACertFile, with TLS, is the PEM of the CA Vault's certificate
	// chains to; "" without.
	CACertFile string

	bin  string
	port int
	tls  bool
	p    *proc.Process
}

// Options changes how Start runs Vault.
type Options struct {
	// TLS serves https with a certificate from a CA Vault generates
	// (-dev-tls); Env.CACertFile holds that CA.
	TLS bool
}

// Start starts Vault for the test and stops it in t.Cleanup. Under go test
// -short it skips the test.
func Start(t testing.TB) *Env {
	t.Helper()
	return StartWith(t, Options{})
}

// StartWith is Start with options.
func StartWith(t testing.TB, opts Options) *Env {
	t.Helper()
	kubeenv.SkipIfShort(t)
	dir, err := kubeenv.BinDir()
	if err != nil {
		t.Fatalf("vaultenv: %v", err)
	}
	bin := filepath.Join(dir, "vault")
	if st, err := os.Stat(bin); err != nil || st.Mode()&0o111 == 0 {
		t.Fatalf("vaultenv: vault not found in %s: run test/tools/build.sh vault (or set MESHCA_BIN)", dir)
	}
	e := &Env{Dir: t.TempDir(), bin: bin, tls: opts.TLS}
	var lastErr error
	for range startAttempts {
		if lastErr = e.start(); lastErr == nil {
			break
		}
	}
	if lastErr != nil {
		t.Fatalf("vaultenv: %v", lastErr)
	}
	t.Cleanup(func() {
		if t.Failed() && e.p != nil {
			t.Logf("vaultenv: last lines of %s:\n%s", e.p.LogPath(), e.p.LogTail(20))
		}
		e.Stop()
	})
	t.Logf("vaultenv: Vault at %s, log in %s", e.Addr, e.Dir)
	return e
}

func (e *Env) start() error {
	if e.port == 0 {
		// Vault also binds PORT+1 for clustering.
		port, err := freePortPair()
		if err != nil {
			return err
		}
		e.port = port
	}
	e.Addr = "http://127.0.0.1:" + strconv.Itoa(e.port)
	args := []string{"server", "-dev", "-dev-listen-address=127.0.0.1:" + strconv.Itoa(e.port),
		"-dev-root-token-id=" + RootToken, "-dev-no-store-token"}
	httpClient := &http.Client{Timeout: 10 * time.Second}
	if e.tls {
		certDir := filepath.Join(e.Dir, "tls")
		if err := os.MkdirAll(certDir, 0o700); err != nil {
			return err
		}
		e.Addr = "https://127.0.0.1:" + strconv.Itoa(e.port)
		e.CACertFile = filepath.Join(certDir, "vault-ca.pem")
		args = append(args, "-dev-tls", "-dev-tls-cert-dir="+certDir, "-dev-tls-san=127.0.0.1")
	}
	p, err := proc.Start(proc.Config{
		Name: "vault",
		Path: e.bin,
		Args: args,
		// HOME keeps the CLI's token helper inside Dir; no VAULT_* variable
		// of the test's environment leaks in.
		Env:     []string{"HOME=" + e.Dir, "PATH=" + os.Getenv("PATH")},
		Dir:     e.Dir,
		LogPath: filepath.Join(e.Dir, "vault.log"),
	})
	if err != nil {
		return err
	}
	e.p = p
	ctx, cancel := context.WithTimeout(context.Background(), readyTimeout)
	defer cancel()
	for e.tls {
		// The CA file appears once Vault has made its certificate.
		pemBytes, err := os.ReadFile(e.CACertFile)
		if err == nil {
			pool := x509.NewCertPool()
			if pool.AppendCertsFromPEM(pemBytes) {
				httpClient.Transport = &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS12}}
				break
			}
		}
		if p.Exited() || ctx.Err() != nil {
			p.Stop(time.Second)
			return fmt.Errorf("vault wrote no CA file %s:\n%s", e.CACertFile, p.LogTail(20))
		}
		time.Sleep(50 * time.Millisecond)
	}
	c, err := api.NewClient(&api.Config{Address: e.Addr, HttpClient: httpClient})
	if err != nil {
		p.Stop(time.Second)
		return err
	}
	c.SetToken(RootToken)
	e.Client = c
	for {
		if p.Exited() {
			if p.LogContains("address already in use") {
				e.port = 0
			}
			return fmt.Errorf("vault exited early (%v):\n%s", p.Err(), p.LogTail(20))
		}
		if h, err := c.Sys().HealthWithContext(ctx); err == nil && h.Initialized && !h.Sealed {
			return nil
		}
		select {
		case <-ctx.Done():
			p.Stop(time.Second)
			return fmt.Errorf("vault not ready within %s:\n%s", readyTimeout, p.LogTail(20))
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// Stop stops the server. Its state (dev mode keeps it in memory) is lost.
func (e *Env) Stop() {
	if e.p != nil {
		e.p.Stop(5 * time.Second)
		e.p = nil
	}
}

// Pause stops the server's process from running (SIGSTOP): connections
// hang, as with an unreachable upstream. Resume undoes it.
func (e *Env) Pause(t testing.TB) { t.Helper(); e.signal(t, "STOP") }

// Resume continues a paused server.
func (e *Env) Resume(t testing.TB) { t.Helper(); e.signal(t, "CONT") }

func (e *Env) signal(t testing.TB, sig string) {
	t.Helper()
	p, err := os.FindProcess(e.p.Pid())
	if err != nil {
		t.Fatalf("vaultenv: %v", err)
	}
	s := map[string]os.Signal{"STOP": sigStop, "CONT": sigCont}[sig]
	if err := p.Signal(s); err != nil {
		t.Fatalf("vaultenv: SIG%s: %v", sig, err)
	}
}

// Write is a root-token write that must succeed.
func (e *Env) Write(t testing.TB, path string, data map[string]any) *api.Secret {
	t.Helper()
	s, err := e.Client.Logical().Write(path, data)
	if err != nil {
		t.Fatalf("vaultenv: write %s: %v", path, err)
	}
	return s
}

// PKI is a PKI mount with a root.
type PKI struct {
	Mount string
	Root  *x509.Certificate
}

// EnablePKI mounts a PKI engine at mount (max lease 10 years) and
// generates an EC P-256 root in it.
func (e *Env) EnablePKI(t testing.TB, mount string) PKI {
	t.Helper()
	if err := e.Client.Sys().Mount(mount, &api.MountInput{Type: "pki", Config: api.MountConfigInput{MaxLeaseTTL: "87600h"}}); err != nil {
		t.Fatalf("vaultenv: mount pki at %s: %v", mount, err)
	}
	s := e.Write(t, mount+"/root/generate/internal", map[string]any{
		"common_name": "vaultenv root " + mount, "ttl": "87600h", "key_type": "ec", "key_bits": 256, "issuer_name": "root",
	})
	return PKI{Mount: mount, Root: parseCert(t, s.Data["certificate"])}
}

// WriteRole writes a PKI role that signs SPIFFE leaves of trustDomain, of
// any key type, with the given max_ttl. extra overrides fields.
func (e *Env) WriteRole(t testing.TB, mount, role, trustDomain string, maxTTL time.Duration, extra map[string]any) {
	t.Helper()
	data := map[string]any{
		"allow_any_name": true, "allowed_uri_sans": []string{"spiffe://" + trustDomain + "/*"}, "require_cn": false,
		"use_csr_common_name": false, "use_csr_sans": false, "key_type": "any", "max_ttl": strconv.Itoa(int(maxTTL.Seconds())) + "s",
		"server_flag": true, "client_flag": true, "enforce_hostnames": false, "allow_ip_sans": true, "allow_localhost": true,
	}
	for k, v := range extra {
		data[k] = v
	}
	e.Write(t, mount+"/roles/"+role, data)
}

// SignerPolicy is a Vault policy that lets meshca sign on mount (both
// modes), read its role and issuer, and read the mount's tuning.
func SignerPolicy(mount string) string {
	return fmt.Sprintf(`
path "%[1]s/sign/*" { capabilities = ["create", "update"] }
path "%[1]s/sign-verbatim/*" { capabilities = ["create", "update"] }
path "%[1]s/root/sign-intermediate" { capabilities = ["create", "update"] }
path "%[1]s/issuer/+/sign-intermediate" { capabilities = ["create", "update"] }
path "%[1]s/issuer/+/sign/*" { capabilities = ["create", "update"] }
path "%[1]s/issuer/+/json" { capabilities = ["read"] }
path "%[1]s/roles/*" { capabilities = ["read"] }
path "sys/mounts/%[1]s/tune" { capabilities = ["read"] }
`, mount)
}

// WritePolicy writes a named ACL policy.
func (e *Env) WritePolicy(t testing.TB, name, hcl string) {
	t.Helper()
	if err := e.Client.Sys().PutPolicy(name, hcl); err != nil {
		t.Fatalf("vaultenv: put policy %s: %v", name, err)
	}
}

// Token creates a renewable token with policy and ttl, and returns it and
// its accessor.
func (e *Env) Token(t testing.TB, policy string, ttl time.Duration) (token, accessor string) {
	t.Helper()
	s, err := e.Client.Auth().Token().Create(&api.TokenCreateRequest{
		Policies: []string{policy}, TTL: ttl.String(), Renewable: boolPtr(true), NoDefaultPolicy: false,
	})
	if err != nil {
		t.Fatalf("vaultenv: create token: %v", err)
	}
	return s.Auth.ClientToken, s.Auth.Accessor
}

// RevokeAccessor revokes the token with accessor.
func (e *Env) RevokeAccessor(t testing.TB, accessor string) {
	t.Helper()
	if err := e.Client.Auth().Token().RevokeAccessor(accessor); err != nil {
		t.Fatalf("vaultenv: revoke: %v", err)
	}
}

// EnableAppRole enables AppRole at "approle" with a role holding policy,
// and returns its role ID and a new secret ID.
func (e *Env) EnableAppRole(t testing.TB, role, policy string, tokenTTL time.Duration) (roleID, secretID string) {
	t.Helper()
	if err := e.Client.Sys().EnableAuthWithOptions("approle", &api.EnableAuthOptions{Type: "approle"}); err != nil {
		t.Fatalf("vaultenv: enable approle: %v", err)
	}
	e.Write(t, "auth/approle/role/"+role, map[string]any{"token_policies": []string{policy}, "token_ttl": tokenTTL.String(), "token_max_ttl": "24h"})
	r, err := e.Client.Logical().Read("auth/approle/role/" + role + "/role-id")
	if err != nil {
		t.Fatalf("vaultenv: read role id: %v", err)
	}
	s := e.Write(t, "auth/approle/role/"+role+"/secret-id", nil)
	return r.Data["role_id"].(string), s.Data["secret_id"].(string)
}

// EnableKubernetes enables the Kubernetes auth method at "kubernetes",
// checking tokens against k's apiserver with reviewerJWT (a token of an
// account bound to system:auth-delegator), and a role that admits the
// service account ns/sa with policy.
func (e *Env) EnableKubernetes(t testing.TB, k *kubeenv.Env, reviewerJWT, role, ns, sa, policy string) {
	t.Helper()
	if err := e.Client.Sys().EnableAuthWithOptions("kubernetes", &api.EnableAuthOptions{Type: "kubernetes"}); err != nil {
		t.Fatalf("vaultenv: enable kubernetes auth: %v", err)
	}
	e.Write(t, "auth/kubernetes/config", map[string]any{
		"kubernetes_host": k.Host, "kubernetes_ca_cert": string(k.Config.CAData), "token_reviewer_jwt": reviewerJWT,
		"disable_local_ca_jwt": true,
	})
	e.Write(t, "auth/kubernetes/role/"+role, map[string]any{
		"bound_service_account_names": []string{sa}, "bound_service_account_namespaces": []string{ns},
		"token_policies": []string{policy}, "token_ttl": "1h", "audience": "vault",
	})
}

func parseCert(t testing.TB, v any) *x509.Certificate {
	t.Helper()
	s, _ := v.(string)
	block, _ := pem.Decode([]byte(s))
	if block == nil {
		t.Fatalf("vaultenv: not a PEM certificate: %q", s)
		return nil
	}
	c, err := x509.ParseCertificate(block.Bytes)
	if err != nil {
		t.Fatalf("vaultenv: %v", err)
	}
	return c
}

func boolPtr(b bool) *bool { return &b }

// freePortPair returns a loopback port P such that P and P+1 were free a
// moment ago.
func freePortPair() (int, error) {
	for range 20 {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return 0, err
		}
		p := l.Addr().(*net.TCPAddr).Port
		l2, err := net.Listen("tcp", "127.0.0.1:"+strconv.Itoa(p+1))
		l.Close()
		if err == nil {
			l2.Close()
			return p, nil
		}
	}
	return 0, errors.New("no free pair of loopback ports")
}
