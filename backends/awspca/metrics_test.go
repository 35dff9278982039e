package awspca_test

import (
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/stretchr/testify/require"

	"github.com/meshca/meshca/backends/awspca"
	"github.com/meshca/meshca/backends/backendtest"
	"github.com/meshca/meshca/ca"
	"github.com/meshca/meshca/test/awspcaemu"
)

func TestEmulatorMetricsCountThrottling(t *testing.T) {
	awspcaemu.SetCredentials(t)
	e := awspcaemu.Start(t, awspcaemu.Config{})
	cfg := emulatorConfig(e, awspca.ModeDirect)
	cfg.TemplateARN = passthroughTemplate
	reg := prometheus.NewPedanticRegistry()
	b, err := awspca.New(t.Context(), cfg, awspca.Deps{Registerer: reg})
	require.NoError(t, err)
	h := backendtest.NewHeld(t, b, ca.Config{})
	e.Throttle(1)
	_, err = signLeaf(t, h)
	require.NoError(t, err)
	n, err := testutil.GatherAndCount(reg, "meshca_awspca_requests_total", "meshca_awspca_issue_duration_seconds")
	require.NoError(t, err)
	require.Positive(t, n)
	require.NoError(t, testutil.GatherAndCompare(reg, stringsReader(`
# HELP meshca_awspca_requests_total HTTP attempts to AWS Private CA, retries and waiter polls included, by operation and result (success, throttled, in_progress, rejected, unreachable, rate_limited).
# TYPE meshca_awspca_requests_total counter
meshca_awspca_requests_total{operation="DescribeCertificateAuthority",result="success"} 1
meshca_awspca_requests_total{operation="GetCertificate",result="success"} 1
meshca_awspca_requests_total{operation="GetCertificateAuthorityCertificate",result="success"} 2
meshca_awspca_requests_total{operation="IssueCertificate",result="success"} 1
meshca_awspca_requests_total{operation="IssueCertificate",result="throttled"} 1
`), "meshca_awspca_requests_total"))
}

func BenchmarkEmulatorIssue(b *testing.B) {
	for _, mode := range []string{awspca.ModeDirect, awspca.ModeIntermediate} {
		b.Run(mode, func(b *testing.B) {
			b.Setenv("AWS_ACCESS_KEY_ID", "AKIDEMULATOR")
			b.Setenv("AWS_SECRET_ACCESS_KEY", "emulator-secret")
			b.Setenv("AWS_EC2_METADATA_DISABLED", "true")
			b.Setenv("AWS_CONFIG_FILE", b.TempDir()+"/config")
			b.Setenv("AWS_SHARED_CREDENTIALS_FILE", b.TempDir()+"/credentials")
			e := awspcaemu.Start(b, awspcaemu.Config{Subordinate: true})
			cfg := emulatorConfig(e, mode)
			if mode == awspca.ModeDirect {
				cfg.TemplateARN = passthroughTemplate
			}
			bk, err := awspca.New(b.Context(), cfg, awspca.Deps{})
			require.NoError(b, err)
			c, err := ca.New(b.Context(), ca.Config{Backend: bk, Intermediate: cfg.IntermediateConfig()})
			require.NoError(b, err)
			csr := csrFor(b)
			b.ResetTimer()
			for b.Loop() {
				if _, err := c.Sign(b.Context(), signRequest(csr)); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
