package config

import "testing"

// FuzzParse feeds arbitrary YAML to the strict decoder and validation: a
// bad file must be an error, never a panic.
func FuzzParse(f *testing.F) {
	f.Add(devYAML)
	f.Add([]byte("authn:\n  chain: [jwt]\n  jwt:\n    skew: 10s\n"))
	f.Add([]byte("backend:\n  type: plugged\n  plugged: {dir: /x}\n"))
	f.Add([]byte("a: &a [*a]\n"))
	f.Fuzz(func(t *testing.T, data []byte) {
		_, _ = Parse(data)
		_, _ = ParsePolicy(data)
	})
}
