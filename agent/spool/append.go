package spool

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"syscall"
	"time"
)

// commitGroup is the set of records made durable by one write (and fsync).
// done is closed when they are; err says whether they are.
type commitGroup struct {
	done chan struct{}
	err  error
}

func newGroup() *commitGroup { return &commitGroup{done: make(chan struct{})} }

// chunk is the pending bytes of one segment within a group.
type chunk struct {
	seg  *segment
	buf  []byte
	last uint64 // seq of the last record in buf
	n    int    // records in buf
}

// Pending is an Append whose records have their seqs but may not be durable yet.
type Pending struct {
	// First is the seq of the first record; the others follow consecutively.
	First uint64
	g     *commitGroup
}

// Wait returns when the records are durable per the fsync policy, or with the
// write error. If ctx ends first it returns ctx's error and the records may
// still become durable.
func (p Pending) Wait(ctx context.Context) error {
	if p.g == nil {
		return nil
	}
	select {
	case <-p.g.done:
		return p.g.err
	case <-ctx.Done():
		return ctx.Err()
	}
}

// Append adds records and returns the seq of the first (the others follow
// consecutively) once they are durable as the fsync policy says. Concurrent
// callers share one write and fsync. When the spool is full, FullBlock waits
// for acknowledgements (until ctx ends) and FullDropOldest deletes the oldest
// segment. Each record is at most MaxRecordSize bytes.
func (s *Spool) Append(ctx context.Context, data ...[]byte) (first uint64, err error) {
	p, err := s.appendAsync(ctx, data, s.opts.Fsync != FsyncBatch)
	if err != nil {
		return 0, err
	}
	if err := p.Wait(ctx); err != nil {
		return 0, err
	}
	return p.First, nil
}

// AppendAsync is Append without the wait for durability: it returns once the
// records have seqs and are queued for the committer, so a caller can prepare
// the next batch while this one is written. Call Wait before telling anyone
// the records are safe. Records are visible to Next only once durable.
func (s *Spool) AppendAsync(ctx context.Context, data ...[]byte) (Pending, error) {
	return s.appendAsync(ctx, data, false)
}

// appendAsync queues data; with inline it writes the group itself when no
// write is in progress (Append under FsyncNever and FsyncAlways).
func (s *Spool) appendAsync(ctx context.Context, data [][]byte, inline bool) (Pending, error) {
	if len(data) == 0 {
		return Pending{}, nil
	}
	var need int64
	for i, d := range data {
		if len(d) > MaxRecordSize {
			return Pending{}, fmt.Errorf("spool: record %d of %d bytes is larger than the %d-byte limit; split it", i, len(d), MaxRecordSize)
		}
		need += framedSize(len(d))
	}
	if need+segHeaderSize > s.opts.MaxBytes-s.opts.SegmentBytes {
		return Pending{}, fmt.Errorf("spool: %d records of %d bytes do not fit in max_bytes %d (less one %d-byte segment); append fewer or raise spool.max_bytes", len(data), need, s.opts.MaxBytes, s.opts.SegmentBytes)
	}
	s.mu.Lock()
	for {
		if s.closed {
			s.mu.Unlock()
			return Pending{}, ErrClosed
		}
		if s.total+need+segHeaderSize <= s.opts.MaxBytes {
			break
		}
		if s.opts.Full == FullDropOldest && s.dropOldestLocked() {
			continue
		}
		ch := s.spaceWaitLocked()
		s.mu.Unlock()
		if err := s.waitCtx(ctx, ch); err != nil {
			if errors.Is(err, ErrClosed) {
				return Pending{}, err
			}
			return Pending{}, fmt.Errorf("spool: %s is full (max_bytes %d) and waiting for acknowledgements: %w", s.dir, s.opts.MaxBytes, err)
		}
		s.mu.Lock()
	}
	first := s.nextSeq
	for _, d := range data {
		s.encodeLocked(d)
	}
	g := s.group
	if inline && !s.writing {
		// Nobody is writing: write this group here rather than hand it to
		// the committer (saves two goroutine switches per Append).
		s.flushLocked()
		s.mu.Unlock()
		return Pending{First: first, g: g}, nil
	}
	s.mu.Unlock()
	select {
	case s.kick <- struct{}{}:
	default:
	}
	return Pending{First: first, g: g}, nil
}

// encodeLocked frames d as the next record into the pending group, starting a
// new segment when the active one would grow past SegmentBytes.
func (s *Spool) encodeLocked(d []byte) {
	n := framedSize(len(d))
	seq := s.nextSeq
	s.nextSeq++
	if s.active == nil || (s.active.size+n > s.opts.SegmentBytes && s.active.size > segHeaderSize) {
		seg := &segment{first: seq, last: seq - 1, size: segHeaderSize, path: filepath.Join(s.dir, segmentName(seq))}
		s.segs = append(s.segs, seg)
		s.active = seg
		s.total += segHeaderSize
		s.pend = append(s.pend, chunk{seg: seg, buf: append(s.getBuf(), segMagic...)})
		s.pendBytes += segHeaderSize
	} else if len(s.pend) == 0 || s.pend[len(s.pend)-1].seg != s.active {
		s.pend = append(s.pend, chunk{seg: s.active, buf: s.getBuf()})
	}
	if s.pendRecs == 0 {
		s.pendSince = time.Now()
	}
	s.pendRecs++
	c := &s.pend[len(s.pend)-1]
	c.buf = appendRecord(c.buf, seq, d)
	c.last = seq
	c.n++
	s.active.last = seq
	s.active.size += n
	s.total += n
	s.pendBytes += n
}

