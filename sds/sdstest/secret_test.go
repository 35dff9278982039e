package sdstest

import (
	"crypto/ecdsa"
	"crypto/rsa"
	"crypto/x509"
	"encoding/base64"
	"encoding/pem"
	"strings"
	"testing"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"github.com/stretchr/testify/require"
	"google.golang.org/protobuf/types/known/anypb"
)

func tlsSecretPEM(name string, chain, key []byte) *tlsv3.Secret {
	return &tlsv3.Secret{Name: name, Type: &tlsv3.Secret_TlsCertificate{TlsCertificate: &tlsv3.TlsCertificate{
		CertificateChain: inlineBytes(chain), PrivateKey: inlineBytes(key),
	}}}
}

func TestValidate(t *testing.T) {
	p := newPKI(t)
	chain, key := p.leaf(t, "P-256")
	chainPEM := certsPEM(chain[0], p.root)
	keyPEM := pkcs8PEM(t, key)
	rsaChain, rsaKey := p.leaf(t, "RSA-2048")
	ecDER, err := x509.MarshalECPrivateKey(key.(*ecdsa.PrivateKey))
	require.NoError(t, err)
	sec1PEM := pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: ecDER})
	ecParams := pem.EncodeToMemory(&pem.Block{Type: "EC PARAMETERS", Bytes: []byte{6, 8, 42, 134, 72, 206, 61, 3, 1, 7}})
	pkcs1PEM := pem.EncodeToMemory(&pem.Block{Type: "RSA PRIVATE KEY", Bytes: x509.MarshalPKCS1PrivateKey(rsaKey.(*rsa.PrivateKey))})
	_, otherKey := p.leaf(t, "P-256")
	corruptKey := pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: []byte("not a key but secret bytes")})

	for _, tc := range []struct {
		name   string
		secret *tlsv3.Secret
		err    string // empty: valid
	}{
		{name: "PKCS8", secret: tlsSecretPEM("default", chainPEM, keyPEM)},
		{name: "SEC1 after EC PARAMETERS", secret: tlsSecretPEM("default", chainPEM, append(ecParams, sec1PEM...))},
		{name: "PKCS1 RSA", secret: tlsSecretPEM("default", certsPEM(rsaChain...), pkcs1PEM)},
		{name: "inline strings", secret: &tlsv3.Secret{Name: "default", Type: &tlsv3.Secret_TlsCertificate{TlsCertificate: &tlsv3.TlsCertificate{
			CertificateChain: &corev3.DataSource{Specifier: &corev3.DataSource_InlineString{InlineString: string(chainPEM)}},
			PrivateKey:       &corev3.DataSource{Specifier: &corev3.DataSource_InlineString{InlineString: string(keyPEM)}},
		}}}},
		{name: "key of another leaf", secret: tlsSecretPEM("default", chainPEM, pkcs8PEM(t, otherKey)), err: "does not match"},
		{name: "root first", secret: tlsSecretPEM("default", certsPEM(p.root, chain[0]), keyPEM), err: "does not match"},
		{name: "chain from a file", secret: &tlsv3.Secret{Name: "default", Type: &tlsv3.Secret_TlsCertificate{TlsCertificate: &tlsv3.TlsCertificate{
			CertificateChain: &corev3.DataSource{Specifier: &corev3.DataSource_Filename{Filename: "/etc/certs/chain.pem"}},
			PrivateKey:       inlineBytes(keyPEM),
		}}}, err: "certificate_chain: not inline"},
		{name: "no key", secret: &tlsv3.Secret{Name: "default", Type: &tlsv3.Secret_TlsCertificate{TlsCertificate: &tlsv3.TlsCertificate{
			CertificateChain: inlineBytes(chainPEM),
		}}}, err: "private_key: missing"},
		{name: "empty chain", secret: tlsSecretPEM("default", nil, keyPEM), err: "certificate_chain: empty"},
		{name: "chain not PEM", secret: tlsSecretPEM("default", chain[0].Raw, keyPEM), err: "no PEM certificate"},
		{name: "chain with text after", secret: tlsSecretPEM("default", append(append([]byte{}, chainPEM...), "junk"...), keyPEM), err: "text after"},
		{name: "key in the chain", secret: tlsSecretPEM("default", append(append([]byte{}, chainPEM...), keyPEM...), keyPEM), err: `"PRIVATE KEY", want CERTIFICATE`},
		{name: "corrupt certificate", secret: tlsSecretPEM("default", pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: []byte{1, 2, 3}}), keyPEM), err: "parse certificate 1"},
		{name: "two keys", secret: tlsSecretPEM("default", chainPEM, append(append([]byte{}, keyPEM...), keyPEM...)), err: "more than one private key"},
		{name: "certificate as key", secret: tlsSecretPEM("default", chainPEM, chainPEM), err: "want a private key"},
		{name: "encrypted key", secret: tlsSecretPEM("default", chainPEM, pem.EncodeToMemory(&pem.Block{Type: "ENCRYPTED PRIVATE KEY", Bytes: []byte{1}})), err: "encrypted"},
		{name: "corrupt key", secret: tlsSecretPEM("default", chainPEM, corruptKey), err: "parse PRIVATE KEY"},
		{name: "roots", secret: rootSecret("ROOTCA", p.root, chain[0])},
		{name: "no roots", secret: &tlsv3.Secret{Name: "ROOTCA", Type: &tlsv3.Secret_ValidationContext{ValidationContext: &tlsv3.CertificateValidationContext{}}}, err: "trusted_ca: missing"},
		{name: "roots not PEM", secret: &tlsv3.Secret{Name: "ROOTCA", Type: &tlsv3.Secret_ValidationContext{ValidationContext: &tlsv3.CertificateValidationContext{
			TrustedCa: inlineBytes([]byte("hello")),
		}}}, err: "no PEM certificate"},
		{name: "no type", secret: &tlsv3.Secret{Name: "default"}, err: "no type"},
		{name: "generic secret", secret: &tlsv3.Secret{Name: "hmac", Type: &tlsv3.Secret_GenericSecret{GenericSecret: &tlsv3.GenericSecret{}}}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := Validate(tc.secret)
			if tc.err == "" {
				require.NoError(t, err)
				return
			}
			require.ErrorContains(t, err, tc.err)
			msg := err.Error()
			require.NotContains(t, msg, "secret bytes")
			require.NotContains(t, msg, base64.StdEncoding.EncodeToString(corruptKey[30:60]))
			require.NotContains(t, msg, "-----BEGIN")
		})
	}
}

