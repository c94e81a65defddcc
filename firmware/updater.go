package firmware

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"time"
)

const updaterStateFile = "updater.json"

// Config configures an Updater.
type Config struct {
	// StateDir holds updater.json, image.part and download.json. Deleting it does not weaken
	// anti-rollback: that lives in Counter.
	StateDir string
	// Hardware is this device's hardware id, matched against the manifest's "hardware".
	Hardware string
	// Trust holds the release public keys (firmware.trust).
	Trust *TrustStore
	// Counter is the anti-rollback counter (a TPM NV counter in production).
	Counter Counter
	// Installer installs, commits and rolls back (FileSlots or CommandInstaller).
	Installer Installer
	// Reporter receives status messages; nil drops them.
	Reporter Reporter
	// OpenSource turns a manifest source ("mqtt" or an https:// URL) into a Source; return an
	// error for sources this device cannot use. See Sources.
	OpenSource func(m *Manifest, source string) (Source, error)
	// Restart is run after installing (to start the new slot) and after a rollback (to start
	// the previous one): e.g. exit so systemd restarts the agent, or run a reboot command.
	// nil does nothing; the caller restarts.
	Restart func(ctx context.Context) error
	// HealthTimeout bounds the health check (firmware.health_timeout); 0 means 60s.
	HealthTimeout time.Duration
	// MaxBootAttempts is how many starts of a trial slot may fail to finish the health check
	// (e.g. crash) before rolling back; 0 means 3.
	MaxBootAttempts int
	// MaxCounterStep is the largest accepted security_version jump; 0 means 1000.
	MaxCounterStep uint64
	// CurrentVersion, if set, is the version running now: a job for it that this state
	// directory knows nothing about (e.g. after the directory was deleted) is ignored instead
	// of being installed again.
	CurrentVersion string
	// PersistEvery is Downloader.PersistEvery (0: 1 MiB).
	PersistEvery int64
	// Log receives progress and warnings; nil discards them.
	Log *slog.Logger
}

// Updater runs the device side of firmware updates. Its methods serialize on an internal lock;
// a call that finds the lock taken returns ErrBusy rather than waiting.
type Updater struct {
	cfg Config
	dl  *Downloader
	mu  sync.Mutex
}

// jobState is updater.json: the last verified job and where it stands.
type jobState struct {
	Phase           string    `json:"phase"`
	Digest          string    `json:"manifest_sha256,omitempty"`
	Job             []byte    `json:"job,omitempty"` // the signed envelope, to resume
	Name            string    `json:"name,omitempty"`
	Version         string    `json:"version,omitempty"`
	SecurityVersion uint64    `json:"security_version,omitempty"`
	Reason          string    `json:"reason,omitempty"`
	Error           string    `json:"error,omitempty"`
	HealthAttempts  int       `json:"health_attempts,omitempty"`
	Time            time.Time `json:"time"`
}

// New checks cfg and returns an Updater.
func New(cfg Config) (*Updater, error) {
	switch {
	case cfg.StateDir == "":
		return nil, errors.New("firmware: updater: no state directory")
	case cfg.Hardware == "":
		return nil, errors.New("firmware: updater: no hardware id: set firmware.hardware")
	case cfg.Trust == nil || len(cfg.Trust.KeyIDs()) == 0:
		return nil, errors.New("firmware: updater: empty trust store: list release public keys in firmware.trust")
	case cfg.Counter == nil:
		return nil, errors.New("firmware: updater: no anti-rollback counter")
	case cfg.Installer == nil:
		return nil, errors.New("firmware: updater: no installer")
	}
	if cfg.HealthTimeout <= 0 {
		cfg.HealthTimeout = 60 * time.Second
	}
	if cfg.MaxBootAttempts <= 0 {
		cfg.MaxBootAttempts = 3
	}
	if cfg.Log == nil {
		cfg.Log = slog.New(slog.DiscardHandler)
	}
	if err := os.MkdirAll(cfg.StateDir, 0o700); err != nil {
		return nil, fmt.Errorf("firmware: updater state directory: %w", err)
	}
	return &Updater{cfg: cfg, dl: &Downloader{Dir: cfg.StateDir, Log: cfg.Log, PersistEvery: cfg.PersistEvery}}, nil
}

// BytesFetched returns the image bytes this Updater received from sources.
func (u *Updater) BytesFetched() int64 { return u.dl.BytesFetched() }

// BytesRehashed returns the bytes this Updater re-read from disk to resume downloads.
func (u *Updater) BytesRehashed() int64 { return u.dl.BytesRehashed() }

// Status returns the persisted state of the last job ("idle" if none).
func (u *Updater) Status() (Status, error) {
	st, err := u.load()
	if err != nil {
		return Status{}, err
	}
	return Status{State: st.Phase, Name: st.Name, Version: st.Version, SecurityVersion: st.SecurityVersion,
		Reason: st.Reason, Error: st.Error, Time: st.Time}, nil
}

