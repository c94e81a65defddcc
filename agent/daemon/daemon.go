// Package daemon is `tpmagent run`: it opens the TPM-resident identity,
// builds the TLS 1.3 client configuration, opens the durable spool, connects
// to the brokers and runs the telemetry pipeline with its sources, the status
// socket, Prometheus metrics and the systemd notifications, until its context
// ends; then it drains and stops in reverse order.
//
// Start-up reads like the data flow (DESIGN.md): openIdentity → buildTLS →
// openSpool → connect → runPipeline. systemd hears READY=1 once the key is
// loaded and either the first broker connection is up or the spool accepts
// readings while offline; WATCHDOG=1 comes from a loop that checks the
// publishing loop's heartbeat, so a stalled pipeline is restarted.
package daemon

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/tpmagent/tpmagent/agent"
	"github.com/tpmagent/tpmagent/agent/batch"
	"github.com/tpmagent/tpmagent/agent/config"
	"github.com/tpmagent/tpmagent/agent/identity"
	"github.com/tpmagent/tpmagent/agent/sdnotify"
	"github.com/tpmagent/tpmagent/agent/source"
	"github.com/tpmagent/tpmagent/agent/spool"
	"github.com/tpmagent/tpmagent/agent/status"
	"github.com/tpmagent/tpmagent/transport"
)

// Options configure a daemon run.
type Options struct {
	// Config is the loaded configuration.
	Config *config.Config
	// Logger receives the daemon's log.
	Logger *slog.Logger
	// LogLevel, when set, is adjusted on reload.
	LogLevel *slog.LevelVar
	// Reload, when set, delivers a value for every SIGHUP: certificates
	// and the log level are reloaded.
	Reload <-chan struct{}
	// ReloadConfig re-reads the configuration file on reload.
	ReloadConfig func() (*config.Config, error)
	// Notifier talks to systemd; nil makes one from Logger.
	Notifier *sdnotify.Notifier
	// ExtraSources are run besides the socket and system sources (tests,
	// bench).
	ExtraSources []source.Source
	// StatusInterval is how often a STATUS= line is sent (default 10 s).
	StatusInterval time.Duration
	// WrapPublisher, when set, wraps the broker connection the pipeline
	// publishes to (fault injection in tests: a stalled publisher).
	WrapPublisher func(transport.Publisher) transport.Publisher
}

// daemon is the state of one run, one field per component, in start order.
type daemon struct {
	opts     Options
	cfg      *config.Config
	log      *slog.Logger
	notify   *sdnotify.Notifier
	counters *status.Counters

	id       *identity.Identity
	tls      *transport.TLSIdentity
	keylog   io.Closer
	spool    *spool.Spool
	client   *transport.Client
	pipeline *agent.Pipeline
	// clientSuffix is appended to the MQTT client id (bench runs beside
	// the agent without taking over its session).
	clientSuffix string

	firmware firmwareState
	renewal  renewalState

	// watchdog state: the acked count and when it last moved.
	lastAcked    uint64
	lastProgress time.Time
}

// Run runs the agent until ctx ends. It returns nil after a clean drain.
func Run(ctx context.Context, opts Options) error {
	d := &daemon{opts: opts, cfg: opts.Config, log: opts.Logger, notify: opts.Notifier, counters: &status.Counters{}}
	if d.log == nil {
		d.log = slog.Default()
	}
	if d.notify == nil {
		d.notify = sdnotify.New(d.log)
	}
	if opts.StatusInterval == 0 {
		d.opts.StatusInterval = 10 * time.Second
	}
	if err := d.cfg.RequireDeviceID(); err != nil {
		return err
	}
	if err := d.cfg.RequireBroker(); err != nil {
		return err
	}
	d.counters.Start(time.Now())
	if d.cfg.File != "" {
		for _, w := range config.CheckPermissions(d.cfg.File) {
			d.log.Warn("configuration file permissions: " + w)
		}
	}
	defer d.close()
	steps := []struct {
		name string
		fn   func(context.Context) error
	}{
		{"open identity", d.openIdentity},
		{"build TLS configuration", d.buildTLS},
		{"open spool", d.openSpool},
		{"connect", d.connect},
		{"start firmware updates", d.startFirmware},
		{"start certificate renewal", d.startRenewal},
	}
	for _, s := range steps {
		if err := s.fn(ctx); err != nil {
			d.notify.Status("failed: %s: %v", s.name, err)
			return err
		}
	}
	return d.runFirmware(ctx, d.runPipeline)
}

