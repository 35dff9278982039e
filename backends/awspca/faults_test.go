package awspca_test

import (
	"crypto/x509"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/stretchr/testify/require"

	"github.com/meshca/meshca/backends/awspca"
	"github.com/meshca/meshca/backends/backendtest"
	"github.com/meshca/meshca/ca"
	"github.com/meshca/meshca/ca/catest"
	"github.com/meshca/meshca/test/awspcaemu"
)

var testID = spiffeid.RequireFromString("spiffe://cluster.local/ns/awspca/sa/workload")

const passthroughTemplate = "arn:aws:acm-pca:::template/" + awspca.TemplateEndEntityAPIPassthrough

// directHeld starts an emulator and puts a direct-mode backend on it under
// a CA core, as meshca runs it.
func directHeld(t *testing.T, ecfg awspcaemu.Config, edit func(*awspca.Config)) (*awspcaemu.Emulator, backendtest.Held) {
	t.Helper()
	awspcaemu.SetCredentials(t)
	e := awspcaemu.Start(t, ecfg)
	cfg := emulatorConfig(e, awspca.ModeDirect)
	cfg.TemplateARN = passthroughTemplate
	if edit != nil {
		edit(&cfg)
	}
	return e, backendtest.NewHeld(t, newBackend(t, cfg), ca.Config{})
}

func signLeaf(t *testing.T, h backendtest.Held) (*ca.SignResponse, error) {
	t.Helper()
	now := time.Now()
	return h.Sign(t.Context(), ca.SignRequest{CSR: catest.CSR(t, catest.Key(t, "P-256")), ID: testID,
		NotBefore: now.Add(-30 * time.Second), NotAfter: now.Add(time.Hour)})
}

func TestEmulatorDirectCapsNotAfter(t *testing.T) {
	awspcaemu.SetCredentials(t)
	e := awspcaemu.Start(t, awspcaemu.Config{Subordinate: true, CAValidity: 48 * time.Hour})
	cfg := emulatorConfig(e, awspca.ModeDirect)
	cfg.TemplateARN = passthroughTemplate
	up := newBackend(t, cfg).(*awspca.Upstream)
	notBefore := time.Now().Truncate(time.Second)
	got, err := up.SignLeaf(t.Context(), ca.SignRequest{CSR: catest.CSR(t, catest.Key(t, "P-256")), ID: testID,
		NotBefore: notBefore, NotAfter: notBefore.Add(365 * 24 * time.Hour)})
	require.NoError(t, err)
	require.True(t, got.Leaf.NotAfter.Equal(e.CACertificate().NotAfter), "NotAfter %s, CA's %s", got.Leaf.NotAfter, e.CACertificate().NotAfter)
	require.True(t, got.Leaf.NotBefore.Equal(notBefore))
	require.Equal(t, []*x509.Certificate{e.CACertificate(), e.Root()}, got.Chain)
}

func TestEmulatorDirectDefaultTemplateCopiesCSRNames(t *testing.T) {
	e, h := directHeld(t, awspcaemu.Config{}, func(c *awspca.Config) { c.TemplateARN = "" })
	key := catest.Key(t, "P-256")
	csr, err := x509.ParseCertificateRequest(catest.CSRDER(t, key, nil, testID.String()))
	require.NoError(t, err)
	now := time.Now()
	resp, err := h.Sign(t.Context(), ca.SignRequest{CSR: csr, ID: testID, NotBefore: now, NotAfter: now.Add(time.Hour)})
	require.NoError(t, err)
	leaf, err := x509.ParseCertificate(resp.Leaf)
	require.NoError(t, err)
	require.Equal(t, testID.String(), leaf.URIs[0].String())

	// A CSR without the names: EndEntityCertificate/V1 cannot carry them,
	// so the backend refuses before calling AWS.
	before := e.Calls(awspcaemu.OpIssueCertificate)
	_, err = signLeaf(t, h)
	require.ErrorIs(t, err, ca.ErrInvalidSignRequest)
	require.ErrorContains(t, err, "backend.awsPCA.templateARN")
	require.Equal(t, before, e.Calls(awspcaemu.OpIssueCertificate))
}

func TestEmulatorIntermediateMintsUnderTheCA(t *testing.T) {
	awspcaemu.SetCredentials(t)
	e := awspcaemu.Start(t, awspcaemu.Config{Subordinate: true, CAValidity: 48 * time.Hour})
	a := newBackend(t, emulatorConfig(e, awspca.ModeIntermediate)).(*awspca.Authority)
	key := catest.Key(t, "P-256")
	csr, err := x509.ParseCertificateRequest(catest.CSRDER(t, key, nil))
	require.NoError(t, err)
	m, err := a.MintCA(t.Context(), ca.MintRequest{CSR: csr, TTL: 30 * 24 * time.Hour})
	require.NoError(t, err)
	require.True(t, m.Cert.IsCA)
	require.True(t, m.Cert.MaxPathLenZero)
	require.True(t, m.Cert.NotAfter.Equal(e.CACertificate().NotAfter), "capped at the CA's NotAfter")
	require.Equal(t, []*x509.Certificate{e.CACertificate(), e.Root()}, m.Chain)
	require.Equal(t, []*x509.Certificate{e.Root()}, m.Roots)
	bundle, err := a.TrustBundle(t.Context())
	require.NoError(t, err)
	require.Equal(t, []*x509.Certificate{e.Root()}, bundle)
}