func (s *Spool) getBuf() []byte {
	if k := len(s.freeBufs); k > 0 {
		b := s.freeBufs[k-1]
		s.freeBufs = s.freeBufs[:k-1]
		return b[:0]
	}
	return make([]byte, 0, 64<<10)
}

func (s *Spool) putBufLocked(b []byte) {
	if cap(b) <= 1<<20 && len(s.freeBufs) < 4 {
		s.freeBufs = append(s.freeBufs, b)
	}
}

// dropOldestLocked deletes the oldest segment for FullDropOldest. It reports
// false when there is none that can go (only the active one, or one still
// being written).
func (s *Spool) dropOldestLocked() bool {
	if len(s.segs) < 2 {
		return false
	}
	seg := s.segs[0]
	if seg == s.active || seg.durSize != seg.size {
		return false
	}
	var dropped uint64
	if seg.last >= s.lowWater {
		dropped = seg.last - max(s.lowWater, seg.first) + 1
		for q := range s.acked {
			if q <= seg.last {
				delete(s.acked, q)
				dropped--
			}
		}
		for _, h := range s.holes {
			if h.to >= s.lowWater && h.from <= seg.last {
				dropped -= min(h.to, seg.last) - max(h.from, s.lowWater) + 1
			}
		}
		s.lowWater = seg.last + 1
	}
	s.removeSegmentLocked(seg)
	s.advanceLocked()
	s.st.Dropped += dropped
	now := time.Now()
	if s.dropLast.IsZero() || now.Sub(s.dropLast) > 10*time.Second {
		if s.dropBurst > 0 {
			s.log.Warn("spool: previous drop burst ended", "dropped_records", s.dropBurst)
		}
		s.log.Warn("spool: full: dropping oldest unacknowledged records (policy drop_oldest); further drops in this burst are counted, not logged",
			"max_bytes", s.opts.MaxBytes, "file", seg.path, "dropped_records", dropped, "dropped_total", s.st.Dropped)
		s.dropBurst = 0
	}
	s.dropBurst += dropped
	s.dropLast = now
	s.notifyDataLocked()
	return true
}

// commitLoop is the committer: it takes the pending group, writes it, syncs it
// as the policy says and wakes the appenders that wait for it. Under
// FsyncBatch it first lets the group grow (gatherLocked).
func (s *Spool) commitLoop() {
	defer s.wg.Done()
	for {
		s.mu.Lock()
		for len(s.pend) == 0 || s.writing {
			if s.closed && len(s.pend) == 0 && !s.writing {
				s.mu.Unlock()
				return
			}
			writing := s.writing
			s.mu.Unlock()
			if writing {
				<-s.kick // the inline writer kicks when it is done
			} else {
				select {
				case <-s.kick:
				case <-s.closing:
				}
			}
			s.mu.Lock()
		}
		if s.opts.Fsync == FsyncBatch {
			s.gatherLocked()
		}
		if !s.writing && len(s.pend) > 0 {
			s.flushLocked()
		}
		s.mu.Unlock()
	}
}

// gatherLocked lets the pending group grow before an FsyncBatch write: it
// waits until the group holds as many records as the previous one (the
// appenders that waited for that fsync have come back) or until BatchWindow
// has passed since the group's first record, whichever is first. Called and
// returns with mu held.
func (s *Spool) gatherLocked() {
	var t *time.Timer
	for !s.closed && len(s.pend) > 0 && s.pendRecs < s.lastGroupRecs && s.pendBytes < 4<<20 {
		wait := time.Until(s.pendSince.Add(s.opts.BatchWindow))
		if wait <= 0 {
			break
		}
		if t == nil {
			t = time.NewTimer(wait)
			defer t.Stop()
		} else {
			t.Reset(wait)
		}
		s.mu.Unlock()
		select {
		case <-s.kick:
		case <-t.C:
		case <-s.closing:
		}
		s.mu.Lock()
	}
}

