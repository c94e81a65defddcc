package tpmkeys

import (
	"context"
	"fmt"
	"strings"

	"github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport"
)

// flushStale flushes transient objects and loaded sessions left in a TPM
// that has no resource manager (swtpm, /dev/tpmN) by a client that died
// without flushing them (kill -9). The kernel's resource manager does this
// for /dev/tpmrmN; without it three crashed agents fill the TPM's session
// slots and every later signature fails with TPM_RC_SESSION_MEMORY. Only
// safe where this process is the TPM's only client, which holds for both:
// swtpm serves one connection at a time and /dev/tpmN is opened exclusively.
func (t *TPM) flushStale(ctx context.Context) (int, error) {
	n := 0
	err := t.do(ctx, func(tp transport.TPM) error {
		for _, ht := range []tpm2.TPMHT{tpm2.TPMHTTransient, tpm2.TPMHTLoadedSession, tpm2.TPMHTPolicySession} {
			rsp, err := tpm2.GetCapability{Capability: tpm2.TPMCapHandles, Property: uint32(ht) << 24, PropertyCount: 64}.Execute(tp)
			if err != nil {
				return fmt.Errorf("list handles 0x%02x: %w", ht, err)
			}
			hs, err := rsp.CapabilityData.Data.Handles()
			if err != nil {
				return err
			}
			for _, h := range hs.Handle {
				if uint8(h>>24) != uint8(ht) {
					continue
				}
				if _, err := (tpm2.FlushContext{FlushHandle: h}).Execute(tp); err != nil {
					return fmt.Errorf("flush 0x%08x: %w", uint32(h), err)
				}
				n++
			}
		}
		return nil
	})
	if err != nil {
		return n, fmt.Errorf("tpmkeys: flush stale handles in %s: %w", t.device, err)
	}
	return n, nil
}

// StaleFlushed is the number of transient objects and sessions left by
// earlier clients that Open flushed (TPMs without a resource manager only).
func (t *TPM) StaleFlushed() int { return t.staleFlushed }

// hasResourceManager reports whether the device is the kernel's resource
// manager (/dev/tpmrmN), which flushes a dead client's handles itself.
func hasResourceManager(d Device) bool {
	return d.Kind == DeviceLinux && strings.HasPrefix(d.Path, "/dev/tpmrm")
}
