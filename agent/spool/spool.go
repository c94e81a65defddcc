// Package spool is the agent's durable on-disk queue between the telemetry
// batcher and the MQTT publisher.
//
// # What it promises
//
//   - Append assigns consecutive sequence numbers and returns once the records
//     are durable as the fsync policy says: FsyncAlways and FsyncBatch after an
//     fsync(2) of the segment, FsyncNever after write(2) (they survive a crash
//     of the process, not of the machine). Concurrent callers share one write
//     and one fsync (group commit). FsyncAlways syncs as soon as the previous
//     fsync is done; FsyncBatch first waits (at most BatchWindow) for the group
//     to grow to the size of the previous one, so groups are larger.
//   - Next hands records to one consumer in sequence order; Ack releases them
//     in any order; Rewind goes back to the oldest unacknowledged record so a
//     publisher resends what the broker never acknowledged (at-least-once).
//   - The acknowledged low-watermark is persisted in the file "ack" (rewritten
//     atomically at most every Options.AckFlushInterval and at Close), and
//     segments whose records are all acknowledged are deleted, so after a crash
//     only unacknowledged and recently acknowledged records are replayed.
//   - The segment files never exceed MaxBytes in total: FullBlock makes Append
//     wait until Ack frees space, FullDropOldest deletes the oldest segment,
//     counts its unacknowledged records in Stats.Dropped and logs once per burst.
//   - Open recovers after a crash: every record is checked against its
//     CRC-32C; a torn tail is truncated (logged, Stats.TornTailRepairs);
//     damage in the middle of a segment is skipped up to the next valid record
//     (logged at error level with file, offsets and the lost seqs,
//     Stats.CorruptSkips). A file without the segment magic stops Open with an
//     error naming it.
//   - A full disk (ENOSPC) or an unwritable dir fails the Append with an error
//     that names the dir and the cause; the partial write is truncated away and
//     records made durable earlier stay intact.
//
// # Layout
//
// dir/LOCK (flock, one process per spool), dir/ack (low-watermark: uint64 seq
// + CRC-32C), and segments dir/<first seq, 20 digits>.seg: the 8-byte magic
// "TPMSPL1\n" followed by records framed as
//
//	uint32 length | uint32 CRC-32C(length, seq, payload) | uint64 seq | payload
//
// little endian, payload at most 16 MiB.
//
// # Why not a library
//
// Compared: github.com/joncrlsn/dque (gob-encoded items in segments, no
// checksum, dequeue removes: no out-of-order acks, no group commit),
// github.com/beeker1121/goque (LevelDB: compactions and a second on-disk
// format; dequeue removes, no ack window, no size policy),
// github.com/nsqio/go-diskqueue (length-prefixed without CRC, one reader that
// removes, sync every N messages rather than group commit, renames a corrupt
// file ".bad" and loses the rest of it), github.com/tidwall/wal (no per-record
// checksum, an fsync per Write call with no sharing across goroutines,
// TruncateFront needs in-order release) and github.com/barnowlsnest/go-wallib
// (CRC-32C and group commit, but mid-log corruption is a hard error and there
// are no out-of-order acks or full policy). Each would need the ack window,
// the size bound and the recovery rules built on top, so the spool is written
// here in a few hundred lines on the standard library.
//
// # Throughput
//
// Under FsyncNever an Append with nobody else writing does its own write(2)
// (no goroutine hand-off). Under FsyncBatch and FsyncAlways a blocking
// Append costs an fsync round trip, so a single producer should hand over
// many records per Append or use AppendAsync and Wait later; concurrent
// producers share fsyncs. Figures: go test -run xxx -bench Append ./agent/spool
//
// # Memory
//
// No per-record index is kept: the reader streams segments from disk. Memory
// is the group being written, the set of out-of-order acks above the
// low-watermark (bounded by the publisher's in-flight window) and one buffer
// per Next call.
package spool

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"log/slog"
	"os"
	"path/filepath"
	"sync"
	"syscall"
	"time"
)

// FsyncPolicy says when an appended record counts as durable.
type FsyncPolicy int

const (
	// FsyncBatch: Append waits for an fsync shared by a group of records:
	// the committer lets a group grow until it is as large as the previous
	// one or Options.BatchWindow has passed since its first record.
	FsyncBatch FsyncPolicy = iota
	// FsyncAlways: Append waits for an fsync started as soon as the previous
	// one finished; concurrent Appends share it.
	FsyncAlways
	// FsyncNever: Append waits for write(2) only; the kernel writes back later.
	FsyncNever
)

