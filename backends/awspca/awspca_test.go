package awspca_test

import (
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/meshca/meshca/backends/awspca"
	"github.com/meshca/meshca/backends/backendtest"
	"github.com/meshca/meshca/ca"
	"github.com/meshca/meshca/test/awspcaemu"
)

// emulatorConfig points a Config at the emulator.
func emulatorConfig(e *awspcaemu.Emulator, mode string) awspca.Config {
	return awspca.Config{Mode: mode, Region: e.Region(), CAARN: e.ARN(), Endpoint: e.URL(),
		RequestsPerSecond: 1000, Burst: 100, IssueTimeout: 10 * time.Second}
}

func newBackend(t *testing.T, cfg awspca.Config) ca.Backend {
	t.Helper()
	b, err := awspca.New(t.Context(), cfg, awspca.Deps{})
	require.NoError(t, err)
	return b
}

func TestEmulatorConformanceDirect(t *testing.T) {
	awspcaemu.SetCredentials(t)
	backendtest.Run(t, func(t *testing.T) ca.Backend {
		e := awspcaemu.Start(t, awspcaemu.Config{Subordinate: true})
		cfg := emulatorConfig(e, awspca.ModeDirect)
		cfg.TemplateARN = "arn:aws:acm-pca:::template/" + awspca.TemplateEndEntityAPIPassthrough
		return newBackend(t, cfg)
	})
}

func TestEmulatorConformanceIntermediate(t *testing.T) {
	awspcaemu.SetCredentials(t)
	backendtest.Run(t, func(t *testing.T) ca.Backend {
		e := awspcaemu.Start(t, awspcaemu.Config{Subordinate: true})
		return newBackend(t, emulatorConfig(e, awspca.ModeIntermediate))
	})
}
