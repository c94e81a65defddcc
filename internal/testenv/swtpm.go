package testenv

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"strconv"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport/tcp"
)

// Swtpm is a software TPM 2.0 (`swtpm socket --tpm2`) serving the MS simulator TCP protocol on
// 127.0.0.1: the command port is Port and the control port Port+1. Its state lives in a
// directory under t.TempDir(), so persistent objects and NV indices survive Restart.
//
// swtpm serves one client connection at a time: close your own connection (e.g.
// tpmkeys.TPM.Close) before running tpm2-tools against the same instance.
type Swtpm struct {
	tb       testing.TB
	port     int
	stateDir string
	logFile  string

	mu  sync.Mutex
	cmd *exec.Cmd
	// exited is closed when the current process has been waited for.
	exited chan struct{}
}

// StartSwtpm starts swtpm on two consecutive free loopback ports with its state in a fresh
// t.TempDir(), waits until it answers a TPM command and registers Stop with t.Cleanup.
// It fails the test (never skips) when swtpm is not installed.
func StartSwtpm(tb testing.TB) *Swtpm {
	tb.Helper()
	if _, err := exec.LookPath("swtpm"); err != nil {
		tb.Fatalf("testenv: swtpm not found in PATH (%v): install it with `apt-get install swtpm swtpm-tools`", err)
	}
	dir := tb.TempDir()
	s := &Swtpm{tb: tb, stateDir: dir, logFile: dir + "/swtpm.log"}
	var lastErr error
	for attempt := 0; attempt < 10; attempt++ {
		port, err := freePortPair()
		if err != nil {
			lastErr = err
			continue
		}
		s.port = port
		if err := s.start(); err != nil {
			lastErr = err
			continue
		}
		tb.Cleanup(s.Stop)
		return s
	}
	tb.Fatalf("testenv: start swtpm: %v", lastErr)
	return nil
}

// freePortPair returns a port P such that P and P+1 were both free on 127.0.0.1.
func freePortPair() (int, error) {
	for i := 0; i < 50; i++ {
		l1, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return 0, err
		}
		p := l1.Addr().(*net.TCPAddr).Port
		if p >= 65535 {
			l1.Close()
			continue
		}
		l2, err := net.Listen("tcp", "127.0.0.1:"+strconv.Itoa(p+1))
		l1.Close()
		if err != nil {
			continue
		}
		l2.Close()
		return p, nil
	}
	return 0, errors.New("no two consecutive free loopback ports found")
}

// start launches swtpm on s.port with s.stateDir and waits until it answers.
func (s *Swtpm) start() error {
	cmd := exec.Command("swtpm", "socket", "--tpm2",
		"--server", fmt.Sprintf("type=tcp,port=%d,bindaddr=127.0.0.1", s.port),
		"--ctrl", fmt.Sprintf("type=tcp,port=%d,bindaddr=127.0.0.1", s.port+1),
		"--tpmstate", "dir="+s.stateDir,
		"--log", "file="+s.logFile+",level=1",
		"--flags", "not-need-init,startup-clear")
	var stderr bytes.Buffer
	cmd.Stdout = &stderr
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("exec swtpm: %w", err)
	}
	exited := make(chan struct{})
	go func() {
		_ = cmd.Wait()
		close(exited)
	}()
	deadline := time.Now().Add(10 * time.Second)
	for {
		err := ping(s.Addr(), fmt.Sprintf("127.0.0.1:%d", s.port+1))
		if err == nil {
			break
		}
		select {
		case <-exited:
			log, _ := os.ReadFile(s.logFile)
			return fmt.Errorf("swtpm on port %d exited early: %s %s (%v)", s.port, stderr.String(), log, err)
		default:
		}
		if time.Now().After(deadline) {
			_ = cmd.Process.Kill()
			<-exited
			return fmt.Errorf("swtpm on port %d did not answer within 10s: %v", s.port, err)
		}
		time.Sleep(20 * time.Millisecond)
	}
	s.mu.Lock()
	s.cmd, s.exited = cmd, exited
	s.mu.Unlock()
	return nil
}

// ping opens a connection, sends TPM2_GetRandom and closes the connection again (swtpm
// serves one connection at a time).
func ping(cmdAddr, platAddr string) error {
	t, err := tcp.Open(tcp.Config{CommandAddress: cmdAddr, PlatformAddress: platAddr})
	if err != nil {
		return err
	}
	defer t.Close()
	_, err = tpm2.GetRandom{BytesRequested: 8}.Execute(t)
	return err
}

// Port returns the TPM command port; the control (platform) port is Port()+1.
func (s *Swtpm) Port() int { return s.port }

// Addr returns the command address "127.0.0.1:P".
func (s *Swtpm) Addr() string { return fmt.Sprintf("127.0.0.1:%d", s.port) }

// URL returns the device string for tpmkeys.Open: "swtpm://127.0.0.1:P".
func (s *Swtpm) URL() string { return "swtpm://" + s.Addr() }

// StateDir returns the directory holding the TPM state.
func (s *Swtpm) StateDir() string { return s.stateDir }

// TCTI returns the tpm2-tools TCTI string for this instance: "swtpm:host=127.0.0.1,port=P".
func (s *Swtpm) TCTI() string { return fmt.Sprintf("swtpm:host=127.0.0.1,port=%d", s.port) }

// Env returns os.Environ() plus TPM2TOOLS_TCTI and TCTI pointing tpm2-tools at this instance.
func (s *Swtpm) Env() []string {
	return append(os.Environ(), "TPM2TOOLS_TCTI="+s.TCTI(), "TCTI="+s.TCTI())
}

// Command returns an exec.Cmd for a tpm2-tools program (or any program) with Env() set.
func (s *Swtpm) Command(ctx context.Context, name string, args ...string) *exec.Cmd {
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.Env = s.Env()
	return cmd
}

// Stop terminates swtpm (SIGTERM, then SIGKILL after 5s) and waits for it. It is safe to call
// more than once; StartSwtpm registers it with t.Cleanup.
func (s *Swtpm) Stop() {
	s.mu.Lock()
	cmd, exited := s.cmd, s.exited
	s.cmd, s.exited = nil, nil
	s.mu.Unlock()
	if cmd == nil {
		return
	}
	_ = cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-exited:
	case <-time.After(5 * time.Second):
		_ = cmd.Process.Kill()
		<-exited
	}
}

// Restart stops swtpm and starts it again on the same ports with the same state directory,
// like a device reboot: persistent objects and NV survive, transient objects and sessions do not.
func (s *Swtpm) Restart() {
	s.tb.Helper()
	s.Stop()
	var err error
	for attempt := 0; attempt < 50; attempt++ {
		if err = s.start(); err == nil {
			return
		}
		time.Sleep(100 * time.Millisecond) // the old sockets may linger briefly
	}
	s.tb.Fatalf("testenv: restart swtpm on port %d: %v", s.port, err)
}
