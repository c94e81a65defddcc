package status

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"time"
)

// Serve listens on the unix socket path (mode 0660, the directory created
// 0750 when missing, a stale socket file replaced) and writes one JSON
// Snapshot to every client that connects, then closes the connection. It
// returns when ctx is done, removing the socket.
func Serve(ctx context.Context, path string, c *Counters, log *slog.Logger) error {
	l, err := ListenUnix(path, 0o660)
	if err != nil {
		return fmt.Errorf("status: %w", err)
	}
	go func() {
		<-ctx.Done()
		l.Close()
	}()
	defer os.Remove(path)
	for {
		conn, err := l.Accept()
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			return fmt.Errorf("status: accept on %s: %w", path, err)
		}
		go func() {
			defer conn.Close()
			_ = conn.SetWriteDeadline(time.Now().Add(5 * time.Second))
			if err := json.NewEncoder(conn).Encode(c.Snapshot()); err != nil && log != nil {
				log.Debug("status: write snapshot", "socket", path, "err", err)
			}
		}()
	}
}

// ListenUnix listens on a unix socket at path with the given file mode. It
// creates the parent directory (0750) and removes a stale socket left by a
// process that died, but refuses to replace a socket that still answers or a
// file that is not a socket.
func ListenUnix(path string, mode os.FileMode) (net.Listener, error) {
	if err := os.MkdirAll(filepath.Dir(path), 0o750); err != nil {
		return nil, fmt.Errorf("socket %s: create directory: %w", path, err)
	}
	if fi, err := os.Lstat(path); err == nil {
		if fi.Mode()&os.ModeSocket == 0 {
			return nil, fmt.Errorf("socket %s: exists and is not a socket: remove it or choose another path", path)
		}
		if c, err := net.DialTimeout("unix", path, time.Second); err == nil {
			c.Close()
			return nil, fmt.Errorf("socket %s: another process is listening on it (is the agent already running?)", path)
		}
		if err := os.Remove(path); err != nil {
			return nil, fmt.Errorf("socket %s: remove stale socket: %w", path, err)
		}
	}
	l, err := net.Listen("unix", path)
	if err != nil {
		return nil, fmt.Errorf("socket %s: listen: %w", path, err)
	}
	l.(*net.UnixListener).SetUnlinkOnClose(true)
	if err := os.Chmod(path, mode); err != nil {
		l.Close()
		return nil, fmt.Errorf("socket %s: chmod %o: %w", path, mode, err)
	}
	return l, nil
}

// Fetch reads one Snapshot from the status socket at path.
func Fetch(ctx context.Context, path string) (Snapshot, error) {
	var d net.Dialer
	conn, err := d.DialContext(ctx, "unix", path)
	if err != nil {
		return Snapshot{}, fmt.Errorf("status: connect to %s: %w (is `tpmagent run` running with this status.socket?)", path, err)
	}
	defer conn.Close()
	if dl, ok := ctx.Deadline(); ok {
		_ = conn.SetDeadline(dl)
	}
	var s Snapshot
	if err := json.NewDecoder(io.LimitReader(conn, 1<<20)).Decode(&s); err != nil {
		if errors.Is(err, io.EOF) {
			return Snapshot{}, fmt.Errorf("status: %s closed without a snapshot", path)
		}
		return Snapshot{}, fmt.Errorf("status: read snapshot from %s: %w", path, err)
	}
	return s, nil
}