func (u *Updater) statePath() string { return filepath.Join(u.cfg.StateDir, updaterStateFile) }

func (u *Updater) load() (jobState, error) {
	data, err := os.ReadFile(u.statePath())
	if errors.Is(err, os.ErrNotExist) {
		return jobState{Phase: StateIdle}, nil
	}
	if err != nil {
		return jobState{}, fmt.Errorf("firmware: read updater state: %w", err)
	}
	var st jobState
	if err := json.Unmarshal(data, &st); err != nil {
		return jobState{}, fmt.Errorf("firmware: updater state %s: %w: remove it to forget the current job", u.statePath(), err)
	}
	return st, nil
}

func (u *Updater) save(st *jobState) error {
	st.Time = time.Now().UTC()
	data, err := json.Marshal(st)
	if err != nil {
		return err
	}
	return writeFileAtomic(u.statePath(), data, 0o600)
}

func (u *Updater) report(ctx context.Context, s Status) {
	if s.Time.IsZero() {
		s.Time = time.Now().UTC()
	}
	u.cfg.Log.Info("firmware status", "state", s.State, "version", s.Version, "percent", s.Percent, "reason", s.Reason, "error", s.Error)
	if u.cfg.Reporter == nil {
		return
	}
	if err := u.cfg.Reporter.Report(ctx, s); err != nil {
		u.cfg.Log.Warn("firmware status not delivered", "state", s.State, "err", err)
	}
}

func statusOf(st *jobState, state string) Status {
	return Status{State: state, Name: st.Name, Version: st.Version, SecurityVersion: st.SecurityVersion}
}

// finish persists a terminal phase for the job and reports it.
func (u *Updater) finish(ctx context.Context, st *jobState, phase, reason string, cause error) error {
	st.Phase, st.Reason, st.Error = phase, reason, ""
	if cause != nil {
		st.Error = cause.Error()
	}
	st.Job = nil
	serr := u.save(st)
	s := statusOf(st, phase)
	s.Reason, s.Error = reason, st.Error
	u.report(ctx, s)
	return serr
}

// HandleJob runs one job (a signed envelope from the job topic) as far as it goes on this start:
// verify the manifest before anything else, check hardware and security_version, download
// (resuming), verify size and SHA-256, install into the inactive slot, persist "restarting" and
// run the restart hook. It blocks for the whole download: call it from its own goroutine, not
// from an MQTT message handler. A job already finished (committed, rolled back, rejected,
// failed) is ignored, since retained jobs arrive again at every connection; an empty payload (a
// cleared retained job) is ignored. The returned error is also reported as a status message,
// except ErrBusy and cancellation.
func (u *Updater) HandleJob(ctx context.Context, job []byte) error {
	if len(job) == 0 {
		return nil
	}
	if !u.mu.TryLock() {
		return fmt.Errorf("firmware: a job is in progress: %w", ErrBusy)
	}
	defer u.mu.Unlock()
	return u.handleJob(ctx, job)
}

