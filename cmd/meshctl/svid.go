package main

import (
	"context"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"time"

	"github.com/spiffe/go-spiffe/v2/workloadapi"
)

// svidCmd fetches the X.509-SVID and bundles from a SPIFFE Workload API
// socket (meshca agent's) with go-spiffe's own client, and prints them or
// writes them as PEM files.
func svidCmd(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("meshctl svid", flag.ContinueOnError)
	fs.SetOutput(stderr)
	socket := fs.String("socket", "./var/run/secrets/workload-spiffe-uds/socket", "the Workload API's Unix socket")
	out := fs.String("out", "", "write svid.pem, svid-key.pem and bundle.pem into this folder")
	timeout := fs.Duration("timeout", 10*time.Second, "give up after this long")
	if err := fs.Parse(args); err != nil {
		return err
	}
	abs, err := filepath.Abs(*socket)
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(ctx, *timeout)
	defer cancel()
	c, err := workloadapi.New(ctx, workloadapi.WithAddr("unix://"+abs))
	if err != nil {
		return fmt.Errorf("connect to %s: %w", abs, err)
	}
	defer c.Close()
	x, err := c.FetchX509Context(ctx)
	if err != nil {
		return fmt.Errorf("fetch X.509 SVID from %s: %w", abs, err)
	}
	svid := x.DefaultSVID()
	if svid == nil {
		return errors.New("the Workload API returned no SVID")
	}
	leaf := svid.Certificates[0]
	fmt.Fprintf(stdout, "spiffe id:  %s\nserial:     %x\nnot before: %s\nnot after:  %s\nchain:      %d certificate(s)\n",
		svid.ID, leaf.SerialNumber, leaf.NotBefore.UTC().Format(time.RFC3339), leaf.NotAfter.UTC().Format(time.RFC3339), len(svid.Certificates))
	for _, b := range x.Bundles.Bundles() {
		fmt.Fprintf(stdout, "bundle:     %s, %d root(s)\n", b.TrustDomain().IDString(), len(b.X509Authorities()))
	}
	if *out == "" {
		return nil
	}
	certPEM, keyPEM, err := svid.Marshal()
	if err != nil {
		return err
	}
	bundle, ok := x.Bundles.Get(svid.ID.TrustDomain())
	if !ok {
		return errors.New("no bundle for the SVID's trust domain")
	}
	var roots []byte
	for _, r := range bundle.X509Authorities() {
		roots = append(roots, pemCert(r)...)
	}
	if err := os.MkdirAll(*out, 0o700); err != nil {
		return err
	}
	for name, data := range map[string][]byte{"svid.pem": certPEM, "svid-key.pem": keyPEM, "bundle.pem": roots} {
		if err := os.WriteFile(filepath.Join(*out, name), data, 0o600); err != nil {
			return err
		}
	}
	fmt.Fprintf(stdout, "wrote %s/{svid.pem,svid-key.pem,bundle.pem}\n", *out)
	return nil
}

func pemCert(c *x509.Certificate) []byte {
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: c.Raw})
}