// openIdentity opens the TPM and loads the device key.
func (d *daemon) openIdentity(ctx context.Context) error {
	id, err := identity.Open(ctx, d.cfg, false, d.log)
	if err != nil {
		return fmt.Errorf("run: %w", err)
	}
	d.id = id
	d.counters.TPMSignatures = id.Signatures
	d.log.Info("device key loaded", "tpm", d.cfg.TPM.Device, "handle", fmt.Sprintf("0x%08x", id.Key.Handle()), "type", id.Key.Type(), "fingerprint", id.Key.FingerprintSHA256())
	return nil
}

// buildTLS checks the certificate against the TPM key and builds the shared
// TLS configuration (one session cache for every connection).
func (d *daemon) buildTLS(context.Context) error {
	opts := transport.TLSOptions{
		Signer:     d.id.Signer,
		CertFile:   d.cfg.Broker.CertFile,
		CAFile:     d.cfg.Broker.CAFile,
		ServerName: d.cfg.Broker.ServerName,
		MinTLS:     d.cfg.Broker.MinTLS,
		Logger:     d.log,
	}
	if d.cfg.Broker.KeyLog != "" {
		f, err := os.OpenFile(d.cfg.Broker.KeyLog, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
		if err != nil {
			return fmt.Errorf("run: broker.keylog %s: %w", d.cfg.Broker.KeyLog, err)
		}
		d.keylog = f
		opts.KeyLogWriter = f
	}
	id, err := transport.NewTLSConfig(opts)
	if err != nil {
		return fmt.Errorf("run: %w", err)
	}
	d.tls = id
	return nil
}

// openSpool opens (and recovers) the durable queue.
func (d *daemon) openSpool(context.Context) error {
	fs, err := spool.ParseFsync(d.cfg.Spool.Fsync)
	if err != nil {
		return &config.FieldError{Field: "spool.fsync", Value: d.cfg.Spool.Fsync, Msg: err.Error()}
	}
	full, err := spool.ParseFullPolicy(d.cfg.Spool.OnFull)
	if err != nil {
		return &config.FieldError{Field: "spool.on_full", Value: d.cfg.Spool.OnFull, Msg: err.Error()}
	}
	sp, err := spool.Open(d.cfg.Spool.Dir, spool.Options{MaxBytes: int64(d.cfg.Spool.MaxBytes), Fsync: fs, Full: full, Logger: d.log})
	if err != nil {
		return fmt.Errorf("run: spool.dir %s: %w", d.cfg.Spool.Dir, err)
	}
	d.spool = sp
	d.counters.SpoolStats = agent.SpoolStats(sp)
	return nil
}

// connect starts the MQTT client; it connects (and reconnects) in the
// background, so the agent spools while the brokers are unreachable.
func (d *daemon) connect(ctx context.Context) error {
	c, err := transport.NewClient(transport.ClientOptions{
		URLs:           d.cfg.Broker.URLs,
		TLS:            d.tls.Config(),
		AllowPlaintext: d.cfg.Broker.AllowPlaintext,
		ClientID:       d.cfg.DeviceID + d.clientSuffix,
		StatusTopic:    d.statusTopic(),
		Keepalive:      d.cfg.Broker.Keepalive,
		CleanSession:   d.cfg.Broker.CleanSession,
		BackoffBase:    d.cfg.Broker.BackoffBase,
		BackoffMax:     d.cfg.Broker.BackoffMax,
		Inflight:       d.cfg.Telemetry.Inflight,
		Logger:         d.log,
		ExplainError:   d.tls.ExplainTLSError,
	})
	if err != nil {
		return fmt.Errorf("run: %w", err)
	}
	if err := c.Start(ctx); err != nil {
		return fmt.Errorf("run: %w", err)
	}
	d.client = c
	d.counters.Broker = func() string {
		if !c.Connected() {
			return ""
		}
		return c.Stats().Broker
	}
	return nil
}

// runPipeline runs sources → batcher → spool → publisher, the status socket,
// metrics and the systemd loops until ctx ends.
func (d *daemon) runPipeline(ctx context.Context) error {
	enc, err := batch.NewEncoder(d.cfg.Telemetry.Encoding)
	if err != nil {
		return &config.FieldError{Field: "telemetry.encoding", Value: d.cfg.Telemetry.Encoding, Msg: err.Error()}
	}
	var sealer agent.Sealer
	if d.cfg.Seal.Enabled {
		s, err := agent.NewSealingFromConfig(d.cfg.DeviceID, d.cfg.Seal, d.id.Signer, d.cfg.Broker.CertFile)
		if err != nil {
			return fmt.Errorf("run: %w", err)
		}
		sealer = s
		d.log.Info("telemetry sealed end to end for the collector", "collector_key", d.cfg.Seal.CollectorKey, "suite", d.cfg.Seal.Suite)
	}
	p, err := agent.New(agent.Options{
		Topic:     d.cfg.Expand(d.cfg.Telemetry.Topic),
		QoS:       byte(d.cfg.Telemetry.QoS),
		Batch:     batch.Options{Max: d.cfg.Telemetry.BatchMax, Bytes: int(d.cfg.Telemetry.BatchBytes), Linger: d.cfg.Telemetry.Linger},
		Encoder:   enc,
		Sealer:    sealer,
		Queue:     d.spool,
		Publisher: d.publisher(),
		Counters:  d.counters,
		Logger:    d.log,
	})
	if err != nil {
		return fmt.Errorf("run: %w", err)
	}
	d.pipeline = p
	d.spool = nil // the pipeline closes it

	sock := &source.Socket{Path: d.cfg.Telemetry.Socket, Logger: d.log}
	sources := []source.Source{sock}
	if d.cfg.Telemetry.SystemInterval > 0 {
		sources = append(sources, &source.System{Interval: d.cfg.Telemetry.SystemInterval})
	}
	sources = append(sources, d.opts.ExtraSources...)

	var wg sync.WaitGroup
	loops, stopLoops := context.WithCancel(context.WithoutCancel(ctx))
	defer func() { stopLoops(); wg.Wait() }()
	run := func(name string, fn func(context.Context) error) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := fn(loops); err != nil && !errors.Is(err, context.Canceled) {
				d.log.Error(name+" stopped", "err", err)
				d.counters.SetError(fmt.Errorf("%s: %w", name, err))
			}
		}()
	}
	if d.cfg.Status.Socket != "" {
		run("status socket", func(c context.Context) error { return status.Serve(c, d.cfg.Status.Socket, d.counters, d.log) })
	}
	if d.cfg.Metrics.Listen != "" {
		run("metrics", func(c context.Context) error { return status.ServeMetrics(c, d.cfg.Metrics.Listen, d.counters) })
	}
	run("systemd", func(c context.Context) error { d.systemdLoop(c, sock); return nil })
	run("reload", func(c context.Context) error { d.reloadLoop(c); return nil })
	run("connection errors", func(c context.Context) error { d.connectionErrors(c); return nil })

	err = p.Run(ctx, sources...)
	d.notify.Stopping()
	return err
}

