package sdnotify

import (
	"bytes"
	"errors"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"
)

// listen starts a unixgram socket like systemd's notification socket and
// points NOTIFY_SOCKET at it. It returns the connection to read from.
func listen(t *testing.T) *net.UnixConn {
	t.Helper()
	// Short directory: socket paths are limited to 108 bytes.
	dir, err := os.MkdirTemp("", "sdn")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	path := filepath.Join(dir, "notify.sock")
	conn, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: path, Net: "unixgram"})
	if err != nil {
		t.Fatalf("listen on %s: %v", path, err)
	}
	t.Cleanup(func() { conn.Close() })
	t.Setenv("NOTIFY_SOCKET", path)
	return conn
}

// recv reads one datagram from conn within a second.
func recv(t *testing.T, conn *net.UnixConn) string {
	t.Helper()
	buf := make([]byte, 4096)
	if err := conn.SetReadDeadline(time.Now().Add(time.Second)); err != nil {
		t.Fatal(err)
	}
	k, err := conn.Read(buf)
	if err != nil {
		t.Fatalf("read notification: %v", err)
	}
	return string(buf[:k])
}

func TestNotifications(t *testing.T) {
	conn := listen(t)
	var logBuf bytes.Buffer
	n := New(slog.New(slog.NewTextHandler(&logBuf, nil)))
	if !n.Enabled() {
		t.Fatal("Enabled() = false with NOTIFY_SOCKET set")
	}
	tests := []struct {
		name string
		send func()
		want string
	}{
		{"ready", n.Ready, "READY=1"},
		{"watchdog", n.Watchdog, "WATCHDOG=1"},
		{"status", func() { n.Status("connected %s; %d readings/s", "mqtts://127.0.0.1:8883", 1520) },
			"STATUS=connected mqtts://127.0.0.1:8883; 1520 readings/s"},
		{"status one line", func() { n.Status("a\nb\r\nc") }, "STATUS=a b c"},
		{"stopping", n.Stopping, "STOPPING=1"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			tt.send()
			if got := recv(t, conn); got != tt.want {
				t.Errorf("got %q, want %q", got, tt.want)
			}
		})
	}
	if logBuf.Len() != 0 {
		t.Errorf("unexpected log output: %s", logBuf.String())
	}
}

func TestReloadingSendsMonotonicUsec(t *testing.T) {
	conn := listen(t)
	n := New(nil)
	before := monotonicUsec(t)
	n.Reloading()
	after := monotonicUsec(t)
	lines := strings.Split(recv(t, conn), "\n")
	if len(lines) != 2 || lines[0] != "RELOADING=1" || !strings.HasPrefix(lines[1], "MONOTONIC_USEC=") {
		t.Fatalf("got %q, want [RELOADING=1 MONOTONIC_USEC=N]", lines)
	}
	usec, err := strconv.ParseInt(strings.TrimPrefix(lines[1], "MONOTONIC_USEC="), 10, 64)
	if err != nil {
		t.Fatalf("MONOTONIC_USEC not a number: %q", lines[1])
	}
	if usec < before || usec > after {
		t.Errorf("MONOTONIC_USEC=%d not within [%d, %d] (CLOCK_MONOTONIC)", usec, before, after)
	}
}

func TestNoSocketIsNoOp(t *testing.T) {
	t.Setenv("NOTIFY_SOCKET", "")
	var logBuf bytes.Buffer
	n := New(slog.New(slog.NewTextHandler(&logBuf, nil)))
	if n.Enabled() {
		t.Fatal("Enabled() = true without NOTIFY_SOCKET")
	}
	n.Ready()
	n.Watchdog()
	n.Status("x")
	n.Reloading()
	n.Stopping()
	if logBuf.Len() != 0 {
		t.Errorf("no-op notifier logged: %s", logBuf.String())
	}
}

func TestErrorLoggedOnce(t *testing.T) {
	t.Setenv("NOTIFY_SOCKET", filepath.Join(t.TempDir(), "absent.sock"))
	var logBuf bytes.Buffer
	n := New(slog.New(slog.NewTextHandler(&logBuf, nil)))
	for range 5 {
		n.Watchdog()
	}
	n.Ready()
	out := logBuf.String()
	if got := strings.Count(out, "\n"); got != 1 {
		t.Fatalf("logged %d lines, want 1:\n%s", got, out)
	}
	if !strings.Contains(out, "absent.sock") || !strings.Contains(out, "WATCHDOG=1") {
		t.Errorf("log line does not name the socket and state: %s", out)
	}
}

func TestWatchdogInterval(t *testing.T) {
	pid := strconv.Itoa(os.Getpid())
	tests := []struct {
		name      string
		usec, pid string
		want      time.Duration
		wantOK    bool
		wantLog   bool
	}{
		{"unset", "", "", 0, false, false},
		{"30s", "30000000", "", 30 * time.Second, true, false},
		{"our pid", "15000000", pid, 15 * time.Second, true, false},
		{"other pid", "15000000", "1", 0, false, false},
		{"zero", "0", "", 0, false, true},
		{"negative", "-5", "", 0, false, true},
		{"garbage", "30s", "", 0, false, true},
		{"bad pid", "1000", "x", 0, false, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Setenv("WATCHDOG_USEC", tt.usec)
			t.Setenv("WATCHDOG_PID", tt.pid)
			var logBuf bytes.Buffer
			n := New(slog.New(slog.NewTextHandler(&logBuf, nil)))
			got, ok := n.WatchdogInterval()
			if got != tt.want || ok != tt.wantOK {
				t.Errorf("WatchdogInterval() = %v, %v; want %v, %v", got, ok, tt.want, tt.wantOK)
			}
			n.WatchdogInterval() // a second call must not log again
			if lines := strings.Count(logBuf.String(), "\n"); (lines == 1) != tt.wantLog || lines > 1 {
				t.Errorf("logged %d lines (want log: %v): %s", lines, tt.wantLog, logBuf.String())
			}
		})
	}
}

func TestNotifyAfterListenerGone(t *testing.T) {
	conn := listen(t)
	n := New(nil)
	n.Ready()
	if got := recv(t, conn); got != "READY=1" {
		t.Fatalf("got %q", got)
	}
	conn.Close()
	// Must not panic or block once systemd's socket is gone.
	done := make(chan struct{})
	go func() { n.Watchdog(); close(done) }()
	select {
	case <-done:
	case <-time.After(2 * time.Second):
		t.Fatal(errors.New("Watchdog blocked after the socket closed"))
	}
}
