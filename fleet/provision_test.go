package fleet

import (
	"bytes"
	"context"
	"encoding/csv"
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

	mqtt "github.com/eclipse/paho.mqtt.golang"

	"github.com/tpmagent/tpmagent/internal/testenv"
	"github.com/tpmagent/tpmagent/tpmkeys"
)

// fleetCount is the number of devices TestProvisionFleet enrols: 3 in normal runs,
// FLEET_COUNT (e.g. 20 in `make fleet-test` and CI) when set.
func fleetCount(t *testing.T) int {
	s := os.Getenv("FLEET_COUNT")
	if s == "" {
		return 3
	}
	n, err := strconv.Atoi(s)
	if err != nil || n < 2 {
		t.Fatalf("FLEET_COUNT=%q: want a number >= 2", s)
	}
	return n
}

// buildTpmagent builds the CLI once per test binary run.
var buildOnce struct {
	sync.Once
	path string
	err  error
}

func tpmagentBinary(t *testing.T) string {
	t.Helper()
	buildOnce.Do(func() {
		dir, err := os.MkdirTemp("", "tpmagent-fleet-bin")
		if err != nil {
			buildOnce.err = err
			return
		}
		buildOnce.path = filepath.Join(dir, "tpmagent")
		cmd := exec.Command("go", "build", "-o", buildOnce.path, "./cmd/tpmagent")
		cmd.Dir = ".."
		cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
		if out, err := cmd.CombinedOutput(); err != nil {
			buildOnce.err = fmt.Errorf("go build ./cmd/tpmagent: %v\n%s", err, out)
		}
	})
	if buildOnce.err != nil {
		t.Fatal(buildOnce.err)
	}
	return buildOnce.path
}

// startStateSwtpm starts swtpm from an existing state directory on free loopback ports (as
// a device of the provisioned fleet boots) and returns its tpmkeys device URL.
func startStateSwtpm(t *testing.T, stateDir string) string {
	t.Helper()
	for attempt := 0; attempt < 10; attempt++ {
		port := testenv.FreePortPair(t)
		cmd := exec.Command("swtpm", "socket", "--tpm2",
			"--server", fmt.Sprintf("type=tcp,port=%d,bindaddr=127.0.0.1", port),
			"--ctrl", fmt.Sprintf("type=tcp,port=%d,bindaddr=127.0.0.1", port+1),
			"--tpmstate", "dir="+stateDir, "--flags", "not-need-init,startup-clear")
		cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		done := make(chan struct{})
		go func() { _ = cmd.Wait(); close(done) }()
		if err := testenv.WaitPort(fmt.Sprintf("127.0.0.1:%d", port), 5*time.Second); err == nil {
			t.Cleanup(func() {
				_ = cmd.Process.Signal(syscall.SIGTERM)
				select {
				case <-done:
				case <-time.After(5 * time.Second):
					_ = cmd.Process.Kill()
					<-done
				}
			})
			return fmt.Sprintf("swtpm://127.0.0.1:%d", port)
		}
		_ = cmd.Process.Kill()
		<-done
	}
	t.Fatalf("swtpm on %s did not start", stateDir)
	return ""
}