// flushLocked writes the pending group and completes it. It is called with mu
// held, s.writing false and s.pend not empty, by the committer or by an
// appender that found no write in progress (FsyncNever and FsyncAlways), and
// returns with mu held. It releases mu while writing.
func (s *Spool) flushLocked() {
	s.writing = true
	chunks := append(s.flushBuf[:0], s.pend...)
	clear(s.pend)
	s.pend = s.pend[:0]
	s.pendBytes = 0
	s.lastGroupRecs, s.pendRecs = s.pendRecs, 0
	g := s.group
	s.group = newGroup()
	s.mu.Unlock()

	fsyncs, err := s.writeChunks(chunks)

	s.mu.Lock()
	s.st.Fsyncs += fsyncs
	if err == nil {
		for _, c := range chunks {
			c.seg.durSize += int64(len(c.buf))
			c.seg.durLast = c.last
			s.durSeq = c.last
			s.st.Appended += uint64(c.n)
			if c.seg != s.active && c.seg.f != nil && c.seg.durSize == c.seg.size { // sealed and fully written
				c.seg.f.Close()
				c.seg.f = nil
			}
		}
	} else {
		s.rollbackLocked(err)
	}
	g.err = err
	close(g.done)
	for i := range chunks {
		s.putBufLocked(chunks[i].buf)
		chunks[i] = chunk{}
	}
	s.flushBuf = chunks[:0]
	s.writing = false
	s.notifyDataLocked()
	// A full spool under FullDropOldest may wait for a segment to finish
	// being written before it can drop it.
	s.notifySpaceLocked()
	if len(s.pend) > 0 || s.closed {
		select {
		case s.kick <- struct{}{}:
		default:
		}
	}
}

// writeChunks writes a group to its segment files, creating new ones, and
// syncs each touched file unless FsyncNever. It returns the number of fsyncs.
func (s *Spool) writeChunks(chunks []chunk) (uint64, error) {
	var fsyncs uint64
	created := false
	for i, c := range chunks {
		if c.seg.f == nil {
			f, err := os.OpenFile(c.seg.path, os.O_CREATE|os.O_EXCL|os.O_WRONLY|os.O_APPEND, 0o600)
			if err != nil {
				return fsyncs, s.writeErr(err)
			}
			c.seg.f = f // guarded by the committer: readers open their own handle
			created = true
		}
		if _, err := c.seg.f.Write(c.buf); err != nil {
			return fsyncs, s.writeErr(err)
		}
		lastOfSeg := i == len(chunks)-1 || chunks[i+1].seg != c.seg
		if lastOfSeg && s.opts.Fsync != FsyncNever {
			fsyncs++
			if err := c.seg.f.Sync(); err != nil {
				return fsyncs, s.writeErr(err)
			}
		}
	}
	if created && s.opts.Fsync != FsyncNever {
		fsyncs++
		if err := syncDir(s.dir); err != nil {
			return fsyncs, s.writeErr(err)
		}
	}
	return fsyncs, nil
}

// writeErr names the dir and the cause, with what to do for the usual ones.
func (s *Spool) writeErr(err error) error {
	hint := ""
	switch {
	case errors.Is(err, syscall.ENOSPC), errors.Is(err, syscall.EDQUOT):
		hint = "; the file system is full: free space or lower spool.max_bytes"
	case errors.Is(err, syscall.EACCES), errors.Is(err, syscall.EPERM), errors.Is(err, syscall.EROFS):
		hint = "; the spool dir is not writable: fix its permissions or mount"
	}
	return fmt.Errorf("spool: append to %s: %w%s", s.dir, err, hint)
}

// rollbackLocked undoes a failed group and everything queued behind it: the
// touched segments are cut back to their durable size (segments created for
// the group are deleted), the pending appends fail with err, and the seqs
// are reused, so no gap is left.
func (s *Spool) rollbackLocked(err error) {
	if len(s.pend) > 0 {
		s.group.err = err
		close(s.group.done)
		s.group = newGroup()
		for i := range s.pend {
			s.putBufLocked(s.pend[i].buf)
		}
		clear(s.pend)
		s.pend = s.pend[:0]
		s.pendBytes = 0
		s.pendRecs = 0
	}
	s.nextSeq = s.durSeq + 1
	for len(s.segs) > 0 {
		seg := s.segs[len(s.segs)-1]
		if seg.size == seg.durSize {
			break
		}
		s.total -= seg.size - seg.durSize
		if seg.durSize == 0 {
			if seg.f != nil {
				seg.f.Close()
				seg.f = nil
			}
			if rerr := os.Remove(seg.path); rerr != nil && !errors.Is(rerr, os.ErrNotExist) {
				s.log.Error("spool: remove segment after failed write", "file", seg.path, "err", rerr)
			}
			seg.removed = true
			s.segs = s.segs[:len(s.segs)-1]
			continue
		}
		if seg.f != nil {
			if terr := seg.f.Truncate(seg.durSize); terr != nil {
				s.log.Error("spool: truncate after failed write (Open will repair the tail)", "file", seg.path, "offset", seg.durSize, "err", terr)
			}
		}
		seg.size = seg.durSize
		seg.last = seg.durLast
	}
	s.active = nil
	if k := len(s.segs); k > 0 && s.segs[k-1].f != nil {
		s.active = s.segs[k-1]
	}
	s.log.Error("spool: append failed; nothing durable was lost", "err", err)
	s.notifySpaceLocked()
}

func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	err = d.Sync()
	if cerr := d.Close(); err == nil {
		err = cerr
	}
	return err
}
