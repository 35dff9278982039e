package awspcaemu

import (
	"net/http/httptest"
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
