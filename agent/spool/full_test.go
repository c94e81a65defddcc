package spool

import (
	"context"
	"errors"
	"fmt"
	"math/rand"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

func TestFullBlock(t *testing.T) {
	const size = 1000
	s := openT(t, t.TempDir(), Options{Fsync: FsyncNever, MaxBytes: 64 << 10, SegmentBytes: 8 << 10, Full: FullBlock})
	// Fill until an Append with a short deadline blocks.
	var n uint64
	for {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Millisecond)
		_, err := s.Append(ctx, payload(n+1, size))
		cancel()
		if err != nil {
			if !errors.Is(err, context.DeadlineExceeded) || !strings.Contains(err.Error(), "is full") {
				t.Fatalf("Append on a full spool = %v; want deadline exceeded naming 'is full'", err)
			}
			break
		}
		n++
		if n > 1000 {
			t.Fatal("spool never filled up")
		}
	}
	if st := s.Stats(); st.Bytes > 64<<10 || st.Records != int64(n) || st.Dropped != 0 {
		t.Fatalf("full spool stats %+v (records want %d)", st, n)
	}
	// A blocked Append returns once acks free a segment.
	done := make(chan error, 1)
	go func() {
		q, err := s.Append(context.Background(), payload(n+1, size))
		if err == nil && q != n+1 {
			err = fmt.Errorf("seq %d, want %d", q, n+1)
		}
		done <- err
	}()
	select {
	case err := <-done:
		t.Fatalf("Append on full spool returned without an ack: %v", err)
	case <-time.After(100 * time.Millisecond):
	}
	recs, err := s.Next(context.Background(), 20)
	must(t, err)
	for _, r := range recs {
		s.Ack(r.Seq)
	}
	select {
	case err := <-done:
		must(t, err)
	case <-time.After(5 * time.Second):
		t.Fatal("Append still blocked after acks freed space")
	}
	if st := s.Stats(); st.Bytes > 64<<10 || st.Dropped != 0 {
		t.Fatalf("stats %+v", st)
	}
}

func TestFullDropOldest(t *testing.T) {
	const size, n = 1000, 500
	log, lb := testLogger(t)
	s := openT(t, t.TempDir(), Options{Fsync: FsyncBatch, MaxBytes: 64 << 10, SegmentBytes: 8 << 10, Full: FullDropOldest, Logger: log})
	appendN(t, s, 10, size)
	recs, err := s.Next(context.Background(), 10) // in flight when they get dropped
	must(t, err)
	s.Ack(recs[3].Seq) // one acked out of order: not counted as dropped
	for i := 11; i <= n; i++ {
		if st := s.Stats(); st.Bytes > 64<<10 {
			t.Fatalf("Bytes %d over MaxBytes", st.Bytes)
		}
		if _, err := s.Append(context.Background(), payload(uint64(i), size)); err != nil {
			t.Fatalf("Append %d: %v", i, err)
		}
	}
	st := s.Stats()
	rest := drain(t, s)
	if len(rest) == 0 {
		t.Fatal("nothing left after drops")
	}
	first := rest[0].Seq
	checkRecords(t, rest, seqRangeList(first, n), size)
	if st.Dropped != first-1-1 || st.Records != int64(len(rest)) || st.Bytes > 64<<10 {
		t.Fatalf("stats %+v: want Dropped %d (seqs below %d less the one acked), Records %d", st, first-2, first, len(rest))
	}
	if c := lb.count("dropping oldest"); c != 1 {
		t.Fatalf("drop logged %d times, want once per burst:\n%s", c, lb.String())
	}
}

// mountTmpfs mounts a tmpfs with the given options on a fresh dir and
// unmounts it at cleanup. The tests run as root (CI too).
func mountTmpfs(t *testing.T, opts string) string {
	t.Helper()
	dir := filepath.Join(t.TempDir(), "mnt")
	must(t, os.Mkdir(dir, 0o700))
	if out, err := exec.Command("mount", "-t", "tmpfs", "-o", opts, "tmpfs", dir).CombinedOutput(); err != nil {
		t.Fatalf("mount -t tmpfs -o %s tmpfs %s: %v: %s (these tests need root and tmpfs)", opts, dir, err, out)
	}
	t.Cleanup(func() {
		if out, err := exec.Command("umount", dir).CombinedOutput(); err != nil {
			t.Errorf("umount %s: %v: %s", dir, err, out)
		}
	})
	return dir
}

