package spool

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
)

// closedSpoolWith writes n records of size bytes into one segment of a fresh
// spool, closes it and returns the dir and the segment path.
func closedSpoolWith(t *testing.T, n, size int) (dir, seg string) {
	t.Helper()
	dir = t.TempDir()
	log, _ := testLogger(t)
	s, err := Open(dir, Options{Fsync: FsyncNever, Logger: log})
	if err != nil {
		t.Fatal(err)
	}
	appendN(t, s, n, size)
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	files, _ := filepath.Glob(filepath.Join(dir, "*.seg"))
	if len(files) != 1 {
		t.Fatalf("want one segment, got %v", files)
	}
	return dir, files[0]
}

// recordOffset is the offset of record seq (1-based) when all records have size bytes.
func recordOffset(seq uint64, size int) int64 {
	return segHeaderSize + int64(seq-1)*framedSize(size)
}

func TestTornTail(t *testing.T) {
	const n, size = 20, 100
	for _, tc := range []struct {
		name    string
		damage  func(t *testing.T, path string)
		wantTo  uint64 // last record kept
		wantEnd int64  // segment size after repair
	}{
		{"last record cut by 3 bytes", func(t *testing.T, p string) {
			fi, _ := os.Stat(p)
			must(t, os.Truncate(p, fi.Size()-3))
		}, n - 1, recordOffset(n, size)},
		{"header cut", func(t *testing.T, p string) {
			must(t, os.Truncate(p, recordOffset(n, size)+7))
		}, n - 1, recordOffset(n, size)},
		{"garbage appended", func(t *testing.T, p string) {
			appendBytes(t, p, []byte("\x13\x37garbage after the last record, not a record"))
		}, n, recordOffset(n+1, size)},
		{"zeros appended", func(t *testing.T, p string) {
			appendBytes(t, p, make([]byte, 4096))
		}, n, recordOffset(n+1, size)},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir, seg := closedSpoolWith(t, n, size)
			tc.damage(t, seg)
			log, lb := testLogger(t)
			s := openT(t, dir, Options{Logger: log})
			if st := s.Stats(); st.TornTailRepairs != 1 || st.CorruptSkips != 0 {
				t.Fatalf("stats %+v, want one torn tail repair", st)
			}
			if lb.count("torn tail truncated") != 1 || !strings.Contains(lb.String(), "file="+seg) {
				t.Fatalf("log lacks the torn-tail line naming %s:\n%s", seg, lb.String())
			}
			if fi, _ := os.Stat(seg); fi.Size() != tc.wantEnd {
				t.Fatalf("segment size after repair %d, want %d", fi.Size(), tc.wantEnd)
			}
			checkRecords(t, drain(t, s), seqRangeList(1, tc.wantTo), size)
			// Appends continue after the last intact record.
			if q, err := s.Append(context.Background(), payload(tc.wantTo+1, size)); err != nil || q != tc.wantTo+1 {
				t.Fatalf("Append after repair = %d, %v", q, err)
			}
			must(t, s.Close())
			s2 := openT(t, dir, Options{})
			if st := s2.Stats(); st.TornTailRepairs != 0 || st.Records != int64(tc.wantTo+1) {
				t.Fatalf("second reopen: %+v", st)
			}
		})
	}
}