func TestEmulatorStartupValidation(t *testing.T) {
	for _, tc := range []struct {
		name    string
		emu     awspcaemu.Config
		edit    func(*awspca.Config)
		wantErr error
		setting string
	}{
		{name: "CA disabled", emu: awspcaemu.Config{Status: awspcaemu.StatusDisabled}, wantErr: awspca.ErrCAUnusable, setting: "backend.awsPCA.caARN"},
		{name: "signing algorithm does not fit the key", emu: awspcaemu.Config{},
			edit: func(c *awspca.Config) { c.SigningAlgorithm = "SHA256WITHRSA" }, wantErr: awspca.ErrCAUnusable, setting: "backend.awsPCA.signingAlgorithm"},
		{name: "no CA at the ARN", emu: awspcaemu.Config{},
			edit: func(c *awspca.Config) {
				c.CAARN = c.CAARN[:strings.LastIndex(c.CAARN, "/")+1] + "00000000-0000-0000-0000-000000000000"
			}, wantErr: awspca.ErrCAUnusable, setting: "backend.awsPCA.caARN"},
		{name: "endpoint unreachable", emu: awspcaemu.Config{},
			edit:    func(c *awspca.Config) { c.Endpoint = "http://127.0.0.1:1"; c.IssueTimeout = 2 * time.Second },
			wantErr: ca.ErrBackendUnavailable, setting: "backend.awsPCA.endpoint"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			awspcaemu.SetCredentials(t)
			e := awspcaemu.Start(t, tc.emu)
			cfg := emulatorConfig(e, awspca.ModeIntermediate)
			if tc.edit != nil {
				tc.edit(&cfg)
			}
			_, err := awspca.New(t.Context(), cfg, awspca.Deps{})
			require.ErrorIs(t, err, tc.wantErr)
			require.ErrorContains(t, err, tc.setting)
		})
	}
}

func TestEmulatorShortLivedCARefusesIntermediate(t *testing.T) {
	awspcaemu.SetCredentials(t)
	e := awspcaemu.Start(t, awspcaemu.Config{UsageMode: awspcaemu.UsageShortLived})
	cfg := emulatorConfig(e, awspca.ModeIntermediate)
	cfg.IntermediateTTL = 30 * 24 * time.Hour
	_, err := awspca.New(t.Context(), cfg, awspca.Deps{})
	require.ErrorIs(t, err, awspca.ErrCAUnusable)
	require.ErrorContains(t, err, "backend.awsPCA.mode")
	require.ErrorContains(t, err, "SHORT_LIVED_CERTIFICATE")
	require.ErrorContains(t, err, "720h")

	// Direct mode works with it, for leaves of at most 7 days.
	cfg.Mode, cfg.TemplateARN = awspca.ModeDirect, passthroughTemplate
	up := newBackend(t, cfg).(*awspca.Upstream)
	now := time.Now()
	_, err = up.SignLeaf(t.Context(), ca.SignRequest{CSR: catest.CSR(t, catest.Key(t, "P-256")), ID: testID, NotBefore: now, NotAfter: now.Add(24 * time.Hour)})
	require.NoError(t, err)
	_, err = up.SignLeaf(t.Context(), ca.SignRequest{CSR: catest.CSR(t, catest.Key(t, "P-256")), ID: testID, NotBefore: now, NotAfter: now.Add(8 * 24 * time.Hour)})
	require.ErrorIs(t, err, ca.ErrInvalidSignRequest)
}

func TestEmulatorThrottlingThatClearsSlowsIssuance(t *testing.T) {
	e, h := directHeld(t, awspcaemu.Config{}, nil)
	e.Throttle(2)
	start := time.Now()
	_, err := signLeaf(t, h)
	require.NoError(t, err)
	t.Logf("issued after 2 throttled calls in %s", time.Since(start))
	require.Equal(t, 3, e.Calls(awspcaemu.OpIssueCertificate), "two throttled attempts, then one that issued")
}

func TestEmulatorThrottlingPastDeadlineIsUnavailable(t *testing.T) {
	e, h := directHeld(t, awspcaemu.Config{}, func(c *awspca.Config) { c.IssueTimeout = 2 * time.Second })
	e.ThrottleFor(time.Hour)
	start := time.Now()
	_, err := signLeaf(t, h)
	require.ErrorIs(t, err, ca.ErrBackendUnavailable)
	require.Less(t, time.Since(start), 5*time.Second, "bounded by issueTimeout")
	require.Greater(t, e.Calls(awspcaemu.OpIssueCertificate), 1, "retried")
}

