//go:build chaos

package chaos

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"
)

// TestScenario6SpoolFull puts the spool on a size-limited tmpfs made by the
// test, stops the broker and streams until the filesystem is full; the
// configured policy (on_full: block) must hold readings back (no "ok")
// rather than lose or corrupt any. The agent is then killed with SIGKILL on
// the full filesystem and restarted (recovery must find no corrupt record),
// the broker comes back and everything that was acknowledged is delivered.
func TestScenario6SpoolFull(t *testing.T) {
	_, br, _, d, tr := setup(t)
	dir := filepath.Join(d.Dir, "spool-tmpfs")
	if err := os.MkdirAll(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	size := pick("1m", "4m")
	if out, err := exec.Command("mount", "-t", "tmpfs", "-o", "size="+size+",mode=0700", "tmpfs", dir).CombinedOutput(); err != nil {
		t.Fatalf("mount a %s tmpfs for the spool (needs root): %v\n%s", size, err, out)
	}
	t.Cleanup(func() { _ = exec.Command("umount", "-l", dir).Run() })

	a := newAgent(t, d, writeConfig(t, d, confOpts{SpoolDir: dir}), "")
	a.start()
	if !a.waitConnected(15 * time.Second) {
		t.Fatalf("agent never connected:\n%s", tail(a.log, 3000))
	}
	s := startStream(t, tr, a.sock, 500, 50*time.Millisecond)
	s.timeout = 2 * time.Second
	time.Sleep(time.Second)

	br.Stop()
	// Stream until acknowledgements stop (the filesystem is full).
	full := false
	deadline := time.Now().Add(pick(60*time.Second, 120*time.Second))
	last, since := tr.mark(), time.Now()
	for time.Now().Before(deadline) {
		time.Sleep(200 * time.Millisecond)
		if m := tr.mark(); m != last {
			last, since = m, time.Now()
		} else if time.Since(since) > 3*time.Second {
			full = true
			break
		}
	}
	snap, serr := a.snap()
	out, _ := exec.Command("df", "-k", dir).CombinedOutput()
	t.Logf("spool full=%v: %d records, %d bytes, dropped %d, last_error=%q (status: %v)\n%s", full, snap.Spool.Records, snap.Spool.Bytes, snap.Spool.Dropped, snap.LastError, serr, out)
	if !full {
		t.Fatalf("the spool never filled the %s tmpfs", size)
	}
	// Kill the agent on the full filesystem and start it again.
	a.kill9()
	a.start()
	time.Sleep(time.Second)
	br.Start()
	back := time.Now()
	rec, ok := tr.recovered(tr.mark(), back, 90*time.Second)
	if !ok {
		t.Errorf("backlog not delivered within 90 s after the broker came back; %v", tr.missing())
	}
	time.Sleep(2 * time.Second)
	snap, err := a.snap()
	if err != nil {
		t.Fatal(err)
	}
	if snap.Spool.CorruptSkips != 0 || snap.Spool.Dropped != 0 {
		t.Errorf("spool after a full filesystem: %d corrupt records skipped, %d dropped (policy block drops none)", snap.Spool.CorruptSkips, snap.Spool.Dropped)
	}
	finish(t, 6, "spool tmpfs full (on_full: block)", fmt.Sprintf("%s tmpfs, kill -9 while full, torn-tail repairs %d", size, snap.Spool.TornTailRepairs), tr, s, rec, 90*time.Second, a.log)
}
