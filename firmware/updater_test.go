package firmware

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"
)

func healthy(context.Context) error { return nil }

func TestUpdateCommitted(t *testing.T) {
	rel := newRelease(t, AlgECDSAP256, 1<<20)
	srv := newImageServer(t, rel.image)
	m := rel.manifest(t, "2.0.0", srv.URL()) // security_version 2
	job := rel.sign(t, m)
	counter := FileCounter{Path: filepath.Join(t.TempDir(), "nv-counter")} // outside the state dir, like TPM NV
	if err := counter.Increment(context.Background()); err != nil {
		t.Fatal(err)
	}
	d := newDevice(t, counter, srv.client)
	ctx := context.Background()

	u := d.updater(t, rel.trust)
	if err := u.HandleJob(ctx, job); err != nil {
		t.Fatal(err)
	}
	mustEqual(t, "states", strings.Join(d.rep.states(), ","), "downloading,verifying,installing,restarting")
	mustEqual(t, "restart hook calls", d.restarts.Load(), int32(1))
	st := d.slotState(t)
	if st.Active != SlotB || st.Pending != SlotB || st.Previous != SlotA {
		t.Fatalf("slots after install: %+v", st)
	}
	mustEqual(t, "counter before health check", counterValue(t, counter), uint64(1))
	mustEqual(t, "new slot", readFile(t, d.slots.B), string(rel.image))
	if fileExists(filepath.Join(d.stateDir, partialImageFile)) {
		t.Fatal("downloaded image left in the state directory")
	}
	var percents []int
	for _, s := range d.rep.all() {
		if s.State == StateDownloading {
			percents = append(percents, s.Percent)
		}
	}
	if len(percents) < 5 || percents[0] != 0 || percents[len(percents)-1] != 100 || !slices.IsSorted(percents) {
		t.Fatalf("download progress %v", percents)
	}

	// The agent restarts into slot b: a new Updater on the same directories.
	u2 := d.updater(t, rel.trust)
	if err := u2.OnStart(ctx, HealthFunc(healthy)); err != nil {
		t.Fatal(err)
	}
	last := d.rep.last()
	mustEqual(t, "final state", last.State, StateCommitted)
	mustEqual(t, "final version", last.Version, "2.0.0")
	mustEqual(t, "counter after commit", counterValue(t, counter), uint64(2))
	mustEqual(t, "pending after commit", d.slotState(t).Pending, "")
	if s, _ := u2.Status(); s.State != StateCommitted {
		t.Fatalf("Status() = %+v", s)
	}

	// The retained job arrives again at the next connection: nothing happens.
	reqs, n := srv.requests.Load(), len(d.rep.all())
	if err := u2.HandleJob(ctx, job); err != nil {
		t.Fatal(err)
	}
	if err := u2.OnStart(ctx, HealthFunc(healthy)); err != nil {
		t.Fatal(err)
	}
	if srv.requests.Load() != reqs || len(d.rep.all()) != n || d.restarts.Load() != 1 {
		t.Fatal("a committed job was handled again")
	}

	// State directory lost: an Updater that knows the running version still ignores the job.
	if err := os.RemoveAll(d.stateDir); err != nil {
		t.Fatal(err)
	}
	u3, err := New(Config{StateDir: d.stateDir, Hardware: d.hardware, Trust: rel.trust, Counter: counter,
		Installer: d.slots, Reporter: d.rep, OpenSource: d.sources.Open, CurrentVersion: "2.0.0"})
	if err != nil {
		t.Fatal(err)
	}
	if err := u3.HandleJob(ctx, job); err != nil {
		t.Fatal(err)
	}
	if srv.requests.Load() != reqs || len(d.rep.all()) != n {
		t.Fatal("job for the running version was handled after the state directory was lost")
	}
}

