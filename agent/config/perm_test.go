package config

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestCheckPermissions(t *testing.T) {
	tests := []struct {
		name    string
		fileMod os.FileMode
		dirMod  os.FileMode
		want    []string // substrings, one per expected warning
	}{
		{"owner only", 0o600, 0o700, nil},
		{"group readable", 0o640, 0o750, nil},
		{"world readable", 0o644, 0o755, []string{"readable by every user"}},
		{"world writable", 0o666, 0o755, []string{"readable by every user", "writable by group or others"}},
		{"group writable", 0o660, 0o750, []string{"writable by group or others"}},
		{"directory writable by all", 0o600, 0o777, []string{"directory"}},
		{"sticky directory", 0o600, 0o1777, nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := filepath.Join(t.TempDir(), "etc")
			if err := os.Mkdir(dir, 0o700); err != nil {
				t.Fatal(err)
			}
			p := filepath.Join(dir, "agent.yaml")
			if err := os.WriteFile(p, []byte("device_id: x\n"), 0o600); err != nil {
				t.Fatal(err)
			}
			if err := os.Chmod(p, tt.fileMod); err != nil {
				t.Fatal(err)
			}
			if err := os.Chmod(dir, tt.dirMod.Perm()); err != nil {
				t.Fatal(err)
			}
			if tt.dirMod&0o1000 != 0 {
				if err := os.Chmod(dir, os.ModeSticky|tt.dirMod.Perm()); err != nil {
					t.Fatal(err)
				}
			}
			got := CheckPermissions(p)
			if len(got) != len(tt.want) {
				t.Fatalf("CheckPermissions = %q, want %d warnings like %q", got, len(tt.want), tt.want)
			}
			for i, w := range tt.want {
				if !strings.Contains(got[i], w) || !strings.Contains(got[i], p) {
					t.Errorf("warning %d = %q, want it to contain %q and name %s", i, got[i], w, p)
				}
			}
		})
	}
	if w := CheckPermissions(filepath.Join(t.TempDir(), "missing.yaml")); len(w) != 1 {
		t.Errorf("missing file: %q, want one warning", w)
	}
	if w := CheckPermissions(""); w != nil {
		t.Errorf("empty path: %q", w)
	}
}