func TestDiskFull(t *testing.T) {
	const size = 1000
	mnt := mountTmpfs(t, "size=1m")
	dir := filepath.Join(mnt, "spool")
	log, lb := testLogger(t)
	opts := Options{Fsync: FsyncBatch, MaxBytes: 64 << 20, SegmentBytes: 64 << 10, Logger: log}
	s, err := Open(dir, opts)
	must(t, err)
	var n uint64
	var appendErr error
	for ; n < 10000; n++ {
		if _, appendErr = s.Append(context.Background(), payload(n+1, size)); appendErr != nil {
			break
		}
	}
	if !errors.Is(appendErr, syscall.ENOSPC) || !strings.Contains(appendErr.Error(), dir) || !strings.Contains(appendErr.Error(), "free space") {
		t.Fatalf("Append on a full disk = %v; want ENOSPC naming %s and what to do", appendErr, dir)
	}
	if n < 500 {
		t.Fatalf("only %d records before ENOSPC on a 1 MiB tmpfs", n)
	}
	// Still full: fails again, and the records before are intact.
	if _, err := s.Append(context.Background(), payload(n+1, size)); !errors.Is(err, syscall.ENOSPC) {
		t.Fatalf("second Append on a full disk = %v", err)
	}
	if st := s.Stats(); st.Records != int64(n) || st.Appended != n {
		t.Fatalf("stats after ENOSPC %+v, want %d records", st, n)
	}
	recs := drain(t, s)
	checkRecords(t, recs, seqRangeList(1, n), size)
	// Acks free whole segments; appends then succeed with the next seq.
	half := recs[:len(recs)/2]
	for _, r := range half {
		s.Ack(r.Seq)
	}
	q, err := s.Append(context.Background(), payload(n+1, size))
	if err != nil || q != n+1 {
		t.Fatalf("Append after freeing space = %d, %v; want seq %d", q, err, n+1)
	}
	must(t, s.Close())
	if !strings.Contains(lb.String(), "append failed; nothing durable was lost") {
		t.Fatalf("failure not logged:\n%s", lb.String())
	}
	// Reopen: every unacked record that Append confirmed is there, no repair needed.
	s2 := openT(t, dir, opts)
	if st := s2.Stats(); st.TornTailRepairs != 0 || st.CorruptSkips != 0 {
		t.Fatalf("reopen after ENOSPC needed repairs: %+v", st)
	}
	recs = drain(t, s2)
	checkRecords(t, recs, seqRangeList(recs[0].Seq, n+1), size)
	if recs[0].Seq > half[len(half)-1].Seq+1 {
		t.Fatalf("first record after reopen %d: unacked records lost", recs[0].Seq)
	}
}

func TestDirNotWritable(t *testing.T) {
	mnt := mountTmpfs(t, "size=1m")
	dir := filepath.Join(mnt, "spool")
	must(t, os.Mkdir(dir, 0o700))
	if out, err := exec.Command("mount", "-o", "remount,ro", mnt).CombinedOutput(); err != nil {
		t.Fatalf("remount ro: %v: %s", err, out)
	}
	_, err := Open(dir, Options{})
	if !errors.Is(err, syscall.EROFS) || !strings.Contains(err.Error(), dir) || !strings.Contains(err.Error(), "not writable") {
		t.Fatalf("Open on a read-only dir = %v; want EROFS naming %s", err, dir)
	}
	_, err = Open(filepath.Join(mnt, "new"), Options{})
	if !errors.Is(err, syscall.EROFS) || !strings.Contains(err.Error(), filepath.Join(mnt, "new")) {
		t.Fatalf("Open creating a dir on a read-only fs = %v", err)
	}
}

