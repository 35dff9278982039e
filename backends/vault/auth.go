package vault

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"strings"
	"sync"
	"time"

	"github.com/hashicorp/vault/api"
)

// Bounds of the back-off between failed logins.
const (
	loginBackoffMin = time.Second
	loginBackoffMax = 2 * time.Minute
)

// session keeps meshca logged in to Vault: it logs in, keeps the token
// alive with the API's lifetime watcher, and logs in again when renewal
// fails, the token nears its end, or Vault refuses a request with it.
type session struct {
	cfg     Config
	client  *api.Client
	log     logger
	now     func() time.Time
	metrics *metrics
	// minRelogin is the least time between two logins that refused
	// requests trigger, so a policy that denies everything cannot make
	// meshca hammer Vault's login endpoint.
	minRelogin time.Duration

	mu        sync.Mutex
	auth      *api.Secret // the last login's answer; nil before the first
	token     string
	loggedIn  time.Time
	expires   time.Time // zero: never
	lastErr   error
	relogging chan struct{} // closed when an in-progress login ends
	// kick wakes Run for an early login.
	kick chan struct{}
}

type logger interface {
	Info(msg string, args ...any)
	Warn(msg string, args ...any)
	Error(msg string, args ...any)
}

// login logs in once with the configured method and puts the new token in
// force.
func (s *session) login(ctx context.Context) error {
	secret, err := s.doLogin(ctx)
	s.metrics.logins.WithLabelValues(s.cfg.Auth.Method, result(err)).Inc()
	s.mu.Lock()
	defer s.mu.Unlock()
	if err != nil {
		s.lastErr = err
		s.metrics.authenticated.Set(0)
		return err
	}
	s.auth, s.lastErr = secret, nil
	s.token = secret.Auth.ClientToken
	s.client.SetToken(s.token)
	s.loggedIn = s.now()
	s.expires = time.Time{}
	if ttl := secret.Auth.LeaseDuration; ttl > 0 {
		s.expires = s.loggedIn.Add(time.Duration(ttl) * time.Second)
		s.metrics.tokenExpiry.Set(float64(s.expires.Unix()))
	} else {
		s.metrics.tokenExpiry.Set(0)
	}
	s.metrics.authenticated.Set(1)
	return nil
}

func (s *session) doLogin(ctx context.Context) (*api.Secret, error) {
	a := s.cfg.Auth
	var (
		path string
		data map[string]any
	)
	switch a.Method {
	case AuthToken:
		tok, err := readSecretFile(a.TokenFile, "backend.vault.auth.tokenFile")
		if err != nil {
			return nil, err
		}
		// A given token is checked, not exchanged: lookup-self says
		// whether it works and how long it lives.
		c, err := s.client.Clone()
		if err != nil {
			return nil, fmt.Errorf("vault token login: %w", err)
		}
		c.SetToken(tok)
		c.SetNamespace(s.cfg.Namespace)
		secret, err := c.Auth().Token().LookupSelfWithContext(ctx)
		if err != nil {
			return nil, fmt.Errorf("vault token login: the token in %s does not work (lookup-self): %w", a.TokenFile, classify(err))
		}
		ttl, _ := secret.TokenTTL()
		renewable, _ := secret.TokenIsRenewable()
		return &api.Secret{Auth: &api.SecretAuth{ClientToken: tok, LeaseDuration: int(ttl.Seconds()), Renewable: renewable}}, nil
	case AuthKubernetes:
		jwt, err := readSecretFile(a.Kubernetes.TokenFile, "backend.vault.auth.kubernetes.tokenFile")
		if err != nil {
			return nil, err
		}
		path = "auth/" + a.Kubernetes.Mount + "/login"
		data = map[string]any{"role": a.Kubernetes.Role, "jwt": jwt}
	case AuthAppRole:
		sid, err := readSecretFile(a.AppRole.SecretIDFile, "backend.vault.auth.appRole.secretIDFile")
		if err != nil {
			return nil, err
		}
		path = "auth/" + a.AppRole.Mount + "/login"
		data = map[string]any{"role_id": a.AppRole.RoleID, "secret_id": sid}
	default:
		return nil, fmt.Errorf("backend.vault.auth.method: unknown method %q", a.Method)
	}
	// Logins go out without a token.
	c, err := s.client.Clone()
	if err != nil {
		return nil, fmt.Errorf("vault %s login: %w", a.Method, err)
	}
	c.ClearToken()
	c.SetNamespace(s.cfg.Namespace)
	secret, err := c.Logical().WriteWithContext(ctx, path, data)
	if err != nil {
		return nil, fmt.Errorf("vault %s login at %s: %w", a.Method, path, classify(err))
	}
	if secret == nil || secret.Auth == nil || secret.Auth.ClientToken == "" {
		return nil, fmt.Errorf("vault %s login at %s: the answer holds no token", a.Method, path)
	}
	return secret, nil
}

// readSecretFile reads a one-line secret; its content never reaches an
// error or a log.
func readSecretFile(path, setting string) (string, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return "", fmt.Errorf("%s: %w", setting, err)
	}
	v := strings.TrimSpace(string(b))
	if v == "" {
		return "", fmt.Errorf("%s: %s is empty", setting, path)
	}
	return v, nil
}

