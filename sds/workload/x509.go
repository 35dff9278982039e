package workload

import (
	"crypto/x509"
	"errors"
	"fmt"
	"time"

	workloadpb "github.com/spiffe/go-spiffe/v2/proto/spiffe/workload"
	"google.golang.org/grpc"
	"google.golang.org/protobuf/proto"

	"github.com/meshca/meshca/sds"
)

// FetchX509SVID streams the workload's X.509-SVID, its private key and its
// trust domain's bundle: first as soon as a credential and bundle exist,
// then again whenever either changes, until the caller leaves.
func (s *Server) FetchX509SVID(_ *workloadpb.X509SVIDRequest, stream workloadpb.SpiffeWorkloadAPI_FetchX509SVIDServer) error {
	return s.call(stream.Context(), "FetchX509SVID", true, func() error {
		return watch(s, stream, x509SVIDResponse, s.sentSVID)
	})
}

// FetchX509Bundles streams the trust bundle, keyed by the SPIFFE ID of its
// trust domain: first as soon as one exists, then again whenever it
// changes, until the caller leaves. A new credential alone sends nothing.
func (s *Server) FetchX509Bundles(_ *workloadpb.X509BundlesRequest, stream workloadpb.SpiffeWorkloadAPI_FetchX509BundlesServer) error {
	return s.call(stream.Context(), "FetchX509Bundles", true, func() error {
		return watch(s, stream, x509BundlesResponse, s.sentBundle)
	})
}

// watch serves one stream: it sends compose's answer for the snapshot in
// force, then waits for the Source's next snapshot, and sends again when
// the answer differs from the last one sent. Before the first send, a
// snapshot with nothing to send yet is waited out, up to s.firstWait; after
// it, such a snapshot ends the stream, since the last answer no longer
// holds.
func watch[T any, M interface {
	*T
	proto.Message
}](s *Server, stream grpc.ServerStreamingServer[T], compose func(sds.Snapshot) (M, error), sent func(sds.Snapshot)) error {
	ctx := stream.Context()
	first := time.NewTimer(s.firstWait)
	defer first.Stop()
	timeout := first.C
	var last M
	for {
		snap, changed := s.src.Watch()
		resp, err := compose(snap)
		switch {
		case err != nil && (last != nil || s.firstWait == 0 || !notReady(err)):
			return err
		case err != nil:
			// Nothing to send yet: wait for the Source, or time out.
		case !proto.Equal(resp, last):
			if err := stream.Send(resp); err != nil {
				return fmt.Errorf("send %T: %w", resp, err)
			}
			sent(snap)
			last, timeout = resp, nil
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-timeout:
			return fmt.Errorf("wait %s for the first response: %w", s.firstWait, err)
		case <-changed:
		}
	}
}

func notReady(err error) bool {
	return errors.Is(err, errNoCredential) || errors.Is(err, errNoBundle)
}

// x509SVIDResponse is the FetchX509SVID message for snap: the chain as
// concatenated DER, leaf first; the key as unencrypted PKCS#8 DER; the
// bundle of the credential's trust domain as concatenated DER.
func x509SVIDResponse(snap sds.Snapshot) (*workloadpb.X509SVIDResponse, error) {
	cred := snap.Credential
	if cred == nil {
		return nil, errNoCredential
	}
	if len(snap.Bundle.Roots) == 0 {
		return nil, errNoBundle
	}
	if len(cred.Chain) == 0 {
		return nil, fmt.Errorf("serve credential of %s: it has no certificate", cred.ID)
	}
	if td := cred.ID.TrustDomain(); snap.Bundle.TrustDomain != td {
		return nil, fmt.Errorf("serve credential of %s: the bundle is for trust domain %q, not %q",
			cred.ID, snap.Bundle.TrustDomain, td)
	}
	key, err := x509.MarshalPKCS8PrivateKey(cred.Key)
	if err != nil {
		// The error names the key's type, never its contents.
		return nil, fmt.Errorf("encode private key of %s: %w", cred.ID, err)
	}
	return &workloadpb.X509SVIDResponse{
		Svids: []*workloadpb.X509SVID{{
			SpiffeId:    cred.ID.String(),
			X509Svid:    concatDER(cred.Chain),
			X509SvidKey: key,
			Bundle:      concatDER(snap.Bundle.Roots),
		}},
	}, nil
}

// x509BundlesResponse is the FetchX509Bundles message for snap: the bundle
// keyed by the SPIFFE ID of its trust domain ("spiffe://example.org"), as
// the specification says and SPIRE sends; clients accept the bare name too.
func x509BundlesResponse(snap sds.Snapshot) (*workloadpb.X509BundlesResponse, error) {
	b := snap.Bundle
	if len(b.Roots) == 0 || b.TrustDomain.IsZero() {
		return nil, errNoBundle
	}
	return &workloadpb.X509BundlesResponse{
		Bundles: map[string][]byte{b.TrustDomain.IDString(): concatDER(b.Roots)},
	}, nil
}

func concatDER(certs []*x509.Certificate) []byte {
	n := 0
	for _, c := range certs {
		n += len(c.Raw)
	}
	out := make([]byte, 0, n)
	for _, c := range certs {
		out = append(out, c.Raw...)
	}
	return out
}

// sentSVID logs a sent X.509-SVID by identity, serial and expiry; never
// its key.
func (s *Server) sentSVID(snap sds.Snapshot) {
	leaf := snap.Credential.Leaf()
	s.log.Debug("sent X.509-SVID", "id", snap.Credential.ID.String(), "serial", leaf.SerialNumber.Text(16),
		"not_after", leaf.NotAfter, "roots", len(snap.Bundle.Roots))
}

// sentBundle logs a sent trust bundle.
func (s *Server) sentBundle(snap sds.Snapshot) {
	s.log.Debug("sent X.509 bundle", "trust_domain", snap.Bundle.TrustDomain.String(), "roots", len(snap.Bundle.Roots))
}
