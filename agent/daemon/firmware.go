package daemon

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/tpmagent/tpmagent/agent/config"
	"github.com/tpmagent/tpmagent/agent/source"
	"github.com/tpmagent/tpmagent/firmware"
	"github.com/tpmagent/tpmagent/transport"
)

// ErrRestart is returned by Run after a firmware update installed a new slot, or rolled one
// back, and no firmware.restart_hook is configured: the agent drained and stopped so that it
// can be started again into the active slot. cmd/tpmagent maps it to RestartExitCode, which
// systemd's Restart=on-failure turns into a restart (a launcher runs the active slot).
var ErrRestart = errors.New("daemon: firmware update: restart into the active slot requested")

// RestartExitCode is the process exit code for ErrRestart: 75 (EX_TEMPFAIL, "try again"),
// distinct from 1 (runtime failure) and 2 (usage), non-zero so that Restart=on-failure
// restarts the agent.
const RestartExitCode = 75

// healthFault, when set at link time (go build -ldflags "-X
// github.com/tpmagent/tpmagent/agent/daemon.healthFault=REASON"), makes this build fail its
// own firmware health check with REASON. scripts/demo-ota.sh builds its deliberately broken
// release this way; release builds leave it empty and nothing reads it at run time.
var healthFault string

// healthProbe is the reading the health check sends through the telemetry socket so that a
// telemetry message is acknowledged even on a device whose applications are quiet.
const healthProbe = `{"name":"tpmagent.firmware.health_check","value":1}` + "\n"

// firmwareState is the firmware updater's part of a daemon run.
type firmwareState struct {
	updater *firmware.Updater
	stop    context.CancelFunc
	wg      sync.WaitGroup
	jobs    chan []byte // the latest job not yet handled (capacity 1)

	restartOnce sync.Once
	restart     chan struct{} // closed when an update asks for a restart

	mu         sync.Mutex
	chunks     *firmware.MQTTChunkClient // the download in progress over MQTT
	chunkTopic string                    // its response topic
}

// FirmwareStateDir is the updater's state directory (updater.json, image.part,
// download.json): <state_dir>/firmware. Deleting it does not weaken anti-rollback, which
// lives in the TPM NV counter.
func FirmwareStateDir(cfg *config.Config) string { return filepath.Join(cfg.StateDir, "firmware") }

// SlotStatePath is the file installer's slot state file: slots.json next to firmware.slots.a,
// so that a launcher that picks the active slot finds it beside the slots.
func SlotStatePath(cfg *config.Config) string {
	return filepath.Join(filepath.Dir(cfg.Firmware.Slots.A), "slots.json")
}

// FileSlots returns the file installer for cfg's slots.
func FileSlots(cfg *config.Config) *firmware.FileSlots {
	return &firmware.FileSlots{A: cfg.Firmware.Slots.A, B: cfg.Firmware.Slots.B, StatePath: SlotStatePath(cfg)}
}

// startFirmware starts over-the-air updates when firmware.enabled is set: it builds the
// updater (TPM NV anti-rollback counter, trust store, installer, MQTT and HTTPS sources),
// and subscribes to chunk responses. runFirmware then starts the worker goroutine: it runs the
// health check of a just-installed slot (OnStart), resumes an interrupted download, then
// subscribes to the job topic and handles jobs one at a time, keeping only the latest while
// busy.
func (d *daemon) startFirmware(ctx context.Context) error {
	fw := &d.firmware
	if !d.cfg.Firmware.Enabled {
		return nil
	}
	u, err := d.newUpdater(ctx)
	if err != nil {
		return err
	}
	fw.updater = u
	fw.jobs = make(chan []byte, 1)
	fw.restart = make(chan struct{})

	// One subscription for the chunk responses of every release; routed to the download in
	// progress (MQTTChunkClient.Deliver never blocks).
	respFilter := firmware.ChunkResponseTopic("+", "+", d.cfg.DeviceID)
	if err := d.client.Subscribe(ctx, respFilter, 1, func(m transport.Message) {
		fw.mu.Lock()
		c, topic := fw.chunks, fw.chunkTopic
		fw.mu.Unlock()
		if c != nil && m.Topic == topic {
			c.Deliver(m.Payload)
		}
	}); err != nil {
		d.log.Warn("firmware: subscribe to chunk responses (retried on reconnect)", "topic", respFilter, "err", err)
	}
	return nil
}

