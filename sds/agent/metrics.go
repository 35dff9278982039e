package agent

import (
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promauto"
)

// metrics are a Keeper's metrics; the package doc lists them.
type metrics struct {
	expiry   prometheus.Gauge
	renewAt  prometheus.Gauge
	renewals *prometheus.CounterVec
	roots    prometheus.Gauge
}

func newMetrics(reg prometheus.Registerer, k *Keeper) *metrics {
	f := promauto.With(reg)
	m := &metrics{
		expiry: f.NewGauge(prometheus.GaugeOpts{
			Name: "meshca_agent_certificate_expiry_timestamp_seconds",
			Help: "NotAfter of the workload certificate the agent serves, in Unix seconds; 0 before the first.",
		}),
		renewAt: f.NewGauge(prometheus.GaugeOpts{
			Name: "meshca_agent_certificate_renew_timestamp_seconds",
			Help: "When the agent renews the workload certificate it serves, in Unix seconds; 0 before the first.",
		}),
		renewals: f.NewCounterVec(prometheus.CounterOpts{
			Name: "meshca_agent_renewals_total",
			Help: "Finished certificate renewal attempts, by result (success, failure).",
		}, []string{"result"}),
		roots: f.NewGauge(prometheus.GaugeOpts{
			Name: "meshca_agent_trust_bundle_roots",
			Help: "Roots in the trust bundle the agent serves.",
		}),
	}
	// Both series exist from the start, so a rate over them is defined
	// before the first failure.
	m.renewals.WithLabelValues("success")
	m.renewals.WithLabelValues("failure")
	f.NewGaugeFunc(prometheus.GaugeOpts{
		Name: "meshca_agent_ready",
		Help: "1 while the agent holds a valid, unexpired workload certificate, else 0.",
	}, func() float64 {
		if k.Ready() == nil {
			return 1
		}
		return 0
	})
	return m
}
