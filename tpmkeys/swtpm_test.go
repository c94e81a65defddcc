package tpmkeys_test

import (
	"bytes"
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/sha256"
	"encoding/pem"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/tpmagent/tpmagent/internal/testenv"
	"github.com/tpmagent/tpmagent/tpmkeys"
)

// These tests run against a real swtpm over TCP and check interoperability with tpm2-tools and
// openssl. swtpm serves one connection at a time, so the Go side closes its TPM before a tool runs.

func openSwtpm(t testing.TB, s *testenv.Swtpm) *tpmkeys.TPM {
	t.Helper()
	tpm, err := tpmkeys.Open(tpmkeys.TestCtxForTest(t), s.URL())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { tpm.Close() })
	return tpm
}

func run(t testing.TB, s *testenv.Swtpm, args ...string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	var out, stderr bytes.Buffer
	cmd := s.Command(ctx, args[0], args[1:]...)
	cmd.Stdout, cmd.Stderr = &out, &stderr
	if err := cmd.Run(); err != nil {
		t.Fatalf("%s: %v\n%s%s", strings.Join(args, " "), err, out.String(), stderr.String())
	}
	return out.String() + stderr.String()
}

func readPEMDER(t testing.TB, path, typ string) []byte {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	blk, _ := pem.Decode(b)
	if blk == nil || blk.Type != typ {
		t.Fatalf("%s: no %s PEM block in %q", path, typ, b)
	}
	return blk.Bytes
}

func TestSwtpmInteropTPM2Tools(t *testing.T) {
	s := testenv.StartSwtpm(t)
	dir := t.TempDir()
	ctx := tpmkeys.TestCtxForTest(t)

	// 1. Our key, as tpm2-tools sees it.
	tpm := openSwtpm(t, s)
	res, err := tpm.CreateKey(ctx, tpmkeys.KeySpec{}, false)
	if err != nil || !res.Created {
		t.Fatalf("CreateKey = %+v, %v", res, err)
	}
	k, err := tpm.LoadKey(ctx, tpmkeys.DefaultKeyHandle, tpmkeys.DefaultSRKHandle)
	if err != nil {
		t.Fatal(err)
	}
	der, err := tpmkeys.CreateCSR(k, "dev-0001", []string{"dev-0001.example"})
	if err != nil {
		t.Fatal(err)
	}
	ourCSR := filepath.Join(dir, "dev.csr")
	os.WriteFile(ourCSR, tpmkeys.EncodeCSRPEM(der), 0o600)
	ourSPKI := k.PublicKeyDER()
	tpm.Close()

	ourPEM := filepath.Join(dir, "ours.pem")
	out := run(t, s, "tpm2_readpublic", "-c", "0x81000100", "-f", "pem", "-o", ourPEM)
	attrLine := ""
	for _, l := range strings.Split(out, "\n") {
		if strings.Contains(l, "value: fixedtpm") {
			attrLine = strings.TrimSpace(l)
		}
	}
	for _, a := range []string{"fixedtpm", "fixedparent", "sensitivedataorigin", "userwithauth", "sign"} {
		if !strings.Contains(attrLine, a) {
			t.Errorf("tpm2_readpublic attributes %q lack %s\n%s", attrLine, a, out)
		}
	}
	if !strings.Contains(out, "ecc") || !strings.Contains(out, "NIST p256") && !strings.Contains(out, "nist_p256") {
		t.Errorf("tpm2_readpublic does not show an ECC P-256 key:\n%s", out)
	}
	if !bytes.Equal(readPEMDER(t, ourPEM, "PUBLIC KEY"), ourSPKI) {
		t.Fatal("tpm2_readpublic -f pem differs from Key.PublicKeyDER")
	}
	checkOpenSSLCSR(t, ourCSR, ourSPKI)

	// 2. A P-256 signing key made by tpm2-tools at another handle.
	// swtpm has no resource manager and three object slots: flush after every tool.
	run(t, s, "tpm2_createprimary", "-C", "o", "-g", "sha256", "-G", "ecc256", "-c", filepath.Join(dir, "primary.ctx"))
	run(t, s, "tpm2_flushcontext", "-t")
	run(t, s, "tpm2_create", "-C", filepath.Join(dir, "primary.ctx"), "-G", "ecc256",
		"-a", "fixedtpm|fixedparent|sensitivedataorigin|userwithauth|sign",
		"-u", filepath.Join(dir, "key.pub"), "-r", filepath.Join(dir, "key.priv"))
	run(t, s, "tpm2_flushcontext", "-t")
	run(t, s, "tpm2_load", "-C", filepath.Join(dir, "primary.ctx"), "-u", filepath.Join(dir, "key.pub"),
		"-r", filepath.Join(dir, "key.priv"), "-c", filepath.Join(dir, "key.ctx"))
	run(t, s, "tpm2_evictcontrol", "-C", "o", "-c", filepath.Join(dir, "key.ctx"), "0x81000101")
	run(t, s, "tpm2_flushcontext", "-t")
	foreignPEM := filepath.Join(dir, "foreign.pem")
	run(t, s, "tpm2_readpublic", "-c", "0x81000101", "-f", "pem", "-o", foreignPEM)

	tpm = openSwtpm(t, s)
	fk, err := tpm.LoadKey(ctx, 0x81000101, tpmkeys.DefaultSRKHandle)
	if err != nil {
		t.Fatal(err)
	}
	if fk.Type() != tpmkeys.KeyTypeECCP256 {
		t.Fatalf("foreign key type %s", fk.Type())
	}
	der, err = tpmkeys.CreateCSR(fk, "dev-0002", nil)
	if err != nil {
		t.Fatal(err)
	}
	foreignCSR := filepath.Join(dir, "foreign.csr")
	os.WriteFile(foreignCSR, tpmkeys.EncodeCSRPEM(der), 0o600)
	if !bytes.Equal(readPEMDER(t, foreignPEM, "PUBLIC KEY"), fk.PublicKeyDER()) {
		t.Fatal("tpm2_readpublic -f pem of the foreign key differs from LoadKey's public key")
	}
	tpm.Close()
	checkOpenSSLCSR(t, foreignCSR, fk.PublicKeyDER())

	// 3. A tpm2-tools decrypt-only key is refused with a clear error.
	run(t, s, "tpm2_create", "-C", filepath.Join(dir, "primary.ctx"), "-G", "ecc256",
		"-a", "fixedtpm|fixedparent|sensitivedataorigin|userwithauth|decrypt",
		"-u", filepath.Join(dir, "dec.pub"), "-r", filepath.Join(dir, "dec.priv"))
	run(t, s, "tpm2_flushcontext", "-t")
	run(t, s, "tpm2_load", "-C", filepath.Join(dir, "primary.ctx"), "-u", filepath.Join(dir, "dec.pub"),
		"-r", filepath.Join(dir, "dec.priv"), "-c", filepath.Join(dir, "dec.ctx"))
	run(t, s, "tpm2_evictcontrol", "-C", "o", "-c", filepath.Join(dir, "dec.ctx"), "0x81000102")
	run(t, s, "tpm2_flushcontext", "-t")
	tpm = openSwtpm(t, s)
	_, err = tpm.LoadKey(ctx, 0x81000102, tpmkeys.DefaultSRKHandle)
	if !errors.Is(err, tpmkeys.ErrNotSigningKey) || !strings.Contains(err.Error(), "0x81000102") ||
		!strings.Contains(err.Error(), "fixedtpm|fixedparent|sensitivedataorigin|userwithauth|decrypt") {
		t.Fatalf("decrypt-only tpm2-tools key: %v", err)
	}
	tpm.Close()
}

