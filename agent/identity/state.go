package identity

import (
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"time"

	"github.com/tpmagent/tpmagent/internal/atomicfile"

	"github.com/tpmagent/tpmagent/agent/config"
)

// StateFileName is the file in state_dir that names the device key's
// handle once a certificate renewal has moved it off tpm.key_handle.
const StateFileName = "identity.json"

// State is state_dir/identity.json, written by certificate renewal: which
// persistent handle holds the device key that broker.cert_file certifies.
// Without the file the key is at tpm.key_handle.
type State struct {
	// KeyHandle is the device key's handle ("0x81000101").
	KeyHandle string `json:"key_handle"`
	// PreviousKeyHandle held the key before the last renewal (evicted by it).
	PreviousKeyHandle string `json:"previous_key_handle,omitempty"`
	// CertSerial (hex) and CertNotAfter describe the certificate issued for
	// KeyHandle's key.
	CertSerial   string    `json:"cert_serial,omitempty"`
	CertNotAfter time.Time `json:"cert_not_after,omitzero"`
	// UpdatedAt is when the renewal switched to this key.
	UpdatedAt time.Time `json:"updated_at"`
}

// StatePath returns state_dir/identity.json.
func StatePath(cfg *config.Config) string { return filepath.Join(cfg.StateDir, StateFileName) }

// ReadState reads state_dir/identity.json; (nil, nil) when it does not exist.
func ReadState(cfg *config.Config) (*State, error) {
	path := StatePath(cfg)
	b, err := os.ReadFile(path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("identity state %s: %w", path, err)
	}
	var st State
	if err := json.Unmarshal(b, &st); err != nil {
		return nil, fmt.Errorf("identity state %s: %w (it names the device key's handle after a certificate renewal: fix it, or delete it to use tpm.key_handle)", path, err)
	}
	return &st, nil
}

// WriteState replaces state_dir/identity.json atomically (temporary file,
// fsync, rename, fsync of the directory), creating state_dir (0700).
func WriteState(cfg *config.Config, st *State) error {
	b, err := json.MarshalIndent(st, "", "  ")
	if err != nil {
		return err
	}
	if err := os.MkdirAll(cfg.StateDir, 0o700); err != nil {
		return fmt.Errorf("identity state: state_dir %s: %w", cfg.StateDir, err)
	}
	if err := atomicfile.Write(StatePath(cfg), append(b, '\n'), 0o600); err != nil {
		return fmt.Errorf("identity state: %w", err)
	}
	return nil
}

// ActiveKeyHandle returns the handle of the device key: the one
// state_dir/identity.json names, else tpm.key_handle.
func ActiveKeyHandle(cfg *config.Config) (uint32, error) {
	st, err := ReadState(cfg)
	if err != nil {
		return 0, err
	}
	if st == nil || st.KeyHandle == "" {
		return uint32(cfg.TPM.KeyHandle), nil
	}
	h, err := config.ParseHandle(st.KeyHandle)
	if err != nil || h>>24 != 0x81 {
		return 0, fmt.Errorf("identity state %s: key_handle %q is not a persistent handle (0x81000000-0x81ffffff): fix it, or delete the file to use tpm.key_handle", StatePath(cfg), st.KeyHandle)
	}
	return uint32(h), nil
}

// OtherKeyHandle returns the handle of the pair (tpm.key_handle,
// enrol.renew_handle) that active is not: where the next renewal creates its
// key. 0 when enrol.renew_handle is not set or equals tpm.key_handle.
func OtherKeyHandle(cfg *config.Config, active uint32) uint32 {
	k, r := uint32(cfg.TPM.KeyHandle), uint32(cfg.Enrol.RenewHandle)
	if r == 0 || r == k {
		return 0
	}
	if active == r {
		return k
	}
	return r
}
