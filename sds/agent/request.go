package agent

import (
	"context"
	"crypto"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"net/url"
	"os"
	"strings"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/metadata"
	pb "istio.io/api/security/v1alpha1"

	"github.com/meshca/meshca/ca"
	"github.com/meshca/meshca/ca/service"
	"github.com/meshca/meshca/sds"
)

// request makes one attempt: a new key and CSR, one CreateCertificate
// call on a new connection, and the checks on the answer. It returns the
// credential and the root it chains to.
func (k *Keeper) request(ctx context.Context) (*sds.Credential, *x509.Certificate, error) {
	ctx, cancel := context.WithTimeout(ctx, k.cfg.RequestTimeout)
	defer cancel()
	token, err := readToken(k.cfg.TokenFile)
	if err != nil {
		return nil, nil, err
	}
	key, err := ca.GenerateKey(k.cfg.KeyType)
	if err != nil {
		return nil, nil, err
	}
	der, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{URIs: []*url.URL{k.id.URL()}}, key)
	if err != nil {
		return nil, nil, fmt.Errorf("create CSR: %w", err)
	}
	conn, err := k.dial()
	if err != nil {
		return nil, nil, err
	}
	defer conn.Close()
	var header metadata.MD
	resp, err := pb.NewIstioCertificateServiceClient(conn).CreateCertificate(
		metadata.AppendToOutgoingContext(ctx, "authorization", "Bearer "+token),
		&pb.IstioCertificateRequest{
			Csr:              string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: der})),
			ValidityDuration: int64(k.cfg.TTL / time.Second),
		},
		grpc.Header(&header))
	if err != nil {
		return nil, nil, fmt.Errorf("request certificate from %s: %w", k.cfg.Address, err)
	}
	chain, root, err := checkChain(resp.GetCertChain(), key, k.id, k.cfg.Now())
	if err != nil {
		return nil, nil, fmt.Errorf("refuse meshca's answer: %w", err)
	}
	return &sds.Credential{ID: k.id, Chain: chain, Key: key, RenewAt: k.renewAt(header, chain[0])}, root, nil
}

// dial returns a client connection to meshca that verifies its serving
// certificate against RootsFile, read again now, and the roots in the
// bundle. It does not connect until the first call.
func (k *Keeper) dial() (*grpc.ClientConn, error) {
	if roots, err := readRoots(k.cfg.RootsFile); err != nil {
		k.cfg.Log.Warn("cannot read the roots file; using its last good contents", "err", err)
	} else {
		k.fileRoots = roots
	}
	pool := x509.NewCertPool()
	for _, r := range k.fileRoots {
		pool.AddCert(r)
	}
	k.mu.Lock()
	learned := k.snap.Bundle.Roots
	k.mu.Unlock()
	for _, r := range learned {
		pool.AddCert(r)
	}
	creds := credentials.NewTLS(&tls.Config{RootCAs: pool, ServerName: k.cfg.ServerName, MinVersion: tls.VersionTLS12})
	// passthrough: the dialer resolves the name on every dial, so there is
	// no resolver state to go stale between renewals hours apart.
	conn, err := grpc.NewClient("passthrough:///"+k.cfg.Address,
		grpc.WithTransportCredentials(creds), grpc.WithContextDialer(k.cfg.Dial))
	if err != nil {
		return nil, fmt.Errorf("dial %s: %w", k.cfg.Address, err)
	}
	return conn, nil
}

// renewAt is the renewal point meshca named in the header, or, when it
// named none or one outside the leaf's validity, the fallback schedule.
func (k *Keeper) renewAt(header metadata.MD, leaf *x509.Certificate) time.Time {
	if vals := header.Get(service.RenewAtHeader); len(vals) > 0 {
		at, err := time.Parse(time.RFC3339, vals[0])
		switch {
		case err != nil:
			k.cfg.Log.Warn("meshca sent an unreadable renewal point; using the fallback schedule", "header", service.RenewAtHeader, "err", err)
		case at.Before(leaf.NotBefore) || at.After(leaf.NotAfter):
			k.cfg.Log.Warn("meshca sent a renewal point outside the certificate's validity; using the fallback schedule",
				"header", service.RenewAtHeader, "renew_at", at, "not_before", leaf.NotBefore, "not_after", leaf.NotAfter)
		default:
			return at
		}
	}
	return ca.RenewAt(leaf.NotBefore, leaf.NotAfter, k.cfg.RenewFraction, k.cfg.RenewJitter)
}

