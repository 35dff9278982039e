package pilotagent

import (
	"errors"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"strings"
	"syscall"
	"testing"
)

// netnsEnv marks a process that ReexecInNetNS started inside a private
// network namespace.
const netnsEnv = "MESHCA_NETNS"

// InNetNS reports whether this process runs in the private network namespace
// made by ReexecInNetNS, where only loopback exists and listening on all
// interfaces exposes nothing.
func InNetNS() bool {
	return os.Getenv(netnsEnv) == "1"
}

// ReexecInNetNS is for TestMain of a package that runs pilot-agent, whose
// status server listens on all interfaces. Outside the namespace it runs the
// test binary again, with the same arguments, under `unshare -n` (as root)
// or `unshare -rn` (otherwise: a new user namespace in which the caller is
// root, owning the new network namespace) with loopback up, forwards its
// output and signals, and exits with its exit code. Inside (InNetNS), it
// runs m.Run and exits. Everything the tests start (CA, kube-apiserver,
// pilot-agent) then shares that one loopback, and nothing off this machine
// can be reached from there: build what the tests need first (see
// RunInNetNS). It never returns.
//
// unshare (util-linux) and ip (iproute2) must be installed, and the caller
// must be root or the kernel must allow unprivileged user namespaces;
// otherwise it exits with a message saying so.
//
// Under go test -short it runs m.Run where it is: Start then skips every
// test that would run pilot-agent, so no namespace is needed.
func ReexecInNetNS(m *testing.M) {
	os.Exit(RunInNetNS(m))
}

// RunInNetNS is ReexecInNetNS returning the exit code rather than exiting,
// so that TestMain can prepare before entering the namespace (build
// binaries while the module proxy is reachable) and clean up after.
func RunInNetNS(m *testing.M) int {
	if !flag.Parsed() {
		flag.Parse() // for testing.Short; m.Run does not parse again
	}
	if InNetNS() || testing.Short() {
		return m.Run()
	}
	code, err := reexec()
	if err != nil {
		fmt.Fprintf(os.Stderr, "pilotagent: %v\n", err)
		return 1
	}
	return code
}

// unshareFlags returns the flags that make a private network namespace
// for this process: root makes one directly, as it always has; anyone else
// makes a user namespace first, mapping their uid to root in it.
func unshareFlags() []string {
	if os.Geteuid() == 0 {
		return []string{"-n"}
	}
	return []string{"-r", "-n"}
}

func reexec() (int, error) {
	unshare, err := exec.LookPath("unshare")
	if err != nil {
		return 0, errors.New("cannot run tests in a private network namespace: unshare not found (Debian package util-linux)")
	}
	if _, err := exec.LookPath("ip"); err != nil {
		return 0, errors.New("cannot run tests in a private network namespace: ip not found (Debian package iproute2)")
	}
	flags := unshareFlags()
	// A dry run first, so a missing privilege is reported as such rather
	// than as a failed test binary.
	if out, err := exec.Command(unshare, append(flags, "--", "ip", "link", "set", "lo", "up")...).CombinedOutput(); err != nil {
		return 0, fmt.Errorf("cannot make a private network namespace (unshare %s: as root, needs CAP_SYS_ADMIN; otherwise, a kernel that allows unprivileged user namespaces; uid %d): %v: %s",
			strings.Join(flags, " "), os.Geteuid(), err, strings.TrimSpace(string(out)))
	}
	exe, err := os.Executable()
	if err != nil {
		return 0, fmt.Errorf("find test binary: %w", err)
	}
	// unshare and sh exec in place, so cmd.Process is the test binary.
	args := append(append(flags, "--", "sh", "-c", `ip link set lo up && exec "$0" "$@"`, exe), os.Args[1:]...)
	cmd := exec.Command(unshare, args...)
	cmd.Env = append(os.Environ(), netnsEnv+"=1")
	cmd.Stdin, cmd.Stdout, cmd.Stderr = os.Stdin, os.Stdout, os.Stderr
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}

	sigs := make(chan os.Signal, 1)
	// SIGQUIT is how go test asks a hung test binary for its stacks.
	signal.Notify(sigs, syscall.SIGINT, syscall.SIGTERM, syscall.SIGQUIT)
	defer signal.Stop(sigs)
	if err := cmd.Start(); err != nil {
		return 0, fmt.Errorf("start test binary under unshare: %w", err)
	}
	done := make(chan struct{})
	go func() {
		for {
			select {
			case s := <-sigs:
				_ = cmd.Process.Signal(s)
			case <-done:
				return
			}
		}
	}()
	err = cmd.Wait()
	close(done)
	var exitErr *exec.ExitError
	switch {
	case err == nil:
		return 0, nil
	case errors.As(err, &exitErr):
		if ws, ok := exitErr.Sys().(syscall.WaitStatus); ok && ws.Signaled() {
			return 128 + int(ws.Signal()), nil
		}
		return exitErr.ExitCode(), nil
	default:
		return 0, fmt.Errorf("run test binary under unshare: %w", err)
	}
}
