package collector

import (
	"bufio"
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/tpmagent/tpmagent/agent/reading"
	"github.com/tpmagent/tpmagent/transport/seal"
)

// durable is a runner with a state in dir writing to dir/out.jsonl, like
// `tpmagent collect` with seal.state_dir.
type durable struct {
	dir   string
	out   *os.File
	state *State
	run   *Runner
	acked []int // tags of the acknowledged messages, in order
}

func openDurable(t *testing.T, f *fixture, dir string, so StateOptions) (*durable, error) {
	t.Helper()
	out, err := os.OpenFile(filepath.Join(dir, "out.jsonl"), os.O_RDWR|os.O_CREATE|os.O_APPEND, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	so.Output = out
	st, err := OpenState(filepath.Join(dir, "state"), so)
	if err != nil {
		out.Close()
		return nil, err
	}
	col, err := seal.NewCollector(f.priv, f.pool, seal.CollectorOptions{})
	if err != nil {
		t.Fatal(err)
	}
	d := &durable{dir: dir, out: out, state: st}
	d.run, err = New(Options{Collector: col, Output: out, State: st})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close(); out.Close() })
	return d, nil
}

func (d *durable) frame(tag int, fr []byte) {
	d.run.handleFrame(msg(frameTopic, fr), func() { d.acked = append(d.acked, tag) })
}

func (d *durable) announce(ann []byte) {
	d.run.handleAnnouncement(msg(seal.SessionsTopic("dev-0001"), ann), func() { d.acked = append(d.acked, -1) })
}

// crash leaves what a SIGKILL leaves: the lines written so far are in the
// file (write(2) happened), nothing more is committed or acknowledged.
func (d *durable) crash(t *testing.T) {
	t.Helper()
	d.run.mu.Lock()
	if err := d.run.out.Flush(); err != nil {
		t.Fatal(err)
	}
	d.run.mu.Unlock()
}

// values reads the output file: the value of every reading, in order.
func values(t *testing.T, dir string) []int {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(dir, "out.jsonl"))
	if err != nil {
		t.Fatal(err)
	}
	var vs []int
	sc := bufio.NewScanner(bytes.NewReader(b))
	for sc.Scan() {
		_, r, err := ParseLine(sc.Bytes())
		if err != nil || r == nil {
			t.Fatalf("output line %q: %v", sc.Text(), err)
		}
		vs = append(vs, int(r.Value))
	}
	return vs
}

func sealN(t *testing.T, f *fixture, n int) (ann []byte, frames [][]byte) {
	t.Helper()
	for i := 0; i < n; i++ {
		a, fr := f.seal(t, reading.Reading{Name: "v", Value: float64(i), Time: time.Now()})
		if a != nil {
			ann = a
		}
		frames = append(frames, fr)
	}
	return ann, frames
}

