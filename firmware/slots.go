package firmware

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sync"
)

// Slot names in the slot state file.
const (
	SlotA = "a"
	SlotB = "b"
)

// SlotState is the content of the FileSlots state file.
type SlotState struct {
	// Active is the slot to run: "a" or "b".
	Active string `json:"active"`
	// Previous is the slot that ran before the last switch ("" if none): the rollback target.
	Previous string `json:"previous"`
	// Pending is the slot on trial ("" when committed).
	Pending string `json:"pending"`
	// BootAttempts counts starts of the pending slot.
	BootAttempts int `json:"boot_attempts"`
	// Version is the firmware version in the active slot, if known.
	Version string `json:"version,omitempty"`
	// PreviousVersion is the firmware version in the previous slot, if known.
	PreviousVersion string `json:"previous_version,omitempty"`
	// SHA256 is the image hash of the active slot, if installed by FileSlots.
	SHA256 string `json:"sha256,omitempty"`
}

// FileSlots is an A/B installer over two files (e.g. two copies of the agent binary that a
// launcher picks from, see ActivePath) and a state file written atomically (temp file, fsync,
// rename, directory fsync). Install writes the inactive slot and switches to it as pending;
// Commit clears pending; Rollback makes the previous slot active again.
type FileSlots struct {
	A, B      string      // slot file paths
	StatePath string      // state file (JSON SlotState)
	Mode      os.FileMode // mode of written slot files; 0 means 0755 (the slots are programs)

	mu sync.Mutex
}

var _ Installer = (*FileSlots)(nil)
var _ BootCounter = (*FileSlots)(nil)

func (s *FileSlots) path(slot string) string {
	if slot == SlotB {
		return s.B
	}
	return s.A
}

func otherSlot(slot string) string {
	if slot == SlotB {
		return SlotA
	}
	return SlotB
}

// State reads the state file. A missing file means slot "a" active, nothing pending.
func (s *FileSlots) State() (SlotState, error) {
	data, err := os.ReadFile(s.StatePath)
	if errors.Is(err, os.ErrNotExist) {
		return SlotState{Active: SlotA}, nil
	}
	if err != nil {
		return SlotState{}, fmt.Errorf("firmware: read slot state: %w", err)
	}
	var st SlotState
	if err := json.Unmarshal(data, &st); err != nil {
		return SlotState{}, fmt.Errorf("firmware: slot state %s: %w: repair or remove it", s.StatePath, err)
	}
	for _, v := range []struct{ name, val string }{{"active", st.Active}, {"previous", st.Previous}, {"pending", st.Pending}} {
		if v.val != "" && v.val != SlotA && v.val != SlotB {
			return SlotState{}, fmt.Errorf("firmware: slot state %s: field %q is %q, want \"a\" or \"b\"", s.StatePath, v.name, v.val)
		}
	}
	if st.Active == "" {
		return SlotState{}, fmt.Errorf("firmware: slot state %s: field \"active\" is empty", s.StatePath)
	}
	return st, nil
}

func (s *FileSlots) writeState(st SlotState) error {
	data, err := json.Marshal(st)
	if err != nil {
		return err
	}
	return writeFileAtomic(s.StatePath, append(data, '\n'), 0o644)
}

// ActivePath returns the file of the active slot: what a launcher should run.
func (s *FileSlots) ActivePath() (string, error) {
	st, err := s.State()
	if err != nil {
		return "", err
	}
	return s.path(st.Active), nil
}

