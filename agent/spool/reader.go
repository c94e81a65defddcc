package spool

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
)

// Record is one spooled record.
type Record struct {
	Seq  uint64
	Data []byte
}

// maxNextBytes bounds the payload bytes one Next call returns (at least one record).
const maxNextBytes = 4 << 20

// reader is the consumer's cursor: a read handle on one segment and the
// offset of the next record in it. Guarded by Spool.readMu.
type reader struct {
	seg  *segment
	f    *os.File
	br   *bufio.Reader
	off  int64
	next uint64 // seqs below next were handed out (or are acknowledged)
	avg  int64  // payload bytes per record in the last read, to size the next buffer
}

func (r *reader) close() {
	if r.f != nil {
		r.f.Close()
	}
	r.f, r.seg = nil, nil
}

// Next returns up to maxRecs records past the cursor, in seq order, blocking until
// there is at least one (or ctx ends). Records already acknowledged are
// skipped. Data of the returned records is owned by the caller.
func (s *Spool) Next(ctx context.Context, maxRecs int) ([]Record, error) {
	if maxRecs <= 0 {
		maxRecs = 1
	}
	s.readMu.Lock()
	defer s.readMu.Unlock()
	var out []Record
	outBytes := 0
	for {
		s.mu.Lock()
		if s.closed {
			s.mu.Unlock()
			return nil, ErrClosed
		}
		if s.rd.next < s.lowWater {
			s.rd.next = s.lowWater
			s.rd.close()
		}
		if s.rd.seg == nil || s.rd.seg.removed {
			s.positionLocked()
		}
		seg := s.rd.seg
		var limit int64
		sealed := false
		if seg != nil {
			limit = seg.durSize
			sealed = seg != s.active && seg.durSize == seg.size
		}
		wait := s.dataWaitLocked()
		s.mu.Unlock()

		if seg != nil && s.rd.off < limit {
			recs, err := s.readRecords(limit, maxRecs-len(out))
			if err != nil {
				return nil, err
			}
			for _, r := range s.filterAcked(recs) {
				out = append(out, r)
				outBytes += len(r.Data)
			}
			if len(out) >= maxRecs || outBytes >= maxNextBytes {
				return out, nil
			}
			continue
		}
		if seg != nil && sealed {
			s.mu.Lock()
			s.rd.next = max(s.rd.next, seg.last+1)
			s.rd.close()
			s.positionLocked()
			s.mu.Unlock()
			continue
		}
		if len(out) > 0 {
			return out, nil
		}
		if err := s.waitCtx(ctx, wait); err != nil {
			return nil, err
		}
	}
}

// Rewind moves the cursor back to the oldest unacknowledged record, so Next
// returns every unacknowledged record again (after a reconnect).
func (s *Spool) Rewind() {
	s.readMu.Lock()
	defer s.readMu.Unlock()
	s.mu.Lock()
	defer s.mu.Unlock()
	s.rd.close()
	s.rd.next = s.lowWater
}

// positionLocked points the cursor at the segment holding the first record at
// or after rd.next (nil when there is none yet) and at its first record;
// readRecords skips the records below rd.next.
func (s *Spool) positionLocked() {
	s.rd.close()
	for _, seg := range s.segs {
		if seg.last >= s.rd.next {
			s.rd.seg = seg
			s.rd.off = segHeaderSize
			return
		}
	}
}

