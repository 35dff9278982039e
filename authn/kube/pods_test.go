package kube

import (
	"context"
	"crypto/x509"
	"testing"

	"github.com/stretchr/testify/require"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
)

// TestNewTrustedNodeAgents checks that New builds the pod watch and the
// node authorizer only for trusted node agents, and only with a client.
func TestNewTrustedNodeAgents(t *testing.T) {
	rc := &rest.Config{Host: "http://127.0.0.1:1"}
	cs, err := kubernetes.NewForConfig(rc)
	require.NoError(t, err)
	client := &Client{Rest: rc, Interface: cs, Watch: cs}
	base := Config{Chain: []string{NameClientCert}, TrustDomain: testTD}
	roots := func(context.Context) ([]*x509.Certificate, error) { return nil, nil }

	a, err := New(t.Context(), base, Deps{Client: client, Roots: roots})
	require.NoError(t, err)
	require.Nil(t, a.Pods, "no trusted node agents: no pod watch")
	require.Nil(t, a.Impersonation)

	withAgents := base
	withAgents.TrustedNodeAgents = []string{"istio-system/ztunnel"}
	a, err = New(t.Context(), withAgents, Deps{Client: client, Roots: roots})
	require.NoError(t, err)
	require.NotNil(t, a.Pods)
	require.NotNil(t, a.Impersonation)

	_, err = New(t.Context(), withAgents, Deps{Roots: roots})
	require.ErrorContains(t, err, "authn.trustedNodeAgents needs a kube client")

	bad := base
	bad.TrustedNodeAgents = []string{"ztunnel"}
	_, err = New(t.Context(), bad, Deps{Client: client, Roots: roots})
	require.ErrorContains(t, err, `authn.trustedNodeAgents: node authorizer: trusted node agent "ztunnel": want namespace/serviceaccount`)
}