// current returns the token in force.
func (s *session) current() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.token
}

// Status is nil while meshca holds a working Vault token, else the last
// login failure.
func (s *session) status() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.token == "" || s.lastErr != nil {
		if s.lastErr != nil {
			return s.lastErr
		}
		return errors.New("not logged in to Vault yet")
	}
	if !s.expires.IsZero() && !s.now().Before(s.expires) {
		return fmt.Errorf("the Vault token expired at %s", s.expires.UTC().Format(time.RFC3339))
	}
	return nil
}

// refused is called when Vault refused a request made with token (HTTP
// 403): the token may have been revoked. It logs in again, at most once
// per minRelogin, and reports whether a new token is in force to retry
// with. Concurrent callers share one login.
func (s *session) refused(ctx context.Context, token string) bool {
	s.mu.Lock()
	if s.token != token {
		s.mu.Unlock()
		return true // someone logged in since
	}
	if ch := s.relogging; ch != nil {
		s.mu.Unlock()
		select {
		case <-ch:
		case <-ctx.Done():
			return false
		}
		return s.current() != token
	}
	if s.now().Sub(s.loggedIn) < s.minRelogin {
		s.mu.Unlock()
		return false
	}
	ch := make(chan struct{})
	s.relogging = ch
	s.mu.Unlock()

	s.log.Warn("Vault refused meshca's token; logging in again", "method", s.cfg.Auth.Method)
	err := s.login(ctx)
	s.mu.Lock()
	s.relogging = nil
	if err != nil {
		// Not before minRelogin again, however the login failed.
		s.loggedIn = s.now()
	}
	s.mu.Unlock()
	close(ch)
	if err != nil {
		s.log.Error("logging in to Vault again failed", "method", s.cfg.Auth.Method, "err", err)
		return false
	}
	select {
	case s.kick <- struct{}{}: // Run watches the new token
	default:
	}
	return true
}

// run keeps the token alive until ctx is done: it watches the token with
// the lifetime watcher, and when the watcher gives up (renewal failed, or
// the token reached its max TTL) logs in again, retrying with bounded
// exponential back-off and jitter.
func (s *session) run(ctx context.Context) error {
	for {
		s.watch(ctx)
		if ctx.Err() != nil {
			return nil
		}
		backoff := loginBackoffMin
		for {
			err := s.login(ctx)
			if err == nil {
				s.log.Info("logged in to Vault", "method", s.cfg.Auth.Method)
				break
			}
			if ctx.Err() != nil {
				return nil
			}
			wait := jitter(backoff)
			s.log.Error("logging in to Vault failed; retrying", "method", s.cfg.Auth.Method, "retry_in", wait.Round(time.Millisecond), "err", err)
			select {
			case <-ctx.Done():
				return nil
			case <-time.After(wait):
			}
			backoff = min(2*backoff, loginBackoffMax)
		}
	}
}

// watch returns when the token in force needs replacing (or ctx is done,
// or a refused request already replaced it).
func (s *session) watch(ctx context.Context) {
	s.mu.Lock()
	secret, expires := s.auth, s.expires
	s.mu.Unlock()
	if secret == nil || s.status() != nil {
		return
	}
	if !secret.Auth.Renewable {
		// Log in again at 80% of a token that cannot be renewed; a token
		// that never expires is only replaced when Vault refuses it.
		var timer <-chan time.Time
		if !expires.IsZero() {
			timer = time.After(time.Duration(float64(expires.Sub(s.now())) * 0.8))
		}
		select {
		case <-ctx.Done():
		case <-timer:
		case <-s.kick:
		}
		return
	}
	c, err := s.client.Clone()
	if err == nil {
		c.SetToken(secret.Auth.ClientToken)
		c.SetNamespace(s.cfg.Namespace)
	}
	var w *api.LifetimeWatcher
	if err == nil {
		w, err = c.NewLifetimeWatcher(&api.LifetimeWatcherInput{Secret: secret})
	}
	if err != nil {
		s.log.Error("cannot watch the Vault token; logging in again", "err", err)
		return
	}
	go w.Start()
	defer w.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-s.kick:
			return
		case r := <-w.RenewCh():
			if r != nil && r.Secret != nil && r.Secret.Auth != nil {
				s.mu.Lock()
				if s.token == secret.Auth.ClientToken && r.Secret.Auth.LeaseDuration > 0 {
					s.expires = s.now().Add(time.Duration(r.Secret.Auth.LeaseDuration) * time.Second)
					s.metrics.tokenExpiry.Set(float64(s.expires.Unix()))
				}
				s.mu.Unlock()
				s.metrics.renewals.WithLabelValues("success").Inc()
			}
		case err := <-w.DoneCh():
			if err != nil {
				s.metrics.renewals.WithLabelValues("failure").Inc()
				s.log.Warn("renewing the Vault token failed; logging in again", "err", classify(err))
			} else {
				s.log.Info("the Vault token reached its maximum lifetime; logging in again")
			}
			return
		}
	}
}

// jitter spreads d by ±20%.
func jitter(d time.Duration) time.Duration {
	return time.Duration(float64(d) * (0.8 + 0.4*rand.Float64()))
}

func result(err error) string {
	if err != nil {
		return "failure"
	}
	return "success"
}
