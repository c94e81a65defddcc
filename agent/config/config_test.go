package config

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func writeYAML(t *testing.T, body string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "agent.yaml")
	if err := os.WriteFile(p, []byte(body), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

func TestLoadDefaultsAndFile(t *testing.T) {
	p := writeYAML(t, `
device_id: dev-0001
tpm: { device: "swtpm://127.0.0.1:2321", key_handle: 0x81000101 }
broker: { urls: [mqtts://broker:8883], keepalive: 10s }
spool: { max_bytes: 1MiB, fsync: always }
`)
	c, err := Load(p, true, nil)
	if err != nil {
		t.Fatal(err)
	}
	if c.DeviceID != "dev-0001" || c.TPM.KeyHandle != 0x81000101 || c.TPM.SRKHandle != 0x81000002 {
		t.Fatalf("got %+v", c.TPM)
	}
	if c.Broker.Keepalive != 10*time.Second || c.Spool.MaxBytes != 1<<20 || c.Spool.Fsync != "always" {
		t.Fatalf("got %+v %+v", c.Broker, c.Spool)
	}
	if c.Telemetry.Linger != 5*time.Millisecond || c.Telemetry.QoS != 1 {
		t.Fatalf("defaults: %+v", c.Telemetry)
	}
	if got := c.Expand(c.Telemetry.Topic); got != "devices/dev-0001/telemetry" {
		t.Fatalf("topic %q", got)
	}
}

func TestEnvOverridesFile(t *testing.T) {
	p := writeYAML(t, "device_id: from-file\n")
	t.Setenv("TPMAGENT_DEVICE_ID", "from-env")
	t.Setenv("TPMAGENT_TPM_KEY_HANDLE", "0x81000200")
	c, err := Load(p, true, nil)
	if err != nil {
		t.Fatal(err)
	}
	if c.DeviceID != "from-env" || c.TPM.KeyHandle != 0x81000200 {
		t.Fatalf("got %q %v", c.DeviceID, c.TPM.KeyHandle)
	}
}

func TestMissingDefaultFileIsFine(t *testing.T) {
	if _, err := Load(filepath.Join(t.TempDir(), "none.yaml"), false, nil); err != nil {
		t.Fatal(err)
	}
	_, err := Load(filepath.Join(t.TempDir(), "none.yaml"), true, nil)
	if err == nil || !IsConfigError(err) || !strings.Contains(err.Error(), "none.yaml") {
		t.Fatalf("explicit missing file: %v", err)
	}
}

func TestBadValues(t *testing.T) {
	cases := []struct {
		name, yaml, want string
	}{
		{"unknown key", "devce_id: x\n", "field devce_id: is not a known configuration key"},
		{"unknown nested key", "tpm: { handel: 0x81000100 }\n", "field tpm.handel: is not a known"},
		{"handle not hex", "tpm: { key_handle: zz }\n", `field tpm.key_handle: "zz" is not a hex handle`},
		{"handle not persistent", "tpm: { key_handle: 0x80000001 }\n", "field tpm.key_handle: \"0x80000001\" is not a persistent handle"},
		{"device form", "tpm: { device: /tmp/foo }\n", `field tpm.device: "/tmp/foo" is not a TPM device`},
		{"swtpm without port", "tpm: { device: \"swtpm://localhost\" }\n", "is not swtpm://HOST:PORT"},
		{"key type", "tpm: { key_type: ed25519 }\n", "field tpm.key_type: \"ed25519\" is not one of ecc-p256, rsa-2048"},
		{"duration", "telemetry: { linger: soon }\n", `field telemetry.linger: "soon" is not a duration`},
		{"size", "spool: { max_bytes: lots }\n", `field spool.max_bytes: "lots" is not a size`},
		{"qos", "telemetry: { qos: 2 }\n", "field telemetry.qos: \"2\" must be 0 or 1"},
		{"plaintext", "broker: { urls: [tcp://b:1883] }\n", "is a plaintext URL"},
		{"fsync", "spool: { fsync: sometimes }\n", "field spool.fsync"},
		{"yaml syntax", "tpm: [\n", "agent.yaml"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			p := writeYAML(t, tc.yaml)
			_, err := Load(p, true, nil)
			if err == nil {
				t.Fatalf("no error")
			}
			if !IsConfigError(err) {
				t.Fatalf("not a config error: %v", err)
			}
			if !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("error %q does not contain %q", err, tc.want)
			}
			if tc.name != "yaml syntax" && !strings.Contains(err.Error(), p) {
				t.Fatalf("error %q does not name the file", err)
			}
		})
	}
}

func TestPlaintextAllowed(t *testing.T) {
	p := writeYAML(t, "broker: { urls: [tcp://127.0.0.1:1883], allow_plaintext: true }\n")
	if _, err := Load(p, true, nil); err != nil {
		t.Fatal(err)
	}
}

func FuzzLoad(f *testing.F) {
	f.Add("device_id: x\ntpm: { key_handle: 0x81000100 }\n")
	f.Add("spool: { max_bytes: 1MiB }\n")
	f.Add("broker: { urls: [mqtts://a:1] }\n")
	f.Fuzz(func(t *testing.T, body string) {
		p := filepath.Join(t.TempDir(), "c.yaml")
		if err := os.WriteFile(p, []byte(body), 0o600); err != nil {
			t.Fatal(err)
		}
		c, err := Load(p, true, nil)
		if err == nil && c == nil {
			t.Fatal("nil config without error")
		}
	})
}
