package spool

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// TestMain doubles as the child process of TestKillMidAppend.
func TestMain(m *testing.M) {
	if os.Getenv("SPOOL_DEBUG") != "" {
		benchLogOut = os.Stderr
	}
	if dir := os.Getenv("SPOOL_CHILD_DIR"); dir != "" {
		os.Exit(childAppend(dir, os.Getenv("SPOOL_CHILD_FSYNC")))
	}
	os.Exit(m.Run())
}

// logBuf is a concurrency-safe log sink for assertions on log lines.
type logBuf struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *logBuf) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *logBuf) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

func (l *logBuf) count(s string) int { return strings.Count(l.String(), s) }

func testLogger(t testing.TB) (*slog.Logger, *logBuf) {
	lb := &logBuf{}
	w := io.Writer(lb)
	if testing.Verbose() {
		w = io.MultiWriter(lb, os.Stderr)
	}
	return slog.New(slog.NewTextHandler(w, nil)), lb
}

func openT(t testing.TB, dir string, opts Options) *Spool {
	t.Helper()
	if opts.Logger == nil {
		opts.Logger, _ = testLogger(t)
	}
	s, err := Open(dir, opts)
	if err != nil {
		t.Fatalf("Open(%s): %v", dir, err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

// abandon simulates a crash of the process holding s: the committer stops
// after what is queued, nothing is persisted, the lock is dropped.
func abandon(s *Spool) {
	s.mu.Lock()
	s.closed = true
	close(s.closing)
	select {
	case s.kick <- struct{}{}:
	default:
	}
	s.notifyDataLocked()
	s.notifySpaceLocked()
	s.mu.Unlock()
	s.wg.Wait()
	for _, seg := range s.segs {
		if seg.f != nil {
			seg.f.Close()
		}
	}
	s.rd.close()
	s.lock.Close()
}

func payload(seq uint64, size int) []byte {
	b := []byte(fmt.Sprintf("record-%d|", seq))
	for len(b) < size {
		b = append(b, byte('a'+seq%26))
	}
	return b[:max(size, len(b))]
}

func appendN(t testing.TB, s *Spool, n, size int) []uint64 {
	t.Helper()
	seqs := make([]uint64, 0, n)
	for i := 0; i < n; i++ {
		s.mu.Lock()
		next := s.nextSeq
		s.mu.Unlock()
		seq, err := s.Append(context.Background(), payload(next, size))
		if err != nil {
			t.Fatalf("Append #%d: %v", i, err)
		}
		if seq != next {
			t.Fatalf("Append #%d: seq %d, want %d", i, seq, next)
		}
		seqs = append(seqs, seq)
	}
	return seqs
}

// drain reads every record available now (waiting at most a moment for more).
func drain(t testing.TB, s *Spool) []Record {
	t.Helper()
	var all []Record
	for {
		ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
		recs, err := s.Next(ctx, 1000)
		cancel()
		if errors.Is(err, context.DeadlineExceeded) {
			return all
		}
		if err != nil {
			t.Fatalf("Next: %v", err)
		}
		all = append(all, recs...)
	}
}

func checkRecords(t testing.TB, recs []Record, want []uint64, size int) {
	t.Helper()
	got := make([]uint64, len(recs))
	for i, r := range recs {
		got[i] = r.Seq
		if !bytes.Equal(r.Data, payload(r.Seq, size)) {
			t.Fatalf("record %d: data %q, want %q", r.Seq, r.Data, payload(r.Seq, size))
		}
	}
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Fatalf("seqs\n got %v\nwant %v", got, want)
	}
}

func seqRangeList(from, to uint64) []uint64 {
	var s []uint64
	for q := from; q <= to; q++ {
		s = append(s, q)
	}
	return s
}

func TestParsePolicies(t *testing.T) {
	for _, tc := range []struct {
		in      string
		fsync   FsyncPolicy
		fsyncOK bool
		full    FullPolicy
		fullOK  bool
	}{
		{"always", FsyncAlways, true, 0, false},
		{"batch", FsyncBatch, true, 0, false},
		{"never", FsyncNever, true, 0, false},
		{"block", 0, false, FullBlock, true},
		{"drop_oldest", 0, false, FullDropOldest, true},
		{"sometimes", 0, false, 0, false},
	} {
		f, err := ParseFsync(tc.in)
		if (err == nil) != tc.fsyncOK || (err == nil && (f != tc.fsync || f.String() != tc.in)) {
			t.Errorf("ParseFsync(%q) = %v, %v", tc.in, f, err)
		}
		p, err := ParseFullPolicy(tc.in)
		if (err == nil) != tc.fullOK || (err == nil && (p != tc.full || p.String() != tc.in)) {
			t.Errorf("ParseFullPolicy(%q) = %v, %v", tc.in, p, err)
		}
	}
}

func TestAppendNextAckOrder(t *testing.T) {
	for _, pol := range []FsyncPolicy{FsyncAlways, FsyncBatch, FsyncNever} {
		t.Run(pol.String(), func(t *testing.T) {
			dir := t.TempDir()
			// Small segments so the records span several files.
			s := openT(t, dir, Options{Fsync: pol, MaxBytes: 1 << 20, SegmentBytes: 4 << 10})
			ctx := context.Background()
			appendN(t, s, 300, 100)
			// A multi-record Append gets consecutive seqs.
			first, err := s.Append(ctx, payload(301, 100), payload(302, 100), payload(303, 100))
			if err != nil || first != 301 {
				t.Fatalf("Append(3 records) = %d, %v; want 301", first, err)
			}
			if st := s.Stats(); st.Records != 303 || st.Appended != 303 || st.Segments < 5 {
				t.Fatalf("stats after append: %+v", st)
			}
			recs := drain(t, s)
			checkRecords(t, recs, seqRangeList(1, 303), 100)

			// Ack out of order: odd seqs first; nothing is released yet
			// beyond seq 1.
			for q := 303; q >= 1; q -= 2 {
				s.Ack(uint64(q))
			}
			s.Ack(1, 1, 9999) // duplicates and unknown seqs are ignored
			st := s.Stats()
			if st.Records != 151 || st.Acked != 152 {
				t.Fatalf("after odd acks: Records %d Acked %d, want 151 152", st.Records, st.Acked)
			}
			for q := uint64(2); q <= 302; q += 2 {
				s.Ack(q)
			}
			st = s.Stats()
			if st.Records != 0 || st.Acked != 303 {
				t.Fatalf("after all acks: %+v", st)
			}
			// Every segment but the active one is gone.
			files, _ := filepath.Glob(filepath.Join(dir, "*.seg"))
			if len(files) != 1 || st.Segments != 1 {
				t.Fatalf("segments after acking everything: %v (stats %d)", files, st.Segments)
			}
			// The next record follows on.
			if q, err := s.Append(ctx, payload(304, 100)); err != nil || q != 304 {
				t.Fatalf("Append after acks = %d, %v", q, err)
			}
			checkRecords(t, drain(t, s), []uint64{304}, 100)
		})
	}
}

func TestAppendRejectsOversizedRecord(t *testing.T) {
	s := openT(t, t.TempDir(), Options{})
	_, err := s.Append(context.Background(), make([]byte, MaxRecordSize+1))
	if err == nil || !strings.Contains(err.Error(), "limit") {
		t.Fatalf("Append(16 MiB + 1) = %v, want a size error", err)
	}
	small := openT(t, t.TempDir(), Options{MaxBytes: 64 << 10, SegmentBytes: 8 << 10})
	if _, err := small.Append(context.Background(), make([]byte, 60<<10)); err == nil || !strings.Contains(err.Error(), "max_bytes") {
		t.Fatalf("Append larger than max_bytes = %v, want an error naming max_bytes", err)
	}
}

func TestNextBlocksUntilAppend(t *testing.T) {
	s := openT(t, t.TempDir(), Options{Fsync: FsyncNever})
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	if _, err := s.Next(ctx, 10); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Next on empty spool = %v, want deadline exceeded", err)
	}
	got := make(chan []Record, 1)
	go func() {
		recs, err := s.Next(context.Background(), 10)
		if err != nil {
			t.Error(err)
		}
		got <- recs
	}()
	time.Sleep(20 * time.Millisecond)
	appendN(t, s, 1, 10)
	select {
	case recs := <-got:
		checkRecords(t, recs, []uint64{1}, 10)
	case <-time.After(5 * time.Second):
		t.Fatal("Next did not wake up after Append")
	}
}

func TestRewindResendsUnacked(t *testing.T) {
	s := openT(t, t.TempDir(), Options{Fsync: FsyncNever, MaxBytes: 1 << 20, SegmentBytes: 4 << 10})
	appendN(t, s, 100, 100)
	ctx := context.Background()
	recs, err := s.Next(ctx, 60)
	if err != nil || len(recs) != 60 {
		t.Fatalf("Next(60) = %d records, %v", len(recs), err)
	}
	// The broker acknowledged 1..10 and every third record up to 60.
	s.Ack(seqRangeList(1, 10)...)
	var want []uint64
	for q := uint64(11); q <= 60; q++ {
		if q%3 == 0 {
			s.Ack(q)
		} else {
			want = append(want, q)
		}
	}
	want = append(want, seqRangeList(61, 100)...)
	s.Rewind()
	checkRecords(t, drain(t, s), want, 100)
	// A second rewind with nothing new acked resends the same.
	s.Rewind()
	checkRecords(t, drain(t, s), want, 100)
	// Acks that arrive after the rewind are honoured when reading again.
	s.Ack(11, 13, 14)
	s.Rewind()
	checkRecords(t, drain(t, s), want[3:], 100)
}

func TestReopenWithoutClose(t *testing.T) {
	for _, pol := range []FsyncPolicy{FsyncAlways, FsyncBatch, FsyncNever} {
		t.Run(pol.String(), func(t *testing.T) {
			dir := t.TempDir()
			log, _ := testLogger(t)
			s, err := Open(dir, Options{Fsync: pol, MaxBytes: 1 << 20, SegmentBytes: 4 << 10, AckFlushInterval: 10 * time.Millisecond, Logger: log})
			if err != nil {
				t.Fatal(err)
			}
			appendN(t, s, 200, 50)
			drain(t, s)
			s.Ack(seqRangeList(1, 120)...)
			time.Sleep(50 * time.Millisecond) // let the ack low-watermark be persisted
			s.Ack(seqRangeList(121, 150)...)  // recently acked: may be replayed
			abandon(s)

			s2 := openT(t, dir, Options{Fsync: pol, MaxBytes: 1 << 20, SegmentBytes: 4 << 10})
			recs := drain(t, s2)
			if len(recs) == 0 || recs[0].Seq > 151 || recs[0].Seq < 121 {
				t.Fatalf("after reopen first record %v; want one in 121..151 (acked below 121 persisted)", recs[:min(1, len(recs))])
			}
			checkRecords(t, recs, seqRangeList(recs[0].Seq, 200), 50)
			if q, err := s2.Append(context.Background(), payload(201, 50)); err != nil || q != 201 {
				t.Fatalf("Append after reopen = %d, %v; want seq 201", q, err)
			}
		})
	}
}

func TestSecondOpenFails(t *testing.T) {
	dir := t.TempDir()
	openT(t, dir, Options{})
	if _, err := Open(dir, Options{}); err == nil || !strings.Contains(err.Error(), "in use") {
		t.Fatalf("second Open = %v, want 'in use'", err)
	}
}

// childAppend is the child of TestKillMidAppend: it appends from 4 goroutines
// and prints each seq after its Append returned, until it is killed.
func childAppend(dir, fsync string) int {
	pol, err := ParseFsync(fsync)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 2
	}
	s, err := Open(dir, Options{Fsync: pol, MaxBytes: 64 << 20, SegmentBytes: 256 << 10, Logger: slog.New(slog.NewTextHandler(os.Stderr, nil))})
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 2
	}
	var mu sync.Mutex
	out := bufio.NewWriter(os.Stdout)
	var wg sync.WaitGroup
	for g := 0; g < 4; g++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; ; i++ {
				n := 1 + i%3 // 1..3 records per Append
				data := make([][]byte, n)
				for j := range data {
					data[j] = []byte(fmt.Sprintf("g%d-i%d-j%d", g, i, j))
				}
				first, err := s.Append(context.Background(), data...)
				if err != nil {
					fmt.Fprintln(os.Stderr, err)
					os.Exit(3)
				}
				mu.Lock()
				for j := range data {
					fmt.Fprintf(out, "%d %s\n", first+uint64(j), data[j])
				}
				out.Flush()
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	return 0
}

