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
			s := c.Snapshot()
			s.Memory = ReadMemory()
			if err := json.NewEncoder(conn).Encode(s); err != nil && log != nil {
				log.Debug("status: write snapshot", "socket", path, "err", err)
			}
		}()
	}
}

// ListenUnix listens on a unix socket at path with the given file mode. It
// creates the parent directory (0750) and removes a stale socket left by a
// process that died, but refuses to replace a socket that still answers or a
// file that is not a socket.
//
// The socket is bound under a temporary name, given its mode and only then
// renamed to path, so that a client (or a script waiting with `test -S`)
// never finds the file before it accepts connections or while it still has
// the default mode. Close removes path if it is still this socket.
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
	tmp := filepath.Join(filepath.Dir(path), ".~"+filepath.Base(path))
	if len(tmp) > maxUnixPath {
		tmp = path // no room for a longer name: bind in place
	}
	_ = os.Remove(tmp) // left by a process killed between bind and rename
	l, err := net.Listen("unix", tmp)
	if err != nil {
		return nil, fmt.Errorf("socket %s: listen: %w", path, err)
	}
	ul := l.(*net.UnixListener)
	ul.SetUnlinkOnClose(false)
	fail := func(err error) (net.Listener, error) {
		ul.Close()
		os.Remove(tmp)
		return nil, err
	}
	if err := os.Chmod(tmp, mode); err != nil {
		return fail(fmt.Errorf("socket %s: chmod %o: %w", path, mode, err))
	}
	fi, err := os.Lstat(tmp)
	if err != nil {
		return fail(fmt.Errorf("socket %s: %w", path, err))
	}
	if tmp != path {
		if err := os.Rename(tmp, path); err != nil {
			return fail(fmt.Errorf("socket %s: rename from %s: %w", path, tmp, err))
		}
	}
	return &unixListener{UnixListener: ul, path: path, fi: fi}, nil
}

// maxUnixPath is the longest socket path Linux takes (sun_path is 108
// bytes with the terminating NUL).
const maxUnixPath = 107

// unixListener removes its socket file on Close unless another process
// has replaced it meanwhile.
type unixListener struct {
	*net.UnixListener
	path string
	fi   os.FileInfo
}

func (l *unixListener) Close() error {
	// Remove first, so that the file is gone when Accept returns.
	if fi, err := os.Lstat(l.path); err == nil && os.SameFile(fi, l.fi) {
		os.Remove(l.path)
	}
	return l.UnixListener.Close()
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
