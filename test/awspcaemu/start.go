package awspcaemu

import (
	"net/http/httptest"
	"path/filepath"
	"testing"
)

// Start makes an emulator and serves it over plain HTTP on 127.0.0.1 until
// the test ends. Point the SDK at URL with BaseEndpoint.
func Start(tb testing.TB, cfg Config) *Emulator {
	tb.Helper()
	e, err := New(cfg)
	if err != nil {
		tb.Fatalf("awspcaemu: %v", err)
	}
	srv := httptest.NewServer(e) // httptest listens on 127.0.0.1 only
	tb.Cleanup(srv.Close)
	e.url = srv.URL
	return e
}

// SetCredentials gives the AWS SDK's default chain, in this test and in
// the processes it starts, static credentials from the environment, and
// keeps it from reading the user's AWS files or an instance's metadata.
// The emulator checks that requests are signed, not with what.
func SetCredentials(t *testing.T) {
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
