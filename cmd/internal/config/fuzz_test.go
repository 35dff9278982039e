package config

import (
	"testing"

	"github.com/stretchr/testify/require"
	"go.yaml.in/yaml/v3"
)

// FuzzParse feeds arbitrary YAML to the strict decoder and validation. A
// bad file must be an error, never a panic, and the answer must not depend
// on how it was reached:
//   - Parse agrees with its steps taken one by one (decode, defaults,
//     Validate): the same verdict and, on success, the same Config;
//   - a Config that Parse accepted validates again, unchanged;
//   - encoding it to YAML and parsing that gives an equal Config (equal
//     once encoded: nil and empty lists mean the same), also valid: what
//     meshca accepted, it can write back and accept again.
//
// The seed corpus is in testdata/fuzz/FuzzParse; `make fuzz` runs it.
func FuzzParse(f *testing.F) {
	f.Add(devYAML)
	f.Add([]byte("authn:\n  chain: [jwt]\n  jwt:\n    skew: 10s\n"))
	f.Add([]byte("backend:\n  type: plugged\n  plugged: {dir: /x}\n"))
	f.Add([]byte("a: &a [*a]\n"))
	f.Fuzz(func(t *testing.T, data []byte) {
		_, _ = ParsePolicy(data)

		c, err := Parse(data)

		var steps Config
		if derr := decodeStrict(data, &steps); derr != nil {
			require.Error(t, err, "Parse accepted what decoding refused: %v", derr)
			return
		}
		steps.applyDefaults()
		verr := steps.Validate()
		if verr != nil {
			require.Error(t, err, "Parse accepted what Validate refuses: %v", verr)
			return
		}
		require.NoError(t, err, "Parse refused what decoding and Validate accept")
		require.Equal(t, &steps, c)

		again := *c
		require.NoError(t, again.Validate(), "a parsed Config validates again")
		again.applyDefaults()
		require.Equal(t, c, &again, "defaults are idempotent")

		out, err := yaml.Marshal(c)
		require.NoError(t, err)
		back, err := Parse(out)
		require.NoError(t, err, "re-encoded config refused:\n%s", out)
		// Compared as YAML: an absent list decodes as nil, "[]" as empty,
		// and the two mean the same.
		outBack, err := yaml.Marshal(back)
		require.NoError(t, err)
		require.Equal(t, string(out), string(outBack), "a re-encoded config parses to an equal one")
	})
}
