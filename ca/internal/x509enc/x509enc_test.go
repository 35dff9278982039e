package x509enc_test

import (
	"crypto"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"encoding/asn1"
	"math/big"
	"net"
	"net/url"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/meshca/meshca/ca/catest"
	"github.com/meshca/meshca/ca/internal/x509enc"
)

// TestTBSMatchesX509 holds the encoder to its one promise: for every CA key
// type, leaf key type and name shape, the TBSCertificate it builds is
// byte-for-byte the one x509.CreateCertificate makes from the equivalent
// template.
func TestTBSMatchesX509(t *testing.T) {
	now := time.Now().UTC().Truncate(time.Second)
	sigAlg := map[string]struct {
		oid    asn1.ObjectIdentifier
		params asn1.RawValue
	}{
		"P-256":    {oid: x509enc.OIDSignatureECDSAWithSHA256},
		"P-384":    {oid: x509enc.OIDSignatureECDSAWithSHA384},
		"RSA-2048": {oid: x509enc.OIDSignatureSHA256WithRSA, params: asn1.NullRawValue},
		"Ed25519":  {oid: x509enc.OIDSignatureEd25519},
	}
	uri, err := url.Parse("spiffe://cluster.local/ns/default/sa/web")
	require.NoError(t, err)
	shapes := []struct {
		name string
		uri  *url.URL
		dns  []string
		ips  []net.IP
	}{
		{name: "spiffe-id", uri: uri},
		{name: "dns-ip", dns: []string{"meshca.meshca-system.svc"}, ips: []net.IP{net.ParseIP("10.0.0.7"), net.ParseIP("fd00::7")}},
		{name: "all", uri: uri, dns: []string{"localhost"}, ips: []net.IP{net.IPv4(127, 0, 0, 1)}},
	}
	times := [][2]time.Time{
		{now, now.Add(time.Hour)},
		{time.Date(2049, 12, 31, 23, 59, 59, 0, time.UTC), time.Date(2050, 1, 1, 0, 0, 0, 0, time.UTC)}, // UTCTime to GeneralizedTime
	}
	leafKeys := map[string]crypto.Signer{}
	for kt := range sigAlg {
		leafKeys[kt] = catest.Key(t, kt)
	}
	for caType, alg := range sigAlg {
		caKey := catest.Key(t, caType)
		caCert := catest.Issue(t, catest.CATemplate("x509enc CA", now.Add(-time.Hour), time.Date(2060, 1, 1, 0, 0, 0, 0, time.UTC)), caKey, nil, nil)
		enc, err := x509enc.NewIssuer(caCert, alg.oid, alg.params)
		require.NoError(t, err)
		for leafType, leafKey := range leafKeys {
			spki, err := x509.MarshalPKIXPublicKey(leafKey.Public())
			require.NoError(t, err)
			_, isRSA := leafKey.Public().(*rsa.PublicKey)
			for _, shape := range shapes {
				for _, tt := range times {
					t.Run(caType+"/"+leafType+"/"+shape.name+"/"+tt[0].Format("2006"), func(t *testing.T) {
						serial := new(big.Int).Lsh(big.NewInt(1), 127)
						leaf := x509enc.Leaf{Serial: serial, NotBefore: tt[0], NotAfter: tt[1], SPKI: spki, RSA: isRSA,
							DNSNames: shape.dns, IPAddresses: shape.ips}
						tmpl := &x509.Certificate{
							SerialNumber: serial, NotBefore: tt[0], NotAfter: tt[1],
							KeyUsage:              x509.KeyUsageDigitalSignature,
							ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
							BasicConstraintsValid: true, DNSNames: shape.dns, IPAddresses: shape.ips,
						}
						if isRSA {
							tmpl.KeyUsage |= x509.KeyUsageKeyEncipherment
						}
						if shape.uri != nil {
							leaf.URI = shape.uri.String()
							tmpl.URIs = []*url.URL{shape.uri}
						}
						tbs, err := enc.TBS(leaf)
						require.NoError(t, err)
						der, err := x509.CreateCertificate(rand.Reader, tmpl, caCert, leafKey.Public(), caKey)
						require.NoError(t, err)
						want, err := x509.ParseCertificate(der)
						require.NoError(t, err)
						require.Equal(t, want.RawTBSCertificate, tbs)
					})
				}
			}
		}
	}
}

func TestCheckNames(t *testing.T) {
	require.NoError(t, x509enc.CheckNames([]string{"meshca.svc"}, []net.IP{net.IPv4(1, 2, 3, 4).To4(), net.IPv6loopback}))
	require.Error(t, x509enc.CheckNames([]string{"mésh.svc"}, nil))
	require.Error(t, x509enc.CheckNames(nil, []net.IP{{1, 2, 3}}))
}
