package awspcaemu_test

import (
	"crypto/x509"
	"encoding/pem"
	"errors"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/credentials"
	"github.com/aws/aws-sdk-go-v2/service/acmpca"
	"github.com/aws/aws-sdk-go-v2/service/acmpca/types"
	"github.com/aws/smithy-go"
	"github.com/stretchr/testify/require"

	"github.com/meshca/meshca/ca/catest"
	"github.com/meshca/meshca/test/awspcaemu"
)

// client is the real SDK pointed at e, with retries off so each fault shows.
func client(e *awspcaemu.Emulator) *acmpca.Client {
	return acmpca.New(acmpca.Options{
		Region:       e.Region(),
		BaseEndpoint: aws.String(e.URL()),
		Credentials:  credentials.NewStaticCredentialsProvider("AKIDEMULATOR", "secret", ""),
		Retryer:      aws.NopRetryer{},
	})
}

func issue(t *testing.T, e *awspcaemu.Emulator, c *acmpca.Client, edit func(*acmpca.IssueCertificateInput)) (*x509.Certificate, error) {
	t.Helper()
	csr := catest.CSRPEM(t, catest.Key(t, "P-256"), nil, "spiffe://csr.example/x")
	in := &acmpca.IssueCertificateInput{
		CertificateAuthorityArn: aws.String(e.ARN()), Csr: csr, SigningAlgorithm: types.SigningAlgorithmSha256withecdsa,
		Validity: &types.Validity{Type: types.ValidityPeriodTypeDays, Value: aws.Int64(1)},
	}
	if edit != nil {
		edit(in)
	}
	out, err := c.IssueCertificate(t.Context(), in)
	if err != nil {
		return nil, err
	}
	got, err := c.GetCertificate(t.Context(), &acmpca.GetCertificateInput{CertificateAuthorityArn: aws.String(e.ARN()), CertificateArn: out.CertificateArn})
	if err != nil {
		return nil, err
	}
	block, _ := pem.Decode([]byte(aws.ToString(got.Certificate)))
	require.NotNil(t, block)
	cert, err := x509.ParseCertificate(block.Bytes)
	require.NoError(t, err)
	return cert, nil
}

func code(err error) string {
	var apiErr smithy.APIError
	if errors.As(err, &apiErr) {
		return apiErr.ErrorCode()
	}
	return ""
}

func TestEmulatorValidityTypes(t *testing.T) {
	e := awspcaemu.Start(t, awspcaemu.Config{CAValidity: 10 * 365 * 24 * time.Hour})
	c := client(e)
	now := time.Now()
	for _, tc := range []struct {
		name  string
		v     types.Validity
		want  time.Time
		slack time.Duration
	}{
		{name: "ABSOLUTE", v: types.Validity{Type: types.ValidityPeriodTypeAbsolute, Value: aws.Int64(now.Add(time.Hour).Unix())}, want: now.Add(time.Hour).Truncate(time.Second)},
		{name: "DAYS", v: types.Validity{Type: types.ValidityPeriodTypeDays, Value: aws.Int64(3)}, want: now.AddDate(0, 0, 3), slack: 5 * time.Second},
		{name: "MONTHS", v: types.Validity{Type: types.ValidityPeriodTypeMonths, Value: aws.Int64(2)}, want: now.AddDate(0, 2, 0), slack: 5 * time.Second},
		{name: "YEARS", v: types.Validity{Type: types.ValidityPeriodTypeYears, Value: aws.Int64(1)}, want: now.AddDate(1, 0, 0), slack: 5 * time.Second},
		{name: "END_DATE GeneralizedTime", v: types.Validity{Type: types.ValidityPeriodTypeEndDate, Value: aws.Int64(20300102030405)}, want: time.Date(2030, 1, 2, 3, 4, 5, 0, time.UTC)},
		{name: "END_DATE UTCTime", v: types.Validity{Type: types.ValidityPeriodTypeEndDate, Value: aws.Int64(300102030405)}, want: time.Date(2030, 1, 2, 3, 4, 5, 0, time.UTC)},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cert, err := issue(t, e, c, func(in *acmpca.IssueCertificateInput) { in.Validity = &tc.v })
			require.NoError(t, err)
			require.WithinDuration(t, tc.want, cert.NotAfter, tc.slack)
			require.WithinDuration(t, now.Add(-time.Hour), cert.NotBefore, 5*time.Second, "AWS back-dates NotBefore by an hour")
		})
	}
}

