package main

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/tls"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"encoding/pem"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/google/renameio/v2"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	pb "istio.io/api/security/v1alpha1"

	"github.com/meshca/meshca/cmd/internal/devkey"
)

const (
	defaultAddr   = "127.0.0.1:15012"
	defaultCACert = ".meshca-dev/" + devkey.RootFile
)

func issueCmd(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("meshctl issue", flag.ContinueOnError)
	fs.SetOutput(stderr)
	addr := fs.String("addr", defaultAddr, "meshca gRPC address")
	caCert := fs.String("ca-cert", defaultCACert, "PEM roots that meshca's serving certificate chains to")
	tokenArg := fs.String("token", "", "service-account token, or @FILE to read it from a file (required)")
	td := fs.String("trust-domain", "cluster.local", "trust domain of the identity to ask for")
	ttl := fs.Duration("ttl", 0, "requested lifetime (0 = the policy's default)")
	keyType := fs.String("key", "ecdsa", "key to generate: ecdsa (P-256) or rsa (2048)")
	out := fs.String("out", "", "directory to write cert-chain.pem and key.pem into (optional)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	tok, err := readToken(*tokenArg)
	if err != nil {
		return err
	}
	id, err := idFromToken(tok, *td)
	if err != nil {
		return err
	}
	key, err := newKey(*keyType)
	if err != nil {
		return err
	}
	csrPEM, err := makeCSR(key, id)
	if err != nil {
		return err
	}
	conn, err := dial(*addr, *caCert)
	if err != nil {
		return err
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	resp, err := pb.NewIstioCertificateServiceClient(conn).CreateCertificate(withToken(ctx, tok),
		&pb.IstioCertificateRequest{Csr: string(csrPEM), ValidityDuration: int64(ttl.Seconds())})
	if err != nil {
		st := status.Convert(err)
		if st.Code() == codes.Unavailable && strings.Contains(st.Message(), "connection error") {
			return fmt.Errorf("could not reach or verify meshca at %s (check --addr and --ca-cert): %s", *addr, st.Message())
		}
		return fmt.Errorf("meshca refused: %s: %s", st.Code(), st.Message())
	}
	chain := resp.GetCertChain()
	if len(chain) < 2 {
		return fmt.Errorf("meshca answered with %d certificates, want the leaf and at least the root", len(chain))
	}
	leaf, err := parsePEMCert(chain[0])
	if err != nil {
		return err
	}
	fmt.Fprintf(stdout, "identity:   %s\nserial:     %s\nnot before: %s\nnot after:  %s (%s)\nchain:      %d certificates, root %q\n",
		uriList(leaf.URIs), leaf.SerialNumber.Text(16), leaf.NotBefore.UTC().Format(time.RFC3339),
		leaf.NotAfter.UTC().Format(time.RFC3339), leaf.NotAfter.Sub(leaf.NotBefore).Round(time.Second),
		len(chain), mustSubject(chain[len(chain)-1]))
	if *out != "" {
		der, err := x509.MarshalPKCS8PrivateKey(key)
		if err != nil {
			return err
		}
		if err := os.MkdirAll(*out, 0o700); err != nil {
			return err
		}
		if err := renameio.WriteFile(filepath.Join(*out, "key.pem"), pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der}), 0o600); err != nil {
			return err
		}
		if err := renameio.WriteFile(filepath.Join(*out, "cert-chain.pem"), []byte(strings.Join(chain, "")), 0o644); err != nil {
			return err
		}
		fmt.Fprintf(stdout, "wrote:      %s\n", *out)
	}
	return nil
}

func readToken(arg string) (string, error) {
	if arg == "" {
		return "", errors.New("--token is required (a token, or @FILE)")
	}
	if name, ok := strings.CutPrefix(arg, "@"); ok {
		b, err := os.ReadFile(name)
		if err != nil {
			return "", fmt.Errorf("read token: %w", err)
		}
		arg = string(b)
	}
	return strings.TrimSpace(arg), nil
}