func TestEmulatorRequestInProgressThenIssued(t *testing.T) {
	e, h := directHeld(t, awspcaemu.Config{}, nil)
	e.InProgress(3)
	_, err := signLeaf(t, h)
	require.NoError(t, err)
	require.Equal(t, 1, e.Calls(awspcaemu.OpIssueCertificate))
	require.Equal(t, 4, e.Calls(awspcaemu.OpGetCertificate), "three in progress, then the certificate")
}

func TestEmulatorIssueDelayIsWaitedFor(t *testing.T) {
	e, h := directHeld(t, awspcaemu.Config{IssueDelay: 500 * time.Millisecond}, nil)
	_, err := signLeaf(t, h)
	require.NoError(t, err)
	require.Greater(t, e.Calls(awspcaemu.OpGetCertificate), 1)
}

func TestEmulatorDownThenRecovers(t *testing.T) {
	for _, mode := range []awspcaemu.DownMode{awspcaemu.Down500, awspcaemu.DownClose} {
		t.Run(map[awspcaemu.DownMode]string{awspcaemu.Down500: "500", awspcaemu.DownClose: "closed connection"}[mode], func(t *testing.T) {
			e, h := directHeld(t, awspcaemu.Config{}, func(c *awspca.Config) { c.IssueTimeout = 2 * time.Second })
			e.SetDown(mode)
			_, err := signLeaf(t, h)
			require.ErrorIs(t, err, ca.ErrBackendUnavailable)
			e.SetDown(awspcaemu.Up)
			_, err = signLeaf(t, h)
			require.NoError(t, err, "the same backend recovers")
		})
	}
}

func TestEmulatorIntermediateDownKeepsSigning(t *testing.T) {
	awspcaemu.SetCredentials(t)
	e := awspcaemu.Start(t, awspcaemu.Config{Subordinate: true})
	cfg := emulatorConfig(e, awspca.ModeIntermediate)
	cfg.IssueTimeout = 2 * time.Second
	a := newBackend(t, cfg).(*awspca.Authority)
	h := backendtest.NewHeld(t, a, ca.Config{Intermediate: cfg.IntermediateConfig()})
	e.SetDown(awspcaemu.Down500)
	_, err := signLeaf(t, h)
	require.NoError(t, err, "leaves are signed by the intermediate in memory")
	key := catest.Key(t, "P-256")
	csr, err := x509.ParseCertificateRequest(catest.CSRDER(t, key, nil))
	require.NoError(t, err)
	_, err = a.MintCA(t.Context(), ca.MintRequest{CSR: csr, TTL: time.Hour})
	require.ErrorIs(t, err, ca.ErrBackendUnavailable)
	e.SetDown(awspcaemu.Up)
	_, err = a.MintCA(t.Context(), ca.MintRequest{CSR: csr, TTL: time.Hour})
	require.NoError(t, err)
}

func TestEmulatorWrongCertificateIsRefused(t *testing.T) {
	for _, tc := range []struct {
		name  string
		wrong awspcaemu.WrongCert
	}{
		{name: "other URI SAN", wrong: awspcaemu.WrongURI},
		{name: "CA certificate", wrong: awspcaemu.WrongCA},
		{name: "short lifetime", wrong: awspcaemu.WrongShortLifetime},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e, h := directHeld(t, awspcaemu.Config{}, nil)
			e.SetWrongCert(tc.wrong)
			resp, err := signLeaf(t, h)
			require.ErrorIs(t, err, ca.ErrBackendUnavailable)
			require.Nil(t, resp)
		})
	}
}

func TestEmulatorRateLimitHolds(t *testing.T) {
	const rps = 5
	e, h := directHeld(t, awspcaemu.Config{}, func(c *awspca.Config) { c.RequestsPerSecond, c.Burst = rps, 1 })
	for range 4 {
		_, err := signLeaf(t, h)
		require.NoError(t, err)
	}
	calls := e.CallLog()
	require.GreaterOrEqual(t, len(calls), 10, "2 at start, 2 per leaf")
	// With burst 1, no window of 1s holds more than rps+1 calls: call i
	// and call i+rps are at least (about) a second apart.
	for i := 0; i+rps < len(calls); i++ {
		gap := calls[i+rps].At.Sub(calls[i].At)
		require.GreaterOrEqual(t, gap, 900*time.Millisecond, "calls %d..%d came within %s", i, i+rps, gap)
	}
}

func csrFor(tb testing.TB) *x509.CertificateRequest { return catest.CSR(tb, catest.Key(tb, "P-256")) }

func signRequest(csr *x509.CertificateRequest) ca.SignRequest {
	now := time.Now()
	return ca.SignRequest{CSR: csr, ID: testID, NotBefore: now.Add(-30 * time.Second), NotAfter: now.Add(time.Hour)}
}

func stringsReader(s string) *strings.Reader { return strings.NewReader(s) }
