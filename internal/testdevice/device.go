// Package testdevice makes emulated devices for integration tests: a swtpm
// with the device key created inside, a certificate for it from the lab CA
// and an agent configuration pointing at a TLS mosquitto (internal/testenv).
package testdevice

import (
	"context"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/tpmagent/tpmagent/agent/config"
	"github.com/tpmagent/tpmagent/internal/testenv"
	"github.com/tpmagent/tpmagent/tpmkeys"
)

// Device is an emulated device: its own swtpm with the device key created
// inside, a certificate for that key from the lab CA, and an agent
// configuration pointing at a TLS mosquitto. Everything lives under
// t.TempDir() and stops with the test.
type Device struct {
	ID     string
	Dir    string
	Swtpm  *testenv.Swtpm
	PKI    *testenv.PKI
	Broker *testenv.Mosquitto
	// Config is ready for `tpmagent run` (sockets, spool and state under Dir).
	Config *config.Config
	// ConfigFile holds Config as YAML (for the CLI).
	ConfigFile string
	// Fingerprint of the device key (hex SHA-256 of its SPKI).
	Fingerprint string
}

// Options configure New.
type Options struct {
	// ID is the device id and certificate CN (default "dev-0001").
	ID string
	// PKI and Broker are reused when set (several devices, one broker).
	PKI    *testenv.PKI
	Broker *testenv.Mosquitto
	// CertLifetime is the device certificate's lifetime (default 24 h).
	CertLifetime time.Duration
}

// New starts swtpm, creates the device key in it, issues its
// certificate and (unless given) starts a broker.
func New(t testing.TB, opts Options) *Device {
	t.Helper()
	if opts.ID == "" {
		opts.ID = "dev-0001"
	}
	if opts.CertLifetime == 0 {
		opts.CertLifetime = 24 * time.Hour
	}
	d := &Device{ID: opts.ID, Dir: t.TempDir(), PKI: opts.PKI, Broker: opts.Broker}
	if d.PKI == nil {
		d.PKI = testenv.NewPKI(t, "", "lab-ca")
	}
	if d.Broker == nil {
		d.Broker = testenv.StartMosquitto(t, testenv.MosquittoOptions{PKI: d.PKI})
	}
	d.Swtpm = testenv.StartSwtpm(t)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	tp, err := tpmkeys.Open(ctx, d.Swtpm.URL())
	if err != nil {
		t.Fatalf("testdevice: open %s: %v", d.Swtpm.URL(), err)
	}
	spec := tpmkeys.KeySpec{Handle: 0x81000100, SRKHandle: 0x81000002, Type: tpmkeys.KeyTypeECCP256}
	if _, err := tp.CreateKey(ctx, spec, false); err != nil {
		t.Fatalf("testdevice: create device key: %v", err)
	}
	k, err := tp.OpenKey(ctx, spec)
	if err != nil {
		t.Fatalf("testdevice: open device key: %v", err)
	}
	certFile := filepath.Join(d.Dir, "device.pem")
	d.PKI.IssueClient(t, d.ID, k.Public(), time.Now().Add(-time.Minute), time.Now().Add(opts.CertLifetime), certFile)
	d.Fingerprint = k.FingerprintSHA256()
	k.Close()
	tp.Close()

	c, err := config.Load("", false, nil)
	if err != nil {
		t.Fatal(err)
	}
	c.DeviceID = d.ID
	c.StateDir = filepath.Join(d.Dir, "state")
	c.TPM.Device = d.Swtpm.URL()
	c.Broker.URLs = []string{d.Broker.URL()}
	c.Broker.CAFile = d.PKI.CAFile
	c.Broker.CertFile = certFile
	c.Broker.BackoffBase = 100 * time.Millisecond
	c.Broker.BackoffMax = time.Second
	c.Telemetry.Socket = filepath.Join(d.Dir, "telemetry.sock")
	// Tests count the readings they send; system readings are opt-in.
	c.Telemetry.SystemInterval = 0
	c.Status.Socket = filepath.Join(d.Dir, "status.sock")
	c.Spool.Dir = filepath.Join(d.Dir, "spool")
	c.Firmware.Slots.A = filepath.Join(d.Dir, "slot-a")
	c.Firmware.Slots.B = filepath.Join(d.Dir, "slot-b")
	d.Config = c
	d.ConfigFile = filepath.Join(d.Dir, "agent.yaml")
	if err := os.WriteFile(d.ConfigFile, []byte(d.YAML()), 0o600); err != nil {
		t.Fatal(err)
	}
	return d
}

// YAML renders the essential parts of Config as an agent.yaml.
func (d *Device) YAML() string {
	c := d.Config
	return "device_id: " + c.DeviceID + "\n" +
		"state_dir: " + c.StateDir + "\n" +
		"tpm: { device: \"" + c.TPM.Device + "\" }\n" +
		"broker:\n  urls: [" + c.Broker.URLs[0] + "]\n  ca_file: " + c.Broker.CAFile + "\n  cert_file: " + c.Broker.CertFile + "\n  backoff_base: 100ms\n  backoff_max: 1s\n" +
		"telemetry: { socket: " + c.Telemetry.Socket + ", system_interval: 0s }\n" +
		"status: { socket: " + c.Status.Socket + " }\n" +
		"spool: { dir: " + c.Spool.Dir + " }\n" +
		"firmware: { slots: { a: " + c.Firmware.Slots.A + ", b: " + c.Firmware.Slots.B + " } }\n"
}
