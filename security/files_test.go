package security

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"encoding/pem"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/tpmagent/tpmagent/agent/config"
	"github.com/tpmagent/tpmagent/agent/daemon"
	"github.com/tpmagent/tpmagent/agent/source"
	"github.com/tpmagent/tpmagent/agent/status"
	"github.com/tpmagent/tpmagent/internal/testdevice"
	"github.com/tpmagent/tpmagent/internal/testenv"
)

// derKeyPrefixes start the DER encodings of private keys: PKCS#8 with an
// EC or RSA algorithm identifier, SEC1 ECPrivateKey (version 1, 32- or
// 48-byte scalar) and PKCS#1 RSAPrivateKey (version 0 then a long modulus).
var derKeyPrefixes = [][]byte{
	{0x02, 0x01, 0x00, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01},             // PKCS#8 ecPublicKey
	{0x02, 0x01, 0x00, 0x30, 0x0d, 0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01}, // PKCS#8 rsaEncryption
	{0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70},                                     // PKCS#8 Ed25519
	{0x02, 0x01, 0x01, 0x04, 0x20}, // SEC1 P-256
	{0x02, 0x01, 0x01, 0x04, 0x30}, // SEC1 P-384
	{0x02, 0x01, 0x00, 0x02, 0x82}, // PKCS#1 RSA
}

// findKeyMaterial reports private key material in b: a PEM block whose type
// names a private key, or a DER structure that parses as a private key.
func findKeyMaterial(b []byte) []string {
	var found []string
	if bytes.Contains(b, []byte("PRIVATE KEY-----")) {
		found = append(found, "PEM private key block")
	}
	for _, p := range derKeyPrefixes {
		for off := 0; ; {
			i := bytes.Index(b[off:], p)
			if i < 0 {
				break
			}
			at := off + i
			off = at + 1
			// The SEQUENCE header is 2 to 4 bytes before the version.
			for back := 2; back <= 4 && at-back >= 0; back++ {
				der := b[at-back:]
				if der[0] != 0x30 {
					continue
				}
				if k, err := x509.ParsePKCS8PrivateKey(trimDER(der)); err == nil {
					found = append(found, fmt.Sprintf("DER PKCS#8 %T at offset %d", k, at-back))
				} else if _, err := x509.ParseECPrivateKey(trimDER(der)); err == nil {
					found = append(found, fmt.Sprintf("DER SEC1 EC private key at offset %d", at-back))
				} else if _, err := x509.ParsePKCS1PrivateKey(trimDER(der)); err == nil {
					found = append(found, fmt.Sprintf("DER PKCS#1 RSA private key at offset %d", at-back))
				}
			}
		}
	}
	return found
}

// trimDER cuts b to the length its outer DER header announces.
func trimDER(b []byte) []byte {
	if len(b) < 2 {
		return b
	}
	n, hdr := int(b[1]), 2
	if b[1]&0x80 != 0 {
		k := int(b[1] & 0x7f)
		if k == 0 || k > 3 || len(b) < 2+k {
			return b
		}
		n = 0
		for _, c := range b[2 : 2+k] {
			n = n<<8 | int(c)
		}
		hdr = 2 + k
	}
	if hdr+n > len(b) {
		return b
	}
	return b[:hdr+n]
}

// scanTree returns the key material found in every regular file under dirs.
func scanTree(t *testing.T, dirs ...string) []string {
	t.Helper()
	var found []string
	for _, dir := range dirs {
		err := filepath.WalkDir(dir, func(p string, e fs.DirEntry, err error) error {
			if err != nil {
				if os.IsNotExist(err) && p == dir {
					return nil
				}
				return err
			}
			if !e.Type().IsRegular() {
				return nil
			}
			b, err := os.ReadFile(p)
			if err != nil {
				return err
			}
			for _, f := range findKeyMaterial(b) {
				found = append(found, p+": "+f)
			}
			return nil
		})
		if err != nil {
			t.Fatalf("scan %s: %v", dir, err)
		}
	}
	return found
}