// statusTopic is where "online" and the last will "offline" go: the
// device's status topic, or none for a bench client beside the agent.
func (d *daemon) statusTopic() string {
	if d.clientSuffix != "" {
		return "-"
	}
	return "devices/" + d.cfg.DeviceID + "/status"
}

func (d *daemon) publisher() transport.Publisher {
	if d.opts.WrapPublisher != nil {
		return d.opts.WrapPublisher(d.client)
	}
	return d.client
}

// pipelineAlive reports whether the publishing loop is healthy: it is idle
// (nothing spooled), offline (spooling is its job then), or the broker's
// acknowledgements keep arriving. Connected, with records waiting and no
// acknowledgement for stallAfter, is a stall: the watchdog stops and
// systemd restarts the agent.
func (d *daemon) pipelineAlive(now time.Time, stallAfter time.Duration) bool {
	s := d.counters.Snapshot()
	if s.MessagesAcked != d.lastAcked || s.Spool.Records == 0 || !d.client.Connected() || d.lastProgress.IsZero() {
		d.lastAcked, d.lastProgress = s.MessagesAcked, now
		return true
	}
	return now.Sub(d.lastProgress) < stallAfter
}

// systemdLoop sends READY=1 once the socket accepts readings (they are
// spooled whether or not a broker is up), STATUS= lines, and WATCHDOG=1 while
// the publishing loop makes progress.
func (d *daemon) systemdLoop(ctx context.Context, sock *source.Socket) {
	select {
	case <-sock.Ready():
	case <-ctx.Done():
		return
	}
	connected := false
	wait := time.NewTimer(5 * time.Second)
	for !connected {
		select {
		case <-wait.C:
			connected = true // offline: the spool accepts readings anyway
		case <-ctx.Done():
			return
		case <-time.After(20 * time.Millisecond):
			connected = d.client.Connected()
		}
	}
	d.notify.Ready()
	d.log.Info("agent ready", "device_id", d.cfg.DeviceID, "socket", d.cfg.Telemetry.Socket, "connected", d.client.Connected())
	wdInterval, wdOn := d.notify.WatchdogInterval()
	tick := time.Second
	if wdOn && wdInterval/2 < tick {
		tick = wdInterval / 2
	}
	stallAfter := 30 * time.Second
	if wdOn {
		stallAfter = wdInterval
	}
	t := time.NewTicker(tick)
	defer t.Stop()
	lastStatus := time.Now()
	var lastIn uint64
	for {
		select {
		case <-ctx.Done():
			return
		case now := <-t.C:
			if d.pipelineAlive(now, stallAfter) {
				d.notify.Watchdog()
			}
			if now.Sub(lastStatus) >= d.opts.StatusInterval {
				s := d.counters.Snapshot()
				rate := float64(s.ReadingsIn-lastIn) / now.Sub(lastStatus).Seconds()
				broker := s.Broker
				if broker == "" {
					broker = "offline"
				}
				d.notify.Status("%s; %.0f readings/s; %d acked; spool %d records", broker, rate, s.MessagesAcked, s.Spool.Records)
				lastIn, lastStatus = s.ReadingsIn, now
			}
		}
	}
}

