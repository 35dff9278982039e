package awspca_test

import (
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/meshca/meshca/backends/awspca"
	"github.com/meshca/meshca/ca"
)

func TestConfigValidate(t *testing.T) {
	const arn = "arn:aws:acm-pca:us-east-1:111122223333:certificate-authority/11111111-2222-3333-4444-555555555555"
	for _, tc := range []struct {
		name string
		cfg  awspca.Config
		want []string // dotted paths in the error; none means valid
	}{
		{name: "minimal", cfg: awspca.Config{Region: "us-east-1", CAARN: arn}},
		{name: "direct with passthrough", cfg: awspca.Config{Mode: "direct", Region: "us-east-1", CAARN: arn,
			TemplateARN: "arn:aws:acm-pca:::template/EndEntityCertificate_APIPassthrough/V1", SigningAlgorithm: "SHA384WITHECDSA"}},
		{name: "empty", cfg: awspca.Config{}, want: []string{"backend.awsPCA.region", "backend.awsPCA.caARN"}},
		{name: "region differs from the ARN's", cfg: awspca.Config{Region: "eu-west-1", CAARN: arn}, want: []string{"backend.awsPCA.region"}},
		{name: "not a CA ARN", cfg: awspca.Config{Region: "us-east-1", CAARN: "arn:aws:acm:us-east-1:111122223333:certificate/x"}, want: []string{"backend.awsPCA.caARN"}},
		{name: "everything wrong", cfg: awspca.Config{
			Mode: "proxy", Region: "Virginia", CAARN: arn, SigningAlgorithm: "MD5WITHRSA",
			TemplateARN: "template/x", Endpoint: "ftp://x", IntermediateSettings: ca.IntermediateSettings{IntermediateTTL: time.Minute, IntermediateRenewFraction: 1,
				IntermediateKeyType: "DSA"}, RequestsPerSecond: -1, Burst: -1, IssueTimeout: time.Millisecond, TrustDomain: "not a domain",
		}, want: []string{"backend.awsPCA.mode", "backend.awsPCA.region", "backend.awsPCA.signingAlgorithm", "backend.awsPCA.templateARN",
			"backend.awsPCA.endpoint", "backend.awsPCA.intermediateTTL", "backend.awsPCA.intermediateRenewFraction",
			"backend.awsPCA.intermediateKeyType", "backend.awsPCA.requestsPerSecond", "backend.awsPCA.burst",
			"backend.awsPCA.issueTimeout", "backend.awsPCA.trustDomain"}},
		{name: "end-entity template in intermediate mode", cfg: awspca.Config{Region: "us-east-1", CAARN: arn,
			TemplateARN: "arn:aws:acm-pca:::template/EndEntityCertificate/V1"}, want: []string{"backend.awsPCA.templateARN"}},
		{name: "subordinate template in direct mode", cfg: awspca.Config{Mode: "direct", Region: "us-east-1", CAARN: arn,
			TemplateARN: "arn:aws:acm-pca:::template/SubordinateCACertificate_PathLen0/V1"}, want: []string{"backend.awsPCA.templateARN"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := tc.cfg.Validate()
			if len(tc.want) == 0 {
				require.NoError(t, err)
				return
			}
			require.Error(t, err)
			for _, w := range tc.want {
				require.ErrorContains(t, err, w+":")
			}
		})
	}
}

func TestConfigIntermediateConfigDefaults(t *testing.T) {
	ic := awspca.Config{TrustDomain: "cluster.local"}.IntermediateConfig()
	require.Equal(t, awspca.DefaultIntermediateTTL, ic.TTL)
	require.Equal(t, awspca.DefaultIntermediateRenewFraction, ic.RenewFraction)
	require.Equal(t, awspca.DefaultIntermediateKeyType, ic.KeyType)
	require.Equal(t, "meshca intermediate for cluster.local", ic.Subject.CommonName)
}
