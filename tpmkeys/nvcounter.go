package tpmkeys

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"

	"github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport"
)

// Counter is a TPM NV monotonic counter (TPM_NT_COUNTER): its value can only grow, it
// survives reboots and reinstalls of the agent, and no command resets it short of
// undefining the index (which needs owner authorization). Firmware anti-rollback stores the
// lowest acceptable version in one.
type Counter struct {
	tpm   *TPM
	index tpm2.TPMHandle
}

// NVCounter opens the NV counter at index (DefaultCounterIndex when 0), defining it when
// absent: TPM_NT_COUNTER, 8 bytes, SHA-256 name, read and write with the owner's or the
// index's own (empty) authorization, noDA. An existing index of another kind is an error.
// Defining needs an empty owner authorization.
func (t *TPM) NVCounter(ctx context.Context, index uint32) (*Counter, error) {
	if index == 0 {
		index = DefaultCounterIndex
	}
	if index>>24 != 0x01 {
		return nil, fmt.Errorf("tpmkeys: NV counter 0x%x: not an NV index (0x01000000–0x01FFFFFF)", index)
	}
	c := &Counter{tpm: t, index: tpm2.TPMHandle(index)}
	err := t.do(ctx, func(tp transport.TPM) error {
		pub, _, err := c.readPublic(tp)
		if err == nil {
			if pub.Attributes.NT != tpm2.TPMNTCounter {
				return fmt.Errorf("tpmkeys: NV index 0x%x exists but is not a counter (type %d): choose another "+
					"index or undefine it (tpm2_nvundefine 0x%x)", index, pub.Attributes.NT, index)
			}
			return nil
		}
		if !errors.Is(err, tpm2.TPMRCHandle) {
			return fmt.Errorf("tpmkeys: NV counter 0x%x: %w", index, err)
		}
		_, err = tpm2.NVDefineSpace{
			AuthHandle: tpm2.TPMRHOwner,
			PublicInfo: tpm2.New2B(tpm2.TPMSNVPublic{
				NVIndex: c.index,
				NameAlg: tpm2.TPMAlgSHA256,
				Attributes: tpm2.TPMANV{
					OwnerWrite: true,
					OwnerRead:  true,
					AuthWrite:  true,
					AuthRead:   true,
					NoDA:       true,
					NT:         tpm2.TPMNTCounter,
				},
				DataSize: 8,
			}),
		}.Execute(tp)
		if err != nil {
			return fmt.Errorf("tpmkeys: define NV counter 0x%x (owner hierarchy; its auth must be empty): %w", index, err)
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	return c, nil
}

func (c *Counter) readPublic(tp transport.TPM) (*tpm2.TPMSNVPublic, tpm2.TPM2BName, error) {
	rsp, err := tpm2.NVReadPublic{NVIndex: c.index}.Execute(tp)
	if err != nil {
		return nil, tpm2.TPM2BName{}, err
	}
	pub, err := rsp.NVPublic.Contents()
	if err != nil {
		return nil, tpm2.TPM2BName{}, err
	}
	return pub, rsp.NVName, nil
}

// Index returns the NV index.
func (c *Counter) Index() uint32 { return uint32(c.index) }

// Read returns the counter's value. A counter that was never incremented reads 0. Note that
// the TPM initializes a counter on its first increment to the highest value any counter in
// this TPM has had (TPM 2.0 Part 3, NV_Increment), so the first Increment may jump past 1.
func (c *Counter) Read(ctx context.Context) (uint64, error) {
	var v uint64
	err := c.tpm.do(ctx, func(tp transport.TPM) error {
		pub, name, err := c.readPublic(tp)
		if err != nil {
			return err
		}
		if !pub.Attributes.Written {
			v = 0
			return nil
		}
		rsp, err := tpm2.NVRead{
			AuthHandle: tpm2.AuthHandle{Handle: c.index, Name: name, Auth: tpm2.PasswordAuth(nil)},
			NVIndex:    tpm2.NamedHandle{Handle: c.index, Name: name},
			Size:       8,
		}.Execute(tp)
		if err != nil {
			return err
		}
		if len(rsp.Data.Buffer) != 8 {
			return fmt.Errorf("read %d bytes, want 8", len(rsp.Data.Buffer))
		}
		v = binary.BigEndian.Uint64(rsp.Data.Buffer)
		return nil
	})
	if err != nil {
		return 0, fmt.Errorf("tpmkeys: read NV counter 0x%x: %w", uint32(c.index), err)
	}
	return v, nil
}

// Increment adds one to the counter.
func (c *Counter) Increment(ctx context.Context) error {
	err := c.tpm.do(ctx, func(tp transport.TPM) error {
		_, name, err := c.readPublic(tp)
		if err != nil {
			return err
		}
		_, err = tpm2.NVIncrement{
			AuthHandle: tpm2.AuthHandle{Handle: c.index, Name: name, Auth: tpm2.PasswordAuth(nil)},
			NVIndex:    tpm2.NamedHandle{Handle: c.index, Name: name},
		}.Execute(tp)
		return err
	})
	if err != nil {
		return fmt.Errorf("tpmkeys: increment NV counter 0x%x: %w", uint32(c.index), err)
	}
	return nil
}

// maxAdvance bounds AdvanceTo: each step is one NV write.
const maxAdvance = 4096

// AdvanceTo increments the counter until it is at least v (at most 4096 steps; NV writes
// wear the TPM). A counter already at or above v is left alone.
func (c *Counter) AdvanceTo(ctx context.Context, v uint64) error {
	cur, err := c.Read(ctx)
	if err != nil {
		return err
	}
	if cur >= v {
		return nil
	}
	if v-cur > maxAdvance {
		return fmt.Errorf("tpmkeys: NV counter 0x%x: advancing from %d to %d needs more than %d increments",
			uint32(c.index), cur, v, maxAdvance)
	}
	for ; cur < v; cur++ {
		if err := c.Increment(ctx); err != nil {
			return err
		}
	}
	return nil
}
