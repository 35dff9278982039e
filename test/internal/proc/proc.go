// Package proc runs a test's child server in its own process group, logs to
// a file, and stops it without leaving orphans or zombies.
package proc

import (
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"syscall"
	"time"
)

// Config says how to run one child server.
type Config struct {
	// Name names the server in error messages, such as "start etcd: ...".
	Name string
	// Path is the executable to run.
	Path string
	// Args are the arguments, without the program name.
	Args []string
	// Env is the child's environment; nil means the test's own.
	Env []string
	// Dir is the child's working directory; empty means the test's own.
	Dir string
	// LogPath is the file that stdout and stderr are appended to. It is
	// created, with mode 0600, if it does not exist.
	LogPath string
}

// Process is a child server running in its own process group, with its
// output in a log file.
type Process struct {
	name    string
	cmd     *exec.Cmd
	logPath string
	done    chan struct{} // closed once the process has been reaped
	err     error         // exit status, valid after done is closed
}

// Start runs cfg.Path in its own process group, appending stdout and stderr
// to cfg.LogPath, and reaps it when it ends. The kernel kills the child if
// the test binary dies without running its cleanups.
func Start(cfg Config) (*Process, error) {
	logFile, err := os.OpenFile(cfg.LogPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return nil, fmt.Errorf("open %s log: %w", cfg.Name, err)
	}
	defer logFile.Close() // the child holds its own copy of the descriptor
	cmd := exec.Command(cfg.Path, cfg.Args...)
	cmd.Dir = cfg.Dir
	cmd.Env = cfg.Env
	cmd.Stdout = logFile
	cmd.Stderr = logFile
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("start %s: %w", cfg.Name, err)
	}
	p := &Process{name: cfg.Name, cmd: cmd, logPath: cfg.LogPath, done: make(chan struct{})}
	go func() {
		p.err = cmd.Wait()
		close(p.done)
	}()
	return p, nil
}

// Name returns Config.Name.
func (p *Process) Name() string { return p.name }

// Pid returns the child's process ID, which is also its process group ID.
func (p *Process) Pid() int { return p.cmd.Process.Pid }

// LogPath returns Config.LogPath.
func (p *Process) LogPath() string { return p.logPath }

// Exited reports whether the process has ended and been reaped.
func (p *Process) Exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

// Err returns what waiting for the process returned: nil for exit status 0,
// otherwise an *exec.ExitError. It is valid only once Exited reports true.
func (p *Process) Err() error { return p.err }

// ProcessState returns the exit state of the process. It is valid only once
// Exited reports true.
func (p *Process) ProcessState() *os.ProcessState { return p.cmd.ProcessState }

// Stop sends SIGTERM to the process group, SIGKILL if the process has not
// ended after grace, and waits until the process has been reaped. It then
// sends SIGKILL to the group once more, for anything the process left in it.
// Call it once.
func (p *Process) Stop(grace time.Duration) {
	pgid := p.cmd.Process.Pid
	_ = syscall.Kill(-pgid, syscall.SIGTERM)
	select {
	case <-p.done:
	case <-time.After(grace):
		_ = syscall.Kill(-pgid, syscall.SIGKILL)
		<-p.done
	}
	// Anything left in the group (there should be nothing) goes too.
	_ = syscall.Kill(-pgid, syscall.SIGKILL)
}

// Log returns the whole log so far, or a note saying why it cannot be read.
func (p *Process) Log() string {
	b, err := os.ReadFile(p.logPath)
	if err != nil {
		return fmt.Sprintf("(no log: %v)", err)
	}
	return string(b)
}

// LogContains reports whether the log holds s.
func (p *Process) LogContains(s string) bool {
	b, err := os.ReadFile(p.logPath)
	return err == nil && bytes.Contains(b, []byte(s))
}

// LogTail returns the last n lines of the log, or a note saying why it
// cannot be read.
func (p *Process) LogTail(n int) string {
	b, err := os.ReadFile(p.logPath)
	if err != nil {
		return fmt.Sprintf("(no log: %v)", err)
	}
	lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}
