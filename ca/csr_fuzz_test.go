package ca_test

import (
	"errors"
	"testing"

	"github.com/meshca/meshca/ca"
	"github.com/meshca/meshca/ca/catest"
)

// FuzzParseCSR feeds CSRFromPEM and ParseCSR arbitrary bytes: it must never panic, and
// every refusal must be a *CSRError (a clear InvalidArgument at the edge).
func FuzzParseCSR(f *testing.F) {
	f.Add(catest.CSRPEM(f, catest.Key(f, "P-256"), nil, "spiffe://cluster.local/ns/a/sa/b"))
	f.Add([]byte("-----BEGIN CERTIFICATE REQUEST-----\nMIIB\n-----END CERTIFICATE REQUEST-----\n"))
	f.Add([]byte(""))
	f.Fuzz(func(t *testing.T, data []byte) {
		csr, _, err := parseCSRPEM(data)
		if err != nil {
			var ce *ca.CSRError
			if !errors.As(err, &ce) {
				t.Fatalf("refusal is not a *CSRError: %v", err)
			}
			return
		}
		if csr.CheckSignature() != nil {
			t.Fatal("accepted a CSR whose signature does not verify")
		}
	})
}