func TestParseTLSCertificate(t *testing.T) {
	p := newPKI(t)
	chain, key := p.leaf(t, "P-256")
	gotChain, gotKey, err := ParseTLSCertificate(tlsSecret(t, "default", append(chain, p.root), key))
	require.NoError(t, err)
	require.Len(t, gotChain, 2)
	require.True(t, gotChain[0].Equal(chain[0]))
	require.True(t, gotChain[1].Equal(p.root))
	require.True(t, gotKey.(*ecdsa.PrivateKey).Equal(key))

	_, _, err = ParseTLSCertificate(rootSecret("ROOTCA", p.root))
	require.ErrorContains(t, err, "not a tls_certificate")
	_, err = ParseValidationContext(tlsSecret(t, "default", chain, key))
	require.ErrorContains(t, err, "not a validation_context")
}

func TestDecodeSotW(t *testing.T) {
	p := newPKI(t)
	chain, key := p.leaf(t, "P-256")
	good := tlsSecret(t, "default", chain, key)
	goodAny, err := anypb.New(good)
	require.NoError(t, err)
	rootAny, err := anypb.New(rootSecret("ROOTCA", p.root))
	require.NoError(t, err)
	wrapped, err := anypb.New(&discoveryv3.Resource{Name: "ROOTCA", Resource: rootAny})
	require.NoError(t, err)
	heartbeat, err := anypb.New(&discoveryv3.Resource{Name: "default"})
	require.NoError(t, err)
	node, err := anypb.New(&corev3.Node{Id: "x"})
	require.NoError(t, err)
	nameless, err := anypb.New(&tlsv3.Secret{Type: good.Type})
	require.NoError(t, err)

	secrets, names, errs := decodeSotW(&discoveryv3.DiscoveryResponse{TypeUrl: TypeURL, Resources: []*anypb.Any{goodAny, wrapped, heartbeat}})
	require.Empty(t, errs)
	require.Equal(t, []string{"default", "ROOTCA"}, names)
	require.Len(t, secrets, 2)

	for _, tc := range []struct {
		name string
		resp *discoveryv3.DiscoveryResponse
		err  string
	}{
		{name: "response type", resp: &discoveryv3.DiscoveryResponse{TypeUrl: "type.googleapis.com/envoy.config.cluster.v3.Cluster", Resources: []*anypb.Any{goodAny}}, err: "response type_url"},
		{name: "resource type", resp: &discoveryv3.DiscoveryResponse{TypeUrl: TypeURL, Resources: []*anypb.Any{node}}, err: "resource 0: type_url"},
		{name: "twice", resp: &discoveryv3.DiscoveryResponse{TypeUrl: TypeURL, Resources: []*anypb.Any{goodAny, goodAny}}, err: `secret "default" appears twice`},
		{name: "nameless", resp: &discoveryv3.DiscoveryResponse{TypeUrl: TypeURL, Resources: []*anypb.Any{nameless}}, err: "no name"},
		{name: "undecodable", resp: &discoveryv3.DiscoveryResponse{TypeUrl: TypeURL, Resources: []*anypb.Any{{TypeUrl: TypeURL, Value: []byte{0xff}}}}, err: "decode Secret"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, _, errs := decodeSotW(tc.resp)
			require.NotEmpty(t, errs)
			require.Contains(t, errorDetail(errs), tc.err)
		})
	}
}