// TestKillMidAppend runs appenders in a child process (this test binary,
// re-executed), kills it with SIGKILL while it appends, and checks that every
// record whose Append had returned is in the spool after reopening.
func TestKillMidAppend(t *testing.T) {
	for _, fsync := range []string{"never", "batch"} {
		t.Run(fsync, func(t *testing.T) {
			dir := t.TempDir()
			cmd := exec.Command(os.Args[0], "-test.run=^$")
			cmd.Env = append(os.Environ(), "SPOOL_CHILD_DIR="+dir, "SPOOL_CHILD_FSYNC="+fsync)
			var stderr logBuf
			cmd.Stderr = &stderr
			stdout, err := cmd.StdoutPipe()
			if err != nil {
				t.Fatal(err)
			}
			if err := cmd.Start(); err != nil {
				t.Fatal(err)
			}
			acked := map[uint64]string{}
			sc := bufio.NewScanner(stdout)
			killed := false
			for sc.Scan() {
				seq, data, ok := strings.Cut(sc.Text(), " ")
				if !ok {
					continue // the kill cut the line
				}
				q, err := strconv.ParseUint(seq, 10, 64)
				if err != nil {
					continue
				}
				acked[q] = data
				if !killed && len(acked) >= 5000 {
					cmd.Process.Kill() // SIGKILL, mid-append
					killed = true
				}
			}
			err = cmd.Wait()
			if !killed {
				t.Fatalf("child exited before the kill: %v\n%s", err, stderr.String())
			}
			if ws, ok := cmd.ProcessState.Sys().(syscall.WaitStatus); !ok || ws.Signal() != syscall.SIGKILL {
				t.Fatalf("child state %v, want killed by SIGKILL\n%s", cmd.ProcessState, stderr.String())
			}

			log, lb := testLogger(t)
			s := openT(t, dir, Options{Logger: log, MaxBytes: 64 << 20, SegmentBytes: 256 << 10})
			got := map[uint64]string{}
			for _, r := range drain(t, s) {
				got[r.Seq] = string(r.Data)
			}
			missing := 0
			for q, d := range acked {
				if got[q] != d {
					missing++
					if missing < 5 {
						t.Errorf("seq %d: Append returned but after reopen got %q, want %q", q, got[q], d)
					}
				}
			}
			if missing > 0 {
				t.Fatalf("%d of %d acknowledged records missing after SIGKILL", missing, len(acked))
			}
			// Reopened seqs are contiguous from 1 (no corruption skipped).
			keys := make([]uint64, 0, len(got))
			for q := range got {
				keys = append(keys, q)
			}
			sort.Slice(keys, func(i, j int) bool { return keys[i] < keys[j] })
			if keys[0] != 1 || keys[len(keys)-1] != uint64(len(keys)) {
				t.Fatalf("reopened seqs %d..%d with %d records: gap", keys[0], keys[len(keys)-1], len(keys))
			}
			if st := s.Stats(); st.CorruptSkips != 0 {
				t.Fatalf("corruption reported after SIGKILL: %+v\n%s", st, lb.String())
			}
			t.Logf("child appended %d acknowledged records (%d on disk), torn tails repaired: %d", len(acked), len(got), s.Stats().TornTailRepairs)
		})
	}
}

