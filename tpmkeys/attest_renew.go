package tpmkeys

import (
	"context"
	"errors"
	"fmt"

	"github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport"
)

// EvictKey removes the persistent object at handle (TPM2_EvictControl with owner
// authorization). A handle that is already empty is not an error: removed reports whether
// something was there. Certificate renewal uses it to drop the old device key after the
// switch to the new one, and to clear a leftover key from a failed renewal. Keys loaded
// from that handle stop working.
func (t *TPM) EvictKey(ctx context.Context, handle uint32) (removed bool, err error) {
	if err := checkPersistent(handle); err != nil {
		return false, err
	}
	h := tpm2.TPMHandle(handle)
	err = t.do(ctx, func(tp transport.TPM) error {
		rp, err := tpm2.ReadPublic{ObjectHandle: h}.Execute(tp)
		if errors.Is(err, tpm2.TPMRCHandle) {
			return nil
		}
		if err != nil {
			return fmt.Errorf("tpmkeys: evict 0x%x: read public area: %w", handle, err)
		}
		if _, err := (tpm2.EvictControl{
			Auth:             tpm2.TPMRHOwner,
			ObjectHandle:     tpm2.NamedHandle{Handle: h, Name: rp.Name},
			PersistentHandle: h,
		}).Execute(tp); err != nil {
			return fmt.Errorf("tpmkeys: evict 0x%x (owner auth must be empty): %w", handle, err)
		}
		removed = true
		return nil
	})
	return removed, err
}

// KeyPresent reports whether a persistent object exists at handle.
func (t *TPM) KeyPresent(ctx context.Context, handle uint32) (bool, error) {
	if err := checkPersistent(handle); err != nil {
		return false, err
	}
	var present bool
	err := t.do(ctx, func(tp transport.TPM) error {
		_, err := tpm2.ReadPublic{ObjectHandle: tpm2.TPMHandle(handle)}.Execute(tp)
		if errors.Is(err, tpm2.TPMRCHandle) {
			return nil
		}
		if err != nil {
			return fmt.Errorf("tpmkeys: read 0x%x: %w", handle, err)
		}
		present = true
		return nil
	})
	return present, err
}
