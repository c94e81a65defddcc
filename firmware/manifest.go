package firmware

import (
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"net/url"
	"os"
	"slices"
	"strings"
	"time"
)

// FormatVersion is the manifest "format" this package writes and accepts.
const FormatVersion = 1

// Manifest limits (docs/FIRMWARE.md §1).
const (
	// MinChunkSize and MaxChunkSize bound the manifest's chunk_size.
	MinChunkSize = 512
	MaxChunkSize = 4 << 20
	// DefaultChunkSize is what BuildManifest uses for chunk size 0.
	DefaultChunkSize = 64 << 10
	// MaxImageSize bounds the manifest's size (1 TiB).
	MaxImageSize = 1 << 40
	// MaxSecurityVersion bounds security_version so that every JSON implementation reads it exactly.
	MaxSecurityVersion = 1<<53 - 1
	// SourceMQTT is the manifest source meaning "chunks over the broker".
	SourceMQTT = "mqtt"
)

const (
	maxHardware           = 64
	maxSources            = 8
	maxSourceLen          = 2048
	maxIdentLen           = 64
	maxEnvelopeSize       = 64 << 10
	maxSignatures         = 8
	maxTextField          = 64
	signatureContext      = "tpmagent-firmware-manifest-v1\x00"
	createdTimeFormat     = time.RFC3339
	defaultMaxCounterStep = 1000
)

// Manifest describes one firmware release. Field order here is the order Marshal writes.
type Manifest struct {
	Format          int      `json:"format"`
	Name            string   `json:"name"`
	Version         string   `json:"version"`
	SecurityVersion uint64   `json:"security_version"`
	Hardware        []string `json:"hardware"`
	Size            int64    `json:"size"`
	SHA256          string   `json:"sha256"`
	ChunkSize       int      `json:"chunk_size"`
	Sources         []string `json:"sources"`
	Created         string   `json:"created,omitempty"`

	raw []byte // the signed bytes, set by ParseAndVerify and Sign
}

// Raw returns the exact manifest bytes that were signed (nil for a manifest not yet signed or parsed).
func (m *Manifest) Raw() []byte { return m.raw }

// Digest returns hex SHA-256 of the signed manifest bytes: the job id the device remembers.
func (m *Manifest) Digest() string {
	sum := sha256.Sum256(m.raw)
	return hex.EncodeToString(sum[:])
}

// BuildManifest hashes the image at imagePath (streaming) and returns a validated manifest with
// format, size, sha256 and created filled in. chunkSize 0 means DefaultChunkSize; nil sources
// means ["mqtt"].
func BuildManifest(imagePath, name, version string, securityVersion uint64, hw []string, chunkSize int, sources []string) (*Manifest, error) {
	f, err := os.Open(imagePath)
	if err != nil {
		return nil, fmt.Errorf("firmware: open image: %w", err)
	}
	defer f.Close()
	h := sha256.New()
	n, err := io.Copy(h, f)
	if err != nil {
		return nil, fmt.Errorf("firmware: read image %s: %w", imagePath, err)
	}
	if chunkSize == 0 {
		chunkSize = DefaultChunkSize
	}
	if sources == nil {
		sources = []string{SourceMQTT}
	}
	m := &Manifest{
		Format:          FormatVersion,
		Name:            name,
		Version:         version,
		SecurityVersion: securityVersion,
		Hardware:        slices.Clone(hw),
		Size:            n,
		SHA256:          hex.EncodeToString(h.Sum(nil)),
		ChunkSize:       chunkSize,
		Sources:         slices.Clone(sources),
		Created:         time.Now().UTC().Format(createdTimeFormat),
	}
	if err := m.Validate(); err != nil {
		return nil, err
	}
	return m, nil
}

func identOK(s string, max int) bool {
	if len(s) == 0 || len(s) > max {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '.' || c == '_' || c == '-') {
			return false
		}
	}
	return true
}

