package fleet

import (
	"context"
	"errors"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/tpmagent/tpmagent/internal/testenv"
	"github.com/tpmagent/tpmagent/tpmkeys"
)

// TestCLIOfflineFlow drives the offline enrolment with the tpmagent binary, the device and
// the CA apart: key attest → fleet ca challenge → key attest --challenge → fleet ca issue;
// the pending record is good once, and an untrusted manufacturer is refused with its reason.
func TestCLIOfflineFlow(t *testing.T) {
	bin := tpmagentBinary(t)
	m := newManufacturer(t)
	sw := m.startTPM(t)
	dir := t.TempDir()
	cfg := filepath.Join(dir, "agent.yaml")
	write(t, cfg, "device_id: dev-cli\ntpm:\n  device: "+sw.URL()+"\n")
	caDir := filepath.Join(dir, "ca")
	mca := []string{"--manufacturer-ca", filepath.Join(m.dir, "ca", "swtpm-localca-rootca-cert.pem"),
		"--manufacturer-ca", filepath.Join(m.dir, "ca", "issuercert.pem")}
	caArgs := []string{"--ca-cert", filepath.Join(caDir, CACertFile), "--ca-key", filepath.Join(caDir, CAKeyFile)}
	run := func(wantOK bool, args ...string) string {
		t.Helper()
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		out, err := exec.CommandContext(ctx, bin, args...).CombinedOutput()
		if (err == nil) != wantOK {
			t.Fatalf("tpmagent %s: err=%v, want ok=%v\n%s", strings.Join(args, " "), err, wantOK, out)
		}
		return string(out)
	}
	bundle, ch, resp, cert := filepath.Join(dir, "bundle.json"), filepath.Join(dir, "challenge.json"),
		filepath.Join(dir, "response.json"), filepath.Join(dir, "device.pem")

	run(true, "fleet", "ca", "init", "--dir", caDir)
	run(true, "key", "create", "--config", cfg)
	run(true, "key", "attest", "--config", cfg, "-o", bundle)
	run(true, append([]string{"fleet", "ca", "verify", "--bundle", bundle}, mca...)...)
	run(true, append([]string{"fleet", "ca", "challenge", "--bundle", bundle, "-o", ch}, mca...)...)
	run(true, "key", "attest", "--config", cfg, "--challenge", ch, "-o", resp)
	issue := append(append([]string{"fleet", "ca", "issue", "--bundle", bundle, "--pending", ch + ".pending",
		"--response", resp, "-o", cert}, mca...), caArgs...)
	out := run(true, issue...)
	if !strings.Contains(out, "issued CN=dev-cli") {
		t.Fatalf("issue output: %s", out)
	}
	certs, err := ReadCertificates(cert)
	if err != nil || certs[0].Subject.CommonName != "dev-cli" {
		t.Fatalf("device.pem: %v", err)
	}
	// The same answer again: the pending record is gone.
	if out := run(false, issue...); !strings.Contains(out, "was used already") {
		t.Fatalf("second issue: %s", out)
	}
	// A CA that trusts another manufacturer refuses with the reason, exit code 1.
	other := newManufacturer(t)
	other.provision(t, t.TempDir())
	out = run(false, "fleet", "ca", "verify", "--bundle", bundle, "--manufacturer-ca", filepath.Join(other.dir, "ca", "issuercert.pem"))
	if !strings.Contains(out, ReasonEKUntrusted) {
		t.Fatalf("untrusted manufacturer: %s", out)
	}
	// One-process lab flow.
	out = run(true, append(append([]string{"fleet", "ca", "sign", "--config", cfg, "-o", filepath.Join(dir, "device2.pem")}, mca...), caArgs...)...)
	if !strings.Contains(out, "issued CN=dev-cli") {
		t.Fatalf("sign output: %s", out)
	}
}

// TestAttestWithoutEKCertificate: a TPM without an EK certificate (plain swtpm state) gets a
// clear error and keeps no transient objects.
func TestAttestWithoutEKCertificate(t *testing.T) {
	ctx := ctxT(t)
	sw := testenv.StartSwtpm(t)
	tp, err := tpmkeys.Open(ctx, sw.URL())
	if err != nil {
		t.Fatal(err)
	}
	if _, err := tp.CreateKey(ctx, tpmkeys.KeySpec{}, false); err != nil {
		t.Fatal(err)
	}
	k, err := tp.OpenKey(ctx, tpmkeys.KeySpec{})
	if err != nil {
		t.Fatal(err)
	}
	d := &device{id: "dev-noek", sw: sw, tpm: tp, key: k}
	_, err = tp.Attest(ctx, k, "dev-noek", nil)
	if !errors.Is(err, tpmkeys.ErrNoEKCertificate) || !strings.Contains(err.Error(), "swtpm_setup --tpm2 --create-ek-cert") {
		t.Fatalf("Attest without EK certificate: %v", err)
	}
	if _, err := tp.ActivateCredential(ctx, &tpmkeys.Challenge{ID: "x", CredentialBlob: []byte{1}, EncryptedSecret: []byte{1}}); !errors.Is(err, tpmkeys.ErrNoEKCertificate) {
		t.Fatalf("ActivateCredential without EK certificate: %v", err)
	}
	if l := leftovers(t, d.rawTPM(t)); len(l) != 0 {
		t.Fatalf("left in the TPM: %x", l)
	}
}
