package testenv

import (
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"
)

// NotifySocket is a NOTIFY_SOCKET as systemd provides it to Type=notify
// services: a unixgram socket whose datagrams (READY=1, WATCHDOG=1,
// STATUS=…, one per line) are recorded. Point NOTIFY_SOCKET at Path.
type NotifySocket struct {
	Path string

	mu   sync.Mutex
	msgs []string
}

// StartNotifySocket listens on a socket in a short temporary directory
// (socket paths are limited to 108 bytes); it is closed by tb.Cleanup.
func StartNotifySocket(tb testing.TB) *NotifySocket {
	tb.Helper()
	dir, err := os.MkdirTemp("", "notify")
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { os.RemoveAll(dir) })
	n := &NotifySocket{Path: filepath.Join(dir, "sd.sock")}
	conn, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: n.Path, Net: "unixgram"})
	if err != nil {
		tb.Fatalf("testenv: notify socket %s: %v", n.Path, err)
	}
	tb.Cleanup(func() { conn.Close() })
	go func() {
		buf := make([]byte, 4096)
		for {
			k, err := conn.Read(buf)
			if err != nil {
				return
			}
			n.mu.Lock()
			n.msgs = append(n.msgs, strings.Split(strings.TrimSpace(string(buf[:k])), "\n")...)
			n.mu.Unlock()
		}
	}()
	return n
}

// Count returns how many recorded lines start with prefix.
func (n *NotifySocket) Count(prefix string) int {
	n.mu.Lock()
	defer n.mu.Unlock()
	c := 0
	for _, m := range n.msgs {
		if strings.HasPrefix(m, prefix) {
			c++
		}
	}
	return c
}

// WaitFor waits until a line starting with prefix arrived; the error lists
// what did arrive.
func (n *NotifySocket) WaitFor(prefix string, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for n.Count(prefix) == 0 {
		if time.Now().After(deadline) {
			n.mu.Lock()
			defer n.mu.Unlock()
			return fmt.Errorf("no %q on NOTIFY_SOCKET within %v; got %q", prefix, timeout, n.msgs)
		}
		time.Sleep(10 * time.Millisecond)
	}
	return nil
}
