package sdnotify

import (
	"testing"

	"golang.org/x/sys/unix"
)

// monotonicUsec reads CLOCK_MONOTONIC in microseconds, as systemd does.
func monotonicUsec(t *testing.T) int64 {
	t.Helper()
	var ts unix.Timespec
	if err := unix.ClockGettime(unix.CLOCK_MONOTONIC, &ts); err != nil {
		t.Fatal(err)
	}
	return ts.Nano() / 1000
}