// TestScannerFindsKeys proves the scanner: every private key encoding the
// agent or a library could write is found, inside other bytes too, and a
// certificate or random data is not.
func TestScannerFindsKeys(t *testing.T) {
	ec, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	ec384, _ := ecdsa.GenerateKey(elliptic.P384(), rand.Reader)
	rk, _ := rsa.GenerateKey(rand.Reader, 2048)
	p8, _ := x509.MarshalPKCS8PrivateKey(ec)
	p8rsa, _ := x509.MarshalPKCS8PrivateKey(rk)
	sec1, _ := x509.MarshalECPrivateKey(ec)
	sec1384, _ := x509.MarshalECPrivateKey(ec384)
	pkcs1 := x509.MarshalPKCS1PrivateKey(rk)
	junk := make([]byte, 4096)
	_, _ = rand.Read(junk)
	wrap := func(b []byte) []byte { return append(append(append([]byte{}, junk[:100]...), b...), junk[100:300]...) }
	d := testdevice.New(t, testdevice.Options{})
	cert, _ := os.ReadFile(d.Config.Broker.CertFile)
	tests := []struct {
		name string
		data []byte
		want bool
	}{
		{"PEM PKCS#8", pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: p8}), true},
		{"PEM SEC1", pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: sec1}), true},
		{"DER PKCS#8 EC in a record", wrap(p8), true},
		{"DER PKCS#8 RSA in a record", wrap(p8rsa), true},
		{"DER SEC1 P-256 in a record", wrap(sec1), true},
		{"DER SEC1 P-384 in a record", wrap(sec1384), true},
		{"DER PKCS#1 in a record", wrap(pkcs1), true},
		{"device certificate", cert, false},
		{"random bytes", junk, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := findKeyMaterial(tt.data); (len(got) > 0) != tt.want {
				t.Errorf("findKeyMaterial = %q, want found=%v", got, tt.want)
			}
		})
	}
}

// TestAgentWritesNoKeyMaterial runs the agent offline (the broker stopped)
// so that readings stay in the spool, stops it, and scans everything it
// wrote (state and spool directories, and the device directory around
// them): no private key in PEM or DER form, because the device key never
// leaves the TPM. The state and spool directories it created are 0700.
func TestAgentWritesNoKeyMaterial(t *testing.T) {
	d := testdevice.New(t, testdevice.Options{})
	d.Broker.Stop()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() {
		done <- daemon.Run(ctx, daemon.Options{Config: d.Config, Logger: slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelError}))})
	}()
	if err := testenv.WaitUnix(d.Config.Telemetry.Socket, 20*time.Second); err != nil {
		cancel()
		t.Fatalf("agent socket never accepted a connection: %v", err)
	}
	var lines strings.Builder
	for i := 0; i < 500; i++ {
		fmt.Fprintf(&lines, "{\"name\":\"t\",\"value\":%d}\n", i)
	}
	sctx, scancel := context.WithTimeout(ctx, 10*time.Second)
	ok, _, err := source.Send(sctx, d.Config.Telemetry.Socket, strings.NewReader(lines.String()), nil)
	scancel()
	if err != nil || ok != 500 {
		t.Fatalf("send: %d ok, %v", ok, err)
	}
	snap, err := status.Fetch(ctx, d.Config.Status.Socket)
	if err != nil || snap.Spool.Records == 0 {
		t.Fatalf("nothing spooled (broker down): %v %+v", err, snap.Spool)
	}
	cancel()
	if err := <-done; err != nil {
		t.Fatalf("agent: %v", err)
	}
	if found := scanTree(t, d.Config.StateDir, d.Config.Spool.Dir, d.Dir); len(found) > 0 {
		t.Errorf("private key material in files the agent wrote:\n%s", strings.Join(found, "\n"))
	}
	var files int
	for _, dir := range []string{d.Config.StateDir, d.Config.Spool.Dir} {
		_ = filepath.WalkDir(dir, func(p string, e fs.DirEntry, err error) error {
			if err != nil {
				return nil
			}
			fi, err := e.Info()
			if err != nil {
				return nil
			}
			if e.IsDir() && fi.Mode().Perm() != 0o700 {
				t.Errorf("directory %s has mode %04o, want 0700", p, fi.Mode().Perm())
			}
			if fi.Mode().IsRegular() {
				files++
				if fi.Mode().Perm()&0o077 != 0 {
					t.Errorf("file %s has mode %04o: readable by group or others", p, fi.Mode().Perm())
				}
			}
			return nil
		})
	}
	if files == 0 {
		t.Errorf("no file found in the spool after spooling 500 readings: the scan proved nothing")
	}
	if _, err := os.Stat(d.Config.Spool.Dir); err != nil {
		t.Errorf("spool directory %s: %v", d.Config.Spool.Dir, err)
	}
}

// TestConfigReadableByOthersWarns: a configuration readable by other users
// produces a warning that names the file and the fix; a 0600 one does not.
func TestConfigReadableByOthersWarns(t *testing.T) {
	d := testdevice.New(t, testdevice.Options{})
	if w := config.CheckPermissions(d.ConfigFile); len(w) != 0 {
		t.Fatalf("0600 config: unexpected warnings %q", w)
	}
	if err := os.Chmod(d.ConfigFile, 0o644); err != nil {
		t.Fatal(err)
	}
	w := config.CheckPermissions(d.ConfigFile)
	if len(w) != 1 || !strings.Contains(w[0], d.ConfigFile) || !strings.Contains(w[0], "chmod") {
		t.Fatalf("0644 config: warnings %q, want one naming %s and the chmod to run", w, d.ConfigFile)
	}
}
