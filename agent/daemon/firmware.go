package daemon

import "context"

// firmwareState is the firmware updater's part of a daemon run.
type firmwareState struct{}

// startFirmware starts over-the-air updates when firmware.enabled is set:
// the health check of a just-installed slot, then jobs from the firmware
// topic. (Replaced by the firmware wiring.)
func (d *daemon) startFirmware(ctx context.Context) error { return nil }