// idFromToken reads (without verifying: meshca does that) the service
// account a token names, to ask for the matching SPIFFE ID.
func idFromToken(tok, trustDomain string) (spiffeid.ID, error) {
	parts := strings.Split(tok, ".")
	if len(parts) != 3 {
		return spiffeid.ID{}, errors.New("token is not a JWT")
	}
	payload, err := base64.RawURLEncoding.DecodeString(parts[1])
	if err != nil {
		return spiffeid.ID{}, errors.New("token payload is not base64url")
	}
	var claims struct {
		Sub string `json:"sub"`
	}
	if err := json.Unmarshal(payload, &claims); err != nil {
		return spiffeid.ID{}, errors.New("token payload is not JSON")
	}
	rest, ok := strings.CutPrefix(claims.Sub, "system:serviceaccount:")
	ns, sa, ok2 := strings.Cut(rest, ":")
	if !ok || !ok2 {
		return spiffeid.ID{}, errors.New("token subject is not a service account")
	}
	td, err := spiffeid.TrustDomainFromString(trustDomain)
	if err != nil {
		return spiffeid.ID{}, fmt.Errorf("--trust-domain: %w", err)
	}
	return spiffeid.FromSegments(td, "ns", ns, "sa", sa)
}

func newKey(kind string) (crypto.Signer, error) {
	switch kind {
	case "ecdsa":
		return ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	case "rsa":
		return rsa.GenerateKey(rand.Reader, 2048)
	default:
		return nil, fmt.Errorf("--key must be ecdsa or rsa, got %q", kind)
	}
}

func makeCSR(key crypto.Signer, id spiffeid.ID) ([]byte, error) {
	der, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{URIs: []*url.URL{id.URL()}}, key)
	if err != nil {
		return nil, fmt.Errorf("create CSR: %w", err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: der}), nil
}

// dial opens a TLS gRPC connection to meshca, verifying its serving
// certificate against the roots in caCertFile.
func dial(addr, caCertFile string) (*grpc.ClientConn, error) {
	cfg, err := clientTLS(addr, caCertFile)
	if err != nil {
		return nil, err
	}
	return grpcDial(addr, cfg)
}

// grpcDial makes a grpc-go client connection over TLS with cfg.
func grpcDial(addr string, cfg *tls.Config) (*grpc.ClientConn, error) {
	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(credentials.NewTLS(cfg)))
	if err != nil {
		return nil, fmt.Errorf("dial %s: %w", addr, err)
	}
	return conn, nil
}

// clientCreds is the TLS client side of dial: meshca's serving certificate
// verified against the roots in caCertFile, for the host part of addr.
func clientCreds(addr, caCertFile string) (credentials.TransportCredentials, error) {
	cfg, err := clientTLS(addr, caCertFile)
	if err != nil {
		return nil, err
	}
	return credentials.NewTLS(cfg), nil
}

// clientTLS is the TLS configuration of clientCreds.
func clientTLS(addr, caCertFile string) (*tls.Config, error) {
	pemBytes, err := os.ReadFile(caCertFile)
	if err != nil {
		return nil, fmt.Errorf("read --ca-cert: %w (in dev mode meshca writes it when it starts)", err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(pemBytes) {
		return nil, fmt.Errorf("--ca-cert %s holds no PEM certificate", caCertFile)
	}
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		return nil, fmt.Errorf("--addr: %w", err)
	}
	return &tls.Config{RootCAs: pool, ServerName: host, MinVersion: tls.VersionTLS12}, nil
}

func withToken(ctx context.Context, tok string) context.Context {
	return metadata.AppendToOutgoingContext(ctx, "authorization", "Bearer "+tok)
}

func parsePEMCert(s string) (*x509.Certificate, error) {
	b, _ := pem.Decode([]byte(s))
	if b == nil {
		return nil, errors.New("meshca answered with a certificate that is not PEM")
	}
	return x509.ParseCertificate(b.Bytes)
}

func mustSubject(s string) string {
	c, err := parsePEMCert(s)
	if err != nil {
		return "?"
	}
	return c.Subject.String()
}

func uriList(us []*url.URL) string {
	s := make([]string, len(us))
	for i, u := range us {
		s[i] = u.String()
	}
	return strings.Join(s, ", ")
}