// TestRejectedBeforeDownload: each of these is rejected with its reason before a single byte
// is requested from the image server, and nothing is installed.
func TestRejectedBeforeDownload(t *testing.T) {
	rel := newRelease(t, AlgEd25519, 100_000)
	stranger := newRelease(t, AlgEd25519, 10)
	srv := newImageServer(t, rel.image)
	good := rel.sign(t, rel.manifest(t, "2.0.0", srv.URL()))
	tests := []struct {
		name     string
		job      []byte
		counter  uint64
		hardware string
		reason   string
		is       error
	}{
		{"signed by unknown key", stranger.sign(t, rel.manifest(t, "2.0.0", srv.URL())), 0, "hw-1", ReasonUnknownKey, ErrUnknownKey},
		{"edited after signing", editEnvelope(t, good, func(b []byte) []byte {
			return bytes.Replace(b, []byte(`"security_version":2`), []byte(`"security_version":9`), 1)
		}), 0, "hw-1", ReasonBadSignature, ErrBadSignature},
		{"malformed", []byte(`{"manifest":"e30=","signatures":[]}`), 0, "hw-1", ReasonMalformed, ErrMalformed},
		{"wrong hardware", good, 0, "hw-7", ReasonIncompatible, ErrIncompatible},
		{"security_version below counter", good, 3, "hw-1", ReasonSecurityVersion, ErrRollback},
		{"security_version jumps too far", rel.sign(t, func() *Manifest {
			m := rel.manifest(t, "2.0.0", srv.URL())
			m.SecurityVersion = 5000
			return m
		}()), 0, "hw-1", ReasonSecurityVersion, ErrRollback},
		{"no usable source", rel.sign(t, rel.manifest(t, "2.0.0", SourceMQTT)), 0, "hw-1", ReasonNoSource, ErrNoSource},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			d := newDevice(t, NewMemoryCounter(tc.counter), srv.client)
			d.hardware = tc.hardware
			before := srv.requests.Load()
			err := d.updater(t, rel.trust).HandleJob(context.Background(), tc.job)
			if !errors.Is(err, tc.is) {
				t.Fatalf("err = %v, want %v", err, tc.is)
			}
			last := d.rep.last()
			mustEqual(t, "reported state", last.State, StateRejected)
			mustEqual(t, "reported reason", last.Reason, tc.reason)
			if last.Error == "" {
				t.Fatal("no error text reported")
			}
			mustEqual(t, "states", strings.Join(d.rep.states(), ","), StateRejected)
			mustEqual(t, "image requests", srv.requests.Load(), before)
			if fileExists(d.slots.B) || fileExists(d.slots.StatePath) || d.restarts.Load() != 0 {
				t.Fatal("something was installed")
			}
		})
	}
}

// TestSecurityVersionSurvivesStateLoss: the counter (TPM NV in production) keeps rejecting an
// older release after the agent's state directory is deleted.
func TestSecurityVersionSurvivesStateLoss(t *testing.T) {
	rel := newRelease(t, AlgEd25519, 50_000)
	srv := newImageServer(t, rel.image)
	counter := FileCounter{Path: filepath.Join(t.TempDir(), "nv-counter")}
	d := newDevice(t, counter, srv.client)
	ctx := context.Background()

	// Install and commit security_version 4.
	m4 := rel.manifest(t, "4.0.0", srv.URL())
	m4.SecurityVersion = 4
	if err := d.updater(t, rel.trust).HandleJob(ctx, rel.sign(t, m4)); err != nil {
		t.Fatal(err)
	}
	if err := d.updater(t, rel.trust).OnStart(ctx, HealthFunc(healthy)); err != nil {
		t.Fatal(err)
	}
	mustEqual(t, "counter", counterValue(t, counter), uint64(4))

	old := rel.sign(t, rel.manifest(t, "1.0.0", srv.URL())) // security_version 2, genuinely signed
	for _, wipe := range []bool{false, true} {
		if wipe {
			if err := os.RemoveAll(d.stateDir); err != nil {
				t.Fatal(err)
			}
		}
		before := srv.requests.Load()
		err := d.updater(t, rel.trust).HandleJob(ctx, old)
		if !errors.Is(err, ErrRollback) {
			t.Fatalf("wipe=%v: err = %v, want ErrRollback", wipe, err)
		}
		mustEqual(t, "reason", d.rep.last().Reason, ReasonSecurityVersion)
		mustEqual(t, "image requests", srv.requests.Load(), before)
	}
	mustEqual(t, "active slot", d.slotState(t).Version, "4.0.0")
}

