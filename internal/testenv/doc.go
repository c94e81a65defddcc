// Package testenv starts the real components that tests talk to: a lab PKI,
// swtpm over TCP and a TLS mosquitto that requires client certificates.
// Every instance lives under t.TempDir(), listens on a free loopback port and
// is stopped by t.Cleanup. A missing tool fails the test with the apt-get line
// that installs it; it never skips.
package testenv

import (
	"net"
	"os/exec"
	"strconv"
	"testing"
	"time"
)

// FreePort returns a TCP port on 127.0.0.1 that was free a moment ago.
func FreePort(t testing.TB) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("testenv: free port: %v", err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

// FreePortPair returns a port p on 127.0.0.1 such that p and p+1 were free.
func FreePortPair(t testing.TB) int {
	t.Helper()
	for i := 0; i < 50; i++ {
		p := FreePort(t)
		l, err := net.Listen("tcp", "127.0.0.1:"+strconv.Itoa(p+1))
		if err == nil {
			l.Close()
			return p
		}
	}
	t.Fatalf("testenv: no pair of free ports found")
	return 0
}

// NeedTool fails the test when name is not on PATH, naming the package.
func NeedTool(t testing.TB, name, debPackage string) string {
	t.Helper()
	p, err := exec.LookPath(name)
	if err != nil {
		t.Fatalf("testenv: %s not found on PATH: install it with `apt-get install -y %s` (scripts/ci-deps.sh does)", name, debPackage)
	}
	return p
}

// WaitPort waits until addr accepts TCP connections or the timeout passes.
func WaitPort(addr string, timeout time.Duration) error {
	return waitDial("tcp", addr, timeout)
}

// WaitUnix waits until a Unix socket at path accepts connections. Waiting
// for the file is not enough: it exists from bind(2) on, but connections
// are refused until listen(2).
func WaitUnix(path string, timeout time.Duration) error {
	return waitDial("unix", path, timeout)
}

func waitDial(network, addr string, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for {
		c, err := net.DialTimeout(network, addr, 200*time.Millisecond)
		if err == nil {
			c.Close()
			return nil
		}
		if time.Now().After(deadline) {
			return err
		}
		time.Sleep(20 * time.Millisecond)
	}
}
