package testenv

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// MosquittoOptions configures a test broker.
type MosquittoOptions struct {
	// PKI provides the CA and server certificate. Required.
	PKI *PKI
	// Port to listen on; 0 picks a free one. Restart keeps the port.
	Port int
	// ACLFile, when set, is used as acl_file.
	ACLFile string
	// TLSVersion restricts the listener (e.g. "tlsv1.2"); empty allows the default.
	TLSVersion string
	// CertFile/KeyFile override the server certificate.
	CertFile, KeyFile string
	// Extra lines appended to the listener configuration.
	Extra []string
}

// Mosquitto is a running TLS mosquitto with require_certificate true and
// use_identity_as_username true.
type Mosquitto struct {
	t    testing.TB
	opts MosquittoOptions
	Dir  string
	Port int
	Conf string
	Log  string

	mu  sync.Mutex
	cmd *exec.Cmd
}

// StartMosquitto writes a config under t.TempDir() and starts mosquitto on a
// free loopback port, waiting until it accepts connections.
func StartMosquitto(t testing.TB, opts MosquittoOptions) *Mosquitto {
	t.Helper()
	NeedTool(t, "mosquitto", "mosquitto")
	if opts.PKI == nil {
		t.Fatal("testenv: MosquittoOptions.PKI is required")
	}
	m := &Mosquitto{t: t, opts: opts, Dir: t.TempDir()}
	m.Port = opts.Port
	if m.Port == 0 {
		m.Port = FreePort(t)
	}
	m.Log = filepath.Join(m.Dir, "mosquitto.log")
	m.Conf = filepath.Join(m.Dir, "mosquitto.conf")
	m.writeConf()
	m.Start()
	t.Cleanup(m.Stop)
	return m
}

func (m *Mosquitto) writeConf() {
	cert, key := m.opts.PKI.ServerCertFile, m.opts.PKI.ServerKeyFile
	if m.opts.CertFile != "" {
		cert, key = m.opts.CertFile, m.opts.KeyFile
	}
	lines := []string{
		"# written by internal/testenv",
		"user root",
		"per_listener_settings false",
		"allow_anonymous false",
		"persistence false",
		"max_queued_messages 0",
		"max_inflight_messages 0",
		// Without it Nagle + delayed ACK hold back the CONNACK after the
		// session tickets: ~40 ms on every connection.
		"set_tcp_nodelay true",
		"log_dest file " + m.Log,
		"log_type error",
		"log_type warning",
		"log_type notice",
		"log_type information",
		"connection_messages true",
		"log_timestamp true",
		fmt.Sprintf("listener %d 127.0.0.1", m.Port),
		"cafile " + m.opts.PKI.CAFile,
		"certfile " + cert,
		"keyfile " + key,
		"require_certificate true",
		"use_identity_as_username true",
	}
	if m.opts.TLSVersion != "" {
		lines = append(lines, "tls_version "+m.opts.TLSVersion)
	}
	if m.opts.ACLFile != "" {
		lines = append(lines, "acl_file "+m.opts.ACLFile)
	}
	lines = append(lines, m.opts.Extra...)
	if err := os.WriteFile(m.Conf, []byte(strings.Join(lines, "\n")+"\n"), 0o644); err != nil {
		m.t.Fatal(err)
	}
}

// Addr is 127.0.0.1:PORT.
func (m *Mosquitto) Addr() string { return "127.0.0.1:" + strconv.Itoa(m.Port) }

// URL is mqtts://127.0.0.1:PORT.
func (m *Mosquitto) URL() string { return "mqtts://" + m.Addr() }

