package fleet

import (
	"context"
	"crypto/x509"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	"github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport/tcp"

	"github.com/tpmagent/tpmagent/internal/testenv"
	"github.com/tpmagent/tpmagent/tpmkeys"
)

// manufacturer is a per-test swtpm-localca: its CA lives in its own directory, so tests do
// not share /var/lib/swtpm-localca and two manufacturers are two different trust anchors.
type manufacturer struct {
	dir       string
	setupConf string
}

func newManufacturer(t testing.TB) *manufacturer {
	t.Helper()
	testenv.NeedTool(t, "swtpm_setup", "swtpm-tools")
	localca := testenv.NeedTool(t, "swtpm_localca", "swtpm-tools")
	dir := t.TempDir()
	ca := filepath.Join(dir, "ca")
	if err := os.MkdirAll(ca, 0o755); err != nil {
		t.Fatal(err)
	}
	lc := filepath.Join(dir, "swtpm-localca.conf")
	write(t, lc, fmt.Sprintf("statedir = %s\nsigningkey = %s/signkey.pem\nissuercert = %s/issuercert.pem\ncertserial = %s/certserial\n",
		ca, ca, ca, ca))
	opts := filepath.Join(dir, "swtpm-localca.options")
	write(t, opts, "--platform-manufacturer tpmagent-test\n--platform-version 2.1\n--platform-model swtpm\n")
	m := &manufacturer{dir: dir, setupConf: filepath.Join(dir, "swtpm_setup.conf")}
	write(t, m.setupConf, fmt.Sprintf("create_certs_tool = %s\ncreate_certs_tool_config = %s\n"+
		"create_certs_tool_options = %s\nactive_pcr_banks = sha256\n", localca, lc, opts))
	return m
}

func write(t testing.TB, path, s string) {
	t.Helper()
	if err := os.WriteFile(path, []byte(s), 0o644); err != nil {
		t.Fatal(err)
	}
}

// provision writes a manufactured TPM state (EKs and EK certificates) into stateDir.
func (m *manufacturer) provision(t testing.TB, stateDir string) {
	t.Helper()
	out, err := exec.Command("swtpm_setup", "--tpm2", "--create-ek-cert", "--overwrite", "--tpmstate", stateDir,
		"--config", m.setupConf, "--logfile", filepath.Join(m.dir, "setup.log")).CombinedOutput()
	if err != nil {
		log, _ := os.ReadFile(filepath.Join(m.dir, "setup.log"))
		t.Fatalf("swtpm_setup: %v\n%s\n%s", err, out, log)
	}
}

// pool returns the manufacturer's root and issuer certificates (after one provision).
func (m *manufacturer) pool(t testing.TB) *x509.CertPool {
	t.Helper()
	p, err := CertPoolFromFiles(filepath.Join(m.dir, "ca", "swtpm-localca-rootca-cert.pem"), filepath.Join(m.dir, "ca", "issuercert.pem"))
	if err != nil {
		t.Fatal(err)
	}
	return p
}

// startTPM starts a swtpm whose state was made by this manufacturer.
func (m *manufacturer) startTPM(t testing.TB) *testenv.Swtpm {
	t.Helper()
	s := testenv.StartSwtpm(t)
	s.Stop()
	m.provision(t, s.StateDir())
	s.Restart()
	return s
}

func ctxT(t testing.TB) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	t.Cleanup(cancel)
	return ctx
}

// device is a TPM with a device key, opened through tpmkeys.
type device struct {
	id  string
	sw  *testenv.Swtpm
	tpm *tpmkeys.TPM
	key *tpmkeys.Key
}

func newDevice(t testing.TB, m *manufacturer, id string) *device {
	t.Helper()
	ctx := ctxT(t)
	sw := m.startTPM(t)
	tp, err := tpmkeys.Open(ctx, sw.URL())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { tp.Close() })
	if _, err := tp.CreateKey(ctx, tpmkeys.KeySpec{}, false); err != nil {
		t.Fatal(err)
	}
	k, err := tp.OpenKey(ctx, tpmkeys.KeySpec{})
	if err != nil {
		t.Fatal(err)
	}
	return &device{id: id, sw: sw, tpm: tp, key: k}
}

func (d *device) attester() *KeyAttester {
	return &KeyAttester{TPM: d.tpm, Key: d.key, DeviceID: d.id}
}

// rawTPM closes the device's tpmkeys connection (swtpm serves one client) and opens a raw
// go-tpm connection to it.
func (d *device) rawTPM(t testing.TB) *tcp.TPM {
	t.Helper()
	d.key.Close()
	d.tpm.Close()
	raw, err := tcp.Open(tcp.Config{CommandAddress: d.sw.Addr(), PlatformAddress: fmt.Sprintf("127.0.0.1:%d", d.sw.Port()+1)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { raw.Close() })
	return raw
}

// leftovers lists transient objects and loaded sessions.
func leftovers(t testing.TB, raw *tcp.TPM) []uint32 {
	t.Helper()
	var out []uint32
	for _, ht := range []tpm2.TPMHT{tpm2.TPMHTTransient, tpm2.TPMHTHMACSession, tpm2.TPMHTPolicySession} {
		rsp, err := tpm2.GetCapability{Capability: tpm2.TPMCapHandles, Property: uint32(ht) << 24, PropertyCount: 64}.Execute(raw)
		if err != nil {
			t.Fatalf("GetCapability handles: %v", err)
		}
		hs, err := rsp.CapabilityData.Data.Handles()
		if err != nil {
			t.Fatal(err)
		}
		for _, h := range hs.Handle {
			if uint8(h>>24) == uint8(ht) {
				out = append(out, uint32(h))
			}
		}
	}
	return out
}

// newService makes a fleet CA in a temp dir trusting m's EK certificates.
func newService(t testing.TB, m *manufacturer) (*Service, string) {
	t.Helper()
	dir := t.TempDir()
	if _, err := InitCA(dir, "test fleet CA", []string{"localhost", "127.0.0.1"}); err != nil {
		t.Fatal(err)
	}
	signer, err := LoadFileSigner(filepath.Join(dir, CACertFile), filepath.Join(dir, CAKeyFile))
	if err != nil {
		t.Fatal(err)
	}
	return &Service{CA: &CA{Signer: signer}, Manufacturers: m.pool(t)}, dir
}