func TestEmulatorEndEntityTemplates(t *testing.T) {
	e := awspcaemu.Start(t, awspcaemu.Config{Subordinate: true})
	c := client(e)
	notBefore := time.Now().Truncate(time.Second)
	cert, err := issue(t, e, c, func(in *acmpca.IssueCertificateInput) {
		in.ValidityNotBefore = &types.Validity{Type: types.ValidityPeriodTypeAbsolute, Value: aws.Int64(notBefore.Unix())}
	})
	require.NoError(t, err)
	require.True(t, cert.NotBefore.Equal(notBefore))
	require.Equal(t, "spiffe://csr.example/x", cert.URIs[0].String(), "V1 copies the CSR's SANs")
	require.Equal(t, x509.KeyUsageDigitalSignature|x509.KeyUsageKeyEncipherment, cert.KeyUsage)
	require.Equal(t, []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth}, cert.ExtKeyUsage)
	require.False(t, cert.IsCA)
	require.NoError(t, cert.CheckSignatureFrom(e.CACertificate()))

	cert, err = issue(t, e, c, func(in *acmpca.IssueCertificateInput) {
		in.TemplateArn = aws.String("arn:aws:acm-pca:::template/" + awspcaemu.TemplateEndEntityPassthrough)
		in.ApiPassthrough = &types.ApiPassthrough{Extensions: &types.Extensions{SubjectAlternativeNames: []types.GeneralName{
			{UniformResourceIdentifier: aws.String("spiffe://api.example/y")}}}}
	})
	require.NoError(t, err)
	require.Len(t, cert.URIs, 1)
	require.Equal(t, "spiffe://api.example/y", cert.URIs[0].String(), "API passthrough wins over the CSR")

	cert, err = issue(t, e, c, func(in *acmpca.IssueCertificateInput) {
		in.TemplateArn = aws.String("arn:aws:acm-pca:::template/" + awspcaemu.TemplateSubordinatePathLen0)
	})
	require.NoError(t, err)
	require.True(t, cert.IsCA)
	require.True(t, cert.MaxPathLenZero)
	require.NotZero(t, cert.KeyUsage&x509.KeyUsageCertSign)
}

func TestEmulatorRefusals(t *testing.T) {
	e := awspcaemu.Start(t, awspcaemu.Config{CAValidity: 48 * time.Hour})
	c := client(e)
	for _, tc := range []struct {
		name string
		edit func(*acmpca.IssueCertificateInput)
		code string
	}{
		{name: "past the CA", edit: func(in *acmpca.IssueCertificateInput) {
			in.Validity = &types.Validity{Type: types.ValidityPeriodTypeDays, Value: aws.Int64(3)}
		}, code: "ValidationException"},
		{name: "RSA algorithm on an EC CA", edit: func(in *acmpca.IssueCertificateInput) {
			in.SigningAlgorithm = types.SigningAlgorithmSha256withrsa
		}, code: "InvalidArgsException"},
		{name: "malformed CSR", edit: func(in *acmpca.IssueCertificateInput) { in.Csr = []byte("not a CSR") }, code: "MalformedCSRException"},
		{name: "unknown CA", edit: func(in *acmpca.IssueCertificateInput) {
			in.CertificateAuthorityArn = aws.String(strings.TrimSuffix(e.ARN(), e.ARN()[len(e.ARN())-12:]) + "000000000000")
		}, code: "ResourceNotFoundException"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := issue(t, e, c, tc.edit)
			require.Equal(t, tc.code, code(err), "%v", err)
		})
	}

	e.SetStatus(awspcaemu.StatusDisabled)
	_, err := issue(t, e, c, nil)
	require.Equal(t, "InvalidStateException", code(err))
	e.SetStatus(awspcaemu.StatusActive)

	e.SetUsageMode(awspcaemu.UsageShortLived)
	_, err = issue(t, e, c, func(in *acmpca.IssueCertificateInput) {
		in.TemplateArn = aws.String("arn:aws:acm-pca:::template/" + awspcaemu.TemplateSubordinatePathLen0)
	})
	require.Equal(t, "ValidationException", code(err), "a short-lived CA is the last in its hierarchy")
}

