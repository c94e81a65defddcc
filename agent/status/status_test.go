package status

import (
	"context"
	"errors"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func TestServeAndFetch(t *testing.T) {
	var c Counters
	c.ReadingsIn.Add(7)
	c.ReadingsRejected.Add(2)
	c.MessagesAcked.Add(3)
	c.TPMSignatures = func() uint64 { return 1 }
	c.Broker = func() string { return "mqtts://127.0.0.1:8883" }
	c.SpoolStats = func() Spool { return Spool{Records: 5, Bytes: 100, Dropped: 4} }
	c.SetError(errors.New("boom"))
	path := filepath.Join(t.TempDir(), "run", "status.sock")
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- Serve(ctx, path, &c, nil) }()
	var s Snapshot
	var err error
	for i := 0; i < 100; i++ {
		if s, err = Fetch(ctx, path); err == nil {
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	if err != nil {
		t.Fatal(err)
	}
	if s.ReadingsIn != 7 || s.ReadingsRejected != 2 || s.MessagesAcked != 3 || s.TPMSignatures != 1 ||
		s.Spool.Records != 5 || s.Drops != 4 || !s.Connected || s.LastError != "boom" {
		t.Fatalf("snapshot %+v", s)
	}
	if m := s.Memory; m == nil || m.RSSKiB <= 0 || m.RSSPeakKiB < m.RSSKiB || m.AnonKiB <= 0 || m.FileKiB <= 0 || m.AnonKiB+m.FileKiB > m.RSSKiB {
		t.Fatalf("snapshot memory %+v: want the process's resident set from /proc/self/status", s.Memory)
	}
	fi, err := os.Stat(path)
	if err != nil || fi.Mode().Perm() != 0o660 {
		t.Fatalf("socket mode %v, %v; want 0660", fi.Mode(), err)
	}
	// A second listener on a live socket is refused.
	if _, err := ListenUnix(path, 0o660); err == nil || !strings.Contains(err.Error(), "already running") {
		t.Fatalf("second listen: %v", err)
	}
	cancel()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(path); !os.IsNotExist(err) {
		t.Fatalf("socket left behind: %v", err)
	}
}

// TestListenUnixAppearsReady: the socket file appears only once it accepts
// connections, with its final mode; no temporary name is left; Close
// removes it but not a socket another process put there since.
func TestListenUnixAppearsReady(t *testing.T) {
	dir := t.TempDir()
	long := filepath.Join(dir, strings.Repeat("s", 107-len(dir)-1)) // exactly the limit
	for _, tc := range []struct {
		name, path string
		mode       os.FileMode
		stale      bool // a temporary name left by a killed process
	}{
		{"plain", filepath.Join(dir, "a.sock"), 0o640, false},
		{"stale temporary", filepath.Join(dir, "b.sock"), 0o660, true},
		{"path at the length limit", long, 0o600, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			tmp := filepath.Join(filepath.Dir(tc.path), ".~"+filepath.Base(tc.path))
			if tc.stale {
				if err := os.WriteFile(tmp, nil, 0o600); err != nil {
					t.Fatal(err)
				}
			}
			l, err := ListenUnix(tc.path, tc.mode)
			if err != nil {
				t.Fatal(err)
			}
			fi, err := os.Lstat(tc.path)
			if err != nil || fi.Mode()&os.ModeSocket == 0 || fi.Mode().Perm() != tc.mode {
				t.Fatalf("socket %v, %v; want a socket with mode %o", fi.Mode(), err, tc.mode)
			}
			if _, err := os.Lstat(tmp); !os.IsNotExist(err) {
				t.Fatalf("temporary %s left: %v", tmp, err)
			}
			go func() {
				if c, err := l.Accept(); err == nil {
					c.Close()
				}
			}()
			c, err := net.Dial("unix", tc.path)
			if err != nil {
				t.Fatalf("dial right after ListenUnix: %v", err)
			}
			c.Close()
			if err := l.Close(); err != nil {
				t.Fatal(err)
			}
			if _, err := os.Lstat(tc.path); !os.IsNotExist(err) {
				t.Fatalf("socket left after Close: %v", err)
			}
		})
	}
	// Close leaves a socket that replaced ours alone.
	path := filepath.Join(dir, "c.sock")
	l, err := ListenUnix(path, 0o660)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.Remove(path); err != nil {
		t.Fatal(err)
	}
	other, err := ListenUnix(path, 0o660)
	if err != nil {
		t.Fatal(err)
	}
	defer other.Close()
	l.Close()
	if _, err := os.Lstat(path); err != nil {
		t.Fatalf("Close of the old listener removed the new socket: %v", err)
	}
}

func TestFetchNoAgent(t *testing.T) {
	_, err := Fetch(context.Background(), filepath.Join(t.TempDir(), "none.sock"))
	if err == nil || !strings.Contains(err.Error(), "tpmagent run") {
		t.Fatalf("Fetch without agent: %v", err)
	}
}
