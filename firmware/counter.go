package firmware

import (
	"context"
	"fmt"
	"os"
	"strconv"
	"strings"
	"sync"
)

// Counter is a monotonic anti-rollback counter. The production implementation is a TPM 2.0 NV
// counter index (tpmkeys), which survives deleting the agent's files and restoring old disk
// images. Implementations must be safe for use by one goroutine at a time.
type Counter interface {
	// Read returns the current value.
	Read(ctx context.Context) (uint64, error)
	// Increment adds one to the counter. It can never be undone.
	Increment(ctx context.Context) error
}

// CheckSecurityVersion rejects (ErrRollback) a manifest whose security_version is below the
// counter, or more than maxStep above it (maxStep 0 means 1000). Equal is accepted.
func CheckSecurityVersion(m *Manifest, counter uint64, maxStep uint64) error {
	if maxStep == 0 {
		maxStep = defaultMaxCounterStep
	}
	if m.SecurityVersion < counter {
		return fmt.Errorf("firmware: %s %s has security_version %d, below the device's anti-rollback counter %d: this release may no longer be installed: %w",
			m.Name, m.Version, m.SecurityVersion, counter, ErrRollback)
	}
	if m.SecurityVersion-counter > maxStep {
		return fmt.Errorf("firmware: %s %s has security_version %d, more than %d above the anti-rollback counter %d: raise security_version in small steps: %w",
			m.Name, m.Version, m.SecurityVersion, maxStep, counter, ErrRollback)
	}
	return nil
}

// AdvanceCounter increments c until it reaches target (one Increment per step, as a TPM NV
// counter requires). It is idempotent: a counter already at or above target is left alone.
func AdvanceCounter(ctx context.Context, c Counter, target uint64) error {
	for {
		v, err := c.Read(ctx)
		if err != nil {
			return fmt.Errorf("firmware: read anti-rollback counter: %w", err)
		}
		if v >= target {
			return nil
		}
		if err := c.Increment(ctx); err != nil {
			return fmt.Errorf("firmware: advance anti-rollback counter from %d to %d: %w", v, target, err)
		}
	}
}

// MemoryCounter is an in-memory Counter for tests. It offers no protection at all.
type MemoryCounter struct {
	mu         sync.Mutex
	v          uint64
	increments int
}

// NewMemoryCounter returns a MemoryCounter starting at v.
func NewMemoryCounter(v uint64) *MemoryCounter { return &MemoryCounter{v: v} }

// Read returns the value.
func (c *MemoryCounter) Read(context.Context) (uint64, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.v, nil
}

// Increment adds one.
func (c *MemoryCounter) Increment(context.Context) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.v++
	c.increments++
	return nil
}

// Increments returns how many times Increment was called (each is one NV write on a TPM).
func (c *MemoryCounter) Increments() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.increments
}

// FileCounter is a Counter kept in a text file, written atomically. It stands in for a TPM NV
// counter in tests and demos; it is NOT an anti-rollback protection (anyone who can write the
// file or restore a disk image resets it). Keep it outside the updater's state directory.
type FileCounter struct {
	Path string
}

// Read returns the value in the file; a missing file reads as 0.
func (c FileCounter) Read(context.Context) (uint64, error) {
	data, err := os.ReadFile(c.Path)
	if os.IsNotExist(err) {
		return 0, nil
	}
	if err != nil {
		return 0, fmt.Errorf("firmware: read counter file: %w", err)
	}
	v, err := strconv.ParseUint(strings.TrimSpace(string(data)), 10, 64)
	if err != nil {
		return 0, fmt.Errorf("firmware: counter file %s: %w", c.Path, err)
	}
	return v, nil
}

// Increment adds one and writes the file atomically.
func (c FileCounter) Increment(ctx context.Context) error {
	v, err := c.Read(ctx)
	if err != nil {
		return err
	}
	return writeFileAtomic(c.Path, []byte(strconv.FormatUint(v+1, 10)+"\n"), 0o600)
}