// newUpdater builds the firmware.Updater from the configuration.
func (d *daemon) newUpdater(ctx context.Context) (*firmware.Updater, error) {
	fc := d.cfg.Firmware
	if fc.Hardware == "" {
		return nil, &config.FieldError{Field: "firmware.hardware", Msg: "is empty: set this board's hardware id (manifests list the hardware ids they run on)"}
	}
	if len(fc.Trust) == 0 {
		return nil, &config.FieldError{Field: "firmware.trust", Msg: "is empty: list the release public key files (`tpmagent firmware keygen` writes KEY.pub)"}
	}
	trust, err := firmware.LoadTrustStore(fc.Trust...)
	if err != nil {
		return nil, &config.FieldError{Field: "firmware.trust", Value: strings.Join(fc.Trust, ","), Msg: err.Error()}
	}
	if d.id == nil || d.id.TPM == nil {
		return nil, errors.New("run: firmware updates need the TPM for the anti-rollback NV counter (tpm.device)")
	}
	counter, err := d.id.TPM.NVCounter(ctx, uint32(d.cfg.TPM.NVCounterIndex))
	if err != nil {
		return nil, fmt.Errorf("run: firmware anti-rollback counter (tpm.nv_counter_index %s): %w", d.cfg.TPM.NVCounterIndex, err)
	}
	var inst firmware.Installer
	current := ""
	switch fc.Installer {
	case "command":
		if strings.TrimSpace(fc.Command) == "" {
			return nil, &config.FieldError{Field: "firmware.command", Msg: "is empty: the command installer needs a command such as \"rauc install {image}\""}
		}
		inst = &firmware.CommandInstaller{InstallCmd: fc.Command}
	default:
		if fc.Slots.A == "" || fc.Slots.B == "" || fc.Slots.A == fc.Slots.B {
			return nil, &config.FieldError{Field: "firmware.slots", Value: fc.Slots.A + "," + fc.Slots.B, Msg: "needs two different files a and b"}
		}
		slots := FileSlots(d.cfg)
		st, err := slots.State()
		if err != nil {
			return nil, fmt.Errorf("run: %w", err)
		}
		current = st.Version
		inst = slots
	}
	restart := func(context.Context) error { d.requestRestart(); return nil }
	if fc.RestartHook != "" {
		restart = firmware.RestartCommand(fc.RestartHook)
	}
	id := d.cfg.DeviceID
	u, err := firmware.New(firmware.Config{
		StateDir:  FirmwareStateDir(d.cfg),
		Hardware:  fc.Hardware,
		Trust:     trust,
		Counter:   counter,
		Installer: inst,
		Reporter:  firmware.ReporterFunc(d.reportFirmware),
		OpenSource: firmware.Sources{
			TLS: d.tls.Config(),
			MQTT: func(m *firmware.Manifest) (firmware.ChunkTransport, error) {
				c := &firmware.MQTTChunkClient{
					Publish:      d.publishWait(false),
					RequestTopic: firmware.ChunkRequestTopic(m.Name, m.Version),
					DeviceID:     id,
				}
				d.firmware.mu.Lock()
				d.firmware.chunks, d.firmware.chunkTopic = c, firmware.ChunkResponseTopic(m.Name, m.Version, id)
				d.firmware.mu.Unlock()
				return c, nil
			},
		}.Open,
		Restart:        restart,
		HealthTimeout:  fc.HealthTimeout,
		CurrentVersion: current,
		Log:            d.log.With("component", "firmware"),
	})
	if err != nil {
		return nil, fmt.Errorf("run: %w", err)
	}
	d.log.Info("firmware updates on", "topic", d.cfg.Expand(fc.Topic), "hardware", fc.Hardware, "installer", fc.Installer,
		"trusted_keys", strings.Join(trust.KeyIDs(), ","), "nv_counter", d.cfg.TPM.NVCounterIndex.String(), "current_version", current)
	return u, nil
}

// firmwareWorker is the updater's goroutine: health check, resume, then jobs.
func (d *daemon) firmwareWorker(ctx context.Context) {
	fw := &d.firmware
	log := d.log.With("component", "firmware")
	if err := fw.updater.OnStart(ctx, firmware.HealthFunc(d.firmwareHealthy)); err != nil && ctx.Err() == nil {
		log.Error("firmware: health check of the new slot could not finish", "err", err)
	}
	if d.restartRequested() || ctx.Err() != nil {
		return
	}
	if err := fw.updater.Resume(ctx); err != nil && ctx.Err() == nil {
		log.Warn("firmware: interrupted job not resumed", "err", err)
	}
	if d.restartRequested() || ctx.Err() != nil {
		return
	}
	topic := d.cfg.Expand(d.cfg.Firmware.Topic)
	if err := d.client.Subscribe(ctx, topic, 1, func(m transport.Message) {
		// Keep only the latest job: replace one that is still waiting.
		for {
			select {
			case fw.jobs <- m.Payload:
				return
			default:
			}
			select {
			case old := <-fw.jobs:
				if len(old) > 0 {
					log.Info("firmware: a newer job replaces one still waiting")
				}
			default:
			}
		}
	}); err != nil {
		log.Warn("firmware: subscribe to the job topic (retried on reconnect)", "topic", topic, "err", err)
	}
	for {
		select {
		case <-ctx.Done():
			return
		case <-fw.restart:
			return
		case job := <-fw.jobs:
			err := fw.updater.HandleJob(ctx, job)
			switch {
			case err == nil, ctx.Err() != nil:
			case errors.Is(err, firmware.ErrBusy):
				log.Info("firmware: job not taken now", "err", err)
			default:
				log.Warn("firmware: job ended", "err", err)
			}
			if d.restartRequested() {
				return
			}
		}
	}
}