func fieldErr(field, format string, args ...any) error {
	return &FieldError{Where: "manifest", Field: field, Problem: fmt.Sprintf(format, args...)}
}

// Validate checks every field against docs/FIRMWARE.md §1. The error is a *FieldError naming
// the first invalid field.
func (m *Manifest) Validate() error {
	if m.Format != FormatVersion {
		return fieldErr("format", "is %d, this device understands %d", m.Format, FormatVersion)
	}
	if !identOK(m.Name, maxIdentLen) {
		return fieldErr("name", "must be 1-%d characters of [A-Za-z0-9._-]", maxIdentLen)
	}
	if !identOK(m.Version, maxIdentLen) {
		return fieldErr("version", "must be 1-%d characters of [A-Za-z0-9._-]", maxIdentLen)
	}
	if m.SecurityVersion > MaxSecurityVersion {
		return fieldErr("security_version", "%d exceeds 2^53-1", m.SecurityVersion)
	}
	if len(m.Hardware) == 0 || len(m.Hardware) > maxHardware {
		return fieldErr("hardware", "must list 1-%d hardware ids, has %d", maxHardware, len(m.Hardware))
	}
	for i, h := range m.Hardware {
		if !identOK(h, maxIdentLen) {
			return fieldErr(fmt.Sprintf("hardware[%d]", i), "must be 1-%d characters of [A-Za-z0-9._-]", maxIdentLen)
		}
	}
	if m.Size < 1 || m.Size > MaxImageSize {
		return fieldErr("size", "%d is outside 1..2^40", m.Size)
	}
	if len(m.SHA256) != 64 || strings.ToLower(m.SHA256) != m.SHA256 {
		return fieldErr("sha256", "must be 64 lowercase hex characters")
	}
	if _, err := hex.DecodeString(m.SHA256); err != nil {
		return fieldErr("sha256", "must be 64 lowercase hex characters")
	}
	if m.ChunkSize < MinChunkSize || m.ChunkSize > MaxChunkSize {
		return fieldErr("chunk_size", "%d is outside %d..%d", m.ChunkSize, MinChunkSize, MaxChunkSize)
	}
	if len(m.Sources) == 0 || len(m.Sources) > maxSources {
		return fieldErr("sources", "must list 1-%d sources, has %d", maxSources, len(m.Sources))
	}
	for i, s := range m.Sources {
		if err := validateSource(s); err != nil {
			return fieldErr(fmt.Sprintf("sources[%d]", i), "%v", err)
		}
	}
	if m.Created != "" {
		if len(m.Created) > maxTextField {
			return fieldErr("created", "longer than %d characters", maxTextField)
		}
		if _, err := time.Parse(createdTimeFormat, m.Created); err != nil {
			return fieldErr("created", "not an RFC 3339 time")
		}
	}
	return nil
}

func validateSource(s string) error {
	if s == SourceMQTT {
		return nil
	}
	if len(s) > maxSourceLen {
		return fmt.Errorf("longer than %d characters", maxSourceLen)
	}
	u, err := url.Parse(s)
	if err != nil {
		return fmt.Errorf("not %q or an https:// URL", SourceMQTT)
	}
	if u.Scheme != "https" || u.Host == "" || u.Opaque != "" {
		return fmt.Errorf("not %q or an https:// URL", SourceMQTT)
	}
	if u.User != nil {
		return fmt.Errorf("URL must not carry user info")
	}
	return nil
}

// CheckCompatible returns an error wrapping ErrIncompatible unless hardware is listed in m.Hardware.
func CheckCompatible(m *Manifest, hardware string) error {
	if slices.Contains(m.Hardware, hardware) {
		return nil
	}
	return fmt.Errorf("firmware: %s %s is built for %s, this device is %q: %w",
		m.Name, m.Version, strings.Join(m.Hardware, ", "), hardware, ErrIncompatible)
}
