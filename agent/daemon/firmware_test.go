package daemon

import (
	"bytes"
	"context"
	"crypto"
	"crypto/rand"
	"crypto/tls"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/tpmagent/tpmagent/agent/config"
	"github.com/tpmagent/tpmagent/firmware"
	"github.com/tpmagent/tpmagent/internal/testdevice"
	"github.com/tpmagent/tpmagent/internal/testmqtt"
	"github.com/tpmagent/tpmagent/tpmkeys"
	"github.com/tpmagent/tpmagent/transport"
)

const testHardware = "hw-test"

// fwRelease is the release side: a signing key and its trust file.
type fwRelease struct {
	key       crypto.Signer
	trustFile string
}

func newFWRelease(t *testing.T, dir string) *fwRelease {
	t.Helper()
	key, err := firmware.GenerateReleaseKey(firmware.AlgECDSAP256)
	if err != nil {
		t.Fatal(err)
	}
	p := filepath.Join(dir, "release.key")
	if err := firmware.WriteKeyFiles(p, key); err != nil {
		t.Fatal(err)
	}
	return &fwRelease{key: key, trustFile: p + ".pub"}
}

// fwImage is one signed release: its image bytes, manifest and job (envelope).
type fwImage struct {
	image []byte
	m     *firmware.Manifest
	job   []byte
}

func (r *fwRelease) build(t *testing.T, version string, sv uint64, hw string, size int) *fwImage {
	t.Helper()
	img := make([]byte, size)
	rand.Read(img)
	p := filepath.Join(t.TempDir(), "image-"+version)
	if err := os.WriteFile(p, img, 0o644); err != nil {
		t.Fatal(err)
	}
	m, err := firmware.BuildManifest(p, "tpmagent", version, sv, []string{hw}, 64<<10, nil)
	if err != nil {
		t.Fatal(err)
	}
	job, err := firmware.Sign(m, r.key)
	if err != nil {
		t.Fatal(err)
	}
	return &fwImage{image: img, m: m, job: job}
}

// backend is the release side on the broker: it publishes jobs, serves chunks (counting
// every byte it sends) and collects the device's status messages.
type backend struct {
	t      *testing.T
	c      *transport.Client
	device string

	mu       sync.Mutex
	statuses []firmware.Status
	images   map[string]*servedImage // by chunk request topic
	newStat  chan struct{}
}

type servedImage struct {
	srv     *firmware.ChunkServer
	tamper  int64 // offset of a byte flipped in what is served; -1 for none
	delay   time.Duration
	bytes   atomic.Int64
	mu      sync.Mutex
	offsets []int64
	lastReq atomic.Int64 // unix nanos of the last request
}

