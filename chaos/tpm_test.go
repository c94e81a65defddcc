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
