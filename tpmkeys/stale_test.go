package tpmkeys

import (
	"crypto"
	"crypto/rand"
	"crypto/sha256"
	"io"
	"testing"

	"github.com/tpmagent/tpmagent/internal/testenv"
)

// TestOpenFlushesStaleSessions: an agent killed with -9 leaves its salted
// signing session loaded in swtpm (no resource manager). Open flushes such
// leftovers, so crashed agents cannot exhaust the TPM's session slots.
func TestOpenFlushesStaleSessions(t *testing.T) {
	sw := testenv.StartSwtpm(t)
	ctx := testCtx(t)
	spec := KeySpec{Handle: DefaultKeyHandle, SRKHandle: DefaultSRKHandle, Type: KeyTypeECCP256}
	for i := 0; i < 5; i++ {
		tp, err := Open(ctx, sw.URL())
		if err != nil {
			t.Fatalf("open %d: %v", i, err)
		}
		if i == 0 {
			if _, err := tp.CreateKey(ctx, spec, false); err != nil {
				t.Fatal(err)
			}
		} else if got := tp.StaleFlushed(); got != 1 {
			t.Fatalf("open %d flushed %d stale handles, want 1 (the session the previous client left)", i, got)
		}
		k, err := tp.OpenKey(ctx, spec)
		if err != nil {
			t.Fatal(err)
		}
		d := sha256.Sum256([]byte("x"))
		if _, err := k.Sign(rand.Reader, d[:], crypto.SHA256); err != nil {
			t.Fatalf("sign after %d crashed clients: %v", i, err)
		}
		// Crash: drop the connection without flushing the session.
		tp.crashForTest()
	}
}

// crashForTest closes the connection without flushing anything, as a
// process killed with SIGKILL would.
func (t *TPM) crashForTest() {
	t.mu.Lock()
	t.closed = true
	t.keys = nil
	t.mu.Unlock()
	if c, ok := t.rt.next.(io.Closer); ok {
		_ = c.Close()
	}
}