// checkOpenSSLCSR runs `openssl req -verify` on the CSR and compares its public key.
func checkOpenSSLCSR(t *testing.T, csrPath string, spki []byte) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	out, err := execCommand(ctx, "openssl", "req", "-in", csrPath, "-verify", "-noout")
	if err != nil || !strings.Contains(out, "verify OK") {
		t.Fatalf("openssl req -verify %s: %v\n%s", csrPath, err, out)
	}
	pubPath := csrPath + ".pub.pem"
	if out, err := execCommand(ctx, "openssl", "req", "-in", csrPath, "-pubkey", "-noout", "-out", pubPath); err != nil {
		t.Fatalf("openssl req -pubkey: %v\n%s", err, out)
	}
	if !bytes.Equal(readPEMDER(t, pubPath, "PUBLIC KEY"), spki) {
		t.Fatalf("public key in %s (openssl) differs from the TPM key", csrPath)
	}
}

// TestSwtpmManySignatures signs 10,000 times in one process (≈10 s) and checks that nothing is left behind: no TPM_RC_OBJECT_MEMORY, and
// `tpm2_getcap handles-transient` / `handles-loaded-session` are empty afterwards.
func TestSwtpmManySignatures(t *testing.T) {
	const n = 10000
	s := testenv.StartSwtpm(t)
	ctx := tpmkeys.TestCtxForTest(t)
	tpm := openSwtpm(t, s)
	if _, err := tpm.CreateKey(ctx, tpmkeys.KeySpec{}, false); err != nil {
		t.Fatal(err)
	}
	k, err := tpm.LoadKey(ctx, tpmkeys.DefaultKeyHandle, tpmkeys.DefaultSRKHandle)
	if err != nil {
		t.Fatal(err)
	}
	pub := k.Public().(*ecdsa.PublicKey)
	start := time.Now()
	for i := 0; i < n; i++ {
		d := sha256.Sum256([]byte{byte(i), byte(i >> 8)})
		sig, err := k.SignContext(ctx, d[:], crypto.SHA256)
		if err != nil {
			t.Fatalf("signature %d: %v", i, err)
		}
		if i%97 == 0 && !ecdsa.VerifyASN1(pub, d[:], sig) {
			t.Fatalf("signature %d does not verify", i)
		}
	}
	el := time.Since(start)
	t.Logf("%d ECDSA P-256 signatures against swtpm in %v (%.0f/s, %v each)", n, el, float64(n)/el.Seconds(), el/time.Duration(n))
	if k.Signatures() != uint64(n) || k.SessionStarts() != 1 {
		t.Fatalf("Signatures() = %d, SessionStarts() = %d", k.Signatures(), k.SessionStarts())
	}
	if tr, se := tpmkeys.LoadedHandlesForTest(t, tpm); len(tr) != 0 || len(se) != 1 {
		t.Fatalf("while signing: transient %x, sessions %x; want none and one", tr, se)
	}
	if err := tpm.Close(); err != nil {
		t.Fatal(err)
	}
	for _, what := range []string{"handles-transient", "handles-loaded-session"} {
		if out := strings.TrimSpace(run(t, s, "tpm2_getcap", what)); out != "" {
			t.Errorf("tpm2_getcap %s after %d signatures: %q, want empty", what, n, out)
		}
	}
}

