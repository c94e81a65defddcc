package firmware

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func TestFileSlotsInstallCommitRollback(t *testing.T) {
	rel := newRelease(t, AlgEd25519, 5000)
	m := rel.manifest(t, "2.0.0")
	d := newDevice(t, NewMemoryCounter(0), nil)
	ctx := context.Background()
	s := d.slots

	if p, _ := s.ActivePath(); p != s.A {
		t.Fatalf("fresh device runs %s, want slot a", p)
	}
	if err := s.Install(ctx, rel.imagePath, m); err != nil {
		t.Fatal(err)
	}
	st := d.slotState(t)
	mustEqual(t, "active", st.Active, SlotB)
	mustEqual(t, "previous", st.Previous, SlotA)
	mustEqual(t, "pending", st.Pending, SlotB)
	mustEqual(t, "slot b content", readFile(t, s.B), string(rel.image))
	mustEqual(t, "slot a kept", readFile(t, s.A), oldFirmware)
	if fi, _ := os.Stat(s.B); fi.Mode().Perm() != 0o755 {
		t.Fatalf("slot b mode %v", fi.Mode())
	}
	// Re-running the same install (resumed job) is a no-op; another image is refused during the trial.
	if err := s.Install(ctx, rel.imagePath, m); err != nil {
		t.Fatalf("idempotent install: %v", err)
	}
	other := newRelease(t, AlgEd25519, 10)
	if err := s.Install(ctx, other.imagePath, other.manifest(t, "3.0.0")); !errors.Is(err, ErrBusy) {
		t.Fatalf("install during trial: %v, want ErrBusy", err)
	}
	for i := 1; i <= 2; i++ {
		n, err := s.RecordBoot(ctx)
		if err != nil || n != i {
			t.Fatalf("RecordBoot = %d, %v; want %d", n, err, i)
		}
	}
	if err := s.Rollback(ctx); err != nil {
		t.Fatal(err)
	}
	st = d.slotState(t)
	mustEqual(t, "active after rollback", st.Active, SlotA)
	mustEqual(t, "pending after rollback", st.Pending, "")
	if p, _ := s.ActivePath(); p != s.A {
		t.Fatalf("after rollback runs %s", p)
	}

	// Install again, commit: previous kept, pending cleared; commit/rollback without trial are no-ops.
	if err := s.Install(ctx, rel.imagePath, m); err != nil {
		t.Fatal(err)
	}
	if err := s.Commit(ctx); err != nil {
		t.Fatal(err)
	}
	st = d.slotState(t)
	if st.Active != SlotB || st.Pending != "" || st.Previous != SlotA || st.BootAttempts != 0 {
		t.Fatalf("after commit: %+v", st)
	}
	if err := s.Rollback(ctx); err != nil || d.slotState(t).Active != SlotB {
		t.Fatalf("rollback without trial changed state: %v %+v", err, d.slotState(t))
	}
	// No temp files left next to the slots.
	ents, _ := os.ReadDir(d.dir)
	for _, e := range ents {
		if strings.Contains(e.Name(), ".tmp") {
			t.Fatalf("temp file left: %s", e.Name())
		}
	}
}

func TestFileSlotsRefusesChangedImage(t *testing.T) {
	rel := newRelease(t, AlgEd25519, 5000)
	m := rel.manifest(t, "2.0.0")
	d := newDevice(t, NewMemoryCounter(0), nil)
	os.WriteFile(rel.imagePath, []byte("swapped after verification"), 0o644)
	if err := d.slots.Install(context.Background(), rel.imagePath, m); !errors.Is(err, ErrHashMismatch) {
		t.Fatalf("install of changed image: %v", err)
	}
	if fileExists(d.slots.B) || fileExists(d.slots.StatePath) {
		t.Fatal("slot b or state written for a changed image")
	}
}

func TestCommandInstaller(t *testing.T) {
	dir := t.TempDir()
	script := func(name, body string) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte("#!/bin/sh\n"+body), 0o755); err != nil {
			t.Fatal(err)
		}
		return p
	}
	rel := newRelease(t, AlgEd25519, 1000)
	m := rel.manifest(t, "4.1.0")
	ok := script("ok.sh", `cp "$1" "$2" && echo "$3 $4" > "$2.meta"`)
	fail := script("fail.sh", "echo 'rauc: bundle signature invalid' >&2\nexit 3\n")
	hang := script("hang.sh", "echo starting >&2\nsleep 30\necho never >&2\n")
	ctx := context.Background()

	t.Run("success", func(t *testing.T) {
		// Templates split on white space before substitution, so {image} with a space in its
		// path is still one argument.
		ci := &CommandInstaller{InstallCmd: ok + " {image} " + filepath.Join(dir, "dest") + " {name} {version}", Timeout: 10 * time.Second}
		img := filepath.Join(dir, "image with space.bin")
		os.WriteFile(img, rel.image, 0o644)
		if err := ci.Install(ctx, img, m); err != nil {
			t.Fatal(err)
		}
		mustEqual(t, "installed", readFile(t, filepath.Join(dir, "dest")), string(rel.image))
		mustEqual(t, "placeholders", readFile(t, filepath.Join(dir, "dest.meta")), "tpmagent 4.1.0\n")
		if err := ci.Commit(ctx); err != nil {
			t.Fatalf("empty commit command: %v", err)
		}
	})
	t.Run("failure", func(t *testing.T) {
		ci := &CommandInstaller{InstallCmd: fail + " {image}", Timeout: 10 * time.Second}
		err := ci.Install(ctx, rel.imagePath, m)
		var ce *CommandError
		if !errors.As(err, &ce) {
			t.Fatalf("err = %v, want *CommandError", err)
		}
		mustEqual(t, "exit code", ce.ExitCode, 3)
		mustEqual(t, "timed out", ce.TimedOut, false)
		if !strings.Contains(ce.Stderr, "bundle signature invalid") || !strings.Contains(err.Error(), "exited with code 3") {
			t.Fatalf("error lacks exit code or stderr: %v", err)
		}
	})
	t.Run("timeout", func(t *testing.T) {
		ci := &CommandInstaller{InstallCmd: hang + " {image}", Timeout: 300 * time.Millisecond}
		start := time.Now()
		err := ci.Install(ctx, rel.imagePath, m)
		el := time.Since(start)
		var ce *CommandError
		if !errors.As(err, &ce) || !ce.TimedOut {
			t.Fatalf("err = %v, want a timed-out *CommandError", err)
		}
		if el > 5*time.Second {
			t.Fatalf("timeout took %s: the sleeping child kept the command alive", el)
		}
		if !strings.Contains(err.Error(), "timed out") || !strings.Contains(ce.Stderr, "starting") {
			t.Fatalf("error lacks timeout or stderr: %v", err)
		}
	})
	t.Run("missing program", func(t *testing.T) {
		ci := &CommandInstaller{InstallCmd: filepath.Join(dir, "nope") + " {image}"}
		var ce *CommandError
		if err := ci.Install(ctx, rel.imagePath, m); !errors.As(err, &ce) || ce.ExitCode != -1 {
			t.Fatalf("missing program: %v", err)
		}
	})
}
