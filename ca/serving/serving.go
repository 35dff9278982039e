// Package serving keeps meshca's own TLS serving certificate fresh. The
// certificate is signed by the CA core, so it chains to the same roots as
// workload certificates and istio-agent's CA root verifies it.
package serving

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"sync/atomic"
	"time"

	"github.com/meshca/meshca/ca"
)

// A Signer signs meshca's own certificate; *ca.CA is one.
type Signer interface {
	Sign(ctx context.Context, req ca.SignRequest) (*ca.SignResponse, error)
}

// Config configures meshca's own TLS serving certificate.
type Config struct {
	// CA issues the certificate. Required.
	CA Signer
	// DNSNames and IPAddresses are the certificate's SANs; at least one.
	DNSNames    []string
	IPAddresses []net.IP
	// TTL is the certificate's lifetime. Default 24h.
	TTL time.Duration
	// RenewFraction of the lifetime passes before it is replaced. Default 0.5.
	RenewFraction float64
	// RetryInterval is the wait after a failed renewal. Default 10s.
	RetryInterval time.Duration
	Log           *slog.Logger
	Now           func() time.Time
}

// Cert keeps a TLS certificate for meshca's listeners fresh: Run
// replaces it before it expires, and GetCertificate always hands out the
// newest one, so rotation needs no restart.
type Cert struct {
	cfg Config
	cur atomic.Pointer[tls.Certificate]
}

// New issues the first certificate and returns a Cert.
func New(ctx context.Context, cfg Config) (*Cert, error) {
	if cfg.CA == nil {
		return nil, errors.New("serving: CA is required")
	}
	if len(cfg.DNSNames) == 0 && len(cfg.IPAddresses) == 0 {
		return nil, errors.New("serving: at least one DNS name or IP address is required")
	}
	if cfg.TTL <= 0 {
		cfg.TTL = 24 * time.Hour
	}
	if cfg.RenewFraction <= 0 || cfg.RenewFraction > 1 {
		cfg.RenewFraction = 0.5
	}
	if cfg.RetryInterval <= 0 {
		cfg.RetryInterval = 10 * time.Second
	}
	if cfg.Log == nil {
		cfg.Log = slog.New(slog.DiscardHandler)
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	s := &Cert{cfg: cfg}
	if err := s.renew(ctx); err != nil {
		return nil, err
	}
	return s, nil
}

// GetCertificate is for tls.Config.GetCertificate.
func (s *Cert) GetCertificate(*tls.ClientHelloInfo) (*tls.Certificate, error) {
	return s.cur.Load(), nil
}

// Leaf returns the certificate being served now.
func (s *Cert) Leaf() *x509.Certificate { return s.cur.Load().Leaf }

// Run replaces the certificate at its renewal point until ctx is done. A
// failed renewal is retried every RetryInterval while the old certificate
// is still served.
func (s *Cert) Run(ctx context.Context) error {
	for {
		leaf := s.Leaf()
		// Never sooner than RetryInterval: a lifetime squeezed by an
		// expiring CA must not turn renewal into a busy loop.
		wait := max(ca.RenewAt(leaf.NotBefore, leaf.NotAfter, s.cfg.RenewFraction, 0).Sub(s.cfg.Now()), s.cfg.RetryInterval)
		for {
			t := time.NewTimer(wait)
			select {
			case <-ctx.Done():
				t.Stop()
				return nil
			case <-t.C:
			}
			err := s.renew(ctx)
			if err == nil {
				break
			}
			s.cfg.Log.Error("serving certificate renewal failed; serving the old one", "not_after", leaf.NotAfter, "retry_in", s.cfg.RetryInterval, "err", err)
			wait = s.cfg.RetryInterval
		}
		l := s.Leaf()
		s.cfg.Log.Info("serving certificate renewed", "serial", l.SerialNumber.Text(16), "not_after", l.NotAfter)
	}
}

func (s *Cert) renew(ctx context.Context) error {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return fmt.Errorf("generate serving key: %w", err)
	}
	der, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{
		DNSNames: s.cfg.DNSNames, IPAddresses: s.cfg.IPAddresses,
	}, key)
	if err != nil {
		return fmt.Errorf("create serving CSR: %w", err)
	}
	csr, err := x509.ParseCertificateRequest(der)
	if err != nil {
		return fmt.Errorf("parse serving CSR: %w", err)
	}
	now := s.cfg.Now()
	resp, err := s.cfg.CA.Sign(ctx, ca.SignRequest{
		CSR: csr, DNSNames: s.cfg.DNSNames, IPAddresses: s.cfg.IPAddresses,
		NotBefore: now.Add(-time.Minute), NotAfter: now.Add(s.cfg.TTL),
	})
	if err != nil {
		return fmt.Errorf("sign serving certificate: %w", err)
	}
	leaf, err := x509.ParseCertificate(resp.Leaf)
	if err != nil {
		return fmt.Errorf("parse serving certificate: %w", err)
	}
	chain := [][]byte{resp.Leaf}
	// The root stays out of the handshake: clients must already hold it.
	for _, p := range resp.ChainPEM[:max(len(resp.ChainPEM)-1, 0)] {
		if b, _ := pem.Decode([]byte(p)); b != nil {
			chain = append(chain, b.Bytes)
		}
	}
	s.cur.Store(&tls.Certificate{Certificate: chain, PrivateKey: key, Leaf: leaf})
	return nil
}