// ParseFsync parses the config value spool.fsync: "always", "batch" or "never".
func ParseFsync(s string) (FsyncPolicy, error) {
	switch s {
	case "always":
		return FsyncAlways, nil
	case "batch", "":
		return FsyncBatch, nil
	case "never":
		return FsyncNever, nil
	}
	return 0, fmt.Errorf("spool: fsync %q: want always, batch or never", s)
}

// String returns the config spelling of p.
func (p FsyncPolicy) String() string {
	switch p {
	case FsyncAlways:
		return "always"
	case FsyncBatch:
		return "batch"
	case FsyncNever:
		return "never"
	}
	return fmt.Sprintf("FsyncPolicy(%d)", int(p))
}

// FullPolicy says what Append does when the spool holds MaxBytes.
type FullPolicy int

const (
	// FullBlock makes Append wait until acknowledgements free space (or ctx ends).
	FullBlock FullPolicy = iota
	// FullDropOldest deletes the oldest segment, unacknowledged records included.
	FullDropOldest
)

// ParseFullPolicy parses the config value for the full policy: "block" or "drop_oldest".
func ParseFullPolicy(s string) (FullPolicy, error) {
	switch s {
	case "block", "":
		return FullBlock, nil
	case "drop_oldest":
		return FullDropOldest, nil
	}
	return 0, fmt.Errorf("spool: full policy %q: want block or drop_oldest", s)
}

// String returns the config spelling of p.
func (p FullPolicy) String() string {
	switch p {
	case FullBlock:
		return "block"
	case FullDropOldest:
		return "drop_oldest"
	}
	return fmt.Sprintf("FullPolicy(%d)", int(p))
}

// Defaults for zero Options fields.
const (
	DefaultMaxBytes         = 256 << 20
	DefaultBatchWindow      = 2 * time.Millisecond
	DefaultAckFlushInterval = 200 * time.Millisecond
	maxDefaultSegmentBytes  = 16 << 20
	minSegmentBytes         = 4 << 10
)

// Options configure a Spool. Zero values take the defaults.
type Options struct {
	// MaxBytes bounds the total size of the segment files (default 256 MiB).
	MaxBytes int64
	// SegmentBytes is the size at which a new segment file starts (default
	// MaxBytes/8, at most 16 MiB). At most MaxBytes/2.
	SegmentBytes int64
	// Fsync is the durability policy (default FsyncBatch).
	Fsync FsyncPolicy
	// Full is the policy when MaxBytes is reached (default FullBlock).
	Full FullPolicy
	// BatchWindow is the longest a record waits for others to join its
	// group before the fsync under FsyncBatch (default 2 ms).
	BatchWindow time.Duration
	// AckFlushInterval is how often the ack low-watermark is persisted
	// (default 200 ms).
	AckFlushInterval time.Duration
	// Logger receives recovery, drop and error reports (default slog.Default()).
	Logger *slog.Logger
}

// Stats is a snapshot of the spool's counters.
type Stats struct {
	Records         int64  // unacknowledged records (approximate after corruption was skipped)
	Bytes           int64  // bytes of segment files not yet deleted (what MaxBytes bounds); acked records count until their segment goes
	Appended        uint64 // records made durable since Open
	Acked           uint64 // acknowledgements accepted since Open
	Dropped         uint64 // unacknowledged records deleted by FullDropOldest since Open
	Segments        int    // segment files
	TornTailRepairs uint64 // torn tails truncated at Open
	CorruptSkips    uint64 // damaged regions skipped (Open or Next)
	Fsyncs          uint64 // fsync calls on segments since Open
}

// ErrClosed is returned by calls on a closed Spool.
var ErrClosed = errors.New("spool: closed")

// seqRange is an inclusive range of seqs that do not exist (lost to corruption).
type seqRange struct{ from, to uint64 }