// Start starts the broker (again) with the same config and port.
func (m *Mosquitto) Start() {
	m.t.Helper()
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.cmd != nil {
		return
	}
	cmd := exec.Command("mosquitto", "-c", m.Conf)
	out, err := os.OpenFile(filepath.Join(m.Dir, "stdout.log"), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		m.t.Fatal(err)
	}
	cmd.Stdout, cmd.Stderr = out, out
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		m.t.Fatalf("testenv: start mosquitto: %v", err)
	}
	go func() { _ = cmd.Wait(); out.Close() }()
	if err := WaitPort(m.Addr(), 10*time.Second); err != nil {
		_ = cmd.Process.Kill()
		b, _ := os.ReadFile(filepath.Join(m.Dir, "stdout.log"))
		l, _ := os.ReadFile(m.Log)
		m.t.Fatalf("testenv: mosquitto did not listen on %s: %v\n%s\n%s", m.Addr(), err, b, l)
	}
	m.cmd = cmd
}

// Stop stops the broker (SIGTERM, then SIGKILL after 5 s).
func (m *Mosquitto) Stop() { m.stop(syscall.SIGTERM) }

// Kill kills the broker with SIGKILL.
func (m *Mosquitto) Kill() { m.stop(syscall.SIGKILL) }

func (m *Mosquitto) stop(sig syscall.Signal) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.cmd == nil {
		return
	}
	cmd := m.cmd
	m.cmd = nil
	_ = cmd.Process.Signal(sig)
	deadline := time.Now().Add(5 * time.Second)
	for time.Now().Before(deadline) {
		if err := cmd.Process.Signal(syscall.Signal(0)); err != nil {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	_ = cmd.Process.Kill()
	// Wait until the port is free again so a restart can bind it.
	for i := 0; i < 250; i++ {
		if WaitPort(m.Addr(), 10*time.Millisecond) != nil {
			return
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// Save makes a broker with persistence write its database now (SIGUSR1)
// and waits until the file is there, so that a SIGKILL from then on
// restores at least this state. mosquitto's autosave runs at most every
// autosave_interval seconds: a broker killed before its first save comes
// back without the subscriptions made so far, and what is published before
// the subscribers return is dropped. The broker's Extra lines must set
// persistence_location.
func (m *Mosquitto) Save() {
	m.t.Helper()
	var dbPath string
	for _, l := range m.opts.Extra {
		if loc, ok := strings.CutPrefix(l, "persistence_location "); ok {
			dbPath = filepath.Join(strings.TrimSpace(loc), "mosquitto.db")
		}
	}
	if dbPath == "" {
		m.t.Fatal("testenv: mosquitto save: no persistence_location in MosquittoOptions.Extra")
	}
	before, _ := os.Stat(dbPath)
	m.mu.Lock()
	cmd := m.cmd
	m.mu.Unlock()
	if cmd == nil {
		m.t.Fatal("testenv: mosquitto save: broker not running")
	}
	if err := cmd.Process.Signal(syscall.SIGUSR1); err != nil {
		m.t.Fatalf("testenv: mosquitto save: %v", err)
	}
	deadline := time.Now().Add(10 * time.Second)
	for time.Now().Before(deadline) {
		if fi, err := os.Stat(dbPath); err == nil && (before == nil || !os.SameFile(before, fi) || fi.ModTime().After(before.ModTime())) {
			return
		}
		time.Sleep(10 * time.Millisecond)
	}
	m.t.Fatalf("testenv: mosquitto did not write %s within 10 s of SIGUSR1:\n%s", dbPath, m.LogText())
}

// Restart stops and starts the broker on the same port.
func (m *Mosquitto) Restart() {
	m.t.Helper()
	m.Stop()
	m.Start()
}

// Reconfigure replaces options (e.g. a rotated certificate or another CA) and
// restarts the broker on the same port.
func (m *Mosquitto) Reconfigure(opts MosquittoOptions) {
	m.t.Helper()
	opts.Port = m.Port
	m.opts = opts
	m.writeConf()
	m.Restart()
}

// LogText returns the broker log so far.
func (m *Mosquitto) LogText() string {
	b, _ := os.ReadFile(m.Log)
	return string(b)
}