// TestStateCrashRestart: acknowledgements wait for the commit; after a
// crash with written but uncommitted lines the restarted runner truncates
// them, re-opens the session from its state (the announcement is not
// delivered again), rejects the redelivered committed frames as replays and
// writes the uncommitted ones again: every reading exactly once.
func TestStateCrashRestart(t *testing.T) {
	f := newFixture(t, seal.CollectorOptions{})
	dir := t.TempDir()
	ann, frames := sealN(t, f, 10)
	d, err := openDurable(t, f, dir, StateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	d.announce(ann)
	for i := 0; i < 6; i++ {
		d.frame(i, frames[i])
	}
	if len(d.acked) != 0 {
		t.Fatalf("acknowledged before any commit: %v", d.acked)
	}
	if err := d.run.Commit(); err != nil {
		t.Fatal(err)
	}
	if got := len(d.acked); got != 7 {
		t.Fatalf("acknowledged %v after the commit, want the announcement and 6 frames", d.acked)
	}
	for i := 6; i < 9; i++ {
		d.frame(i, frames[i])
	}
	d.crash(t)
	if got := len(values(t, dir)); got != 9 {
		t.Fatalf("output before the crash has %d lines, want 9 (3 uncommitted)", got)
	}
	if len(d.acked) != 7 {
		t.Fatalf("uncommitted frames acknowledged: %v", d.acked)
	}

	d2, err := openDurable(t, f, dir, StateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if got := values(t, dir); len(got) != 6 || d2.state.Truncated() == 0 {
		t.Fatalf("after restart the output holds %v (truncated %d bytes), want the 6 committed readings", got, d2.state.Truncated())
	}
	// The broker redelivers what was not acknowledged (6..8) and, say, two
	// it had (4, 5); frame 9 is new. No announcement comes.
	for _, i := range []int{4, 5, 6, 7, 8, 9} {
		d2.frame(i, frames[i])
	}
	if err := d2.run.Flush(); err != nil {
		t.Fatal(err)
	}
	if got := fmtInts(values(t, dir)); got != "[0,1,2,3,4,5,6,7,8,9]" {
		t.Fatalf("output %s, want every reading 0..9 once", got)
	}
	st := d2.run.Stats()
	if st.Replays != 2 || st.Opened != 4 || st.Readings != 4 || st.Restored != 1 || st.Announcements != 0 || st.Gaps != 0 || st.Commits == 0 {
		t.Fatalf("stats after restart %+v", st)
	}
	if len(d2.acked) != 6 {
		t.Fatalf("acknowledged after restart %v, want all 6", d2.acked)
	}
}

func fmtInts(v []int) string {
	s := make([]string, len(v))
	for i, x := range v {
		s[i] = strconv.Itoa(x)
	}
	return "[" + strings.Join(s, ",") + "]"
}

// TestStateDamaged: a state that cannot be read is an error naming the file
// and the fix; the collector never starts from empty on its own.
func TestStateDamaged(t *testing.T) {
	f := newFixture(t, seal.CollectorOptions{})
	ann, frames := sealN(t, f, 3)
	// good makes a state in dir with one commit in the snapshot and one
	// in the log, and returns the snapshot, log and output bytes.
	good := func(t *testing.T, dir string) (snap, logb, out []byte) {
		t.Helper()
		d, err := openDurable(t, f, dir, StateOptions{})
		if err != nil {
			t.Fatal(err)
		}
		d.announce(ann)
		d.frame(0, frames[0])
		if err := d.run.Flush(); err != nil { // commit + snapshot
			t.Fatal(err)
		}
		d.frame(1, frames[1])
		if err := d.run.Commit(); err != nil {
			t.Fatal(err)
		}
		d.state.Close()
		d.out.Close()
		snap, _ = os.ReadFile(filepath.Join(dir, "state", StateFile))
		logb, _ = os.ReadFile(filepath.Join(dir, "state", StateLogFile))
		out, _ = os.ReadFile(filepath.Join(dir, "out.jsonl"))
		if len(logb) == 0 || len(snap) == 0 || len(out) == 0 || bytes.Count(logb, []byte{'\n'}) != 1 {
			t.Fatalf("setup: snapshot %d, log %q, output %d bytes", len(snap), logb, len(out))
		}
		return snap, logb, out
	}
	put := func(t *testing.T, path string, b []byte) {
		t.Helper()
		if b == nil {
			if err := os.Remove(path); err != nil {
				t.Fatal(err)
			}
			return
		}
		if err := os.WriteFile(path, b, 0o600); err != nil { // in place: same inode
			t.Fatal(err)
		}
	}

	for _, tc := range []struct {
		name      string
		mutate    func(snap, logb, out []byte) (s, l, o []byte) // nil: remove
		file, msg string
	}{
		{"snapshot garbage", func(s, l, o []byte) ([]byte, []byte, []byte) { return s[:len(s)/2], l, o }, StateFile, "damaged"},
		{"snapshot version", func(s, l, o []byte) ([]byte, []byte, []byte) {
			return bytes.Replace(s, []byte(`"version":1`), []byte(`"version":9`), 1), l, o
		}, StateFile, "version 9"},
		{"snapshot missing, log present", func(s, l, o []byte) ([]byte, []byte, []byte) { return nil, l, o }, StateFile, "missing, but its log"},
		{"log record altered, then another", func(s, l, o []byte) ([]byte, []byte, []byte) {
			bad := bytes.Clone(l)
			bad[12] ^= 1
			return s, append(bad, l...), o
		}, StateLogFile, "damaged at line 1: checksum mismatch"},
		{"output shorter than committed", func(s, l, o []byte) ([]byte, []byte, []byte) { return s, l, o[:len(o)-5] }, "out.jsonl", "shorter than the"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			snap, logb, out := good(t, dir)
			s, l, o := tc.mutate(snap, logb, out)
			put(t, filepath.Join(dir, "state", StateFile), s)
			put(t, filepath.Join(dir, "state", StateLogFile), l)
			put(t, filepath.Join(dir, "out.jsonl"), o)
			_, err := openDurable(t, f, dir, StateOptions{})
			var se *StateError
			if !errors.As(err, &se) {
				t.Fatalf("OpenState: %v, want a *StateError", err)
			}
			if msg := err.Error(); !strings.Contains(msg, tc.file) || !strings.Contains(msg, tc.msg) ||
				!(strings.Contains(msg, "mv ") || strings.Contains(msg, "restore")) {
				t.Fatalf("error %q: want the file %s, %q and the fix", msg, tc.file, tc.msg)
			}
		})
	}

	t.Run("another non-empty output file", func(t *testing.T) {
		dir := t.TempDir()
		good(t, dir)
		p := filepath.Join(dir, "out.jsonl")
		if err := os.Rename(p, p+".1"); err != nil { // kept: the new file gets another inode
			t.Fatal(err)
		}
		put(t, p, []byte("{}\n"))
		_, err := openDurable(t, f, dir, StateOptions{})
		if err == nil || !strings.Contains(err.Error(), "is not the output file") || !strings.Contains(err.Error(), "point seal.output") {
			t.Fatalf("OpenState: %v", err)
		}
	})

	t.Run("rotated: a new empty output file", func(t *testing.T) {
		dir := t.TempDir()
		good(t, dir)
		p := filepath.Join(dir, "out.jsonl")
		if err := os.Rename(p, p+".1"); err != nil {
			t.Fatal(err)
		}
		d, err := openDurable(t, f, dir, StateOptions{})
		if err != nil {
			t.Fatal(err)
		}
		d.frame(1, frames[1]) // committed before: a replay
		d.frame(2, frames[2])
		if err := d.run.Flush(); err != nil {
			t.Fatal(err)
		}
		if got := fmtInts(values(t, dir)); got != "[2]" {
			t.Fatalf("new output %s, want [2]", got)
		}
	})

	// A record torn at the end of the log (crash while appending) is not
	// an error: it was never committed.
	t.Run("torn last record", func(t *testing.T) {
		dir := t.TempDir()
		_, logb, _ := good(t, dir)
		put(t, filepath.Join(dir, "state", StateLogFile), append(bytes.Clone(logb), logb[:len(logb)/2]...))
		d, err := openDurable(t, f, dir, StateOptions{})
		if err != nil {
			t.Fatal(err)
		}
		d.frame(1, frames[1]) // committed before: a replay
		d.frame(2, frames[2])
		if err := d.run.Flush(); err != nil {
			t.Fatal(err)
		}
		if got := fmtInts(values(t, dir)); got != "[0,1,2]" {
			t.Fatalf("output %s", got)
		}
		if st := d.run.Stats(); st.Replays != 1 {
			t.Fatalf("stats %+v", st)
		}
	})
}

// TestStatePrune: a session superseded by a newer one of the same device
// and idle past SupersededIdle is reduced to a marker: its frames and its
// replayed announcement are rejected (counted), while the newer session
// goes on; sessions past MaxSessionAge are forgotten.
func TestStatePrune(t *testing.T) {
	f := newFixture(t, seal.CollectorOptions{})
	now := time.Now()
	clock := func() time.Time { return now }
	dir := t.TempDir()
	ann1, fr1 := sealN(t, f, 2)
	so := StateOptions{SupersededIdle: time.Hour, MaxSessionAge: 48 * time.Hour, Now: clock}
	d, err := openDurable(t, f, dir, so)
	if err != nil {
		t.Fatal(err)
	}
	d.announce(ann1)
	d.frame(0, fr1[0])
	if err := d.run.Flush(); err != nil {
		t.Fatal(err)
	}
	// A new session of the same device (agent restart).
	f2 := *f
	s2, err := seal.NewSealer("dev-0001", f.priv.Public(), f.key, f.chain, seal.SealerOptions{})
	if err != nil {
		t.Fatal(err)
	}
	f2.sealer = s2
	ann2, fr2 := sealN(t, &f2, 1)
	time.Sleep(5 * time.Millisecond) // a later start time
	d.announce(ann2)
	d.frame(10, fr2[0])
	if err := d.run.Flush(); err != nil {
		t.Fatal(err)
	}
	d.state.Close()
	d.out.Close()

	now = now.Add(2 * time.Hour) // session 1 superseded and idle for 2 h
	d2, err := openDurable(t, f, dir, so)
	if err != nil {
		t.Fatal(err)
	}
	if d2.state.Restored() != 1 || len(d2.state.retired) != 1 {
		t.Fatalf("after pruning: %s", d2.state.Describe())
	}
	d2.announce(ann1) // a replayed old announcement
	d2.frame(1, fr1[1])
	d2.frame(0, fr1[0])
	if err := d2.run.Flush(); err != nil {
		t.Fatal(err)
	}
	st := d2.run.Stats()
	if st.BadAnnouncements != 1 || st.TooOld != 2 || st.Readings != 0 {
		t.Fatalf("stats %+v", st)
	}
	d2.state.Close()
	d2.out.Close()

	now = now.Add(72 * time.Hour) // everything past MaxSessionAge
	d3, err := openDurable(t, f, dir, so)
	if err != nil {
		t.Fatal(err)
	}
	if len(d3.state.sessions) != 0 || len(d3.state.retired) != 0 {
		t.Fatalf("after MaxSessionAge: %s", d3.state.Describe())
	}
	if got := fmtInts(values(t, dir)); got != "[0,0]" {
		t.Fatalf("output %s", got)
	}
}
