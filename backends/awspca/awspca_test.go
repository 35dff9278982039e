package awspca_test

import (
	"path/filepath"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/meshca/meshca/backends/awspca"
	"github.com/meshca/meshca/backends/backendtest"
	"github.com/meshca/meshca/ca"
	"github.com/meshca/meshca/test/awspcaemu"
)

// awsEnv gives the SDK's default chain static test credentials and keeps
// it away from this machine's AWS files and instance metadata.
func awsEnv(t *testing.T) {
	t.Helper()
	dir := t.TempDir()
	t.Setenv("AWS_ACCESS_KEY_ID", "AKIDEMULATOR")
	t.Setenv("AWS_SECRET_ACCESS_KEY", "emulator-secret")
	t.Setenv("AWS_SESSION_TOKEN", "")
	t.Setenv("AWS_PROFILE", "")
	t.Setenv("AWS_CONFIG_FILE", filepath.Join(dir, "config"))
	t.Setenv("AWS_SHARED_CREDENTIALS_FILE", filepath.Join(dir, "credentials"))
	t.Setenv("AWS_EC2_METADATA_DISABLED", "true")
}

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
	awsEnv(t)
	backendtest.Run(t, func(t *testing.T) ca.Backend {
		e := awspcaemu.Start(t, awspcaemu.Config{Subordinate: true})
		cfg := emulatorConfig(e, awspca.ModeDirect)
		cfg.TemplateARN = "arn:aws:acm-pca:::template/" + awspca.TemplateEndEntityAPIPassthrough
		return newBackend(t, cfg)
	})
}

func TestEmulatorConformanceIntermediate(t *testing.T) {
	awsEnv(t)
	backendtest.Run(t, func(t *testing.T) ca.Backend {
		e := awspcaemu.Start(t, awspcaemu.Config{Subordinate: true})
		return newBackend(t, emulatorConfig(e, awspca.ModeIntermediate))
	})
}
