package kube

import (
	"errors"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"

	"github.com/meshca/meshca/authn"
)

func TestRedact(t *testing.T) {
	tests := []struct {
		name string
		err  error
		want string
	}{
		{name: "no token", err: errors.New("connection refused"), want: "connection refused"},
		{name: "token echoed", err: errors.New("bad request: s3cr3t.tok.en is invalid"), want: "bad request: [token] is invalid"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			require.EqualError(t, redact(tt.err, "s3cr3t.tok.en"), tt.want)
		})
	}
}

func TestNewTokenReviewConfig(t *testing.T) {
	client, err := kubernetes.NewForConfig(&rest.Config{Host: "http://127.0.0.1:1"})
	require.NoError(t, err)
	tests := []struct {
		name    string
		cfg     TokenReviewConfig
		wantErr string
	}{
		{name: "no client", cfg: TokenReviewConfig{TrustDomain: testTD}, wantErr: "Client is required"},
		{name: "no trust domain", cfg: TokenReviewConfig{Client: client}, wantErr: "TrustDomain is required"},
		{name: "negative skew", cfg: TokenReviewConfig{Client: client, TrustDomain: testTD, Skew: -1}, wantErr: "must not be negative"},
		{name: "negative MaxInFlight", cfg: TokenReviewConfig{Client: client, TrustDomain: testTD, MaxInFlight: -1}, wantErr: "must not be negative"},
		{name: "ok", cfg: TokenReviewConfig{Client: client, TrustDomain: testTD}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r, err := NewTokenReview(tt.cfg)
			if tt.wantErr != "" {
				require.ErrorContains(t, err, tt.wantErr)
				return
			}
			require.NoError(t, err)
			require.Equal(t, []string{"istio-ca"}, r.audiences)
			require.Equal(t, 30*time.Second, r.skew)
			require.Equal(t, 32, cap(r.slots))
			_, err = r.Authenticate(t.Context(), authn.Credentials{})
			require.ErrorIs(t, err, authn.ErrNoCredentials)
		})
	}
}