// Spool is a durable FIFO of opaque records. Append, Ack, Stats and Close are
// safe for concurrent use; Next and Rewind belong to one consumer (they are
// serialized against each other, and are safe to call alongside the rest).
type Spool struct {
	dir  string
	opts Options
	log  *slog.Logger
	lock *os.File

	mu            sync.Mutex
	segs          []*segment // oldest first
	active        *segment   // segment receiving appends, nil until the first Append after Open
	nextSeq       uint64     // seq for the next appended record
	durSeq        uint64     // last durable seq
	lowWater      uint64     // every seq below is acknowledged (or lost)
	acked         map[uint64]struct{}
	holes         []seqRange
	total         int64 // sum of segment sizes
	pend          []chunk
	pendBytes     int64
	pendRecs      int       // records in pend
	pendSince     time.Time // when the first record in pend was queued
	lastGroupRecs int       // records in the group written last (FsyncBatch gathers up to this many)
	group         *commitGroup
	writing       bool    // a group is being written (by the committer or inline)
	flushBuf      []chunk // scratch for the group being written (guarded by writing)
	freeBufs      [][]byte
	dataCh        chan struct{} // closed when readers have something new to look at
	dataWanted    bool          // a reader holds dataCh
	spaceCh       chan struct{} // closed when space was freed
	spaceWanted   bool          // an appender holds spaceCh
	closed        bool
	dropLast      time.Time // last drop, for logging once per burst
	dropBurst     uint64    // records dropped in the current burst
	persisted     uint64    // low-watermark in the ack file
	st            Stats

	kick    chan struct{}
	closing chan struct{}
	wg      sync.WaitGroup

	readMu sync.Mutex
	rd     reader
}

// Open opens or creates the spool in dir (mode 0700), recovers it after a
// crash and starts its committer. Only one process may hold a spool dir.
func Open(dir string, opts Options) (*Spool, error) {
	if opts.MaxBytes == 0 {
		opts.MaxBytes = DefaultMaxBytes
	}
	if opts.SegmentBytes == 0 {
		opts.SegmentBytes = min(opts.MaxBytes/8, maxDefaultSegmentBytes)
		opts.SegmentBytes = max(opts.SegmentBytes, minSegmentBytes)
	}
	if opts.BatchWindow == 0 {
		opts.BatchWindow = DefaultBatchWindow
	}
	if opts.AckFlushInterval == 0 {
		opts.AckFlushInterval = DefaultAckFlushInterval
	}
	if opts.Logger == nil {
		opts.Logger = slog.Default()
	}
	if opts.SegmentBytes < minSegmentBytes || opts.SegmentBytes > opts.MaxBytes/2 {
		return nil, fmt.Errorf("spool: segment size %d bytes with max_bytes %d: want at least %d and at most half of max_bytes", opts.SegmentBytes, opts.MaxBytes, minSegmentBytes)
	}
	if opts.Fsync < FsyncBatch || opts.Fsync > FsyncNever {
		return nil, fmt.Errorf("spool: %v: unknown fsync policy", opts.Fsync)
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("spool: create dir %s: %w", dir, err)
	}
	lock, err := os.OpenFile(filepath.Join(dir, "LOCK"), os.O_CREATE|os.O_RDWR, 0o600)
	if err != nil {
		return nil, fmt.Errorf("spool: dir %s is not writable: %w", dir, err)
	}
	if err := syscall.Flock(int(lock.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); err != nil {
		lock.Close()
		return nil, fmt.Errorf("spool: dir %s is in use by another process (flock %s: %w); stop it or use another spool.dir", dir, lock.Name(), err)
	}
	s := &Spool{
		dir:     dir,
		opts:    opts,
		log:     opts.Logger.With("spool", dir),
		lock:    lock,
		acked:   make(map[uint64]struct{}),
		group:   newGroup(),
		dataCh:  make(chan struct{}),
		spaceCh: make(chan struct{}),
		kick:    make(chan struct{}, 1),
		closing: make(chan struct{}),
	}
	if err := s.recover(); err != nil {
		lock.Close()
		return nil, err
	}
	s.wg.Add(2)
	go s.commitLoop()
	go s.ackLoop()
	return s, nil
}

// recover rebuilds the in-memory state from dir: the ack file, then every
// segment, checked record by record.
func (s *Spool) recover() error {
	lw, err := readAckFile(filepath.Join(s.dir, "ack"))
	if err != nil {
		s.log.Warn("spool: ack file unreadable; unacknowledged state starts at the oldest record (records may be resent)", "err", err)
		lw = 0
	}
	segs, err := listSegments(s.dir)
	if err != nil {
		return err
	}
	var prev uint64
	for _, seg := range segs {
		if seg.first <= prev {
			return fmt.Errorf("spool: %s: first seq %d overlaps the previous segment (last seq %d); move the file out of the spool dir", seg.path, seg.first, prev)
		}
		f, err := os.OpenFile(seg.path, os.O_RDWR, 0)
		if err != nil {
			return fmt.Errorf("spool: open %s: %w", seg.path, err)
		}
		fi, err := f.Stat()
		if err != nil {
			f.Close()
			return fmt.Errorf("spool: stat %s: %w", seg.path, err)
		}
		res, err := scanSegment(f, fi.Size(), max(prev, seg.first-1))
		if err != nil {
			f.Close()
			return err
		}
		for _, c := range res.corrupt {
			s.log.Error("spool: corrupt data skipped", "file", seg.path, "offset", c.off, "bytes", c.end-c.off,
				"lost_seq_from", c.lostFrom, "lost_seq_to", c.lostTo)
			s.st.CorruptSkips++
			if c.lostTo >= c.lostFrom {
				s.holes = append(s.holes, seqRange{c.lostFrom, c.lostTo})
			}
		}
		if res.badTail {
			s.log.Warn("spool: torn tail truncated", "file", seg.path, "offset", res.end, "bytes", fi.Size()-res.end)
			s.st.TornTailRepairs++
			if res.count > 0 {
				if err := f.Truncate(res.end); err != nil {
					f.Close()
					return fmt.Errorf("spool: truncate torn tail of %s at offset %d: %w", seg.path, res.end, err)
				}
			}
		}
		f.Close()
		if res.count == 0 {
			if err := os.Remove(seg.path); err != nil {
				return fmt.Errorf("spool: remove empty segment %s: %w", seg.path, err)
			}
			continue
		}
		seg.last, seg.durLast = res.last, res.last
		seg.size, seg.durSize = res.end, res.end
		prev = res.last
		s.segs = append(s.segs, seg)
		s.total += seg.size
	}
	s.nextSeq = max(prev+1, lw, 1)
	s.durSeq = s.nextSeq - 1
	s.lowWater = lw
	if len(s.segs) > 0 {
		s.lowWater = max(lw, s.segs[0].first)
	} else {
		s.lowWater = s.nextSeq
	}
	s.persisted = lw
	s.advanceLocked()
	s.rd.next = s.lowWater
	s.log.Info("spool: opened", "segments", len(s.segs), "bytes", s.total, "unacked_from", s.lowWater, "next_seq", s.nextSeq,
		"fsync", s.opts.Fsync.String(), "full", s.opts.Full.String(), "max_bytes", s.opts.MaxBytes)
	return nil
}

// Ack marks records as delivered, in any order. Unknown or repeated seqs are
// ignored. Segments whose records are all acknowledged are deleted.
func (s *Spool) Ack(seqs ...uint64) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, q := range seqs {
		if q < s.lowWater || q > s.durSeq {
			continue
		}
		if _, dup := s.acked[q]; dup {
			continue
		}
		s.acked[q] = struct{}{}
		s.st.Acked++
	}
	s.advanceLocked()
}