func TestEmulatorFaults(t *testing.T) {
	e := awspcaemu.Start(t, awspcaemu.Config{})
	c := client(e)
	e.Throttle(1)
	_, err := issue(t, e, c, nil)
	require.Equal(t, "ThrottlingException", code(err))
	e.InProgress(1)
	_, err = issue(t, e, c, nil)
	var inProgress *types.RequestInProgressException
	require.ErrorAs(t, err, &inProgress)
	_, err = issue(t, e, c, nil)
	require.NoError(t, err)
	require.Equal(t, 3, e.Calls(awspcaemu.OpIssueCertificate))
	require.Equal(t, 2, e.Calls(awspcaemu.OpGetCertificate))
}

func TestEmulatorIdempotencyToken(t *testing.T) {
	e := awspcaemu.Start(t, awspcaemu.Config{})
	c := client(e)
	csr := catest.CSRPEM(t, catest.Key(t, "P-256"), nil)
	in := &acmpca.IssueCertificateInput{CertificateAuthorityArn: aws.String(e.ARN()), Csr: csr,
		SigningAlgorithm: types.SigningAlgorithmSha256withecdsa, IdempotencyToken: aws.String("token-1"),
		Validity: &types.Validity{Type: types.ValidityPeriodTypeDays, Value: aws.Int64(1)}}
	a, err := c.IssueCertificate(t.Context(), in)
	require.NoError(t, err)
	b, err := c.IssueCertificate(t.Context(), in)
	require.NoError(t, err)
	require.Equal(t, aws.ToString(a.CertificateArn), aws.ToString(b.CertificateArn))
}

func TestEmulatorRequiresSigV4(t *testing.T) {
	e := awspcaemu.Start(t, awspcaemu.Config{})
	req, err := http.NewRequestWithContext(t.Context(), http.MethodPost, e.URL()+"/", strings.NewReader("{}"))
	require.NoError(t, err)
	req.Header.Set("X-Amz-Target", "ACMPrivateCA.DescribeCertificateAuthority")
	req.Header.Set("Content-Type", "application/x-amz-json-1.1")
	resp, err := http.DefaultClient.Do(req)
	require.NoError(t, err)
	defer resp.Body.Close()
	require.Equal(t, http.StatusForbidden, resp.StatusCode)

	wrongRegion := acmpca.New(acmpca.Options{Region: "eu-west-1", BaseEndpoint: aws.String(e.URL()),
		Credentials: credentials.NewStaticCredentialsProvider("AKID", "secret", ""), Retryer: aws.NopRetryer{}})
	_, err = wrongRegion.DescribeCertificateAuthority(t.Context(), &acmpca.DescribeCertificateAuthorityInput{CertificateAuthorityArn: aws.String(e.ARN())})
	require.Equal(t, "InvalidSignatureException", code(err))
}

func TestEmulatorDescribeAndCACertificate(t *testing.T) {
	e := awspcaemu.Start(t, awspcaemu.Config{KeyAlgorithm: awspcaemu.KeyRSA2048, Subordinate: true, UsageMode: awspcaemu.UsageShortLived})
	c := client(e)
	d, err := c.DescribeCertificateAuthority(t.Context(), &acmpca.DescribeCertificateAuthorityInput{CertificateAuthorityArn: aws.String(e.ARN())})
	require.NoError(t, err)
	ca := d.CertificateAuthority
	require.Equal(t, types.CertificateAuthorityStatusActive, ca.Status)
	require.Equal(t, types.KeyAlgorithmRsa2048, ca.CertificateAuthorityConfiguration.KeyAlgorithm)
	require.Equal(t, types.CertificateAuthorityUsageModeShortLivedCertificate, ca.UsageMode)
	require.Equal(t, types.CertificateAuthorityTypeSubordinate, ca.Type)
	require.WithinDuration(t, e.CACertificate().NotAfter, aws.ToTime(ca.NotAfter), time.Second)

	g, err := c.GetCertificateAuthorityCertificate(t.Context(), &acmpca.GetCertificateAuthorityCertificateInput{CertificateAuthorityArn: aws.String(e.ARN())})
	require.NoError(t, err)
	block, _ := pem.Decode([]byte(aws.ToString(g.Certificate)))
	require.Equal(t, e.CACertificate().Raw, block.Bytes)
	block, _ = pem.Decode([]byte(aws.ToString(g.CertificateChain)))
	require.Equal(t, e.Root().Raw, block.Bytes)
}