func (u *Updater) handleJob(ctx context.Context, job []byte) error {
	m, err := ParseAndVerify(job, u.cfg.Trust)
	if err != nil {
		// Not verified: nothing is persisted about it (an attacker could send any number).
		u.report(ctx, Status{State: StateRejected, Reason: Reason(err), Error: err.Error()})
		return err
	}
	prev, err := u.load()
	if err != nil {
		return err
	}
	resuming := false
	if prev.Digest == m.Digest() {
		switch prev.Phase {
		case StateCommitted, StateRolledBack, StateRejected, StateFailed:
			u.cfg.Log.Debug("firmware job already handled", "version", m.Version, "phase", prev.Phase)
			return nil
		case StateRestarting, StateHealthCheck:
			return fmt.Errorf("firmware: %s %s is on trial (%s): %w", m.Name, m.Version, prev.Phase, ErrBusy)
		default:
			resuming = true
		}
	} else if prev.Phase == StateRestarting || prev.Phase == StateHealthCheck {
		return fmt.Errorf("firmware: %s %s is on trial (%s); job %s %s must wait: %w", prev.Name, prev.Version, prev.Phase, m.Name, m.Version, ErrBusy)
	}
	if !resuming && u.cfg.CurrentVersion != "" && m.Version == u.cfg.CurrentVersion && prev.Digest != m.Digest() {
		u.cfg.Log.Info("firmware job is for the running version: ignored", "version", m.Version)
		return nil
	}
	st := &jobState{Phase: StateDownloading, Digest: m.Digest(), Job: job, Name: m.Name, Version: m.Version, SecurityVersion: m.SecurityVersion}
	if resuming {
		st.Phase = prev.Phase
	}

	// Checks that need no download.
	if err := CheckCompatible(m, u.cfg.Hardware); err != nil {
		return errors.Join(err, u.finish(ctx, st, StateRejected, ReasonIncompatible, err))
	}
	cv, err := u.cfg.Counter.Read(ctx)
	if err != nil {
		return fmt.Errorf("firmware: read anti-rollback counter: %w", err)
	}
	if err := CheckSecurityVersion(m, cv, u.cfg.MaxCounterStep); err != nil {
		return errors.Join(err, u.finish(ctx, st, StateRejected, ReasonSecurityVersion, err))
	}
	var sources []Source
	var srcErrs []string
	for _, s := range m.Sources {
		if u.cfg.OpenSource == nil {
			srcErrs = append(srcErrs, s+": no source opener configured")
			continue
		}
		src, err := u.cfg.OpenSource(m, s)
		if err != nil {
			srcErrs = append(srcErrs, err.Error())
			continue
		}
		sources = append(sources, src)
	}
	if len(sources) == 0 {
		err := fmt.Errorf("firmware: %s %s: none of its sources is usable here (%s): %w", m.Name, m.Version, strings.Join(srcErrs, "; "), ErrNoSource)
		return errors.Join(err, u.finish(ctx, st, StateRejected, ReasonNoSource, err))
	}
	if !resuming {
		if err := u.dl.Discard(); err != nil { // a different job's partial image
			return err
		}
	}

	// downloading
	st.Phase = StateDownloading
	if err := u.save(st); err != nil {
		return err
	}
	lastPercent := -1
	u.dl.Progress = func(done, total int64) {
		p := int(done * 100 / total)
		if p != lastPercent {
			lastPercent = p
			s := statusOf(st, StateDownloading)
			s.Percent, s.Bytes, s.Size = p, done, total
			u.report(ctx, s)
		}
	}
	res, err := u.dl.Download(ctx, m, sources)
	u.dl.Progress = nil
	if err != nil {
		if ctx.Err() != nil {
			return err // stopping: resume on the next start
		}
		// Sources failed: stay in "downloading" so the next delivery of the job resumes.
		s := statusOf(st, StateFailed)
		s.Reason, s.Error = ReasonDownloadFailed, err.Error()
		u.report(ctx, s)
		return err
	}

	// verifying
	st.Phase = StateVerifying
	if err := u.save(st); err != nil {
		return err
	}
	u.report(ctx, statusOf(st, StateVerifying))
	if err := res.Verify(m); err != nil {
		derr := u.dl.Discard()
		return errors.Join(err, derr, u.finish(ctx, st, StateRejected, Reason(err), err))
	}

	// installing
	st.Phase = StateInstalling
	if err := u.save(st); err != nil {
		return err
	}
	u.report(ctx, statusOf(st, StateInstalling))
	if err := u.cfg.Installer.Install(ctx, res.Path, m); err != nil {
		if ctx.Err() != nil {
			return err
		}
		derr := u.dl.Discard()
		return errors.Join(err, derr, u.finish(ctx, st, StateFailed, ReasonInstallFailed, err))
	}
	if err := u.dl.Discard(); err != nil {
		u.cfg.Log.Warn("firmware: remove downloaded image", "err", err)
	}

	// restarting
	st.Phase = StateRestarting
	st.Job = nil
	if err := u.save(st); err != nil {
		return err
	}
	u.report(ctx, statusOf(st, StateRestarting))
	return u.restart(ctx)
}

func (u *Updater) restart(ctx context.Context) error {
	if u.cfg.Restart == nil {
		return nil
	}
	if err := u.cfg.Restart(ctx); err != nil {
		return fmt.Errorf("firmware: restart hook: %w", err)
	}
	return nil
}

// Resume continues a job that was interrupted while downloading, verifying or installing (e.g.
// by a restart), using the job persisted in the state directory. Without one it does nothing.
func (u *Updater) Resume(ctx context.Context) error {
	if !u.mu.TryLock() {
		return fmt.Errorf("firmware: a job is in progress: %w", ErrBusy)
	}
	defer u.mu.Unlock()
	st, err := u.load()
	if err != nil {
		return err
	}
	switch st.Phase {
	case StateDownloading, StateVerifying, StateInstalling:
		if len(st.Job) > 0 {
			return u.handleJob(ctx, st.Job)
		}
	}
	return nil
}

