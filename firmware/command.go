package firmware

import (
	"context"
	"errors"
	"fmt"
	"os/exec"
	"strings"
	"sync"
	"time"
)

// CommandInstaller runs external commands (rauc, swupdate, a script) to install, commit and
// roll back. Templates are split on white space (no shell); the placeholders {image}, {name},
// {version} and {security_version} are substituted in each argument afterwards, so paths with
// spaces are safe. Example: Install "rauc install {image}", Commit "rauc status mark-good",
// Rollback "rauc status mark-bad".
type CommandInstaller struct {
	InstallCmd  string
	CommitCmd   string        // optional
	RollbackCmd string        // optional
	Timeout     time.Duration // per command; 0 means 10 minutes
	// Env, if non-nil, is the commands' environment (default: the agent's).
	Env []string
}

var _ Installer = (*CommandInstaller)(nil)

// CommandError reports a failed command: its exit code (-1 if it did not exit normally), whether
// the timeout killed it, and the tail of its stderr.
type CommandError struct {
	Argv     []string
	ExitCode int
	TimedOut bool
	Stderr   string // last stderrTail bytes
	Err      error
}

func (e *CommandError) Error() string {
	var b strings.Builder
	fmt.Fprintf(&b, "firmware: command %q", strings.Join(e.Argv, " "))
	switch {
	case e.TimedOut:
		b.WriteString(" timed out and was killed")
	case e.ExitCode >= 0:
		fmt.Fprintf(&b, " exited with code %d", e.ExitCode)
	default:
		fmt.Fprintf(&b, " failed: %v", e.Err)
	}
	if s := strings.TrimSpace(e.Stderr); s != "" {
		fmt.Fprintf(&b, "; stderr: %s", s)
	}
	return b.String()
}

// Unwrap returns the underlying error.
func (e *CommandError) Unwrap() error { return e.Err }

const stderrTail = 2048

// Install runs InstallCmd with {image} = image.
func (c *CommandInstaller) Install(ctx context.Context, image string, m *Manifest) error {
	if strings.TrimSpace(c.InstallCmd) == "" {
		return errors.New("firmware: command installer: no install command configured (firmware.install_command)")
	}
	return c.run(ctx, c.InstallCmd, map[string]string{
		"{image}":            image,
		"{name}":             m.Name,
		"{version}":          m.Version,
		"{security_version}": fmt.Sprint(m.SecurityVersion),
	})
}

// Commit runs CommitCmd, if set.
func (c *CommandInstaller) Commit(ctx context.Context) error {
	return c.run(ctx, c.CommitCmd, nil)
}

// Rollback runs RollbackCmd, if set.
func (c *CommandInstaller) Rollback(ctx context.Context) error {
	return c.run(ctx, c.RollbackCmd, nil)
}

func (c *CommandInstaller) run(ctx context.Context, tmpl string, vars map[string]string) error {
	argv := strings.Fields(tmpl)
	if len(argv) == 0 {
		return nil
	}
	for i, a := range argv {
		for k, v := range vars {
			a = strings.ReplaceAll(a, k, v)
		}
		argv[i] = a
	}
	timeout := c.Timeout
	if timeout <= 0 {
		timeout = 10 * time.Minute
	}
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, argv[0], argv[1:]...)
	cmd.Env = c.Env
	tail := &tailBuffer{max: stderrTail}
	cmd.Stderr = tail
	cmd.WaitDelay = 2 * time.Second
	setProcessGroup(cmd) // kill the whole group on timeout, not only the direct child
	err := cmd.Run()
	if err == nil {
		return nil
	}
	ce := &CommandError{Argv: argv, ExitCode: -1, Stderr: tail.String(), Err: err}
	if ctx.Err() == context.DeadlineExceeded {
		ce.TimedOut = true
	}
	var ee *exec.ExitError
	if errors.As(err, &ee) && ee.Exited() {
		ce.ExitCode = ee.ExitCode()
	}
	return ce
}

// tailBuffer keeps the last max bytes written.
type tailBuffer struct {
	mu  sync.Mutex
	max int
	b   []byte
}

func (t *tailBuffer) Write(p []byte) (int, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.b = append(t.b, p...)
	if len(t.b) > t.max {
		t.b = append(t.b[:0], t.b[len(t.b)-t.max:]...)
	}
	return len(p), nil
}

func (t *tailBuffer) String() string {
	t.mu.Lock()
	defer t.mu.Unlock()
	return string(t.b)
}