// Install copies the image into the inactive slot (temp file, fsync, rename), checking its
// SHA-256 against m once more while copying, then switches: previous = active, active =
// pending = the new slot, boot_attempts = 0. It refuses while another trial is pending.
func (s *FileSlots) Install(ctx context.Context, image string, m *Manifest) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	st, err := s.State()
	if err != nil {
		return err
	}
	if st.Pending != "" && st.SHA256 == m.SHA256 && st.Version == m.Version {
		return nil // already installed: an interrupted job is being resumed
	}
	if st.Pending != "" {
		return fmt.Errorf("firmware: slot %s is still on trial: commit or roll back first: %w", st.Pending, ErrBusy)
	}
	target := otherSlot(st.Active)
	if err := s.copyInto(ctx, image, s.path(target), m); err != nil {
		return err
	}
	next := SlotState{Active: target, Previous: st.Active, Pending: target, Version: m.Version, PreviousVersion: st.Version, SHA256: m.SHA256}
	if err := s.writeState(next); err != nil {
		return err
	}
	return nil
}

func (s *FileSlots) copyInto(ctx context.Context, image, dst string, m *Manifest) error {
	in, err := os.Open(image)
	if err != nil {
		return fmt.Errorf("firmware: open verified image: %w", err)
	}
	defer in.Close()
	mode := s.Mode
	if mode == 0 {
		mode = 0o755
	}
	out, err := os.CreateTemp(filepath.Dir(dst), "."+filepath.Base(dst)+".tmp*")
	if err != nil {
		return fmt.Errorf("firmware: write slot %s: %w", dst, err)
	}
	tmp := out.Name()
	ok := false
	defer func() {
		if !ok {
			out.Close()
			os.Remove(tmp)
		}
	}()
	h := sha256.New()
	if _, err := io.Copy(io.MultiWriter(out, h), ctxReader{ctx, in}); err != nil {
		return fmt.Errorf("firmware: copy image into slot %s: %w", dst, err)
	}
	want, _ := hex.DecodeString(m.SHA256)
	if !bytes.Equal(h.Sum(nil), want) {
		return fmt.Errorf("firmware: image %s changed after verification: %w", image, ErrHashMismatch)
	}
	if err := out.Chmod(mode); err != nil {
		return fmt.Errorf("firmware: chmod %s: %w", tmp, err)
	}
	if err := out.Sync(); err != nil {
		return fmt.Errorf("firmware: fsync %s: %w", tmp, err)
	}
	if err := out.Close(); err != nil {
		return fmt.Errorf("firmware: close %s: %w", tmp, err)
	}
	if err := os.Rename(tmp, dst); err != nil {
		return fmt.Errorf("firmware: rename %s to %s: %w", tmp, dst, err)
	}
	ok = true
	return syncDir(filepath.Dir(dst))
}

// Commit clears pending and boot_attempts; the previous slot is kept.
func (s *FileSlots) Commit(context.Context) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	st, err := s.State()
	if err != nil {
		return err
	}
	if st.Pending == "" {
		return nil
	}
	st.Pending, st.BootAttempts = "", 0
	return s.writeState(st)
}

// Rollback makes the previous slot active again and clears pending. Without a pending trial
// it does nothing.
func (s *FileSlots) Rollback(context.Context) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	st, err := s.State()
	if err != nil {
		return err
	}
	if st.Pending == "" {
		return nil
	}
	if st.Previous == "" {
		return fmt.Errorf("firmware: slot state %s: no previous slot to roll back to", s.StatePath)
	}
	next := SlotState{Active: st.Previous, Version: st.PreviousVersion}
	return s.writeState(next)
}

// RecordBoot increments boot_attempts while a trial is pending and returns it.
func (s *FileSlots) RecordBoot(context.Context) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	st, err := s.State()
	if err != nil {
		return 0, err
	}
	if st.Pending == "" {
		return 0, nil
	}
	st.BootAttempts++
	if err := s.writeState(st); err != nil {
		return 0, err
	}
	return st.BootAttempts, nil
}

// ctxReader stops a copy when ctx is done.
type ctxReader struct {
	ctx context.Context
	r   io.Reader
}

func (c ctxReader) Read(p []byte) (int, error) {
	if err := c.ctx.Err(); err != nil {
		return 0, err
	}
	return c.r.Read(p)
}
