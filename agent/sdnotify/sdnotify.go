// Package sdnotify tells systemd how the agent is doing: READY=1 once it
// serves, WATCHDOG=1 from the loop that must keep running, STATUS= lines for
// `systemctl status`, RELOADING=1 on SIGHUP and STOPPING=1 on shutdown.
//
// It is built on github.com/coreos/go-systemd/v22/daemon and is a no-op when
// the process was not started by systemd with Type=notify (NOTIFY_SOCKET
// unset), so the agent calls it unconditionally. A failure to notify is
// logged once per Notifier, not on every call: a watchdog ping that fails
// every second must not flood the journal.
//
// With a Status line the user sees, for example:
//
//	$ systemctl status tpmagent
//	● tpmagent.service - tpmagent device agent
//	     Loaded: loaded (/lib/systemd/system/tpmagent.service; enabled)
//	     Active: active (running) since Mon 2025-06-02 10:00:00 UTC; 5min ago
//	     Status: "connected mqtts://broker:8883; 1520 readings/s; spool 0 B"
//
// A Notifier holds no global state; each one reads NOTIFY_SOCKET and
// WATCHDOG_USEC from the environment when it is used. It is safe for
// concurrent use.
package sdnotify

import (
	"fmt"
	"log/slog"
	"os"
	"strings"
	"sync"
	"time"

	"github.com/coreos/go-systemd/v22/daemon"
)

// Notifier sends state changes to systemd's notification socket.
type Notifier struct {
	log        *slog.Logger
	notifyOnce sync.Once // first notification failure
	wdOnce     sync.Once // first malformed WATCHDOG_USEC
}

// New returns a Notifier that logs its first notification failure to log
// (slog.Default() when log is nil).
func New(log *slog.Logger) *Notifier {
	if log == nil {
		log = slog.Default()
	}
	return &Notifier{log: log}
}

// Enabled reports whether the process runs under a systemd service manager
// that listens for notifications (NOTIFY_SOCKET set).
func (n *Notifier) Enabled() bool { return os.Getenv("NOTIFY_SOCKET") != "" }

// Ready tells systemd that start-up (or a reload) has finished: for
// Type=notify, `systemctl start` returns only after this.
func (n *Notifier) Ready() { n.notify(daemon.SdNotifyReady) }

// Stopping tells systemd that the agent has begun shutting down (draining
// the spool); systemd then waits up to TimeoutStopSec before SIGKILL.
func (n *Notifier) Stopping() { n.notify(daemon.SdNotifyStopping) }

// Reloading tells systemd that the agent reloads its configuration. It
// sends MONOTONIC_USEC with RELOADING=1, as systemd 253 and later require
// for Type=notify-reload. Call Ready when the reload has finished.
func (n *Notifier) Reloading() {
	n.notify(daemon.SdNotifyReloading + "\n" + strings.TrimSuffix(daemon.SdNotifyMonotonicUsec(), "\n"))
}

// Watchdog resets systemd's watchdog timer (WatchdogSec=). Call it from the
// loop whose stall should get the service restarted, at least every
// WatchdogInterval()/2.
func (n *Notifier) Watchdog() { n.notify(daemon.SdNotifyWatchdog) }

// Status sets the free-form status line that `systemctl status` shows.
// Newlines in the formatted text are replaced by spaces: systemd takes one
// line.
func (n *Notifier) Status(format string, args ...any) {
	s := fmt.Sprintf(format, args...)
	s = strings.NewReplacer("\r\n", " ", "\n", " ", "\r", " ").Replace(s)
	n.notify("STATUS=" + s)
}

// WatchdogInterval returns systemd's watchdog timeout (WATCHDOG_USEC) and
// true when the watchdog is enabled for this process (WATCHDOG_PID unset
// or equal to our pid). Ping at half the interval or more often. A malformed
// WATCHDOG_USEC is logged once and treated as disabled.
func (n *Notifier) WatchdogInterval() (time.Duration, bool) {
	d, err := daemon.SdWatchdogEnabled(false)
	if err != nil {
		n.wdOnce.Do(func() {
			n.log.Warn("sdnotify: WATCHDOG_USEC from systemd is not usable; watchdog pings disabled", "err", err)
		})
		return 0, false
	}
	return d, d > 0
}

// notify sends state; a failure is logged once for the Notifier's lifetime.
func (n *Notifier) notify(state string) {
	if _, err := daemon.SdNotify(false, state); err != nil {
		n.notifyOnce.Do(func() {
			n.log.Warn("sdnotify: cannot notify systemd; check NOTIFY_SOCKET and the unit's NotifyAccess=; further failures are not logged",
				"socket", os.Getenv("NOTIFY_SOCKET"), "state", state, "err", err)
		})
	}
}
