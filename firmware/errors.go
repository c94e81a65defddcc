package firmware

import (
	"errors"
	"fmt"
	"strings"
)

// Sentinel errors. Every error returned by ParseAndVerify, CheckCompatible, CheckSecurityVersion
// and the download verification wraps exactly one of them; use errors.Is, or Reason for the
// machine-readable status reason.
var (
	// ErrUnknownKey: no signature in the envelope names a key in the trust store.
	ErrUnknownKey = errors.New("unknown key")
	// ErrBadSignature: a signature by a trusted key does not verify.
	ErrBadSignature = errors.New("bad signature")
	// ErrMalformed: the envelope or manifest is not valid (see *FieldError for the field).
	ErrMalformed = errors.New("malformed")
	// ErrIncompatible: the manifest does not list the device's hardware id.
	ErrIncompatible = errors.New("incompatible hardware")
	// ErrRollback: the manifest's security_version is below the anti-rollback counter (or jumps too far).
	ErrRollback = errors.New("security version rejected")
	// ErrNoSource: the manifest names no source this device can use.
	ErrNoSource = errors.New("no usable source")
	// ErrSizeMismatch: the downloaded image has a different size than the manifest says.
	ErrSizeMismatch = errors.New("size mismatch")
	// ErrHashMismatch: the downloaded image's SHA-256 differs from the manifest.
	ErrHashMismatch = errors.New("hash mismatch")
	// ErrBusy: a trial (restarting/health_check) or another job is in progress.
	ErrBusy = errors.New("updater busy")
)

// Status reasons, as sent in Status.Reason (docs/FIRMWARE.md §6).
const (
	ReasonUnknownKey        = "unknown_key"
	ReasonBadSignature      = "bad_signature"
	ReasonMalformed         = "malformed"
	ReasonIncompatible      = "incompatible_hardware"
	ReasonSecurityVersion   = "security_version"
	ReasonNoSource          = "no_source"
	ReasonSizeMismatch      = "size_mismatch"
	ReasonHashMismatch      = "hash_mismatch"
	ReasonDownloadFailed    = "download_failed"
	ReasonInstallFailed     = "install_failed"
	ReasonHealthCheckFailed = "health_check_failed"
	ReasonBootLoop          = "boot_loop"
)

// Reason maps an error from this package to its status reason code, or "" if err is nil or
// not one of the sentinel errors.
func Reason(err error) string {
	for _, r := range []struct {
		err    error
		reason string
	}{
		{ErrUnknownKey, ReasonUnknownKey},
		{ErrBadSignature, ReasonBadSignature},
		{ErrMalformed, ReasonMalformed},
		{ErrIncompatible, ReasonIncompatible},
		{ErrRollback, ReasonSecurityVersion},
		{ErrNoSource, ReasonNoSource},
		{ErrSizeMismatch, ReasonSizeMismatch},
		{ErrHashMismatch, ReasonHashMismatch},
	} {
		if errors.Is(err, r.err) {
			return r.reason
		}
	}
	return ""
}

// FieldError reports an invalid field of the envelope or the manifest. It wraps ErrMalformed.
type FieldError struct {
	Where   string // "envelope" or "manifest"
	Field   string // JSON field name, e.g. "chunk_size" or "signatures[1].sig"
	Problem string
}

func (e *FieldError) Error() string {
	return fmt.Sprintf("firmware: %s field %q: %s", e.Where, e.Field, e.Problem)
}

// Unwrap returns ErrMalformed.
func (e *FieldError) Unwrap() error { return ErrMalformed }

// UnknownKeyError lists the key ids found in an envelope, none of which is trusted. It wraps ErrUnknownKey.
type UnknownKeyError struct {
	KeyIDs []string
}

func (e *UnknownKeyError) Error() string {
	return fmt.Sprintf("firmware: manifest signed by unknown key(s) %s: add the release public key to firmware.trust if it is genuine",
		strings.Join(e.KeyIDs, ", "))
}

// Unwrap returns ErrUnknownKey.
func (e *UnknownKeyError) Unwrap() error { return ErrUnknownKey }

// SignatureError reports a signature by a trusted key that does not verify. It wraps ErrBadSignature.
type SignatureError struct {
	KeyID string
	Alg   string
	Err   error // detail, may be nil
}

func (e *SignatureError) Error() string {
	s := fmt.Sprintf("firmware: %s signature by trusted key %s does not verify: manifest altered after signing or signature corrupt", e.Alg, e.KeyID)
	if e.Err != nil {
		s += ": " + e.Err.Error()
	}
	return s
}

// Unwrap returns ErrBadSignature.
func (e *SignatureError) Unwrap() error { return ErrBadSignature }