func TestMidSegmentCorruption(t *testing.T) {
	const n, size = 100, 100
	for _, tc := range []struct {
		name     string
		off      int64 // where to overwrite
		with     []byte
		lostFrom uint64
		lostTo   uint64
	}{
		{"payload byte flipped", recordOffset(50, size) + 40, []byte{0xff}, 50, 50},
		{"length field huge", recordOffset(50, size), []byte{0xff, 0xff, 0xff, 0x7f}, 50, 50},
		{"seq field changed", recordOffset(50, size) + 8, []byte{7}, 50, 50},
		{"300 bytes overwritten", recordOffset(50, size) + 10, bytes.Repeat([]byte{0xa5}, 300), 50, 52},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir, seg := closedSpoolWith(t, n, size)
			writeAt(t, seg, tc.off, tc.with)
			log, lb := testLogger(t)
			s := openT(t, dir, Options{Logger: log})
			st := s.Stats()
			lost := int64(tc.lostTo - tc.lostFrom + 1)
			if st.CorruptSkips != 1 || st.TornTailRepairs != 0 || st.Records != n-lost {
				t.Fatalf("stats %+v, want 1 corrupt skip and %d records", st, n-lost)
			}
			line := lb.String()
			for _, want := range []string{"corrupt data skipped", "file=" + seg, "offset=" + strconv.FormatInt(recordOffset(tc.lostFrom, size), 10),
				"lost_seq_from=" + strconv.FormatUint(tc.lostFrom, 10), "lost_seq_to=" + strconv.FormatUint(tc.lostTo, 10)} {
				if !strings.Contains(line, want) {
					t.Fatalf("log lacks %q:\n%s", want, line)
				}
			}
			want := append(seqRangeList(1, tc.lostFrom-1), seqRangeList(tc.lostTo+1, n)...)
			recs := drain(t, s)
			checkRecords(t, recs, want, size)
			// Acking every surviving record releases the segment: the hole
			// does not hold the low-watermark back.
			s.Ack(want...)
			if st := s.Stats(); st.Records != 0 || st.Segments != 0 {
				t.Fatalf("after acking all survivors: %+v", st)
			}
			if q, err := s.Append(context.Background(), payload(n+1, size)); err != nil || q != n+1 {
				t.Fatalf("Append = %d, %v; want seq %d", q, err, n+1)
			}
		})
	}
}

func TestCorruptionFoundWhileReading(t *testing.T) {
	const size = 100
	dir := t.TempDir()
	log, lb := testLogger(t)
	s := openT(t, dir, Options{Fsync: FsyncNever, Logger: log})
	appendN(t, s, 30, size)
	files, _ := filepath.Glob(filepath.Join(dir, "*.seg"))
	writeAt(t, files[0], recordOffset(10, size)+30, []byte("XXXX"))
	recs := drain(t, s)
	checkRecords(t, recs, append(seqRangeList(1, 9), seqRangeList(11, 30)...), size)
	if st := s.Stats(); st.CorruptSkips != 1 || st.Records != 29 {
		t.Fatalf("stats %+v, want one skip and 29 records", st)
	}
	if !strings.Contains(lb.String(), "corrupt data skipped while reading") {
		t.Fatalf("no log line:\n%s", lb.String())
	}
}

func TestBadMagicStopsOpen(t *testing.T) {
	dir, seg := closedSpoolWith(t, 5, 10)
	writeAt(t, seg, 0, []byte("NOTSPOOL"))
	_, err := Open(dir, Options{})
	if err == nil || !strings.Contains(err.Error(), seg) || !strings.Contains(err.Error(), "offset 0") || !strings.Contains(err.Error(), "move the file") {
		t.Fatalf("Open = %v; want an error naming %s, offset 0 and what to do", err, seg)
	}
}

func TestDamagedAckFile(t *testing.T) {
	dir, _ := closedSpoolWith(t, 10, 10)
	must(t, os.WriteFile(filepath.Join(dir, "ack"), []byte("junk"), 0o600))
	log, lb := testLogger(t)
	s := openT(t, dir, Options{Logger: log})
	checkRecords(t, drain(t, s), seqRangeList(1, 10), 10)
	if !strings.Contains(lb.String(), "ack file unreadable") {
		t.Fatalf("no warning about the ack file:\n%s", lb.String())
	}
}

func must(t *testing.T, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

func appendBytes(t *testing.T, path string, b []byte) {
	t.Helper()
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_APPEND, 0)
	must(t, err)
	_, err = f.Write(b)
	must(t, err)
	must(t, f.Close())
}

func writeAt(t *testing.T, path string, off int64, b []byte) {
	t.Helper()
	f, err := os.OpenFile(path, os.O_WRONLY, 0)
	must(t, err)
	_, err = f.WriteAt(b, off)
	must(t, err)
	must(t, f.Close())
}
