package ca

import (
	"crypto/x509"
	"fmt"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promauto"
)

// NewMetrics creates the CA core's metrics and registers them on reg; a nil
// reg leaves them unregistered (they still count, for tests). Every meshca
// package makes its metrics this way, once per process: promauto.With(reg).
func NewMetrics(reg prometheus.Registerer) *Metrics {
	f := promauto.With(reg)
	return &Metrics{
		CSRRejections: f.NewCounterVec(prometheus.CounterOpts{
			Name: "meshca_csr_rejections_total",
			Help: "Refused CSRs, by reason.",
		}, []string{"reason"}),
		TTLClamps: f.NewCounterVec(prometheus.CounterOpts{
			Name: "meshca_ttl_clamps_total",
			Help: "Requested certificate lifetimes clamped into the policy's bounds, by bound (min, max).",
		}, []string{"bound"}),
		Issued: f.NewCounterVec(prometheus.CounterOpts{
			Name: "meshca_certificates_issued_total",
			Help: "Leaf certificates issued, by key type.",
		}, []string{"key_type"}),
		Rotations: f.NewCounterVec(prometheus.CounterOpts{
			Name: "meshca_intermediate_rotations_total",
			Help: "Intermediates minted by the backend for meshca's in-memory key, by result (success, failure).",
		}, []string{"result"}),
		UpstreamCalls: f.NewCounterVec(prometheus.CounterOpts{
			Name: "meshca_backend_upstream_calls_total",
			Help: "Calls to an upstream CA (Vault, AWS Private CA) by operation (mint, sign, bundle) and result (success, failure, refused: the upstream answered with a wrong certificate).",
		}, []string{"operation", "result"}),
		UpstreamInFlight: f.NewGauge(prometheus.GaugeOpts{
			Name: "meshca_backend_upstream_in_flight",
			Help: "Leaf signing calls in flight to an upstream CA (direct mode).",
		}),
		Degraded: f.NewGauge(prometheus.GaugeOpts{
			Name: "meshca_backend_degraded",
			Help: "1 while the last call to the upstream CA failed: in intermediate mode leaves are still signed by the current intermediate, in direct mode issuance fails.",
		}),
	}
}

// ExpiryCollector exports meshca_ca_cert_expiry_timestamp_seconds for the
// certificates the CA signs with and trusts, read at scrape time so a
// rotation shows at once. Extra returns more certificates to report (the
// serving certificate) by role; it may be nil.
type ExpiryCollector struct {
	CA    *CA
	Extra func() map[string]*x509.Certificate
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
	st := c.CA.State()
	seen := map[string]bool{}
	if st.Signing != nil {
		chain := st.Signing.chain
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
	for _, r := range st.Roots {
		if !seen[string(r.Raw)] {
			emit("root", r)
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