func TestTamperedImageRejectedAtVerify(t *testing.T) {
	rel := newRelease(t, AlgEd25519, 300_000)
	tampered := bytes.Clone(rel.image)
	tampered[123_456] ^= 0x01
	srv := newImageServer(t, tampered)
	job := rel.sign(t, rel.manifest(t, "2.0.0", srv.URL()))
	d := newDevice(t, NewMemoryCounter(0), srv.client)
	u := d.updater(t, rel.trust)

	err := u.HandleJob(context.Background(), job)
	if !errors.Is(err, ErrHashMismatch) {
		t.Fatalf("err = %v, want ErrHashMismatch", err)
	}
	mustEqual(t, "states", strings.Join(d.rep.states(), ","), "downloading,verifying,rejected")
	mustEqual(t, "reason", d.rep.last().Reason, ReasonHashMismatch)
	mustEqual(t, "bytes fetched", u.BytesFetched(), int64(len(tampered)))
	if fileExists(d.slots.B) || fileExists(d.slots.StatePath) || d.restarts.Load() != 0 {
		t.Fatal("tampered image was installed")
	}
	if fileExists(filepath.Join(d.stateDir, partialImageFile)) {
		t.Fatal("tampered image kept in the state directory")
	}
	// The retained job comes again: not downloaded again.
	reqs := srv.requests.Load()
	if err := d.updater(t, rel.trust).HandleJob(context.Background(), job); err != nil {
		t.Fatal(err)
	}
	mustEqual(t, "requests after redelivery", srv.requests.Load(), reqs)
}

// TestInterruptedDownloadResumes kills the agent (cancels its context) in the middle of the
// stream, then starts a new Updater on the same state directory: it re-hashes the bytes on
// disk and the server sends only the rest.
func TestInterruptedDownloadResumes(t *testing.T) {
	const size = 2 << 20
	rel := newRelease(t, AlgEd25519, size)
	srv := newImageServer(t, rel.image)
	job := rel.sign(t, rel.manifest(t, "2.0.0", srv.URL()))
	d := newDevice(t, NewMemoryCounter(0), srv.client)

	ctx, kill := context.WithCancel(context.Background())
	d.rep.onReport = func(s Status) {
		if s.State == StateDownloading && s.Percent >= 40 {
			kill()
		}
	}
	u1 := d.updater(t, rel.trust)
	err := u1.HandleJob(ctx, job)
	if !errors.Is(err, context.Canceled) {
		t.Fatalf("first run: %v, want context.Canceled", err)
	}
	got1 := u1.BytesFetched()
	if got1 < size*4/10 || got1 >= size {
		t.Fatalf("first run fetched %d of %d bytes", got1, size)
	}
	d.rep.onReport = nil
	srv.waitIdle(t)
	servedBefore := srv.served.Load()

	// The agent starts again and resumes the persisted job.
	u2 := d.updater(t, rel.trust)
	if err := u2.Resume(context.Background()); err != nil {
		t.Fatal(err)
	}
	got2 := u2.BytesFetched()
	mustEqual(t, "bytes fetched across both runs", got1+got2, int64(size))
	mustEqual(t, "bytes the server sent on resume", srv.served.Load()-servedBefore, int64(size)-got1)
	mustEqual(t, "bytes re-hashed from disk", u2.BytesRehashed(), got1)
	ranges := srv.Ranges()
	mustEqual(t, "resume range", ranges[len(ranges)-1], fmt.Sprintf("bytes=%d-%d", got1, size-1))
	mustEqual(t, "installed image", readFile(t, d.slots.B), string(rel.image))
	mustEqual(t, "last state", d.rep.last().State, StateRestarting)
	t.Logf("first run fetched %d bytes, resumed run %d bytes (range %s)", got1, got2, ranges[len(ranges)-1])

	// A different job during the trial must wait.
	other := rel.sign(t, rel.manifest(t, "2.0.1", srv.URL()))
	if err := u2.HandleJob(context.Background(), other); !errors.Is(err, ErrBusy) {
		t.Fatalf("job during trial: %v, want ErrBusy", err)
	}
}

