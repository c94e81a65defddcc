package security

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/tpmagent/tpmagent/agent/daemon"
	"github.com/tpmagent/tpmagent/agent/source"
	"github.com/tpmagent/tpmagent/agent/status"
	"github.com/tpmagent/tpmagent/internal/testdevice"
	"github.com/tpmagent/tpmagent/internal/testenv"
)

// capture is a running tshark capture on the loopback interface, limited
// to one TCP port (the test's own broker).
type capture struct {
	file   string
	cmd    *exec.Cmd
	mu     sync.Mutex
	stderr bytes.Buffer
	done   chan struct{}
}

func (c *capture) Write(p []byte) (int, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.stderr.Write(p)
}

func (c *capture) log() string {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.stderr.String()
}

// startCapture starts `tshark -i lo -f "tcp port PORT" -w FILE` and waits
// until it captures.
func startCapture(t *testing.T, port int) *capture {
	t.Helper()
	testenv.NeedTool(t, "tshark", "tshark")
	if os.Geteuid() != 0 {
		t.Fatal("capturing on lo needs root (CI runs as root)")
	}
	c := &capture{file: filepath.Join(t.TempDir(), "lo.pcapng"), done: make(chan struct{})}
	c.cmd = exec.Command("tshark", "-i", "lo", "-f", fmt.Sprintf("tcp port %d", port), "-w", c.file, "-q")
	c.cmd.Stdout, c.cmd.Stderr = c, c
	c.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := c.cmd.Start(); err != nil {
		t.Fatalf("tshark: %v", err)
	}
	go func() { _ = c.cmd.Wait(); close(c.done) }()
	t.Cleanup(c.stop)
	deadline := time.Now().Add(20 * time.Second)
	for !strings.Contains(c.log(), "Capturing on") {
		select {
		case <-c.done:
			t.Fatalf("tshark exited: %s", c.log())
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("tshark did not start capturing within 20 s: %s", c.log())
		}
		time.Sleep(20 * time.Millisecond)
	}
	// dumpcap reports "Capturing on" a moment before its filter is live.
	time.Sleep(time.Second)
	return c
}

// stop ends the capture (SIGINT lets tshark finish the file).
func (c *capture) stop() {
	if c.cmd.Process == nil {
		return
	}
	select {
	case <-c.done:
		return
	default:
	}
	time.Sleep(500 * time.Millisecond) // let dumpcap write the last packets
	_ = c.cmd.Process.Signal(syscall.SIGINT)
	select {
	case <-c.done:
	case <-time.After(10 * time.Second):
		_ = c.cmd.Process.Kill()
		<-c.done
	}
}

// bytes returns the capture file after stopping the capture.
func (c *capture) bytes(t *testing.T) []byte {
	t.Helper()
	c.stop()
	b, err := os.ReadFile(c.file)
	if err != nil {
		t.Fatalf("read capture: %v (tshark: %s)", err, c.log())
	}
	return b
}

// sentinel is a reading name that appears nowhere else.
func sentinel(t *testing.T) string {
	b := make([]byte, 8)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	return "sentinel-" + hex.EncodeToString(b)
}

