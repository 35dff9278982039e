package ca

import (
	"context"
	"crypto/x509"
	"fmt"

	"github.com/prometheus/client_golang/prometheus"
)

// Metrics are the CA's Prometheus metrics. The serving edges (ca/service,
// sds) record requests, latency and authentication failures; Issue records
// CSR rejections and TTL clamps. Every metric is documented in README.md.
type Metrics struct {
	// Requests counts finished requests by service ("istio", "sds") and
	// gRPC status code.
	Requests *prometheus.CounterVec
	// Latency is the time from request arrival to response, by service.
	Latency *prometheus.HistogramVec
	// AuthnFailures counts refused credentials by authenticator and reason.
	AuthnFailures *prometheus.CounterVec
	// CSRRejections counts refused CSRs by reason.
	CSRRejections *prometheus.CounterVec
	// TTLClamps counts requested lifetimes moved into policy bounds, by the
	// bound that applied ("min" or "max").
	TTLClamps *prometheus.CounterVec
	// Issued counts issued leaves by key type.
	Issued *prometheus.CounterVec
	// Reloads counts reloads of watched files (policy, plugged CA) by what
	// was reloaded and the result ("success" or "failure").
	Reloads *prometheus.CounterVec
}

// NewMetrics creates the metrics and registers them on reg, if non-nil.
func NewMetrics(reg prometheus.Registerer) (*Metrics, error) {
	m := &Metrics{
		Requests: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "meshca_requests_total",
			Help: "Certificate requests finished, by service (istio, sds) and gRPC status code.",
		}, []string{"service", "code"}),
		Latency: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "meshca_issuance_duration_seconds",
			Help:    "Time from a certificate request's arrival to its answer, by service.",
			Buckets: []float64{.0001, .00025, .0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5},
		}, []string{"service"}),
		AuthnFailures: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "meshca_authn_failures_total",
			Help: "Refused credentials, by authenticator and reason.",
		}, []string{"authenticator", "reason"}),
		CSRRejections: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "meshca_csr_rejections_total",
			Help: "Refused CSRs, by reason.",
		}, []string{"reason"}),
		TTLClamps: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "meshca_ttl_clamps_total",
			Help: "Requested certificate lifetimes clamped into the policy's bounds, by bound (min, max).",
		}, []string{"bound"}),
		Issued: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "meshca_certificates_issued_total",
			Help: "Leaf certificates issued, by key type.",
		}, []string{"key_type"}),
		Reloads: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "meshca_reloads_total",
			Help: "Reloads of watched files, by what was reloaded (policy, backend) and result (success, failure).",
		}, []string{"what", "result"}),
	}
	if reg != nil {
		for _, c := range []prometheus.Collector{m.Requests, m.Latency, m.AuthnFailures, m.CSRRejections, m.TTLClamps, m.Issued, m.Reloads} {
			if err := reg.Register(c); err != nil {
				return nil, fmt.Errorf("register metrics: %w", err)
			}
		}
	}
	return m, nil
}

// ExpiryCollector exports meshca_ca_cert_expiry_timestamp_seconds for the
// certificates a backend signs with and trusts, read at scrape time so a
// rotation shows at once. Extra returns more certificates to report (the
// serving certificate) by role; it may be nil.
type ExpiryCollector struct {
	Backend Backend
	Extra   func() map[string]*x509.Certificate
}

var expiryDesc = prometheus.NewDesc("meshca_ca_cert_expiry_timestamp_seconds",
	"NotAfter of certificates meshca signs or serves with, as a Unix timestamp, by role (signing, chain, root, serving) and serial.",
	[]string{"role", "serial"}, nil)

// Describe implements prometheus.Collector.
func (c *ExpiryCollector) Describe(ch chan<- *prometheus.Desc) { ch <- expiryDesc }

// Collect implements prometheus.Collector.
func (c *ExpiryCollector) Collect(ch chan<- prometheus.Metric) {
	emit := func(role string, cert *x509.Certificate) {
		ch <- prometheus.MustNewConstMetric(expiryDesc, prometheus.GaugeValue,
			float64(cert.NotAfter.Unix()), role, fmt.Sprintf("%x", cert.SerialNumber))
	}
	seen := map[string]bool{}
	if in, ok := c.Backend.(Inspector); ok {
		chain := in.SigningChain()
		for i, cert := range chain {
			seen[string(cert.Raw)] = true
			if i == 0 {
				emit("signing", cert)
			}
			switch {
			case i == len(chain)-1:
				// Also when the root signs leaves itself, so an alert on
				// role="root" always has a series.
				emit("root", cert)
			case i > 0:
				emit("chain", cert)
			}
		}
	}
	if roots, err := c.Backend.TrustBundle(context.Background()); err == nil {
		for _, r := range roots {
			if !seen[string(r.Raw)] {
				emit("root", r)
			}
		}
	}
	if c.Extra != nil {
		for role, cert := range c.Extra() {
			if cert != nil {
				emit(role, cert)
			}
		}
	}
}