// readRecords reads up to maxRecs records of the cursor's segment below limit
// (its durable size), skipping seqs below rd.next. Damage is logged and
// skipped to the next valid record.
func (s *Spool) readRecords(limit int64, maxRecs int) ([]Record, error) {
	rd := &s.rd
	if rd.f == nil {
		f, err := os.Open(rd.seg.path)
		if err != nil {
			if errors.Is(err, os.ErrNotExist) {
				return nil, nil // deleted meanwhile (dropped or acked): repositioned next round
			}
			return nil, fmt.Errorf("spool: open %s for reading: %w", rd.seg.path, err)
		}
		rd.f = f
	}
	sec := io.NewSectionReader(rd.f, rd.off, limit-rd.off)
	if rd.br == nil {
		rd.br = bufio.NewReaderSize(sec, 128<<10)
	} else {
		rd.br.Reset(sec)
	}
	var recs []Record
	// One buffer for the payloads of this call, sized for what the segment
	// holds (bounded): growing it by doubling from 4 KiB left every smaller
	// copy behind as garbage, a fifth of the bytes a QoS 1 run allocated.
	want := int64(maxRecs) * max(rd.avg+rd.avg/4, 64)
	buf := make([]byte, 0, min(limit-rd.off, maxNextBytes, want))
	var hb [recordHeaderSize]byte
	for rd.off < limit && len(recs) < maxRecs && len(buf) < maxNextBytes {
		h, payload, ok, err := readOne(rd.br, hb[:], &buf, limit-rd.off)
		if err != nil {
			return nil, fmt.Errorf("spool: read %s offset %d: %w", rd.seg.path, rd.off, err)
		}
		if !ok {
			nxt, seq, found, err := resync(rd.f, rd.off+1, limit, rd.next-1)
			if err != nil {
				return nil, fmt.Errorf("spool: read %s offset %d: %w", rd.seg.path, rd.off, err)
			}
			end := limit
			if found {
				end = nxt
			}
			s.log.Error("spool: corrupt data skipped while reading", "file", rd.seg.path, "offset", rd.off, "bytes", end-rd.off, "next_seq", seq)
			s.mu.Lock()
			s.st.CorruptSkips++
			if found && seq > rd.next {
				s.holes = append(s.holes, seqRange{rd.next, seq - 1})
				s.advanceLocked()
			}
			s.mu.Unlock()
			rd.off = end
			rd.br.Reset(io.NewSectionReader(rd.f, rd.off, limit-rd.off))
			continue
		}
		rd.off += framedSize(len(payload))
		if h.seq < rd.next {
			buf = buf[:len(buf)-len(payload)]
			continue
		}
		rd.next = h.seq + 1
		recs = append(recs, Record{Seq: h.seq, Data: payload})
	}
	if len(recs) > 0 {
		rd.avg = int64(len(buf) / len(recs))
	}
	return recs, nil
}

// readOne reads one record of at most avail bytes from br, appending its
// payload to *buf. ok is false when the record is damaged.
func readOne(br *bufio.Reader, hb []byte, buf *[]byte, avail int64) (h header, payload []byte, ok bool, err error) {
	if _, err := io.ReadFull(br, hb); err != nil {
		if errors.Is(err, io.ErrUnexpectedEOF) || errors.Is(err, io.EOF) {
			return h, nil, false, nil
		}
		return h, nil, false, err
	}
	h = parseHeader(hb)
	if h.length > MaxRecordSize || framedSize(int(h.length)) > avail {
		return h, nil, false, nil
	}
	start := len(*buf)
	if cap(*buf)-start < int(h.length) {
		nb := make([]byte, start, max(2*cap(*buf), start+int(h.length), 4<<10))
		copy(nb, *buf)
		*buf = nb
	}
	*buf = (*buf)[:start+int(h.length)]
	payload = (*buf)[start : start+int(h.length) : start+int(h.length)]
	if _, err := io.ReadFull(br, payload); err != nil {
		return h, nil, false, err
	}
	if recordCRC(hb, payload) != h.crc {
		*buf = (*buf)[:start]
		return h, nil, false, nil
	}
	return h, payload, true, nil
}

// filterAcked drops records acknowledged out of order (seen again after Rewind).
func (s *Spool) filterAcked(recs []Record) []Record {
	s.mu.Lock()
	defer s.mu.Unlock()
	if len(s.acked) == 0 && (len(recs) == 0 || recs[0].Seq >= s.lowWater) {
		return recs
	}
	out := recs[:0]
	for _, r := range recs {
		if r.Seq < s.lowWater {
			continue
		}
		if _, ok := s.acked[r.Seq]; ok {
			continue
		}
		out = append(out, r)
	}
	return out
}