// checkChain parses the chain meshca answered with (leaf first, root last)
// and checks that it is fit to serve: see the package doc. It returns the
// chain without the root, and the root.
func checkChain(pems []string, key crypto.Signer, id spiffeid.ID, now time.Time) ([]*x509.Certificate, *x509.Certificate, error) {
	var certs []*x509.Certificate
	for i, p := range pems {
		rest, n := []byte(p), 0
		for {
			var block *pem.Block
			block, rest = pem.Decode(rest)
			if block == nil {
				break
			}
			if block.Type != "CERTIFICATE" {
				return nil, nil, fmt.Errorf("cert_chain[%d] holds a %q PEM block", i, block.Type)
			}
			c, err := x509.ParseCertificate(block.Bytes)
			if err != nil {
				return nil, nil, fmt.Errorf("parse cert_chain[%d]: %w", i, err)
			}
			certs, n = append(certs, c), n+1
		}
		if n == 0 {
			return nil, nil, fmt.Errorf("cert_chain[%d] holds no PEM certificate", i)
		}
	}
	if len(certs) < 2 {
		return nil, nil, fmt.Errorf("the chain has %d certificates; want the leaf and at least the root", len(certs))
	}
	leaf, root := certs[0], certs[len(certs)-1]
	pub, ok := key.Public().(interface{ Equal(crypto.PublicKey) bool })
	if !ok || !pub.Equal(leaf.PublicKey) {
		return nil, nil, errors.New("the leaf's public key is not the key this agent generated for the request")
	}
	if len(leaf.URIs) != 1 || leaf.URIs[0].String() != id.String() {
		return nil, nil, fmt.Errorf("the leaf names [%s]; want exactly %s", uriList(leaf.URIs), id)
	}
	if leaf.IsCA {
		return nil, nil, errors.New("the leaf is a CA certificate")
	}
	if !now.Before(leaf.NotAfter) {
		return nil, nil, fmt.Errorf("the leaf expired at %s", leaf.NotAfter.UTC().Format(time.RFC3339))
	}
	if now.Before(leaf.NotBefore) {
		return nil, nil, fmt.Errorf("the leaf is not valid before %s", leaf.NotBefore.UTC().Format(time.RFC3339))
	}
	if !root.IsCA || root.CheckSignatureFrom(root) != nil {
		return nil, nil, fmt.Errorf("the last certificate, %q, is not a self-signed CA certificate", root.Subject)
	}
	roots, inters := x509.NewCertPool(), x509.NewCertPool()
	roots.AddCert(root)
	for _, c := range certs[1 : len(certs)-1] {
		inters.AddCert(c)
	}
	if _, err := leaf.Verify(x509.VerifyOptions{
		Roots: roots, Intermediates: inters, CurrentTime: now, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny},
	}); err != nil {
		return nil, nil, fmt.Errorf("verify the leaf against the chain's root: %w", err)
	}
	return certs[:len(certs)-1], root, nil
}

// readToken reads the service-account token. Errors name the file, never
// what is in it.
func readToken(path string) (string, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return "", fmt.Errorf("read token: %w", err)
	}
	tok := strings.TrimSpace(string(b))
	if tok == "" {
		return "", fmt.Errorf("read token: %s is empty", path)
	}
	return tok, nil
}

// readRoots reads a PEM bundle of CA certificates.
func readRoots(path string) ([]*x509.Certificate, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("read roots: %w", err)
	}
	roots, err := ca.ParseCertificatesPEM(b)
	if err != nil {
		return nil, fmt.Errorf("parse roots in %s: %w", path, err)
	}
	if len(roots) == 0 {
		return nil, fmt.Errorf("read roots: %s holds no PEM certificate", path)
	}
	return roots, nil
}

func uriList(us []*url.URL) string {
	s := make([]string, len(us))
	for i, u := range us {
		s[i] = u.String()
	}
	return strings.Join(s, ", ")
}