func TestDecodeDelta(t *testing.T) {
	p := newPKI(t)
	chain, key := p.leaf(t, "P-256")
	goodAny, err := anypb.New(tlsSecret(t, "default", chain, key))
	require.NoError(t, err)

	secrets, names, removed, errs := decodeDelta(&discoveryv3.DeltaDiscoveryResponse{
		TypeUrl:              TypeURL,
		Resources:            []*discoveryv3.Resource{{Name: "default", Version: "v7", Resource: goodAny}, {Name: "ROOTCA"}},
		RemovedResources:     []string{"old"},
		RemovedResourceNames: []*discoveryv3.ResourceName{{Name: "older"}},
	})
	require.Empty(t, errs)
	require.Equal(t, []string{"default", "ROOTCA"}, names)
	require.Equal(t, []string{"old", "older"}, removed)
	require.Len(t, secrets, 1)
	require.Equal(t, "v7", secrets[0].version)

	_, _, _, errs = decodeDelta(&discoveryv3.DeltaDiscoveryResponse{
		TypeUrl:   TypeURL,
		Resources: []*discoveryv3.Resource{{Name: "other", Resource: goodAny}, {Resource: goodAny}},
	})
	require.Len(t, errs, 2)
	require.Contains(t, errorDetail(errs), `resource "other" holds secret "default"`)
	require.Contains(t, errorDetail(errs), "resource 1 has no name")
}

func TestNewChecksConfig(t *testing.T) {
	_, err := New(Config{Names: []string{"default"}})
	require.ErrorContains(t, err, "Conn is required")
	srv := newSDSServer(t)
	conn := srv.dial(t)
	_, err = New(Config{Conn: conn})
	require.ErrorContains(t, err, "no secret names")
	_, err = New(Config{Conn: conn, Names: []string{"default", ""}})
	require.ErrorContains(t, err, "empty secret name")

	c, err := New(Config{Conn: conn, Names: []string{"default", "ROOTCA", "default"}})
	require.NoError(t, err)
	st := c.State()
	require.Equal(t, []string{"default", "ROOTCA"}, st.Names)
	require.Equal(t, 100*time.Millisecond, c.cfg.BackoffBase)
	require.Equal(t, 5*time.Second, c.cfg.BackoffMax)
	require.Equal(t, "sdstest", c.cfg.Node.GetId())
	require.False(t, st.Connected)
	require.Nil(t, st.LastError)
	require.Contains(t, st.String(), "streams=0")
}

func TestBackoffGrowsWithJitterUpToMax(t *testing.T) {
	c := &Client{cfg: Config{BackoffBase: 100 * time.Millisecond, BackoffMax: 5 * time.Second}}
	for attempt, limit := range []time.Duration{100, 200, 400, 800, 1600, 3200, 5000, 5000} {
		limit *= time.Millisecond
		var top time.Duration
		for range 200 {
			d := c.backoff(attempt)
			require.GreaterOrEqual(t, d, time.Duration(0))
			require.Less(t, d, limit, "attempt %d", attempt)
			top = max(top, d)
		}
		require.Greater(t, top, limit/2, "attempt %d: jitter spans the range", attempt)
	}
	require.Less(t, c.backoff(1000), 5*time.Second)
}

func TestHistoryKeepsTheNewest(t *testing.T) {
	c := &Client{cfg: Config{History: 3}}
	for i := range 5 {
		c.recordLocked(Event{Stream: i, Accepted: i%2 == 0, Replied: true})
	}
	st := c.stateLocked()
	require.Equal(t, []int{2, 3, 4}, []int{st.Events[0].Stream, st.Events[1].Stream, st.Events[2].Stream})
	require.Equal(t, 4, st.Last.Stream)
	require.Equal(t, 3, st.ACKs)
	require.Equal(t, 2, st.NACKs)
	require.Equal(t, 5, st.Responses)

	c = &Client{}
	c.recordLocked(Event{Stream: 1})
	st = c.stateLocked()
	require.Empty(t, st.Events, "no history by default")
	require.Equal(t, 1, st.Last.Stream)
	require.True(t, strings.Contains(st.String(), "responses=1"))
}