// advanceLocked moves the low-watermark over acknowledged seqs and holes and
// deletes the segments below it.
func (s *Spool) advanceLocked() {
	for {
		if _, ok := s.acked[s.lowWater]; ok {
			delete(s.acked, s.lowWater)
			s.lowWater++
			continue
		}
		for len(s.holes) > 0 && s.holes[0].to < s.lowWater {
			s.holes = s.holes[1:]
		}
		if len(s.holes) > 0 && s.holes[0].from <= s.lowWater {
			s.lowWater = s.holes[0].to + 1
			continue
		}
		break
	}
	freed := false
	for len(s.segs) > 0 {
		seg := s.segs[0]
		if seg.last >= s.lowWater || seg == s.active {
			break
		}
		s.removeSegmentLocked(seg)
		freed = true
	}
	if freed {
		s.notifySpaceLocked()
	}
}

// removeSegmentLocked deletes the oldest segment seg.
func (s *Spool) removeSegmentLocked(seg *segment) {
	if seg.f != nil {
		seg.f.Close()
		seg.f = nil
	}
	if err := os.Remove(seg.path); err != nil && !errors.Is(err, os.ErrNotExist) {
		s.log.Error("spool: delete segment (it will be deleted at the next Open)", "file", seg.path, "err", err)
	}
	seg.removed = true
	s.total -= seg.size
	s.segs[0] = nil
	s.segs = s.segs[1:]
}

// spaceWaitLocked returns the channel closed when space is freed next.
func (s *Spool) spaceWaitLocked() <-chan struct{} {
	s.spaceWanted = true
	return s.spaceCh
}

func (s *Spool) notifySpaceLocked() {
	if s.spaceWanted || s.closed {
		close(s.spaceCh)
		s.spaceCh = make(chan struct{})
		s.spaceWanted = false
	}
}