// TestSwtpmRestart restarts swtpm (a reboot: sessions gone, connection dropped) under an open
// key: the next signature reconnects and starts a new session. While swtpm is down, the error
// names the address and says to start swtpm.
func TestSwtpmRestart(t *testing.T) {
	s := testenv.StartSwtpm(t)
	ctx := tpmkeys.TestCtxForTest(t)
	tpm := openSwtpm(t, s)
	if _, err := tpm.CreateKey(ctx, tpmkeys.KeySpec{}, false); err != nil {
		t.Fatal(err)
	}
	k, err := tpm.LoadKey(ctx, tpmkeys.DefaultKeyHandle, tpmkeys.DefaultSRKHandle)
	if err != nil {
		t.Fatal(err)
	}
	d := sha256.Sum256([]byte("x"))
	if _, err := k.Sign(nil, d[:], crypto.SHA256); err != nil {
		t.Fatal(err)
	}
	s.Stop()
	_, err = k.Sign(nil, d[:], crypto.SHA256)
	if err == nil || !strings.Contains(err.Error(), s.Addr()) || !strings.Contains(err.Error(), "start swtpm") {
		t.Fatalf("sign with swtpm stopped: %v", err)
	}
	s.Restart()
	sig, err := k.Sign(nil, d[:], crypto.SHA256)
	if err != nil {
		t.Fatalf("sign after swtpm restart: %v", err)
	}
	if !ecdsa.VerifyASN1(k.Public().(*ecdsa.PublicKey), d[:], sig) {
		t.Fatal("signature after restart does not verify")
	}
	if k.Signatures() != 2 || k.SessionStarts() != 2 {
		t.Fatalf("Signatures() = %d, SessionStarts() = %d; want 2, 2", k.Signatures(), k.SessionStarts())
	}
}

// TestSwtpmBusy opens a second connection while the first holds swtpm (it serves one client
// at a time): Open gives up when ctx ends, with an error that says why.
func TestSwtpmBusy(t *testing.T) {
	s := testenv.StartSwtpm(t)
	first := openSwtpm(t, s)
	ctx, cancel := context.WithTimeout(context.Background(), 500*time.Millisecond)
	defer cancel()
	start := time.Now()
	second, err := tpmkeys.Open(ctx, s.URL())
	if err == nil {
		second.Close()
		t.Fatal("second Open succeeded while the first connection holds swtpm")
	}
	if !strings.Contains(err.Error(), s.Addr()) || !strings.Contains(err.Error(), "one client at a time") {
		t.Fatalf("error = %v", err)
	}
	if el := time.Since(start); el > 5*time.Second {
		t.Fatalf("Open took %v", el)
	}
	// The first connection still works; once it is closed the next Open succeeds.
	if _, err := first.EnsureSRK(context.Background(), tpmkeys.DefaultSRKHandle); err != nil {
		t.Fatal(err)
	}
	first.Close()
	third := openSwtpm(t, s)
	if _, err := third.EnsureSRK(context.Background(), tpmkeys.DefaultSRKHandle); err != nil {
		t.Fatal(err)
	}
}
