// Command vault is HashiCorp Vault's own server and CLI, built from the Go
// module proxy for the end-to-end tests of backends/vault. Vault is
// BUSL-1.1 licensed: it is a test dependency and is never shipped.
package main

import (
	"os"

	"github.com/hashicorp/vault/command"
)

func main() { os.Exit(command.Run(os.Args[1:])) }
