package firmware

import "context"

// Installer puts a verified image into service. The Updater calls Install once per job, then
// (after the restart, in OnStart) Commit when the health check passed or Rollback when it failed.
type Installer interface {
	// Install writes the verified image at path into the inactive slot and switches to it as a
	// trial, so that the next start runs it while the previous slot stays available.
	Install(ctx context.Context, image string, m *Manifest) error
	// Commit makes the trial slot permanent. Calling it again, or without a trial, is a no-op.
	Commit(ctx context.Context) error
	// Rollback switches back to the previous slot. Calling it without a trial is a no-op.
	Rollback(ctx context.Context) error
}

// BootCounter is implemented by installers that count starts of a trial slot themselves
// (FileSlots). The Updater uses it to detect a crash loop during the health check.
type BootCounter interface {
	// RecordBoot counts one start of the trial slot and returns the number of starts so far
	// (0 when no trial is pending).
	RecordBoot(ctx context.Context) (int, error)
}
