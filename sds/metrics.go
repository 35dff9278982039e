package sds

import (
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promauto"
)

// Metrics are the SDS server's Prometheus metrics. Every metric is
// documented in README.md. The gauges that describe connected proxies
// (streams by mode, earliest expiry, stale bundles) are computed at scrape
// time by the Server, which registers itself as a collector.
type Metrics struct {
	// Pushes counts secrets sent, by resource ("default", "ROOTCA",
	// "spiffe_id", "trust_domain").
	Pushes *prometheus.CounterVec
	// NACKs counts responses proxies rejected.
	NACKs prometheus.Counter
	// Refusals counts resource names a stream asked for and was not
	// served, by reason ("not_authorized": another workload's identity or
	// trust domain; "unknown_name").
	Refusals *prometheus.CounterVec
	// PushDelay is the time from a certificate's renewal point to the push
	// of its replacement.
	PushDelay prometheus.Histogram
	// Shed counts streams refused because the server was at a limit, by
	// limit ("streams").
	Shed *prometheus.CounterVec

	reg prometheus.Registerer
}

// NewMetrics creates the SDS metrics on reg (nil: unregistered).
func NewMetrics(reg prometheus.Registerer) *Metrics {
	f := promauto.With(reg)
	return &Metrics{
		reg: reg,
		Pushes: f.NewCounterVec(prometheus.CounterOpts{
			Name: "meshca_sds_pushes_total",
			Help: "Secrets sent to proxies, by resource (default, ROOTCA, spiffe_id, trust_domain).",
		}, []string{"resource"}),
		NACKs: f.NewCounter(prometheus.CounterOpts{
			Name: "meshca_sds_nacks_total",
			Help: "SDS responses proxies rejected (NACKed).",
		}),
		Refusals: f.NewCounterVec(prometheus.CounterOpts{
			Name: "meshca_sds_refusals_total",
			Help: "Resource names a stream asked for and was not served, by reason (not_authorized, unknown_name).",
		}, []string{"reason"}),
		PushDelay: f.NewHistogram(prometheus.HistogramOpts{
			Name:    "meshca_sds_push_delay_seconds",
			Help:    "Time from a certificate's renewal point to the push of its replacement.",
			Buckets: []float64{.001, .005, .01, .05, .1, .5, 1, 5, 10, 30, 60, 300},
		}),
		Shed: f.NewCounterVec(prometheus.CounterOpts{
			Name: "meshca_sds_shed_total",
			Help: "SDS streams refused because the server was at a limit, by limit.",
		}, []string{"limit"}),
	}
}

// descs are the scrape-time gauges' descriptions.
type descs struct {
	streams, earliestExpiry, staleBundle *prometheus.Desc
}

func newDescs() descs {
	return descs{
		streams: prometheus.NewDesc("meshca_sds_streams",
			"Open SDS streams, by mode (central, agent).", []string{"mode"}, nil),
		earliestExpiry: prometheus.NewDesc("meshca_sds_earliest_expiry_seconds",
			"Seconds until the earliest expiry among the certificates connected proxies last accepted (absent when none).", nil, nil),
		staleBundle: prometheus.NewDesc("meshca_sds_stale_bundle_proxies",
			"Open streams that subscribe to a trust bundle and whose last accepted bundle is not the current one.", nil, nil),
	}
}
