package kubeenv

import (
	"bufio"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"

	"github.com/meshca/meshca/test/internal/proc"
)

// modulePath identifies the repository root: the directory whose go.mod
// declares this module.
const modulePath = "github.com/meshca/meshca"

// BinDir returns the folder holding the test servers built by
// test/tools/build.sh: $MESHCA_BIN if set, otherwise <repo root>/.cache/bin,
// where the repo root is found by walking up from the working directory.
func BinDir() (string, error) {
	if d := os.Getenv("MESHCA_BIN"); d != "" {
		return d, nil
	}
	root, err := repoRoot()
	if err != nil {
		return "", err
	}
	return filepath.Join(root, ".cache", "bin"), nil
}

func repoRoot() (string, error) {
	dir, err := os.Getwd()
	if err != nil {
		return "", fmt.Errorf("get working dir: %w", err)
	}
	for {
		if isModuleRoot(filepath.Join(dir, "go.mod")) {
			return dir, nil
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return "", fmt.Errorf("no go.mod declaring module %s above the working dir", modulePath)
		}
		dir = parent
	}
}

func isModuleRoot(gomod string) bool {
	f, err := os.Open(gomod)
	if err != nil {
		return false
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) >= 2 && fields[0] == "module" {
			return strings.Trim(fields[1], `"`) == modulePath
		}
	}
	return false
}

// findBinary returns the path of an executable server binary, or an error
// that tells the reader how to build it.
func findBinary(dir, name string) (string, error) {
	p := filepath.Join(dir, name)
	st, err := os.Stat(p)
	if err != nil || st.IsDir() || st.Mode()&0o111 == 0 {
		return "", fmt.Errorf("%s not found in %s: run test/tools/build.sh (or set MESHCA_BIN to the folder holding it)", name, dir)
	}
	return p, nil
}

// freePort returns a loopback TCP port that was free a moment ago. Another
// process may take it before the caller binds it; callers detect that from
// the server's log and retry.
func freePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, fmt.Errorf("find free port: %w", err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}

// errPortTaken means a server could not bind a port chosen by freePort; the
// caller starts again with new ports.
var errPortTaken = errors.New("port taken by another process")

// exitError describes a server that ended before it was ready.
func exitError(p *proc.Process) error {
	if p.LogContains("address already in use") {
		return fmt.Errorf("%s exited: %w", p.Name(), errPortTaken)
	}
	return fmt.Errorf("%s exited early (%v); last lines of %s:\n%s", p.Name(), p.Err(), p.LogPath(), p.LogTail(30))
}
