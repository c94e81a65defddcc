package identity

import (
	"bytes"
	"context"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/tpmagent/tpmagent/agent/config"
	"github.com/tpmagent/tpmagent/internal/testenv"
	"github.com/tpmagent/tpmagent/tpmkeys"
)

const (
	keyHandle   = 0x81000100
	renewHandle = 0x81000101
)

// TestOpenFollowsRenewal: Open takes the handle state_dir/identity.json
// names, falls back to tpm.key_handle without it, and after an interrupted
// renewal (state and certificate disagree) takes the key that
// broker.cert_file certifies.
func TestOpenFollowsRenewal(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	sw := testenv.StartSwtpm(t)
	pki := testenv.NewPKI(t, "", "identity test CA")
	dir := t.TempDir()
	certs := map[uint32]string{}
	tp, err := tpmkeys.Open(ctx, sw.URL())
	if err != nil {
		t.Fatal(err)
	}
	for _, h := range []uint32{keyHandle, renewHandle} {
		spec := tpmkeys.KeySpec{Handle: h}
		if _, err := tp.CreateKey(ctx, spec, false); err != nil {
			t.Fatal(err)
		}
		k, err := tp.OpenKey(ctx, spec)
		if err != nil {
			t.Fatal(err)
		}
		certs[h] = filepath.Join(dir, k.FingerprintSHA256()[:8]+".pem")
		pki.IssueClient(t, "dev-0001", k.Public(), time.Now().Add(-time.Minute), time.Now().Add(time.Hour), certs[h])
	}
	tp.Close()

	tests := []struct {
		name     string
		state    string // key_handle in identity.json, "" = no file
		cert     uint32 // which key broker.cert_file certifies
		want     uint32
		wantWarn bool
	}{
		{"no state: tpm.key_handle", "", keyHandle, keyHandle, false},
		{"state names the renew handle", "0x81000101", renewHandle, renewHandle, false},
		{"state names tpm.key_handle again", "0x81000100", keyHandle, keyHandle, false},
		{"state written, certificate not yet: the old key", "0x81000101", keyHandle, keyHandle, true},
		{"certificate written, no state yet: the new key", "", renewHandle, renewHandle, true},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			cfg := testConfig(t, sw.URL(), certs[tc.cert])
			if tc.state != "" {
				if err := WriteState(cfg, &State{KeyHandle: tc.state, UpdatedAt: time.Now()}); err != nil {
					t.Fatal(err)
				}
			}
			var logBuf bytes.Buffer
			id, err := Open(ctx, cfg, false, slog.New(slog.NewTextHandler(&logBuf, nil)))
			if err != nil {
				t.Fatal(err)
			}
			defer id.Close()
			if got := id.Key.Handle(); got != tc.want {
				t.Fatalf("opened the key at 0x%x, want 0x%x", got, tc.want)
			}
			if warned := strings.Contains(logBuf.String(), "interrupted"); warned != tc.wantWarn {
				t.Fatalf("warning logged = %v, want %v; log: %s", warned, tc.wantWarn, logBuf.String())
			}
		})
	}

	t.Run("neither key matches the certificate: the state's handle", func(t *testing.T) {
		other, _, _ := pki.SoftClient(t, "other")
		cfg := testConfig(t, sw.URL(), other)
		if err := WriteState(cfg, &State{KeyHandle: "0x81000101"}); err != nil {
			t.Fatal(err)
		}
		id, err := Open(ctx, cfg, false, nil)
		if err != nil {
			t.Fatal(err)
		}
		defer id.Close()
		if id.Key.Handle() != renewHandle {
			t.Fatalf("opened 0x%x, want the state's 0x%x", id.Key.Handle(), renewHandle)
		}
	})

	t.Run("bad state file", func(t *testing.T) {
		cfg := testConfig(t, sw.URL(), certs[keyHandle])
		if err := os.MkdirAll(cfg.StateDir, 0o700); err != nil {
			t.Fatal(err)
		}
		for _, body := range []string{"{not json", `{"key_handle":"0x01000100"}`} {
			if err := os.WriteFile(StatePath(cfg), []byte(body), 0o600); err != nil {
				t.Fatal(err)
			}
			_, err := Open(ctx, cfg, false, nil)
			if err == nil || !strings.Contains(err.Error(), StatePath(cfg)) || !strings.Contains(err.Error(), "delete") {
				t.Fatalf("state %q: %v, want an error naming the file and what to do", body, err)
			}
		}
	})
}

func testConfig(t *testing.T, device, certFile string) *config.Config {
	t.Helper()
	cfg, err := config.Load("", false, nil)
	if err != nil {
		t.Fatal(err)
	}
	cfg.TPM.Device = device
	cfg.StateDir = filepath.Join(t.TempDir(), "state")
	cfg.Broker.CertFile = certFile
	return cfg
}

func TestOtherKeyHandle(t *testing.T) {
	cfg := &config.Config{}
	cfg.TPM.KeyHandle, cfg.Enrol.RenewHandle = keyHandle, renewHandle
	tests := []struct {
		active, want uint32
		renew        config.Handle
	}{
		{keyHandle, renewHandle, renewHandle},
		{renewHandle, keyHandle, renewHandle},
		{0x81000200, renewHandle, renewHandle}, // a handle outside the pair: renew into the pair
		{keyHandle, 0, 0},
		{keyHandle, 0, keyHandle},
	}
	for _, tc := range tests {
		cfg.Enrol.RenewHandle = tc.renew
		if got := OtherKeyHandle(cfg, tc.active); got != tc.want {
			t.Errorf("OtherKeyHandle(active 0x%x, renew %s) = 0x%x, want 0x%x", tc.active, tc.renew, got, tc.want)
		}
	}
}

func TestStateRoundTripAndAtomicWrite(t *testing.T) {
	cfg := &config.Config{StateDir: filepath.Join(t.TempDir(), "state")}
	cfg.TPM.KeyHandle = keyHandle
	if st, err := ReadState(cfg); st != nil || err != nil {
		t.Fatalf("no file: %v %v", st, err)
	}
	if h, err := ActiveKeyHandle(cfg); h != keyHandle || err != nil {
		t.Fatalf("ActiveKeyHandle without state: 0x%x %v", h, err)
	}
	want := State{KeyHandle: "0x81000101", PreviousKeyHandle: "0x81000100", CertSerial: "abc", CertNotAfter: time.Unix(1e9, 0).UTC(), UpdatedAt: time.Unix(2e9, 0).UTC()}
	if err := WriteState(cfg, &want); err != nil {
		t.Fatal(err)
	}
	got, err := ReadState(cfg)
	if err != nil || *got != want {
		t.Fatalf("ReadState = %+v %v, want %+v", got, err, want)
	}
	if h, _ := ActiveKeyHandle(cfg); h != renewHandle {
		t.Fatalf("ActiveKeyHandle = 0x%x", h)
	}
	fi, err := os.Stat(StatePath(cfg))
	if err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("state file mode %v %v", fi.Mode(), err)
	}
	if di, _ := os.Stat(cfg.StateDir); di.Mode().Perm() != 0o700 {
		t.Fatalf("state_dir mode %v", di.Mode())
	}
	ents, _ := os.ReadDir(cfg.StateDir)
	if len(ents) != 1 {
		t.Fatalf("temporary files left behind: %v", ents)
	}
}
