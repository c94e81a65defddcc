package firmware

import (
	"context"
	"time"
)

// States of the device-side state machine (docs/FIRMWARE.md §6).
const (
	StateIdle        = "idle"
	StateDownloading = "downloading"
	StateVerifying   = "verifying"
	StateInstalling  = "installing"
	StateRestarting  = "restarting"
	StateHealthCheck = "health_check"
	StateCommitted   = "committed"
	StateRolledBack  = "rolled_back"
	StateRejected    = "rejected"
	StateFailed      = "failed"
)

// Status is one status message, published as JSON on StatusTopic(device).
type Status struct {
	State           string    `json:"state"`
	Name            string    `json:"name,omitempty"`
	Version         string    `json:"version,omitempty"`
	SecurityVersion uint64    `json:"security_version,omitempty"`
	Percent         int       `json:"percent,omitempty"`
	Bytes           int64     `json:"bytes,omitempty"`
	Size            int64     `json:"size,omitempty"`
	Reason          string    `json:"reason,omitempty"`
	Error           string    `json:"error,omitempty"`
	Time            time.Time `json:"time"`
}

// Reporter delivers status messages (the agent publishes them, retained, QoS 1). Report should
// not block for long: it is called from inside the download loop. Its errors are logged only.
type Reporter interface {
	Report(ctx context.Context, s Status) error
}

// ReporterFunc adapts a function to Reporter.
type ReporterFunc func(ctx context.Context, s Status) error

// Report calls f.
func (f ReporterFunc) Report(ctx context.Context, s Status) error { return f(ctx, s) }

// HealthChecker decides whether the firmware that just started is healthy. For the agent:
// broker connected and one telemetry message acknowledged. Check must return when ctx ends.
type HealthChecker interface {
	Check(ctx context.Context) error
}

// HealthFunc adapts a function to HealthChecker.
type HealthFunc func(ctx context.Context) error

// Check calls f.
func (f HealthFunc) Check(ctx context.Context) error { return f(ctx) }