// TestProvisionFleet runs scripts/provision-fleet.sh, then boots every device from its swtpm
// state, connects each with its own TPM identity to a mosquitto using the generated ACL,
// and checks that device A cannot publish into device B's topic while its own works.
func TestProvisionFleet(t *testing.T) {
	n := fleetCount(t)
	bin := tpmagentBinary(t)
	out := t.TempDir()
	run := func() (string, time.Duration) {
		t.Helper()
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
		defer cancel()
		cmd := exec.CommandContext(ctx, "bash", "../scripts/provision-fleet.sh", "--count", strconv.Itoa(n), "--out", out,
			"--broker", "mqtts://127.0.0.1:8883")
		cmd.Env = append(os.Environ(), "TPMAGENT="+bin)
		var buf bytes.Buffer
		cmd.Stdout, cmd.Stderr = &buf, &buf
		start := time.Now()
		if err := cmd.Run(); err != nil {
			t.Fatalf("provision-fleet.sh: %v\n%s", err, buf.String())
		}
		return buf.String(), time.Since(start)
	}
	log1, took := run()
	t.Logf("provision-fleet.sh --count %d: %v\n%s", n, took.Round(time.Millisecond), log1)
	log2, took2 := run()
	if !strings.Contains(log2, fmt.Sprintf("%d of %d devices already enrolled, enrolling 0", n, n)) {
		t.Fatalf("re-run did not skip the enrolled devices:\n%s", log2)
	}
	t.Logf("re-run: %v", took2.Round(time.Millisecond))

	// Layout and inventory.
	if fi, err := os.Stat(filepath.Join(out, "ca", "ca.key")); err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("ca/ca.key: %v %v", fi, err)
	}
	f, err := os.Open(filepath.Join(out, "inventory.csv"))
	if err != nil {
		t.Fatal(err)
	}
	rows, err := csv.NewReader(f).ReadAll()
	f.Close()
	if err != nil {
		t.Fatal(err)
	}
	if len(rows) != n+1 || strings.Join(rows[0], ",") != "id,serial,fingerprint,not_after,state_dir" {
		t.Fatalf("inventory: %d rows, header %v", len(rows), rows[0])
	}
	// No swtpm left running by the script.
	if out, _ := exec.Command("pgrep", "-f", "tpmstate dir="+out).Output(); len(bytes.TrimSpace(out)) > 0 {
		t.Fatalf("swtpm processes left running: %s", out)
	}

	caDir := filepath.Join(out, "ca")
	broker := fleetBroker(t, caDir, filepath.Join(out, "mosquitto.acl"))
	ctx := ctxT(t)

	type dev struct {
		id     string
		client mqtt.Client
		got    chan string
	}
	devs := make([]*dev, 0, n)
	for _, row := range rows[1:] {
		id, fp, stateDir := row[0], row[2], row[4]
		url := startStateSwtpm(t, stateDir)
		tp, err := tpmkeys.Open(ctx, url)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { tp.Close() })
		key, err := tp.OpenKey(ctx, tpmkeys.KeySpec{})
		if err != nil {
			t.Fatalf("%s: %v", id, err)
		}
		if key.FingerprintSHA256() != fp {
			t.Fatalf("%s: TPM key fingerprint %s, inventory says %s", id, key.FingerprintSHA256(), fp)
		}
		certs, err := ReadCertificates(filepath.Join(out, "devices", id, "device.pem"))
		if err != nil {
			t.Fatal(err)
		}
		if certs[0].Subject.CommonName != id || !samePublic(certs[0].PublicKey, key.Public()) {
			t.Fatalf("%s: device.pem is CN=%s for another key", id, certs[0].Subject.CommonName)
		}
		d := &dev{id: id, got: make(chan string, 16)}
		opts := mqtt.NewClientOptions().AddBroker(brokerURL(broker.URL())).SetClientID(id).
			SetTLSConfig(deviceTLS(filepath.Join(caDir, CACertFile), key, certs[0])).SetAutoReconnect(false)
		d.client = mqtt.NewClient(opts)
		if tok := d.client.Connect(); !tok.WaitTimeout(15*time.Second) || tok.Error() != nil {
			t.Fatalf("%s: connect with its TPM identity: %v\n%s", id, tok.Error(), broker.LogText())
		}
		t.Cleanup(func() { d.client.Disconnect(0) })
		if tok := d.client.Subscribe("devices/"+id+"/#", 1, func(_ mqtt.Client, m mqtt.Message) {
			d.got <- string(m.Payload())
		}); !tok.WaitTimeout(10*time.Second) || tok.Error() != nil {
			t.Fatalf("%s: subscribe: %v", id, tok.Error())
		}
		devs = append(devs, d)
	}
	t.Logf("%d devices connected, each with its own TPM key and certificate", len(devs))

	a, b := devs[0], devs[1]
	pub := func(d *dev, topic, payload string) {
		t.Helper()
		if tok := d.client.Publish(topic, 1, false, payload); !tok.WaitTimeout(10*time.Second) || tok.Error() != nil {
			t.Fatalf("%s: publish %s: %v\n%s", d.id, topic, tok.Error(), broker.LogText())
		}
	}
	expect := func(d *dev, want string) {
		t.Helper()
		select {
		case got := <-d.got:
			if got != want {
				t.Fatalf("%s received %q, want %q (the ACL let another device publish into its topic)", d.id, got, want)
			}
		case <-time.After(10 * time.Second):
			t.Fatalf("%s: own message %q not delivered", d.id, want)
		}
	}
	// Every device's own topic works.
	for _, d := range devs {
		pub(d, "devices/"+d.id+"/telemetry", "own "+d.id)
		expect(d, "own "+d.id)
	}
	// A publishes into B's topic: mosquitto denies it (and, 2.0.11 with MQTT 3.1.1, drops
	// A's connection, so the publish may or may not be acknowledged).
	tok := a.client.Publish("devices/"+b.id+"/telemetry", 1, false, "forged by "+a.id)
	tok.WaitTimeout(5 * time.Second)
	deadline := time.Now().Add(10 * time.Second)
	for !strings.Contains(broker.LogText(), "Denied PUBLISH from "+a.id) {
		if time.Now().After(deadline) {
			t.Fatalf("the broker log does not show the ACL denial of %s's publish into %s's topic:\n%s", a.id, b.id, broker.LogText())
		}
		time.Sleep(20 * time.Millisecond)
	}
	// B's next own message is the next thing B sees: the forged one never arrived.
	pub(b, "devices/"+b.id+"/telemetry", "own again "+b.id)
	expect(b, "own again "+b.id)
	select {
	case got := <-b.got:
		t.Fatalf("%s received %q", b.id, got)
	case <-time.After(200 * time.Millisecond):
	}
	t.Logf("%s's publish into devices/%s/# was denied by the broker's ACL; %s saw only its own messages", a.id, b.id, b.id)
}

// TestMain removes the tpmagent binary built for the CLI tests.
func TestMain(m *testing.M) {
	code := m.Run()
	if buildOnce.path != "" {
		os.RemoveAll(filepath.Dir(buildOnce.path))
	}
	os.Exit(code)
}