func TestHealthCheckFailureRollsBack(t *testing.T) {
	tests := []struct {
		name   string
		health HealthFunc
		reason string
		text   string
	}{
		{"check fails", func(context.Context) error { return errors.New("broker unreachable: no PUBACK for telemetry") }, ReasonHealthCheckFailed, "no PUBACK for telemetry"},
		{"check times out", func(ctx context.Context) error { <-ctx.Done(); return ctx.Err() }, ReasonHealthCheckFailed, "did not pass within 300ms"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			rel := newRelease(t, AlgEd25519, 100_000)
			srv := newImageServer(t, rel.image)
			job := rel.sign(t, rel.manifest(t, "2.0.0", srv.URL()))
			counter := NewMemoryCounter(1)
			d := newDevice(t, counter, srv.client)
			d.healthTimeout = 300 * time.Millisecond
			ctx := context.Background()
			if err := d.updater(t, rel.trust).HandleJob(ctx, job); err != nil {
				t.Fatal(err)
			}
			u := d.updater(t, rel.trust)
			start := time.Now()
			if err := u.OnStart(ctx, tc.health); err != nil {
				t.Fatal(err)
			}
			if el := time.Since(start); el > 5*time.Second {
				t.Fatalf("health check took %s with a 300ms timeout", el)
			}
			last := d.rep.last()
			mustEqual(t, "state", last.State, StateRolledBack)
			mustEqual(t, "reason", last.Reason, tc.reason)
			if !strings.Contains(last.Error, tc.text) {
				t.Fatalf("reported error %q lacks %q", last.Error, tc.text)
			}
			mustEqual(t, "states", strings.Join(d.rep.states(), ","), "downloading,verifying,installing,restarting,health_check,rolled_back")
			st := d.slotState(t)
			if st.Active != SlotA || st.Pending != "" {
				t.Fatalf("slots after rollback: %+v", st)
			}
			mustEqual(t, "slot a", readFile(t, d.slots.A), oldFirmware)
			mustEqual(t, "counter", counterValue(t, counter), uint64(1))
			mustEqual(t, "counter increments", counter.Increments(), 0)
			mustEqual(t, "restarts (install, rollback)", d.restarts.Load(), int32(2))
			// The retained job is not installed again.
			if err := d.updater(t, rel.trust).HandleJob(ctx, job); err != nil || d.restarts.Load() != 2 {
				t.Fatalf("rolled-back job retried: %v", err)
			}
		})
	}
}

// TestBootLoopRollsBack: the new slot dies during its health check three times (the agent is
// killed before deciding); the fourth start rolls back without running the check.
func TestBootLoopRollsBack(t *testing.T) {
	rel := newRelease(t, AlgEd25519, 10_000)
	srv := newImageServer(t, rel.image)
	d := newDevice(t, NewMemoryCounter(0), srv.client)
	if err := d.updater(t, rel.trust).HandleJob(context.Background(), rel.sign(t, rel.manifest(t, "2.0.0", srv.URL()))); err != nil {
		t.Fatal(err)
	}
	for i := 1; i <= 3; i++ {
		ctx, crash := context.WithCancel(context.Background())
		err := d.updater(t, rel.trust).OnStart(ctx, HealthFunc(func(context.Context) error { crash(); return errors.New("killed") }))
		if !errors.Is(err, context.Canceled) {
			t.Fatalf("start %d: %v", i, err)
		}
		mustEqual(t, "boot attempts", d.slotState(t).BootAttempts, i)
	}
	called := false
	if err := d.updater(t, rel.trust).OnStart(context.Background(), HealthFunc(func(context.Context) error { called = true; return nil })); err != nil {
		t.Fatal(err)
	}
	if called {
		t.Fatal("health check ran on the 4th start")
	}
	mustEqual(t, "reason", d.rep.last().Reason, ReasonBootLoop)
	mustEqual(t, "active", d.slotState(t).Active, SlotA)
}