// firmwareHealthy is the health check of a trial slot: a broker connection is up and at
// least one telemetry message was acknowledged by the broker. It hands one probe reading to
// the telemetry socket (the path applications use) so that an idle device still publishes.
func (d *daemon) firmwareHealthy(ctx context.Context) error {
	if err := d.client.WaitConnected(ctx); err != nil {
		return fmt.Errorf("no broker connection: %w", err)
	}
	if healthFault != "" {
		return fmt.Errorf("this build was made to fail its health check: %s", healthFault)
	}
	probed := d.cfg.Telemetry.Socket == ""
	tick := time.NewTicker(50 * time.Millisecond)
	defer tick.Stop()
	for {
		if d.counters.MessagesAcked.Load() > 0 && d.client.Connected() {
			return nil
		}
		if !probed {
			sctx, cancel := context.WithTimeout(ctx, 2*time.Second)
			ok, _, err := source.Send(sctx, d.cfg.Telemetry.Socket, strings.NewReader(healthProbe), nil)
			cancel()
			probed = err == nil && ok == 1
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("broker connected but no telemetry message acknowledged (%d acknowledged): %w", d.counters.MessagesAcked.Load(), ctx.Err())
		case <-tick.C:
		}
	}
}

// reportFirmware publishes a status message, retained, QoS 1, on the device's status topic
// and waits (bounded) for the broker's acknowledgement. Download progress is skipped while
// no broker connection is up, so that an HTTPS download does not wait on the broker.
func (d *daemon) reportFirmware(ctx context.Context, s firmware.Status) error {
	if s.State == firmware.StateDownloading && !d.client.Connected() {
		return nil
	}
	payload, err := json.Marshal(s)
	if err != nil {
		return err
	}
	return d.publishWait(true)(ctx, firmware.StatusTopic(d.cfg.DeviceID), payload)
}

// publishWait returns a publish function (QoS 1) that waits up to 10 s for the PUBACK.
func (d *daemon) publishWait(retained bool) func(ctx context.Context, topic string, payload []byte) error {
	return func(ctx context.Context, topic string, payload []byte) error {
		ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		defer cancel()
		done := make(chan error, 1)
		if err := d.client.Publish(ctx, topic, 1, retained, payload, func(err error) { done <- err }); err != nil {
			return fmt.Errorf("publish %s: %w", topic, err)
		}
		select {
		case err := <-done:
			if err != nil {
				return fmt.Errorf("publish %s: %w", topic, err)
			}
			return nil
		case <-ctx.Done():
			return fmt.Errorf("publish %s: no acknowledgement: %w", topic, ctx.Err())
		}
	}
}

// requestRestart is the default restart hook: stop the agent (Run returns ErrRestart).
func (d *daemon) requestRestart() {
	d.firmware.restartOnce.Do(func() {
		d.log.Info("firmware: restarting into the active slot: the agent stops with exit code " + fmt.Sprint(RestartExitCode))
		close(d.firmware.restart)
	})
}

func (d *daemon) restartRequested() bool {
	if d.firmware.restart == nil {
		return false
	}
	select {
	case <-d.firmware.restart:
		return true
	default:
		return false
	}
}

// runFirmware runs the pipeline (run) alongside the firmware worker. A restart requested by
// an update stops the pipeline with a graceful drain; then Run returns ErrRestart.
func (d *daemon) runFirmware(ctx context.Context, run func(context.Context) error) error {
	fw := &d.firmware
	if fw.updater == nil {
		return run(ctx)
	}
	// The worker starts here, not in startFirmware, so that a later start-up step that
	// fails leaves no goroutine behind.
	wctx, stop := context.WithCancel(ctx)
	fw.stop = stop
	fw.wg.Add(1)
	go func() {
		defer fw.wg.Done()
		d.firmwareWorker(wctx)
	}()
	pctx, cancel := context.WithCancel(ctx)
	defer cancel()
	go func() {
		select {
		case <-fw.restart:
			cancel()
		case <-pctx.Done():
		}
	}()
	err := run(pctx)
	fw.stop()
	fw.wg.Wait()
	if d.restartRequested() && ctx.Err() == nil {
		if err != nil && !errors.Is(err, context.Canceled) {
			d.log.Warn("firmware: pipeline stopped with an error before the restart", "err", err)
		}
		return ErrRestart
	}
	return err
}