// connectionErrors copies the MQTT client's last connection error (TPM
// gone, certificate refused, broker down) into the status counters, so
// `tpmagent status` shows why the agent is offline, not only the log.
func (d *daemon) connectionErrors(ctx context.Context) {
	t := time.NewTicker(250 * time.Millisecond)
	defer t.Stop()
	var seen time.Time
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		st := d.client.Stats()
		if st.LastError != "" && st.LastErrorAt.After(seen) {
			seen = st.LastErrorAt
			d.counters.SetError(errors.New(st.LastError))
		}
	}
}

// reloadLoop handles SIGHUP: RELOADING=1, re-read the config for the log
// level, reload the certificate (a full handshake follows), READY=1.
func (d *daemon) reloadLoop(ctx context.Context) {
	if d.opts.Reload == nil {
		return
	}
	for {
		select {
		case <-ctx.Done():
			return
		case <-d.opts.Reload:
		}
		d.notify.Reloading()
		if d.opts.ReloadConfig != nil {
			if cfg, err := d.opts.ReloadConfig(); err != nil {
				d.log.Error("reload: configuration not reloaded; keeping the old one", "err", err)
			} else if d.opts.LogLevel != nil {
				var l slog.Level
				if l.UnmarshalText([]byte(cfg.Log.Level)) == nil {
					d.opts.LogLevel.Set(l)
				}
			}
		}
		if err := d.tls.ReloadCertificate(); err != nil {
			d.log.Error("reload: certificate not reloaded; keeping the old one", "file", d.cfg.Broker.CertFile, "err", err)
		} else {
			d.log.Info("reload: certificate reloaded", "file", d.cfg.Broker.CertFile, "not_after", d.tls.Leaf().NotAfter)
		}
		d.notify.Ready()
	}
}

func (d *daemon) close() {
	if d.client != nil {
		ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
		_ = d.client.Close(ctx)
		cancel()
	}
	if d.spool != nil {
		_ = d.spool.Close()
	}
	if d.keylog != nil {
		_ = d.keylog.Close()
	}
	if d.id != nil {
		_ = d.id.Close()
	}
	if d.cfg.Telemetry.Socket != "" {
		_ = os.Remove(filepath.Clean(d.cfg.Telemetry.Socket))
	}
}