func TestAppendAsyncAndGroupCommit(t *testing.T) {
	s := openT(t, t.TempDir(), Options{Fsync: FsyncBatch, BatchWindow: 5 * time.Millisecond})
	ctx := context.Background()
	var ps []Pending
	for i := uint64(1); i <= 500; i++ {
		p, err := s.AppendAsync(ctx, payload(i, 20))
		if err != nil || p.First != i {
			t.Fatalf("AppendAsync %d = %+v, %v", i, p, err)
		}
		ps = append(ps, p)
	}
	for _, p := range ps {
		must(t, p.Wait(ctx))
	}
	// Concurrent blocking appenders share fsyncs too.
	var wg sync.WaitGroup
	for g := 0; g < 50; g++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if _, err := s.Append(ctx, []byte("x")); err != nil {
				t.Error(err)
			}
		}()
	}
	wg.Wait()
	st := s.Stats()
	if st.Appended != 550 || st.Fsyncs == 0 || st.Fsyncs > 100 {
		t.Fatalf("stats %+v: want 550 records in far fewer fsyncs", st)
	}
	recs := drain(t, s)
	checkRecords(t, recs[:500], seqRangeList(1, 500), 20)
	t.Logf("550 records, %d fsyncs", st.Fsyncs)
}

func TestCloseUnblocks(t *testing.T) {
	log, _ := testLogger(t)
	s, err := Open(t.TempDir(), Options{Logger: log, MaxBytes: 64 << 10, SegmentBytes: 8 << 10})
	must(t, err)
	errs := make(chan error, 2)
	go func() {
		for { // reads everything, then blocks in Next (nothing is acked)
			if _, err := s.Next(context.Background(), 1000); err != nil {
				errs <- err
				return
			}
		}
	}()
	go func() {
		for {
			if _, err := s.Append(context.Background(), make([]byte, 1000)); err != nil {
				errs <- err
				return
			}
		}
	}()
	time.Sleep(100 * time.Millisecond)
	must(t, s.Close())
	for i := 0; i < 2; i++ {
		select {
		case err := <-errs:
			if !errors.Is(err, ErrClosed) {
				t.Fatalf("blocked call after Close = %v, want ErrClosed", err)
			}
		case <-time.After(5 * time.Second):
			t.Fatal("Close did not unblock Append/Next")
		}
	}
}
