package daemon

import (
	"bytes"
	"context"
	"crypto/tls"
	"fmt"
	"log/slog"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/tpmagent/tpmagent/agent/batch"
	"github.com/tpmagent/tpmagent/agent/source"
	"github.com/tpmagent/tpmagent/agent/status"
	"github.com/tpmagent/tpmagent/internal/testdevice"
	"github.com/tpmagent/tpmagent/internal/testenv"
	"github.com/tpmagent/tpmagent/internal/testmqtt"
	"github.com/tpmagent/tpmagent/transport"
)

// listenNotify is the test's NOTIFY_SOCKET (testenv.NotifySocket).
func listenNotify(t *testing.T) *notifyListener {
	t.Helper()
	n := testenv.StartNotifySocket(t)
	t.Setenv("NOTIFY_SOCKET", n.Path)
	return &notifyListener{n}
}

// notifyListener adds a failing wait to testenv.NotifySocket.
type notifyListener struct{ *testenv.NotifySocket }

func (n *notifyListener) waitFor(t *testing.T, prefix string, timeout time.Duration) {
	t.Helper()
	if err := n.WaitFor(prefix, timeout); err != nil {
		t.Fatal(err)
	}
}

// startSubscriber connects an MQTT client with tlsCfg to url and hands
// every message on topic (QoS 1) to handle. clean=false keeps a persistent
// session, so the broker queues for it while it reconnects.
func startSubscriber(t *testing.T, url string, tlsCfg *tls.Config, clean bool, topic string, handle func(transport.Message)) {
	t.Helper()
	c, err := testmqtt.Start(t, transport.ClientOptions{
		URLs:         []string{url},
		TLS:          tlsCfg,
		ClientID:     "subscriber",
		StatusTopic:  "-",
		CleanSession: clean,
		Logger:       slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn})),
	}, 15*time.Second)
	if err != nil {
		t.Fatalf("subscriber: connect to %s: %v", url, err)
	}
	if err := c.Subscribe(context.Background(), topic, 1, handle); err != nil {
		t.Fatal(err)
	}
}

// subscribe connects a software-identity subscriber (CN "subscriber") to
// url and counts readings on topic (JSON batches).
func subscribe(t *testing.T, d *testdevice.Device, url, topic string) (readings func() int, payloads func() [][]byte) {
	t.Helper()
	_, _, cert := d.PKI.SoftClient(t, "subscriber")
	var mu sync.Mutex
	n := 0
	var all [][]byte
	startSubscriber(t, url, &tls.Config{RootCAs: d.PKI.Pool(), Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS13}, true, topic,
		func(m transport.Message) {
			rs, err := batch.Decode(m.Payload)
			mu.Lock()
			defer mu.Unlock()
			all = append(all, m.Payload)
			if err == nil {
				n += len(rs)
			}
		})
	return func() int { mu.Lock(); defer mu.Unlock(); return n },
		func() [][]byte { mu.Lock(); defer mu.Unlock(); return append([][]byte(nil), all...) }
}

func lines(from, n int) string {
	var b strings.Builder
	for i := from; i < from+n; i++ {
		fmt.Fprintf(&b, "{\"name\":\"t\",\"value\":%d}\n", i)
	}
	return b.String()
}

func waitSocket(t *testing.T, path string) {
	t.Helper()
	// Dial, not stat (CI once hung on a sender that connected between the
	// agent's bind and listen).
	if err := testenv.WaitUnix(path, 5*time.Second); err != nil {
		t.Fatalf("telemetry socket %s never accepted a connection: %v", path, err)
	}
}

// TestRunPublishesAndNotifiesSystemd runs the daemon against swtpm and a TLS
// mosquitto: readings sent to the socket reach a subscriber; systemd hears
// READY=1, WATCHDOG=1, STATUS= and STOPPING=1.
func TestRunPublishesAndNotifiesSystemd(t *testing.T) {
	n := listenNotify(t)
	t.Setenv("WATCHDOG_USEC", "400000")
	t.Setenv("WATCHDOG_PID", "")
	d := testdevice.New(t, testdevice.Options{})
	d.Config.Telemetry.SystemInterval = 200 * time.Millisecond
	readings, payloads := subscribe(t, d, d.Broker.URL(), "devices/"+d.ID+"/#")

	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() {
		done <- Run(ctx, Options{Config: d.Config, Logger: slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn})), StatusInterval: 200 * time.Millisecond})
	}()
	waitSocket(t, d.Config.Telemetry.Socket)
	n.waitFor(t, "READY=1", 15*time.Second)

	const total = 5000
	sctx, scancel := context.WithTimeout(ctx, 30*time.Second)
	ok, rejected, err := source.Send(sctx, d.Config.Telemetry.Socket, strings.NewReader(lines(0, total)), nil)
	scancel()
	if err != nil || ok != total || rejected != 0 {
		t.Fatalf("send: ok %d rejected %d err %v", ok, rejected, err)
	}
	deadline := time.Now().Add(30 * time.Second)
	for readings() < total && time.Now().Before(deadline) {
		time.Sleep(20 * time.Millisecond)
	}
	if got := readings(); got < total {
		t.Fatalf("subscriber received %d of %d readings", got, total)
	}
	n.waitFor(t, "WATCHDOG=1", 5*time.Second)
	n.waitFor(t, "STATUS=", 5*time.Second)
	system := false
	for _, p := range payloads() {
		system = system || bytes.Contains(p, []byte(`"system.uptime"`))
	}
	if !system {
		t.Error("no system reading (system.uptime) published at telemetry.system_interval")
	}
	if !strings.Contains(d.Broker.LogText(), d.ID) {
		t.Errorf("broker log does not name the device CN %q as username", d.ID)
	}
	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("run: %v", err)
		}
	case <-time.After(20 * time.Second):
		t.Fatal("run did not stop after cancel")
	}
	n.waitFor(t, "STOPPING=1", time.Second)
}