func newBackend(t *testing.T, d *testdevice.Device) *backend {
	t.Helper()
	_, _, cert := d.PKI.SoftClient(t, "backend")
	c, err := testmqtt.Start(t, transport.ClientOptions{
		URLs:         []string{d.Broker.URL()},
		TLS:          &tls.Config{RootCAs: d.PKI.Pool(), Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS13},
		ClientID:     "backend",
		StatusTopic:  "-",
		CleanSession: true,
		Logger:       slog.New(slog.DiscardHandler),
	}, 10*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	b := &backend{t: t, c: c, device: d.ID, images: map[string]*servedImage{}, newStat: make(chan struct{}, 1)}
	if err := c.Subscribe(context.Background(), firmware.StatusTopic(d.ID), 1, func(m transport.Message) {
		if m.Retained {
			return // a status from before this backend started
		}
		var s firmware.Status
		if err := json.Unmarshal(m.Payload, &s); err != nil {
			t.Errorf("status message %q: %v", m.Payload, err)
			return
		}
		b.mu.Lock()
		b.statuses = append(b.statuses, s)
		b.mu.Unlock()
		select {
		case b.newStat <- struct{}{}:
		default:
		}
	}); err != nil {
		t.Fatal(err)
	}
	return b
}

// serve answers chunk requests for rel's image (with one byte flipped at tamper >= 0).
func (b *backend) serve(rel *fwImage, tamper int64, delay time.Duration) *servedImage {
	b.t.Helper()
	img := rel.image
	if tamper >= 0 {
		img = bytes.Clone(img)
		img[tamper] ^= 0x01
	}
	si := &servedImage{srv: &firmware.ChunkServer{Image: bytes.NewReader(img), Size: int64(len(img)), ChunkSize: rel.m.ChunkSize}, tamper: tamper, delay: delay}
	topic := firmware.ChunkRequestTopic(rel.m.Name, rel.m.Version)
	err := b.c.Subscribe(context.Background(), topic, 1, func(m transport.Message) {
		if si.delay > 0 {
			time.Sleep(si.delay)
		}
		dev, resp, err := si.srv.Handle(m.Payload)
		if err != nil {
			b.t.Errorf("chunk request %q: %v", m.Payload, err)
			return
		}
		var req firmware.ChunkRequest
		json.Unmarshal(m.Payload, &req)
		si.mu.Lock()
		si.offsets = append(si.offsets, req.Offset)
		si.mu.Unlock()
		si.bytes.Add(int64(req.Length))
		si.lastReq.Store(time.Now().UnixNano())
		_ = b.c.Publish(context.Background(), firmware.ChunkResponseTopic(rel.m.Name, rel.m.Version, dev), 1, false, resp, nil)
	})
	if err != nil {
		b.t.Fatal(err)
	}
	return si
}

func (si *servedImage) Offsets() []int64 {
	si.mu.Lock()
	defer si.mu.Unlock()
	return append([]int64(nil), si.offsets...)
}

// waitIdle waits until no chunk request arrived for 300 ms.
func (si *servedImage) waitIdle() {
	for time.Since(time.Unix(0, si.lastReq.Load())) < 300*time.Millisecond {
		time.Sleep(50 * time.Millisecond)
	}
}

// publishJob publishes a job retained on the device's job topic.
func (b *backend) publishJob(job []byte) {
	b.t.Helper()
	done := make(chan error, 1)
	if err := b.c.Publish(context.Background(), firmware.JobTopic(b.device), 1, true, job, func(err error) { done <- err }); err != nil {
		b.t.Fatal(err)
	}
	if err := <-done; err != nil {
		b.t.Fatal(err)
	}
}

// waitStatus waits for a status message (after the first from) in a final state and
// returns it with its index.
func (b *backend) waitStatus(from int, want func(firmware.Status) bool, timeout time.Duration) (firmware.Status, int) {
	b.t.Helper()
	deadline := time.After(timeout)
	for {
		b.mu.Lock()
		for i := from; i < len(b.statuses); i++ {
			if want(b.statuses[i]) {
				s := b.statuses[i]
				b.mu.Unlock()
				return s, i + 1
			}
		}
		all := append([]firmware.Status(nil), b.statuses...)
		b.mu.Unlock()
		select {
		case <-b.newStat:
		case <-time.After(50 * time.Millisecond):
		case <-deadline:
			b.t.Fatalf("no matching status message within %v; got %+v", timeout, all)
		}
	}
}

func (b *backend) count() int {
	b.mu.Lock()
	defer b.mu.Unlock()
	return len(b.statuses)
}

func (b *backend) since(from int) []firmware.Status {
	b.mu.Lock()
	defer b.mu.Unlock()
	return append([]firmware.Status(nil), b.statuses[from:]...)
}

func isState(states ...string) func(firmware.Status) bool {
	return func(s firmware.Status) bool {
		for _, st := range states {
			if s.State == st {
				return true
			}
		}
		return false
	}
}

// fwDevice is a test device with firmware updates on.
func fwDevice(t *testing.T, rel *fwRelease) *testdevice.Device {
	t.Helper()
	d := testdevice.New(t, testdevice.Options{})
	c := d.Config
	c.Firmware.Enabled = true
	c.Firmware.Trust = []string{rel.trustFile}
	c.Firmware.Hardware = testHardware
	c.Firmware.HealthTimeout = 5 * time.Second
	c.Telemetry.Linger = time.Millisecond
	if err := os.WriteFile(c.Firmware.Slots.A, []byte("image 1.0.0"), 0o755); err != nil {
		t.Fatal(err)
	}
	return d
}

// agentRun is one daemon.Run in this process.
type agentRun struct {
	cancel context.CancelFunc
	done   chan error
}

func startAgent(t *testing.T, d *testdevice.Device, wrap func(transport.Publisher) transport.Publisher) *agentRun {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	r := &agentRun{cancel: cancel, done: make(chan error, 1)}
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
	go func() { r.done <- Run(ctx, Options{Config: d.Config, Logger: log, WrapPublisher: wrap}) }()
	t.Cleanup(func() {
		cancel()
		select {
		case <-r.done:
		case <-time.After(30 * time.Second):
		}
	})
	return r
}

// exit waits for Run to return by itself (a requested restart).
func (r *agentRun) exit(t *testing.T, timeout time.Duration) error {
	t.Helper()
	select {
	case err := <-r.done:
		r.done <- err // for the cleanup
		return err
	case <-time.After(timeout):
		t.Fatalf("agent did not stop by itself within %v", timeout)
		return nil
	}
}

// stop cancels Run and waits for it.
func (r *agentRun) stop(t *testing.T) {
	t.Helper()
	r.cancel()
	select {
	case err := <-r.done:
		r.done <- err
		if err != nil && !errors.Is(err, context.Canceled) {
			t.Fatalf("run: %v", err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("run did not stop")
	}
}

// readCounter reads the anti-rollback NV counter in the device's swtpm (the agent must be
// stopped: swtpm serves one connection at a time).
func readCounter(t *testing.T, d *testdevice.Device) uint64 {
	t.Helper()
	ctx := context.Background()
	tp, err := tpmkeys.Open(ctx, d.Swtpm.URL())
	if err != nil {
		t.Fatal(err)
	}
	defer tp.Close()
	c, err := tp.NVCounter(ctx, uint32(d.Config.TPM.NVCounterIndex))
	if err != nil {
		t.Fatal(err)
	}
	v, err := c.Read(ctx)
	if err != nil {
		t.Fatal(err)
	}
	return v
}

func slotState(t *testing.T, d *testdevice.Device) firmware.SlotState {
	t.Helper()
	st, err := FileSlots(d.Config).State()
	if err != nil {
		t.Fatal(err)
	}
	return st
}

// editJob changes the signed manifest bytes inside an envelope, keeping the signature.
func editJob(t *testing.T, job []byte, from, to string) []byte {
	t.Helper()
	var env map[string]any
	if err := json.Unmarshal(job, &env); err != nil {
		t.Fatal(err)
	}
	raw, _ := base64.StdEncoding.DecodeString(env["manifest"].(string))
	edited := strings.Replace(string(raw), from, to, 1)
	if edited == string(raw) {
		t.Fatalf("manifest %s has no %q", raw, from)
	}
	env["manifest"] = base64.StdEncoding.EncodeToString([]byte(edited))
	out, _ := json.Marshal(env)
	return out
}

// TestFirmwareUpdateLifecycle runs `tpmagent run` (in process) against swtpm and a TLS
// mosquitto through a device's update history: forged, tampered and incompatible jobs are
// rejected before install with their reason on the status topic; a good release is
// downloaded over MQTT chunks, installed into slot b, the agent stops for a restart, and the
// next start passes the health check and commits, advancing the TPM NV counter; an older
// security_version is then rejected, also after the agent's state directory is deleted; a
// release whose new slot cannot publish telemetry is rolled back to the previous slot.
func TestFirmwareUpdateLifecycle(t *testing.T) {
	rel := newFWRelease(t, t.TempDir())
	d := fwDevice(t, rel)
	b := newBackend(t, d)
	startCounter := readCounter(t, d)
	if startCounter != 0 {
		t.Fatalf("fresh NV counter reads %d", startCounter)
	}

	agent := startAgent(t, d, nil)

	// Rejected before install. Each case: a job, what is served, the reason expected, and
	// whether image bytes may be fetched (the hash is checked after the download).
	good := rel.build(t, "2.0.0", 2, testHardware, 300<<10)
	stranger := newFWRelease(t, t.TempDir())
	cases := []struct {
		name      string
		img       *fwImage
		job       []byte
		tamper    int64
		reason    string
		downloads bool
	}{
		{"tampered image (one byte)", rel.build(t, "1.9.0", 2, testHardware, 200<<10), nil, 100_000, firmware.ReasonHashMismatch, true},
		{"signed by an unknown key", stranger.build(t, "1.9.1", 2, testHardware, 10<<10), nil, -1, firmware.ReasonUnknownKey, false},
		{"manifest edited after signing", good, editJob(t, good.job, `"security_version":2`, `"security_version":3`), -1, firmware.ReasonBadSignature, false},
		{"wrong hardware", rel.build(t, "1.9.2", 2, "other-board", 10<<10), nil, -1, firmware.ReasonIncompatible, false},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			job := tc.job
			if job == nil {
				job = tc.img.job
			}
			si := b.serve(tc.img, tc.tamper, 0)
			from := b.count()
			b.publishJob(job)
			s, _ := b.waitStatus(from, isState(firmware.StateRejected, firmware.StateInstalling, firmware.StateCommitted), 20*time.Second)
			if s.State != firmware.StateRejected || s.Reason != tc.reason {
				t.Fatalf("status %+v, want rejected %s", s, tc.reason)
			}
			if s.Error == "" {
				t.Errorf("rejection without an error text: %+v", s)
			}
			served := si.bytes.Load()
			if !tc.downloads && served != 0 {
				t.Errorf("%d image bytes fetched for a job that must be rejected before download", served)
			}
			if tc.downloads && served != int64(len(tc.img.image)) {
				t.Errorf("served %d bytes of %d", served, len(tc.img.image))
			}
			if _, err := os.Stat(d.Config.Firmware.Slots.B); !errors.Is(err, os.ErrNotExist) {
				t.Errorf("slot b written by a rejected job (%v)", err)
			}
			if st := slotState(t, d); st.Active != firmware.SlotA || st.Pending != "" {
				t.Errorf("slot state changed by a rejected job: %+v", st)
			}
			t.Logf("%s: %s: %s", tc.name, s.Reason, s.Error)
		})
	}

	// A good release: downloaded, verified, installed into slot b, restart requested.
	si := b.serve(good, -1, 0)
	from := b.count()
	b.publishJob(good.job)
	if err := agent.exit(t, 60*time.Second); !errors.Is(err, ErrRestart) {
		t.Fatalf("run returned %v, want ErrRestart", err)
	}
	var states []string
	for _, s := range b.since(from) {
		states = append(states, s.State)
	}
	want := "downloading verifying installing restarting"
	if got := strings.Join(compact(states), " "); got != want {
		t.Fatalf("status sequence %q, want %q", got, want)
	}
	if si.bytes.Load() != int64(len(good.image)) {
		t.Fatalf("served %d bytes for a %d-byte image", si.bytes.Load(), len(good.image))
	}
	if st := slotState(t, d); st.Active != firmware.SlotB || st.Pending != firmware.SlotB || st.Version != "2.0.0" {
		t.Fatalf("slot state after install: %+v", st)
	}
	if readCounter(t, d) != 0 {
		t.Fatal("NV counter advanced before the health check")
	}

	// The restart: health check passes (broker connected, telemetry acknowledged) → committed.
	from = b.count()
	agent = startAgent(t, d, nil)
	s, _ := b.waitStatus(from, isState(firmware.StateCommitted, firmware.StateRolledBack, firmware.StateFailed), 30*time.Second)
	if s.State != firmware.StateCommitted || s.Version != "2.0.0" {
		t.Fatalf("after restart: %+v", s)
	}
	slotB, _ := os.ReadFile(d.Config.Firmware.Slots.B)
	if !bytes.Equal(slotB, good.image) {
		t.Fatal("slot b does not hold the released image")
	}
	if st := slotState(t, d); st.Active != firmware.SlotB || st.Pending != "" {
		t.Fatalf("slot state after commit: %+v", st)
	}

	// An older security_version is refused by the TPM counter.
	old := rel.build(t, "1.5.0", 1, testHardware, 10<<10)
	oldServed := b.serve(old, -1, 0)
	from = b.count()
	b.publishJob(old.job)
	s, _ = b.waitStatus(from, isState(firmware.StateRejected, firmware.StateInstalling), 20*time.Second)
	if s.Reason != firmware.ReasonSecurityVersion {
		t.Fatalf("older security_version: %+v", s)
	}
	agent.stop(t)
	if v := readCounter(t, d); v != 2 {
		t.Fatalf("TPM NV counter %d after committing security_version 2", v)
	}

	// ... also when the agent's state directory is gone (the retained job arrives again).
	if err := os.RemoveAll(d.Config.StateDir); err != nil {
		t.Fatal(err)
	}
	from = b.count()
	agent = startAgent(t, d, nil)
	s, _ = b.waitStatus(from, isState(firmware.StateRejected, firmware.StateInstalling), 20*time.Second)
	if s.Reason != firmware.ReasonSecurityVersion || s.Version != "1.5.0" {
		t.Fatalf("older security_version after deleting %s: %+v", d.Config.StateDir, s)
	}
	if n := oldServed.bytes.Load(); n != 0 {
		t.Fatalf("%d bytes of the older release fetched", n)
	}
	t.Logf("security_version 1 after deleting the state directory: %s", s.Error)

	// A release whose new slot fails its health check: telemetry cannot be delivered.
	bad := rel.build(t, "3.0.0", 3, testHardware, 100<<10)
	b.serve(bad, -1, 0)
	from = b.count()
	b.publishJob(bad.job)
	if err := agent.exit(t, 60*time.Second); !errors.Is(err, ErrRestart) {
		t.Fatalf("run returned %v, want ErrRestart", err)
	}
	if st := slotState(t, d); st.Active != firmware.SlotA || st.Pending != firmware.SlotA || st.Version != "3.0.0" {
		t.Fatalf("slot state after installing 3.0.0: %+v", st)
	}
	broken := &brokenPublisher{release: make(chan struct{})}
	agent = startAgent(t, d, func(p transport.Publisher) transport.Publisher { broken.Publisher = p; return broken })
	s, _ = b.waitStatus(from, isState(firmware.StateCommitted, firmware.StateRolledBack, firmware.StateFailed), 30*time.Second)
	if s.State != firmware.StateRolledBack || s.Reason != firmware.ReasonHealthCheckFailed || s.Version != "3.0.0" {
		t.Fatalf("after the broken slot started: %+v", s)
	}
	close(broken.release)
	if err := agent.exit(t, 30*time.Second); !errors.Is(err, ErrRestart) {
		t.Fatalf("run returned %v after the rollback, want ErrRestart", err)
	}
	if st := slotState(t, d); st.Active != firmware.SlotB || st.Pending != "" || st.Version != "2.0.0" {
		t.Fatalf("slot state after rollback: %+v", st)
	}
	if v := readCounter(t, d); v != 2 {
		t.Fatalf("TPM NV counter %d after a rolled-back security_version 3", v)
	}
	t.Logf("rolled back: %s", s.Error)
}

// compact drops repeated states (downloading is reported once per percent).
func compact(states []string) []string {
	var out []string
	for _, s := range states {
		if len(out) == 0 || out[len(out)-1] != s {
			out = append(out, s)
		}
	}
	return out
}

// brokenPublisher stands for a new slot whose telemetry never reaches the broker: every
// publish blocks until release is closed (then it goes through).
type brokenPublisher struct {
	transport.Publisher
	release chan struct{}
}

func (p *brokenPublisher) Publish(ctx context.Context, topic string, qos byte, retained bool, payload []byte, done func(error)) error {
	select {
	case <-p.release:
		return p.Publisher.Publish(ctx, topic, qos, retained, payload, done)
	case <-ctx.Done():
		return ctx.Err()
	}
}

// TestFirmwareDownloadResumesAfterKill runs the agent as a child process (this test binary
// running daemon.Run), SIGKILLs it in the middle of an MQTT chunk download, then starts the
// agent again: it resumes from the persisted offset, and the backend counts the bytes it
// serves, so no byte below that offset is fetched twice.
func TestFirmwareDownloadResumesAfterKill(t *testing.T) {
	if cfgFile := os.Getenv("FIRMWARE_DAEMON_CHILD"); cfgFile != "" {
		runChildDaemon(cfgFile)
		return
	}
	rel := newFWRelease(t, t.TempDir())
	d := fwDevice(t, rel)
	b := newBackend(t, d)
	const size = 3 << 20
	img := rel.build(t, "2.1.0", 1, testHardware, size)
	si := b.serve(img, -1, 25*time.Millisecond) // ≈ 1.2 s for 48 chunks
	b.publishJob(img.job)

	cfgFile := filepath.Join(d.Dir, "agent-fw.yaml")
	yaml := strings.Replace(d.YAML(), "firmware: { slots:", "firmware: { enabled: true, hardware: "+testHardware+
		", trust: ["+rel.trustFile+"], health_timeout: 5s, slots:", 1)
	if err := os.WriteFile(cfgFile, []byte(yaml), 0o600); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(os.Args[0], "-test.run=^TestFirmwareDownloadResumesAfterKill$", "-test.count=1")
	cmd.Env = append(os.Environ(), "FIRMWARE_DAEMON_CHILD="+cfgFile)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(40 * time.Second)
	for si.bytes.Load() < size*6/10 {
		if time.Now().After(deadline) {
			cmd.Process.Kill()
			cmd.Wait()
			t.Fatalf("child agent did not download 60%% in 40 s: %s", out.String())
		}
		time.Sleep(5 * time.Millisecond)
	}
	if err := cmd.Process.Kill(); err != nil {
		t.Fatal(err)
	}
	werr := cmd.Wait()
	if ee, ok := werr.(*exec.ExitError); !ok || ee.ExitCode() != -1 {
		t.Fatalf("child was not killed mid-download (%v): %s", werr, out.String())
	}
	si.waitIdle()
	servedBefore := si.bytes.Load()
	nBefore := len(si.Offsets())
	var dl struct {
		Offset int64 `json:"offset"`
	}
	data, err := os.ReadFile(filepath.Join(FirmwareStateDir(d.Config), "download.json"))
	if err != nil {
		t.Fatalf("no persisted download progress after the kill: %v", err)
	}
	json.Unmarshal(data, &dl)
	if dl.Offset <= 0 || dl.Offset >= size {
		t.Fatalf("persisted offset %d of %d", dl.Offset, size)
	}

	// The agent starts again (in this process) and resumes.
	agent := startAgent(t, d, nil)
	if err := agent.exit(t, 60*time.Second); !errors.Is(err, ErrRestart) {
		t.Fatalf("run returned %v, want ErrRestart after installing", err)
	}
	after := si.Offsets()[nBefore:]
	servedAfter := si.bytes.Load() - servedBefore
	for _, off := range after {
		if off < dl.Offset {
			t.Fatalf("after the restart the agent asked again for offset %d, below the persisted %d", off, dl.Offset)
		}
	}
	if servedAfter != size-dl.Offset {
		t.Fatalf("served %d bytes after the restart, want %d (size %d - persisted %d)", servedAfter, size-dl.Offset, size, dl.Offset)
	}
	slotB, _ := os.ReadFile(d.Config.Firmware.Slots.B)
	if !bytes.Equal(slotB, img.image) {
		t.Fatal("slot b does not hold the image after the resumed download")
	}
	t.Logf("killed after %d bytes served; %d persisted; after restart %d bytes served (%d refetched: received but not yet persisted)",
		servedBefore, dl.Offset, servedAfter, servedBefore-dl.Offset)
}

// runChildDaemon is the child of TestFirmwareDownloadResumesAfterKill: `tpmagent run` with
// the given configuration, until killed.
func runChildDaemon(cfgFile string) {
	cfg, err := config.Load(cfgFile, true, nil)
	if err != nil {
		fmt.Fprintln(os.Stderr, "child:", err)
		os.Exit(2)
	}
	err = Run(context.Background(), Options{Config: cfg, Logger: slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))})
	fmt.Fprintln(os.Stderr, "child agent stopped before it was killed:", err)
	os.Exit(3)
}