// TestConcurrent runs appenders, a consumer that acks out of order and
// rewinds, and a blocking size bound together (run with -race).
func TestConcurrent(t *testing.T) {
	const appenders, perAppender = 8, 400
	s := openT(t, t.TempDir(), Options{Fsync: FsyncBatch, BatchWindow: 200 * time.Microsecond, MaxBytes: 128 << 10, SegmentBytes: 4 << 10, Full: FullBlock})
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()

	var mu sync.Mutex
	appended := map[uint64]string{}
	var wg sync.WaitGroup
	for g := 0; g < appenders; g++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; i < perAppender; {
				k := min(1+i%3, perAppender-i)
				data := make([][]byte, k)
				for j := range data {
					data[j] = []byte(fmt.Sprintf("g%d-%d", g, i+j))
				}
				first, err := s.Append(ctx, data...)
				if err != nil {
					t.Errorf("Append: %v", err)
					return
				}
				mu.Lock()
				for j := range data {
					appended[first+uint64(j)] = string(data[j])
				}
				mu.Unlock()
				i += k
			}
		}()
	}
	received := map[uint64]string{}
	rng := rand.New(rand.NewSource(1))
	for round := 0; len(received) < appenders*perAppender; round++ {
		recs, err := s.Next(ctx, 1+rng.Intn(64))
		if err != nil {
			t.Fatalf("Next after %d records: %v", len(received), err)
		}
		rng.Shuffle(len(recs), func(i, j int) { recs[i], recs[j] = recs[j], recs[i] })
		for i, r := range recs {
			received[r.Seq] = string(r.Data)
			if i%5 != 4 || round%7 != 0 { // some acks get "lost": resent after Rewind
				s.Ack(r.Seq)
			}
		}
		if round%7 == 6 {
			s.Rewind()
		}
	}
	wg.Wait()
	// Ack the remaining (resent) ones.
	for s.Stats().Records > 0 {
		s.Rewind()
		recs, err := s.Next(ctx, 1000)
		must(t, err)
		for _, r := range recs {
			s.Ack(r.Seq)
		}
	}
	mu.Lock()
	defer mu.Unlock()
	if len(appended) != appenders*perAppender {
		t.Fatalf("appended %d records, want %d", len(appended), appenders*perAppender)
	}
	for q, d := range appended {
		if received[q] != d {
			t.Fatalf("seq %d: received %q, appended %q", q, received[q], d)
		}
	}
	if st := s.Stats(); st.Records != 0 || st.Appended != appenders*perAppender || st.Bytes > 128<<10 {
		t.Fatalf("final stats %+v", st)
	}
}

// TestConcurrentDropOldest: parallel appenders on a spool that keeps
// overflowing never block and never exceed MaxBytes; the books balance.
func TestConcurrentDropOldest(t *testing.T) {
	s := openT(t, t.TempDir(), Options{Fsync: FsyncBatch, BatchWindow: 500 * time.Microsecond, MaxBytes: 64 << 10, SegmentBytes: 8 << 10, Full: FullDropOldest})
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	var wg sync.WaitGroup
	for g := 0; g < 8; g++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; i < 300; i++ {
				if _, err := s.Append(ctx, make([]byte, 500)); err != nil {
					t.Errorf("Append: %v", err)
					return
				}
				if st := s.Stats(); st.Bytes > 64<<10 {
					t.Errorf("Bytes %d over MaxBytes", st.Bytes)
					return
				}
			}
		}()
	}
	wg.Wait()
	st := s.Stats()
	if st.Appended != 2400 || st.Dropped == 0 || st.Records != int64(st.Appended-st.Dropped) {
		t.Fatalf("stats %+v: want Records = Appended - Dropped", st)
	}
	if recs := drain(t, s); int64(len(recs)) != st.Records {
		t.Fatalf("Next returned %d records, Stats says %d", len(recs), st.Records)
	}
}

// TestAppendDirNotWritable: the dir becomes unwritable while the spool is
// open (chattr +i, which binds root too); the Append that needs a new segment
// fails naming the dir and the cause, and the durable records stay readable.
func TestAppendDirNotWritable(t *testing.T) {
	dir := t.TempDir()
	s := openT(t, dir, Options{Fsync: FsyncBatch, MaxBytes: 1 << 20, SegmentBytes: 4 << 10})
	appendN(t, s, 30, 100) // fills the first segment
	if out, err := exec.Command("chattr", "+i", dir).CombinedOutput(); err != nil {
		t.Fatalf("chattr +i %s: %v: %s (needs root and ext4)", dir, err, out)
	}
	t.Cleanup(func() { exec.Command("chattr", "-i", dir).Run() })
	var err error
	for i := 31; i < 100 && err == nil; i++ {
		_, err = s.Append(context.Background(), payload(uint64(i), 100))
	}
	if !errors.Is(err, syscall.EPERM) || !strings.Contains(err.Error(), dir) || !strings.Contains(err.Error(), "not writable") {
		t.Fatalf("Append into an immutable dir = %v; want EPERM naming %s", err, dir)
	}
	st := s.Stats()
	checkRecords(t, drain(t, s), seqRangeList(1, st.Appended), 100)
	must(t, exec.Command("chattr", "-i", dir).Run())
	if q, err := s.Append(context.Background(), payload(st.Appended+1, 100)); err != nil || q != st.Appended+1 {
		t.Fatalf("Append once writable again = %d, %v", q, err)
	}
}