// OnStart finishes a trial after the restart that followed an install: it counts the start,
// rolls back if the trial slot has crashed MaxBootAttempts times, otherwise runs health.Check
// bounded by HealthTimeout, then commits (Installer.Commit, anti-rollback counter advanced to the
// manifest's security_version) or rolls back (Installer.Rollback, restart hook) and reports
// either. Without a trial it does nothing. If ctx ends during the check, nothing is decided.
func (u *Updater) OnStart(ctx context.Context, health HealthChecker) error {
	u.mu.Lock()
	defer u.mu.Unlock()
	st, err := u.load()
	if err != nil {
		return err
	}
	if st.Phase != StateRestarting && st.Phase != StateHealthCheck {
		return nil
	}
	attempts := 0
	if bc, ok := u.cfg.Installer.(BootCounter); ok {
		if attempts, err = bc.RecordBoot(ctx); err != nil {
			return err
		}
	} else {
		st.HealthAttempts++
		attempts = st.HealthAttempts
	}
	st.Phase = StateHealthCheck
	if err := u.save(&st); err != nil {
		return err
	}
	if attempts > u.cfg.MaxBootAttempts {
		return u.rollback(ctx, &st, ReasonBootLoop,
			fmt.Errorf("firmware: %s %s started %d times without passing its health check", st.Name, st.Version, attempts))
	}
	u.report(ctx, statusOf(&st, StateHealthCheck))
	hctx, cancel := context.WithTimeout(ctx, u.cfg.HealthTimeout)
	herr := health.Check(hctx)
	if herr == nil && hctx.Err() != nil {
		herr = hctx.Err()
	}
	cancel()
	if ctx.Err() != nil {
		return ctx.Err() // stopping: decide on the next start
	}
	if herr != nil {
		if errors.Is(herr, context.DeadlineExceeded) {
			herr = fmt.Errorf("firmware: health check of %s %s did not pass within %s: %w", st.Name, st.Version, u.cfg.HealthTimeout, herr)
		} else {
			herr = fmt.Errorf("firmware: health check of %s %s failed: %w", st.Name, st.Version, herr)
		}
		return u.rollback(ctx, &st, ReasonHealthCheckFailed, herr)
	}
	if err := u.cfg.Installer.Commit(ctx); err != nil {
		return fmt.Errorf("firmware: commit %s %s: %w", st.Name, st.Version, err)
	}
	if err := AdvanceCounter(ctx, u.cfg.Counter, st.SecurityVersion); err != nil {
		return err
	}
	return u.finish(ctx, &st, StateCommitted, "", nil)
}

func (u *Updater) rollback(ctx context.Context, st *jobState, reason string, cause error) error {
	if err := u.cfg.Installer.Rollback(ctx); err != nil {
		err = fmt.Errorf("firmware: roll back %s %s after %s: %w", st.Name, st.Version, reason, err)
		s := statusOf(st, StateFailed)
		s.Reason, s.Error = reason, err.Error()
		u.report(ctx, s)
		return err
	}
	if err := u.finish(ctx, st, StateRolledBack, reason, cause); err != nil {
		return err
	}
	return u.restart(ctx)
}

// Sources opens the manifest sources this package knows: "https://" URLs through TLS (the
// device's mTLS config) and "mqtt" through MQTT (which returns a ChunkTransport for the
// manifest's name and version, e.g. an MQTTChunkClient subscribed to its response topic).
// Either may be nil to disable that kind. Use its Open method as Config.OpenSource.
type Sources struct {
	TLS        *tls.Config
	MQTT       func(m *Manifest) (ChunkTransport, error)
	ChunkDepth int // MQTT chunk requests in flight; 0 means 4
}

// Open returns the Source for one manifest source.
func (s Sources) Open(m *Manifest, source string) (Source, error) {
	switch {
	case source == SourceMQTT:
		if s.MQTT == nil {
			return nil, errors.New("mqtt: no MQTT chunk transport configured")
		}
		t, err := s.MQTT(m)
		if err != nil {
			return nil, fmt.Errorf("mqtt: %w", err)
		}
		return &ChunkSource{Transport: t, ChunkSize: m.ChunkSize, Window: s.ChunkDepth}, nil
	case strings.HasPrefix(source, "https://"):
		if s.TLS == nil {
			return nil, fmt.Errorf("%s: no TLS configuration for https sources", source)
		}
		return NewHTTPSource(source, s.TLS), nil
	default:
		return nil, fmt.Errorf("%s: unsupported source", source)
	}
}

// RestartCommand returns a restart hook that runs a command (split on white space, no shell),
// e.g. "systemctl reboot". To restart the agent alone under systemd, prefer a hook that makes
// the agent exit non-zero (Restart=on-failure).
func RestartCommand(command string) func(ctx context.Context) error {
	return func(ctx context.Context) error {
		argv := strings.Fields(command)
		if len(argv) == 0 {
			return errors.New("firmware: empty restart command")
		}
		out, err := exec.CommandContext(ctx, argv[0], argv[1:]...).CombinedOutput()
		if err != nil {
			return fmt.Errorf("firmware: restart command %q: %w: %s", command, err, strings.TrimSpace(string(out)))
		}
		return nil
	}
}