// TestFirmwareHTTPSSourceWithTPMIdentity: a release whose only source is an https:// URL is
// fetched with HTTP Range requests over mutual TLS, the client certificate being the
// device's (its key in swtpm): the server requires and verifies it.
func TestFirmwareHTTPSSourceWithTPMIdentity(t *testing.T) {
	rel := newFWRelease(t, t.TempDir())
	d := fwDevice(t, rel)
	b := newBackend(t, d)

	certFile, keyFile := d.PKI.IssueServer(t, "fw-server", nil, []net.IP{net.IPv4(127, 0, 0, 1)}, time.Now().Add(time.Hour))
	cert, err := tls.LoadX509KeyPair(certFile, keyFile)
	if err != nil {
		t.Fatal(err)
	}
	var (
		mu      sync.Mutex
		clients []string
		ranges  []string
	)
	var image []byte
	srv := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		clients = append(clients, r.TLS.PeerCertificates[0].Subject.CommonName)
		ranges = append(ranges, r.Header.Get("Range"))
		mu.Unlock()
		http.ServeContent(w, r, "image", time.Time{}, bytes.NewReader(image))
	}))
	srv.TLS = &tls.Config{Certificates: []tls.Certificate{cert}, ClientAuth: tls.RequireAndVerifyClientCert, ClientCAs: d.PKI.Pool(), MinVersion: tls.VersionTLS13}
	srv.StartTLS()
	defer srv.Close()

	img := make([]byte, 200<<10)
	rand.Read(img)
	image = img
	p := filepath.Join(t.TempDir(), "image")
	os.WriteFile(p, img, 0o644)
	m, err := firmware.BuildManifest(p, "tpmagent", "2.2.0", 1, []string{testHardware}, 64<<10, []string{srv.URL + "/tpmagent/2.2.0"})
	if err != nil {
		t.Fatal(err)
	}
	job, err := firmware.Sign(m, rel.key)
	if err != nil {
		t.Fatal(err)
	}
	agent := startAgent(t, d, nil)
	from := b.count()
	b.publishJob(job)
	if err := agent.exit(t, 60*time.Second); !errors.Is(err, ErrRestart) {
		t.Fatalf("run returned %v, want ErrRestart; statuses %+v", err, b.since(from))
	}
	slotB, _ := os.ReadFile(d.Config.Firmware.Slots.B)
	if !bytes.Equal(slotB, img) {
		t.Fatal("slot b does not hold the image fetched over HTTPS")
	}
	mu.Lock()
	defer mu.Unlock()
	if len(clients) == 0 || clients[0] != d.ID {
		t.Fatalf("HTTPS clients %v, want the device certificate CN %s", clients, d.ID)
	}
	if ranges[0] != fmt.Sprintf("bytes=0-%d", len(img)-1) {
		t.Fatalf("ranges %v", ranges)
	}
}