// dataWaitLocked returns the channel closed when there is news for the reader.
func (s *Spool) dataWaitLocked() <-chan struct{} {
	s.dataWanted = true
	return s.dataCh
}

func (s *Spool) notifyDataLocked() {
	if s.dataWanted || s.closed {
		close(s.dataCh)
		s.dataCh = make(chan struct{})
		s.dataWanted = false
	}
}

// Stats returns a snapshot of the counters.
func (s *Spool) Stats() Stats {
	s.mu.Lock()
	defer s.mu.Unlock()
	st := s.st
	st.Bytes = s.total
	st.Segments = len(s.segs)
	st.Records = int64(s.durSeq+1-s.lowWater) - int64(len(s.acked))
	for _, h := range s.holes {
		if h.to >= s.lowWater && h.from <= s.durSeq {
			st.Records -= int64(min(h.to, s.durSeq) - max(h.from, s.lowWater) + 1)
		}
	}
	st.Records = max(st.Records, 0)
	return st
}

// Dir returns the spool directory.
func (s *Spool) Dir() string { return s.dir }

// Close writes what is pending, persists the ack low-watermark and releases
// the dir. Blocked Append and Next calls return ErrClosed.
func (s *Spool) Close() error {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return nil
	}
	s.closed = true
	close(s.closing)
	select {
	case s.kick <- struct{}{}: // wake the committer even if it waits for an inline writer
	default:
	}
	s.notifySpaceLocked()
	s.notifyDataLocked()
	s.mu.Unlock()
	s.wg.Wait()

	s.readMu.Lock()
	s.rd.close()
	s.readMu.Unlock()

	err := s.persistAck()
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, seg := range s.segs {
		if seg.f != nil {
			if cerr := seg.f.Close(); cerr != nil && err == nil {
				err = fmt.Errorf("spool: close %s: %w", seg.path, cerr)
			}
			seg.f = nil
		}
	}
	s.lock.Close()
	return err
}

// ackLoop persists the low-watermark every AckFlushInterval when it moved.
func (s *Spool) ackLoop() {
	defer s.wg.Done()
	t := time.NewTicker(s.opts.AckFlushInterval)
	defer t.Stop()
	for {
		select {
		case <-s.closing:
			return
		case <-t.C:
		}
		if err := s.persistAck(); err != nil {
			s.log.Warn("spool: persist ack low-watermark (acknowledged records may be resent after a crash)", "err", err)
		}
	}
}

// persistAck rewrites dir/ack atomically when the low-watermark moved (with
// an fsync unless FsyncNever). Only ackLoop and Close call it, never at once.
func (s *Spool) persistAck() error {
	s.mu.Lock()
	lw, done := s.lowWater, s.lowWater == s.persisted
	s.mu.Unlock()
	if done {
		return nil
	}
	var b [12]byte
	binary.LittleEndian.PutUint64(b[0:8], lw)
	binary.LittleEndian.PutUint32(b[8:12], crc32.Checksum(b[0:8], castagnoli))
	path := filepath.Join(s.dir, "ack")
	tmp := path + ".tmp"
	f, err := os.OpenFile(tmp, os.O_CREATE|os.O_TRUNC|os.O_WRONLY, 0o600)
	if err != nil {
		return fmt.Errorf("spool: write %s: %w", tmp, err)
	}
	_, err = f.Write(b[:])
	if err == nil && s.opts.Fsync != FsyncNever {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(tmp, path)
	}
	if err != nil {
		os.Remove(tmp)
		return fmt.Errorf("spool: write %s: %w", path, err)
	}
	s.mu.Lock()
	s.persisted = lw
	s.mu.Unlock()
	return nil
}

// readAckFile returns the persisted low-watermark, 0 when there is none.
func readAckFile(path string) (uint64, error) {
	b, err := os.ReadFile(path)
	if errors.Is(err, os.ErrNotExist) {
		return 0, nil
	}
	if err != nil {
		return 0, fmt.Errorf("spool: read %s: %w", path, err)
	}
	if len(b) != 12 || crc32.Checksum(b[0:8], castagnoli) != binary.LittleEndian.Uint32(b[8:12]) {
		return 0, fmt.Errorf("spool: %s: damaged (%d bytes, bad checksum)", path, len(b))
	}
	return binary.LittleEndian.Uint64(b[0:8]), nil
}

// waitCtx waits for ch, ctx or closing.
func (s *Spool) waitCtx(ctx context.Context, ch <-chan struct{}) error {
	select {
	case <-ch:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	case <-s.closing:
		return ErrClosed
	}
}
