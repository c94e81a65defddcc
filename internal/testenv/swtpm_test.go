package testenv

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"time"
)

func TestSwtpmStartRestartStop(t *testing.T) {
	s := StartSwtpm(t)
	if want := fmt.Sprintf("swtpm://127.0.0.1:%d", s.Port()); s.URL() != want {
		t.Fatalf("URL() = %q, want %q", s.URL(), want)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()

	// tpm2-tools reach it through Env(): define an NV index, which must survive Restart.
	run := func(args ...string) string {
		t.Helper()
		out, err := s.Command(ctx, args[0], args[1:]...).CombinedOutput()
		if err != nil {
			t.Fatalf("%s: %v\n%s", strings.Join(args, " "), err, out)
		}
		return string(out)
	}
	run("tpm2_nvdefine", "0x01800001", "-C", "o", "-s", "8")
	s.Restart()
	if err := ping(s.Addr(), fmt.Sprintf("127.0.0.1:%d", s.Port()+1)); err != nil {
		t.Fatalf("after Restart: %v", err)
	}
	if out := run("tpm2_getcap", "handles-nv-index"); !strings.Contains(out, "0x1800001") {
		t.Fatalf("NV index lost across Restart; tpm2_getcap handles-nv-index:\n%s", out)
	}
	s.Stop()
	if err := ping(s.Addr(), fmt.Sprintf("127.0.0.1:%d", s.Port()+1)); err == nil {
		t.Fatal("swtpm still answers after Stop")
	}
	s.Stop() // idempotent
}
