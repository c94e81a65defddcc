//go:build chaos

package chaos

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/tpmagent/tpmagent/internal/testenv"
)

// tpmHandles lists the swtpm's transient objects and loaded sessions with
// tpm2_getcap (nobody else may be connected: swtpm serves one client).
func tpmHandles(t *testing.T, sw *testenv.Swtpm) (transient, sessions []string) {
	t.Helper()
	get := func(what string) []string {
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		defer cancel()
		out, err := sw.Command(ctx, "tpm2_getcap", what).CombinedOutput()
		if err != nil {
			t.Fatalf("tpm2_getcap %s: %v\n%s", what, err, out)
		}
		var hs []string
		for _, l := range strings.Split(string(out), "\n") {
			if l = strings.TrimSpace(strings.TrimPrefix(strings.TrimSpace(l), "-")); strings.HasPrefix(l, "0x") {
				hs = append(hs, l)
			}
		}
		return hs
	}
	return get("handles-transient"), get("handles-loaded-session")
}

// flushLikeResourceManager does what the kernel's resource manager
// (/dev/tpmrm0) does when a process holding TPM objects dies: it flushes
// the transient objects and sessions it left. swtpm has no resource
// manager; it returns how many handles the killed agent had left.
func flushLikeResourceManager(t *testing.T, sw *testenv.Swtpm) int {
	t.Helper()
	tr, ss := tpmHandles(t, sw)
	if len(tr)+len(ss) == 0 {
		return 0
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	for _, flag := range []string{"-t", "-l"} {
		if out, err := sw.Command(ctx, "tpm2_flushcontext", flag).CombinedOutput(); err != nil {
			t.Fatalf("tpm2_flushcontext %s: %v\n%s", flag, err, out)
		}
	}
	return len(tr) + len(ss)
}