// stallingPublisher stops publishing (blocks) after the first stallAfter
// messages while claiming to be connected: a stuck publishing loop.
type stallingPublisher struct {
	transport.Publisher
	mu    sync.Mutex
	n     int
	after int
	stuck chan struct{}
	once  sync.Once
}

func (s *stallingPublisher) Publish(ctx context.Context, topic string, qos byte, retained bool, payload []byte, done func(error)) error {
	s.mu.Lock()
	s.n++
	stall := s.n > s.after
	s.mu.Unlock()
	if stall {
		s.once.Do(func() { close(s.stuck) })
		<-ctx.Done()
		return ctx.Err()
	}
	return s.Publisher.Publish(ctx, topic, qos, retained, payload, done)
}

// TestWatchdogStopsWhenPublishingStalls: with the publishing loop stuck
// while connected and records waiting, WATCHDOG=1 stops so that systemd
// restarts the agent.
func TestWatchdogStopsWhenPublishingStalls(t *testing.T) {
	n := listenNotify(t)
	t.Setenv("WATCHDOG_USEC", "600000")
	d := testdevice.New(t, testdevice.Options{})
	d.Config.Telemetry.BatchMax = 1
	sp := &stallingPublisher{after: 3, stuck: make(chan struct{})}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	done := make(chan error, 1)
	go func() {
		done <- Run(ctx, Options{Config: d.Config, Logger: slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelError})),
			WrapPublisher: func(p transport.Publisher) transport.Publisher { sp.Publisher = p; return sp }})
	}()
	waitSocket(t, d.Config.Telemetry.Socket)
	n.waitFor(t, "READY=1", 15*time.Second)
	n.waitFor(t, "WATCHDOG=1", 5*time.Second)
	go func() {
		sctx, scancel := context.WithTimeout(ctx, 20*time.Second)
		defer scancel()
		_, _, _ = source.Send(sctx, d.Config.Telemetry.Socket, strings.NewReader(lines(0, 50)), nil)
	}()
	select {
	case <-sp.stuck:
	case <-time.After(15 * time.Second):
		t.Fatal("publisher never stalled")
	}
	// Give the loop one stall period to notice, then watch for pings.
	time.Sleep(900 * time.Millisecond)
	before := n.Count("WATCHDOG=1")
	time.Sleep(1500 * time.Millisecond)
	if after := n.Count("WATCHDOG=1"); after != before {
		t.Fatalf("watchdog still pinged %d times while publishing was stalled", after-before)
	}
	cancel()
	select {
	case <-done:
	case <-time.After(30 * time.Second):
		t.Fatal("run did not stop")
	}
}

var _ = testenv.FreePort

// TestStatusShowsConnectionErrorAndPermissionWarning: with the broker down
// the agent keeps accepting readings (spooled) and `status` names the
// connection error; a config file readable by others is warned about.
func TestStatusShowsConnectionErrorAndPermissionWarning(t *testing.T) {
	d := testdevice.New(t, testdevice.Options{})
	d.Broker.Stop()
	if err := os.Chmod(d.ConfigFile, 0o644); err != nil {
		t.Fatal(err)
	}
	d.Config.File = d.ConfigFile
	var logBuf syncBuffer
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() {
		done <- Run(ctx, Options{Config: d.Config, Logger: slog.New(slog.NewTextHandler(&logBuf, nil))})
	}()
	waitSocket(t, d.Config.Telemetry.Socket)
	sctx, scancel := context.WithTimeout(ctx, 20*time.Second)
	ok, _, err := source.Send(sctx, d.Config.Telemetry.Socket, strings.NewReader(lines(0, 10)), nil)
	scancel()
	if err != nil || ok != 10 {
		t.Fatalf("offline send: ok %d, err %v", ok, err)
	}
	var snap status.Snapshot
	deadline := time.Now().Add(15 * time.Second)
	for time.Now().Before(deadline) {
		fctx, fcancel := context.WithTimeout(ctx, 2*time.Second)
		snap, err = status.Fetch(fctx, d.Config.Status.Socket)
		fcancel()
		if err == nil && snap.LastError != "" {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	if !strings.Contains(snap.LastError, d.Broker.Addr()) {
		t.Errorf("status last_error %q does not name the broker %s", snap.LastError, d.Broker.Addr())
	}
	if snap.Spool.Records == 0 {
		t.Errorf("readings were not spooled while offline: %+v", snap.Spool)
	}
	if c := snap.Certificate; c == nil || c.KeyHandle != "0x81000100" || c.NotAfter.IsZero() || c.RenewAt.IsZero() || c.RenewalState == "" {
		t.Errorf("status certificate %+v: want the key handle, expiry, renewal time and state", c)
	}
	if !strings.Contains(logBuf.String(), "configuration file permissions") || !strings.Contains(logBuf.String(), d.ConfigFile) {
		t.Errorf("no permission warning naming %s in the log:\n%s", d.ConfigFile, logBuf.String())
	}
	cancel()
	<-done
}

// syncBuffer is a bytes.Buffer safe for the logger's goroutines.
type syncBuffer struct {
	mu sync.Mutex
	b  strings.Builder
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}
