package main

import (
	"bytes"
	"context"
	"crypto/tls"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/tpmagent/tpmagent/agent/config"
	"github.com/tpmagent/tpmagent/agent/daemon"
	"github.com/tpmagent/tpmagent/agent/identity"
	"github.com/tpmagent/tpmagent/fleet"
	"github.com/tpmagent/tpmagent/internal/testenv"
	"github.com/tpmagent/tpmagent/tpmkeys"
)

// runCLI runs tpmagent in-process with args and returns stdout+stderr.
func runCLI(ctx context.Context, args ...string) (string, error) {
	var out bytes.Buffer
	a := &app{stdin: strings.NewReader(""), stdout: &out, stderr: &out}
	root := a.rootCmd()
	root.SetArgs(args)
	err := root.ExecuteContext(ctx)
	return out.String(), err
}

// TestCertRenew: `tpmagent cert renew` without an agent renews itself (new
// key at enrol.renew_handle, certificate from the CA service over MQTT,
// cert_file.prev, identity.json, old key evicted); with the agent running it
// has the agent renew (back to tpm.key_handle) and reports the result; with
// the CA service down it fails and changes nothing.
func TestCertRenew(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	localca := testenv.NeedTool(t, "swtpm_localca", "swtpm-tools")
	testenv.NeedTool(t, "swtpm_setup", "swtpm-tools")

	// A TPM with an EK certificate from a test manufacturer.
	mdir := t.TempDir()
	mca := filepath.Join(mdir, "ca")
	must(t, os.MkdirAll(mca, 0o755))
	must(t, os.WriteFile(filepath.Join(mdir, "localca.conf"), fmt.Appendf(nil, "statedir = %s\nsigningkey = %s/signkey.pem\nissuercert = %s/issuercert.pem\ncertserial = %s/certserial\n", mca, mca, mca, mca), 0o644))
	must(t, os.WriteFile(filepath.Join(mdir, "localca.options"), []byte("--platform-manufacturer tpmagent-test\n--platform-version 2.1\n--platform-model swtpm\n"), 0o644))
	must(t, os.WriteFile(filepath.Join(mdir, "setup.conf"), fmt.Appendf(nil, "create_certs_tool = %s\ncreate_certs_tool_config = %s/localca.conf\ncreate_certs_tool_options = %s/localca.options\nactive_pcr_banks = sha256\n", localca, mdir, mdir), 0o644))
	sw := testenv.StartSwtpm(t)
	sw.Stop()
	if out, err := exec.Command("swtpm_setup", "--tpm2", "--create-ek-cert", "--overwrite", "--tpmstate", sw.StateDir(), "--config", filepath.Join(mdir, "setup.conf")).CombinedOutput(); err != nil {
		t.Fatalf("swtpm_setup: %v\n%s", err, out)
	}
	sw.Restart()
	manufacturers, err := fleet.CertPoolFromFiles(filepath.Join(mca, "swtpm-localca-rootca-cert.pem"), filepath.Join(mca, "issuercert.pem"))
	must(t, err)

	// The fleet CA, the broker, the CA service.
	caDir := t.TempDir()
	_, err = fleet.InitCA(caDir, "cert renew test CA", []string{"localhost", "127.0.0.1"})
	must(t, err)
	signer, err := fleet.LoadFileSigner(filepath.Join(caDir, fleet.CACertFile), filepath.Join(caDir, fleet.CAKeyFile))
	must(t, err)
	svc := &fleet.Service{CA: &fleet.CA{Signer: signer, Validity: 90 * time.Second}, Manufacturers: manufacturers}
	broker := testenv.StartMosquitto(t, testenv.MosquittoOptions{PKI: &testenv.PKI{Dir: caDir, CAFile: filepath.Join(caDir, fleet.CACertFile),
		ServerCertFile: filepath.Join(caDir, fleet.BrokerCertFile), ServerKeyFile: filepath.Join(caDir, fleet.BrokerKeyFile)}})
	pair, err := tls.LoadX509KeyPair(filepath.Join(caDir, fleet.ServiceCertFile), filepath.Join(caDir, fleet.ServiceKeyFile))
	must(t, err)
	pool, err := fleet.CertPoolFromFiles(filepath.Join(caDir, fleet.CACertFile))
	must(t, err)
	sctx, stopCA := context.WithCancel(ctx)
	ready, served := make(chan struct{}, 1), make(chan error, 1)
	go func() {
		served <- svc.Serve(sctx, fleet.ServeOptions{BrokerURL: broker.URL(), Ready: ready,
			TLS: &tls.Config{MinVersion: tls.VersionTLS13, RootCAs: pool, Certificates: []tls.Certificate{pair}}})
	}()
	select {
	case <-ready:
	case err := <-served:
		t.Fatal(err)
	}
	defer func() { stopCA(); <-served }()

	// The device, enrolled at tpm.key_handle.
	dir := t.TempDir()
	cfgFile := filepath.Join(dir, "agent.yaml")
	must(t, os.WriteFile(cfgFile, fmt.Appendf(nil, `device_id: dev-cli
state_dir: %[1]s/state
tpm: { device: "%[2]s" }
broker: { urls: [%[3]s], ca_file: %[4]s, cert_file: %[1]s/device.pem, backoff_base: 100ms, backoff_max: 1s }
telemetry: { socket: %[1]s/telemetry.sock }
status: { socket: %[1]s/status.sock }
spool: { dir: %[1]s/spool }
metrics: { listen: "" }
`, dir, sw.URL(), broker.URL(), filepath.Join(caDir, fleet.CACertFile)), 0o600))
	cfg, err := config.Load(cfgFile, true, nil)
	must(t, err)
	tp, err := tpmkeys.Open(ctx, sw.URL())
	must(t, err)
	_, err = tp.CreateKey(ctx, tpmkeys.KeySpec{}, false)
	must(t, err)
	k, err := tp.OpenKey(ctx, tpmkeys.KeySpec{})
	must(t, err)
	certPEM, first, err := fleet.Enrol(ctx, &fleet.KeyAttester{TPM: tp, Key: k, DeviceID: "dev-cli"}, fleet.LocalRequester{Service: svc})
	must(t, err)
	must(t, os.WriteFile(cfg.Broker.CertFile, certPEM, 0o644))
	tp.Close()

	// 1. No agent: the command renews itself.
	out, err := runCLI(ctx, "cert", "renew", "--config", cfgFile)
	if err != nil || !strings.Contains(out, "certificate renewed by this command") || !strings.Contains(out, "key at 0x81000101 (the key at 0x81000100 was removed)") {
		t.Fatalf("cert renew without an agent: %v\n%s", err, out)
	}
	t.Logf("cert renew (no agent): %s", out)
	st, err := identity.ReadState(cfg)
	if err != nil || st == nil || st.KeyHandle != "0x81000101" || st.CertSerial == first.SerialNumber.Text(16) {
		t.Fatalf("identity.json after cert renew: %+v %v", st, err)
	}
	prev, err := os.ReadFile(cfg.Broker.CertFile + ".prev")
	if err != nil || !bytes.Equal(prev, certPEM) {
		t.Fatalf("%s.prev does not hold the enrolment certificate: %v", cfg.Broker.CertFile, err)
	}
	out, err = runCLI(ctx, "cert", "status", "--json", "--config", cfgFile)
	var cs map[string]any
	if err != nil || json.Unmarshal([]byte(out), &cs) != nil || cs["key_handle"] != "0x81000101" || cs["serial"] != st.CertSerial {
		t.Fatalf("cert status after renew: %v\n%s", err, out)
	}

	// 2. The agent runs: the command has it renew, back at tpm.key_handle.
	actx, stopAgent := context.WithCancel(ctx)
	done := make(chan error, 1)
	var agentLog bytes.Buffer
	logW := &lockedWriter{w: &agentLog}
	defer func() {
		if t.Failed() {
			logW.mu.Lock()
			t.Logf("agent log:\n%s", agentLog.String())
			logW.mu.Unlock()
		}
	}()
	go func() {
		done <- daemon.Run(actx, daemon.Options{Config: cfg, Logger: slog.New(slog.NewTextHandler(logW, nil))})
	}()
	for i := 0; !agentRunning(ctx, cfg); i++ {
		if i > 200 {
			t.Fatal("agent status socket never answered")
		}
		time.Sleep(50 * time.Millisecond)
	}
	out, err = runCLI(ctx, "cert", "renew", "--json", "--config", cfgFile)
	var res certRenewResult
	if err != nil || json.Unmarshal([]byte(out), &res) != nil || res.By != "the running agent" || res.KeyHandle != "0x81000100" || res.PreviousSerial != st.CertSerial {
		t.Fatalf("cert renew with the agent running: %v\n%s", err, out)
	}
	out, err = runCLI(ctx, "cert", "status", "--config", cfgFile)
	if err != nil || !strings.Contains(out, "key_handle:  0x81000100") || !strings.Contains(out, "renewal:     scheduled (agent: 1 attempts, 0 failures, 1 renewals") {
		t.Fatalf("cert status with the agent: %v\n%s", err, out)
	}
	t.Logf("cert status (agent running):\n%s", out)
	stopAgent()
	if err := <-done; err != nil {
		t.Fatalf("agent: %v", err)
	}
	for i := 0; ; i++ {
		rs, _ := daemon.ReadRenewalStatus(cfg)
		if rs != nil && rs.State == daemon.RenewalStopped {
			break
		}
		if i > 100 {
			t.Fatalf("the stopped agent's renewal state: %+v", rs)
		}
		time.Sleep(50 * time.Millisecond)
	}

	// An agent that is alive but has no status socket: refused, not renewed
	// behind its back (it would lose its key).
	stopped, err := os.ReadFile(daemon.RenewalStatusPath(cfg))
	must(t, err)
	alive := strings.Replace(string(stopped), `"state": "stopped"`, `"state": "scheduled"`, 1)
	must(t, os.WriteFile(daemon.RenewalStatusPath(cfg), []byte(alive), 0o600))
	if out, err := runCLI(ctx, "cert", "renew", "--config", cfgFile); err == nil || !strings.Contains(err.Error(), "seems to be running") {
		t.Fatalf("cert renew next to a live agent without status socket: %v\n%s", err, out)
	}
	must(t, os.WriteFile(daemon.RenewalStatusPath(cfg), stopped, 0o600))

	// 3. The CA service is down: the command fails, nothing changes.
	stopCA()
	<-served
	served <- nil
	before, _ := os.ReadFile(cfg.Broker.CertFile)
	out, err = runCLI(ctx, "cert", "renew", "--config", cfgFile)
	if err == nil || !strings.Contains(err.Error(), "fleet ca serve") {
		t.Fatalf("cert renew with the CA down: %v\n%s", err, out)
	}
	t.Logf("CA down: %v", err)
	after, _ := os.ReadFile(cfg.Broker.CertFile)
	if !bytes.Equal(before, after) {
		t.Fatal("a failed cert renew changed broker.cert_file")
	}
	id, err := identity.Open(ctx, cfg, false, nil)
	must(t, err)
	defer id.Close()
	if id.Key.Handle() != 0x81000100 {
		t.Fatalf("identity after the failed renewal: 0x%x", id.Key.Handle())
	}
	// The agent's renewal evicted the key at 0x81000101; the failed attempt
	// evicted the key it had made there.
	if ok, err := id.TPM.KeyPresent(ctx, 0x81000101); ok || err != nil {
		t.Fatalf("a key is left at 0x81000101 (%v)", err)
	}
}

// lockedWriter serializes writes to w.
type lockedWriter struct {
	mu sync.Mutex
	w  io.Writer
}

func (l *lockedWriter) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.w.Write(p)
}

func must(t *testing.T, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}
