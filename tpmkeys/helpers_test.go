package tpmkeys

import (
	"context"
	"testing"
	"time"

	"github.com/google/go-tpm-tools/simulator"
	"github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport"
)

// openSim opens a fresh (manufacture-reset) in-process simulator. Only one exists per process
// at a time: tests using it do not run in parallel.
func openSim(tb testing.TB) (*TPM, *simulator.Simulator) {
	tb.Helper()
	sim, err := simulator.Get()
	if err != nil {
		tb.Fatalf("simulator: %v", err)
	}
	// The TPM wrapper does not own the simulator: tests may swap the transport underneath.
	tb.Cleanup(func() { _ = sim.Close() })
	t := OpenTransport(transport.FromReadWriter(sim), "simulator")
	tb.Cleanup(func() { t.Close() })
	return t, sim
}

func testCtx(tb testing.TB) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	tb.Cleanup(cancel)
	return ctx
}

// defaultKey creates the default device key (ECC P-256 at DefaultKeyHandle
// under a new SRK) and loads it.
func defaultKey(tb testing.TB, ctx context.Context, tpm *TPM) *Key {
	tb.Helper()
	if _, err := tpm.CreateKey(ctx, KeySpec{}, false); err != nil {
		tb.Fatal(err)
	}
	k, err := tpm.LoadKey(ctx, DefaultKeyHandle, DefaultSRKHandle)
	if err != nil {
		tb.Fatal(err)
	}
	return k
}

// loadedHandles lists the transient objects and loaded sessions in the TPM.
func loadedHandles(tb testing.TB, t *TPM) (transient, sessions []uint32) {
	tb.Helper()
	list := func(tp transport.TPM, ht tpm2.TPMHT) []uint32 {
		rsp, err := tpm2.GetCapability{Capability: tpm2.TPMCapHandles, Property: uint32(ht) << 24, PropertyCount: 64}.Execute(tp)
		if err != nil {
			tb.Fatalf("GetCapability handles 0x%x: %v", ht, err)
		}
		hs, err := rsp.CapabilityData.Data.Handles()
		if err != nil {
			tb.Fatal(err)
		}
		var out []uint32
		for _, h := range hs.Handle {
			if uint8(h>>24) == uint8(ht) {
				out = append(out, uint32(h))
			}
		}
		return out
	}
	err := t.do(context.Background(), func(tp transport.TPM) error {
		transient = list(tp, tpm2.TPMHTTransient)
		sessions = list(tp, tpm2.TPMHTHMACSession)
		return nil
	})
	if err != nil {
		tb.Fatal(err)
	}
	return transient, sessions
}

// persistForeign creates a key with the given template under a fresh transient primary (as
// tpm2_createprimary + tpm2_create + tpm2_evictcontrol would), persists it at h and flushes
// everything transient.
func persistForeign(tb testing.TB, t *TPM, h uint32, tmpl tpm2.TPMTPublic) {
	tb.Helper()
	err := t.do(context.Background(), func(tp transport.TPM) error {
		cp, err := tpm2.CreatePrimary{PrimaryHandle: tpm2.TPMRHOwner, InPublic: tpm2.New2B(tpm2.ECCSRKTemplate)}.Execute(tp)
		if err != nil {
			return err
		}
		defer flush(tp, cp.ObjectHandle)
		parent := tpm2.AuthHandle{Handle: cp.ObjectHandle, Name: cp.Name, Auth: tpm2.PasswordAuth(nil)}
		cr, err := tpm2.Create{ParentHandle: parent, InPublic: tpm2.New2B(tmpl)}.Execute(tp)
		if err != nil {
			return err
		}
		lr, err := tpm2.Load{ParentHandle: parent, InPrivate: cr.OutPrivate, InPublic: cr.OutPublic}.Execute(tp)
		if err != nil {
			return err
		}
		defer flush(tp, lr.ObjectHandle)
		_, err = tpm2.EvictControl{Auth: tpm2.TPMRHOwner, ObjectHandle: tpm2.NamedHandle{Handle: lr.ObjectHandle, Name: lr.Name},
			PersistentHandle: tpm2.TPMHandle(h)}.Execute(tp)
		return err
	})
	if err != nil {
		tb.Fatalf("persist foreign key at 0x%x: %v", h, err)
	}
}