func TestInstallFailureReported(t *testing.T) {
	rel := newRelease(t, AlgEd25519, 10_000)
	srv := newImageServer(t, rel.image)
	d := newDevice(t, NewMemoryCounter(0), srv.client)
	script := filepath.Join(d.dir, "rauc")
	os.WriteFile(script, []byte("#!/bin/sh\necho \"rauc: $2: not a bundle\" >&2\nexit 1\n"), 0o755)
	u, err := New(Config{StateDir: d.stateDir, Hardware: "hw-1", Trust: rel.trust, Counter: d.counter,
		Installer: &CommandInstaller{InstallCmd: script + " install {image}", Timeout: 5 * time.Second},
		Reporter:  d.rep, OpenSource: d.sources.Open})
	if err != nil {
		t.Fatal(err)
	}
	err = u.HandleJob(context.Background(), rel.sign(t, rel.manifest(t, "2.0.0", srv.URL())))
	var ce *CommandError
	if !errors.As(err, &ce) || ce.ExitCode != 1 {
		t.Fatalf("err = %v, want exit code 1", err)
	}
	last := d.rep.last()
	mustEqual(t, "state", last.State, StateFailed)
	mustEqual(t, "reason", last.Reason, ReasonInstallFailed)
	if !strings.Contains(last.Error, "exited with code 1") || !strings.Contains(last.Error, "not a bundle") {
		t.Fatalf("reported error lacks exit code or stderr: %q", last.Error)
	}
}

// TestUpdateOverMQTTChunks runs the whole flow with the "mqtt" source only, through an
// MQTTChunkClient and a lossy in-memory broker in front of a ChunkServer.
func TestUpdateOverMQTTChunks(t *testing.T) {
	rel := newRelease(t, AlgECDSAP256, 300_000)
	m, err := BuildManifest(rel.imagePath, "tpmagent", "3.0.0", 3, []string{"hw-1"}, 16<<10, []string{SourceMQTT})
	if err != nil {
		t.Fatal(err)
	}
	job := rel.sign(t, m)
	counter := NewMemoryCounter(0)
	d := newDevice(t, counter, nil)
	var broker *lossyBroker
	d.sources.MQTT = func(m *Manifest) (ChunkTransport, error) {
		broker = &lossyBroker{t: t, srv: &ChunkServer{Image: bytes.NewReader(rel.image), Size: m.Size, ChunkSize: m.ChunkSize},
			topic: ChunkRequestTopic(m.Name, m.Version)}
		broker.client = &MQTTChunkClient{Publish: broker.publish, RequestTopic: ChunkRequestTopic(m.Name, m.Version),
			DeviceID: "dev-0001", Timeout: 50 * time.Millisecond}
		return broker.client, nil
	}
	ctx := context.Background()
	if err := d.updater(t, rel.trust).HandleJob(ctx, job); err != nil {
		t.Fatal(err)
	}
	if err := d.updater(t, rel.trust).OnStart(ctx, HealthFunc(healthy)); err != nil {
		t.Fatal(err)
	}
	mustEqual(t, "state", d.rep.last().State, StateCommitted)
	mustEqual(t, "counter", counterValue(t, counter), uint64(3))
	mustEqual(t, "counter increments", counter.Increments(), 3)
	mustEqual(t, "slot b", readFile(t, d.slots.B), string(rel.image))
	if broker.dropped == 0 {
		t.Fatal("no chunk request was lost: retries not exercised")
	}
}