// runAgent runs the daemon in-process with cfg from d until the test ends,
// sends one reading named name and waits until the broker acknowledged it.
func runAgent(t *testing.T, d *testdevice.Device, name string) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() {
		done <- daemon.Run(ctx, daemon.Options{Config: d.Config, Logger: slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))})
	}()
	t.Cleanup(func() {
		cancel()
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("agent: %v", err)
			}
		case <-time.After(20 * time.Second):
			t.Error("agent did not stop")
		}
	})
	deadline := time.Now().Add(20 * time.Second)
	for {
		sctx, scancel := context.WithTimeout(ctx, time.Second)
		s, err := status.Fetch(sctx, d.Config.Status.Socket)
		scancel()
		if err == nil && s.Connected {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("agent never connected: %v %+v", err, s)
		}
		time.Sleep(20 * time.Millisecond)
	}
	sctx, scancel := context.WithTimeout(ctx, 10*time.Second)
	defer scancel()
	line := fmt.Sprintf("{\"name\":%q,\"value\":42}\n", name)
	if ok, rej, err := source.Send(sctx, d.Config.Telemetry.Socket, strings.NewReader(line), nil); err != nil || ok != 1 || rej != 0 {
		t.Fatalf("send sentinel: ok %d rejected %d err %v", ok, rej, err)
	}
	for {
		s, err := status.Fetch(sctx, d.Config.Status.Socket)
		if err == nil && s.MessagesAcked >= 1 && s.Spool.Records == 0 {
			return
		}
		if sctx.Err() != nil {
			t.Fatalf("sentinel never acknowledged: %v %+v", err, s)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// TestCaptureShowsNoPlaintext streams a sentinel reading through the
// agent's mTLS connection while tshark captures the broker port: the
// sentinel is nowhere in the capture. With the agent's key log
// (broker.keylog) tshark decrypts the same capture and finds it: the
// telemetry was protected by that session's TLS secrets only.
func TestCaptureShowsNoPlaintext(t *testing.T) {
	d := testdevice.New(t, testdevice.Options{})
	keylog := filepath.Join(t.TempDir(), "keylog.txt")
	d.Config.Broker.KeyLog = keylog
	name := sentinel(t)
	c := startCapture(t, d.Broker.Port)
	runAgent(t, d, name)
	raw := c.bytes(t)
	if len(raw) < 1000 {
		t.Fatalf("capture has only %d bytes: tshark saw no traffic (%s)", len(raw), c.log())
	}
	if bytes.Contains(raw, []byte(name)) {
		t.Fatalf("the sentinel %q is in clear in the capture of the TLS connection", name)
	}
	if !bytes.Contains(raw, []byte{0x17, 0x03, 0x03}) {
		t.Errorf("no TLS application-data record in the capture")
	}

	kl, err := os.ReadFile(keylog)
	if err != nil || !bytes.Contains(kl, []byte("CLIENT_TRAFFIC_SECRET_0")) {
		t.Fatalf("key log %s: %v, %d bytes, no CLIENT_TRAFFIC_SECRET_0", keylog, err, len(kl))
	}
	dec := decrypt(t, c.file, d.Broker.Port, keylog)
	if !strings.Contains(dec, name) {
		t.Fatalf("with the key log tshark does not find the sentinel in the decrypted stream (%d bytes of output)", len(dec))
	}
	// Without the key log the same capture stays opaque.
	if plain := decrypt(t, c.file, d.Broker.Port, ""); strings.Contains(plain, name) {
		t.Fatalf("tshark finds the sentinel without the key log")
	}
}

// decrypt dissects a capture as MQTT over TLS on port, with keylog when
// given, and returns the MQTT message payloads tshark finds (hex fields and
// their decoded bytes), so the sentinel can be searched for.
func decrypt(t *testing.T, file string, port int, keylog string) string {
	t.Helper()
	args := []string{"-r", file, "-d", fmt.Sprintf("tcp.port==%d,tls", port), "-d", fmt.Sprintf("tls.port==%d,mqtt", port), "-T", "fields", "-e", "mqtt.msg"}
	if keylog != "" {
		args = append(args, "-o", "tls.keylog_file:"+keylog)
	}
	out, err := exec.Command("tshark", args...).CombinedOutput()
	if err != nil {
		t.Fatalf("tshark %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	var b strings.Builder
	b.Write(out)
	for _, f := range strings.Fields(string(out)) {
		for _, h := range strings.Split(f, ",") {
			if raw, err := hex.DecodeString(strings.ReplaceAll(h, ":", "")); err == nil {
				b.Write(raw)
				b.WriteByte('\n')
			}
		}
	}
	return b.String()
}

// TestCaptureControlPlaintext is the control: with TLS turned off on
// purpose (a plaintext mosquitto listener and broker.allow_plaintext) the
// same capture shows the sentinel in clear. It proves that the check above
// would fail if telemetry went out unencrypted.
func TestCaptureControlPlaintext(t *testing.T) {
	testenv.NeedTool(t, "mosquitto", "mosquitto")
	d := testdevice.New(t, testdevice.Options{})
	port := startPlainMosquitto(t)
	d.Config.Broker.URLs = []string{fmt.Sprintf("mqtt://127.0.0.1:%d", port)}
	d.Config.Broker.AllowPlaintext = true
	name := sentinel(t)
	c := startCapture(t, port)
	runAgent(t, d, name)
	raw := c.bytes(t)
	if !bytes.Contains(raw, []byte(name)) {
		t.Fatalf("control failed: the sentinel %q is not in the capture of a plaintext connection (%d bytes captured); the capture check cannot be trusted", name, len(raw))
	}
}

// startPlainMosquitto starts a mosquitto with one plaintext, anonymous
// listener on a free loopback port (the control case only).
func startPlainMosquitto(t *testing.T) int {
	t.Helper()
	dir := t.TempDir()
	port := testenv.FreePort(t)
	conf := filepath.Join(dir, "plain.conf")
	body := fmt.Sprintf("user root\npersistence false\nallow_anonymous true\nset_tcp_nodelay true\nlog_dest file %s/mosquitto.log\nlistener %d 127.0.0.1\n", dir, port)
	if err := os.WriteFile(conf, []byte(body), 0o600); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command("mosquitto", "-c", conf)
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		t.Fatalf("mosquitto: %v", err)
	}
	exited := make(chan struct{})
	go func() { _ = cmd.Wait(); close(exited) }()
	t.Cleanup(func() {
		_ = cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-exited:
		case <-time.After(5 * time.Second):
			_ = cmd.Process.Kill()
			<-exited
		}
	})
	if err := testenv.WaitPort(fmt.Sprintf("127.0.0.1:%d", port), 10*time.Second); err != nil {
		t.Fatalf("plaintext mosquitto did not listen: %v", err)
	}
	return port
}
