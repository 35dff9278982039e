package proc_test

import (
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/meshca/meshca/test/internal/proc"
)

func start(t *testing.T, script string) *proc.Process {
	t.Helper()
	p, err := proc.Start(proc.Config{
		Name:    "sh",
		Path:    "/bin/sh",
		Args:    []string{"-c", script},
		Dir:     t.TempDir(),
		LogPath: filepath.Join(t.TempDir(), "sh.log"),
	})
	require.NoError(t, err)
	return p
}

// gone reports whether pid has ended: it no longer exists, or it is a zombie
// waiting for a parent other than the test.
func gone(pid int) bool {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return true
	}
	s := string(b)
	fields := strings.Fields(s[strings.LastIndexByte(s, ')')+1:])
	return len(fields) > 0 && fields[0] == "Z"
}

func TestStopTerminates(t *testing.T) {
	p := start(t, "echo hello; echo world; exec sleep 30")
	require.Eventually(t, func() bool { return p.LogContains("world") }, 5*time.Second, 10*time.Millisecond)
	require.False(t, p.Exited())
	require.Equal(t, "world", p.LogTail(1))
	require.Equal(t, "hello\nworld", p.LogTail(5))
	require.Equal(t, "hello\nworld\n", p.Log())
	require.False(t, p.LogContains("nowhere"))

	t0 := time.Now()
	p.Stop(10 * time.Second)
	require.Less(t, time.Since(t0), 5*time.Second, "SIGTERM should have ended it")
	require.True(t, p.Exited())
	var exitErr *exec.ExitError
	require.ErrorAs(t, p.Err(), &exitErr)
	ws := p.ProcessState().Sys().(syscall.WaitStatus)
	require.Equal(t, syscall.SIGTERM, ws.Signal())
}

func TestStopKillsGroupAfterGrace(t *testing.T) {
	// The shell and its child ignore SIGTERM; the child's PID is logged.
	p := start(t, `trap "" TERM; sleep 30 & echo $!; wait`)
	var child int
	require.Eventually(t, func() bool {
		child, _ = strconv.Atoi(strings.TrimSpace(p.LogTail(1)))
		return child > 0
	}, 5*time.Second, 10*time.Millisecond)

	const grace = 200 * time.Millisecond
	t0 := time.Now()
	p.Stop(grace)
	require.GreaterOrEqual(t, time.Since(t0), grace)
	require.True(t, p.Exited())
	require.Equal(t, syscall.SIGKILL, p.ProcessState().Sys().(syscall.WaitStatus).Signal())
	require.Eventually(t, func() bool { return gone(child) }, 5*time.Second, 10*time.Millisecond,
		"child %d of the group survived", child)
}

func TestExited(t *testing.T) {
	p := start(t, "exit 3")
	require.Eventually(t, p.Exited, 5*time.Second, 10*time.Millisecond)
	require.Equal(t, 3, p.ProcessState().ExitCode())
	require.EqualError(t, p.Err(), "exit status 3")
	require.Equal(t, "sh", p.Name())
	require.Positive(t, p.Pid())
	p.Stop(time.Second) // harmless on an ended process
}

func TestStartErrors(t *testing.T) {
	dir := t.TempDir()
	_, err := proc.Start(proc.Config{Name: "nothing", Path: filepath.Join(dir, "missing"), LogPath: filepath.Join(dir, "x.log")})
	require.ErrorContains(t, err, "start nothing: ")
	require.True(t, errors.Is(err, os.ErrNotExist), "%v", err)

	_, err = proc.Start(proc.Config{Name: "sh", Path: "/bin/sh", LogPath: filepath.Join(dir, "no", "such", "dir.log")})
	require.ErrorContains(t, err, "open sh log: ")
}
