package spool

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
)

// segMagic starts every segment file; it names the format and its version.
const segMagic = "TPMSPL1\n"

const segHeaderSize = int64(len(segMagic))

const segSuffix = ".seg"

// segment is one append-only file of records. Its name is the sequence
// number of its first record, 20 digits, so lexical order is append order.
// Fields are guarded by Spool.mu; f is used by the committer without the lock
// while it writes a group.
type segment struct {
	first   uint64   // seq of the first record (from the name)
	last    uint64   // seq of the last record appended (first-1 when none)
	size    int64    // bytes including records still pending in the committer
	durSize int64    // bytes written (and synced as the policy says)
	durLast uint64   // seq of the last record within durSize
	path    string   // file path
	f       *os.File // write handle while the segment receives appends
	removed bool     // file deleted (acked or dropped)
}

func segmentName(first uint64) string { return fmt.Sprintf("%020d%s", first, segSuffix) }

// listSegments returns the segment files of dir in append order.
func listSegments(dir string) ([]*segment, error) {
	ents, err := os.ReadDir(dir)
	if err != nil {
		return nil, fmt.Errorf("spool: list %s: %w", dir, err)
	}
	var segs []*segment
	for _, e := range ents {
		name := e.Name()
		if !e.Type().IsRegular() || !strings.HasSuffix(name, segSuffix) {
			continue
		}
		first, err := strconv.ParseUint(strings.TrimSuffix(name, segSuffix), 10, 64)
		if err != nil {
			continue // not ours
		}
		segs = append(segs, &segment{first: first, path: filepath.Join(dir, name)})
	}
	sort.Slice(segs, func(i, j int) bool { return segs[i].first < segs[j].first })
	return segs, nil
}

// corruptRegion is a stretch of a segment that holds no valid record, followed
// by a valid one. The records with seqs in [lostFrom, lostTo] were in it.
type corruptRegion struct {
	off, end         int64
	lostFrom, lostTo uint64
}

// scanResult describes a segment after recovery.
type scanResult struct {
	count   int64           // valid records
	last    uint64          // seq of the last valid record (0 when count == 0)
	end     int64           // offset just past the last valid record
	corrupt []corruptRegion // damaged stretches skipped in the middle
	badTail bool            // bytes after end hold no valid record (torn tail)
}

// scanSegment validates every record of f (size bytes) whose seqs must exceed
// prev. Damage followed by a valid record is reported in corrupt; damage that
// runs to the end of the file is a torn tail (end tells where to truncate).
func scanSegment(f *os.File, size int64, prev uint64) (scanResult, error) {
	res := scanResult{end: segHeaderSize}
	if size < segHeaderSize {
		res.badTail = true
		return res, nil
	}
	var magic [segHeaderSize]byte
	if _, err := f.ReadAt(magic[:], 0); err != nil {
		return res, fmt.Errorf("spool: read %s: %w", f.Name(), err)
	}
	if string(magic[:]) != segMagic {
		return res, fmt.Errorf("spool: %s offset 0: not a spool segment (bad magic %q); move the file out of the spool dir", f.Name(), magic[:])
	}
	off := segHeaderSize
	br := bufio.NewReaderSize(io.NewSectionReader(f, off, size-off), 256<<10)
	var hb [recordHeaderSize]byte
	var payload []byte
	for off < size {
		ok, err := func() (bool, error) {
			if size-off < recordHeaderSize {
				return false, nil // a header cut short: torn tail
			}
			if _, err := io.ReadFull(br, hb[:]); err != nil {
				return false, readErr(err)
			}
			h := parseHeader(hb[:])
			if h.length > MaxRecordSize || off+framedSize(int(h.length)) > size || h.seq <= prev {
				return false, nil
			}
			if cap(payload) < int(h.length) {
				payload = make([]byte, h.length)
			}
			payload = payload[:h.length]
			if _, err := io.ReadFull(br, payload); err != nil {
				return false, readErr(err)
			}
			return recordCRC(hb[:], payload) == h.crc, nil
		}()
		if err != nil {
			return res, fmt.Errorf("spool: read %s offset %d: %w", f.Name(), off, err)
		}
		if ok {
			h := parseHeader(hb[:])
			prev, res.last = h.seq, h.seq
			res.count++
			off += framedSize(int(h.length))
			res.end = off
			continue
		}
		next, seq, found, err := resync(f, off+1, size, prev)
		if err != nil {
			return res, fmt.Errorf("spool: read %s offset %d: %w", f.Name(), off, err)
		}
		if !found {
			res.badTail = true
			return res, nil
		}
		res.corrupt = append(res.corrupt, corruptRegion{off: off, end: next, lostFrom: prev + 1, lostTo: seq - 1})
		off = next
		br.Reset(io.NewSectionReader(f, off, size-off))
	}
	return res, nil
}

// readErr maps a short read inside a file of known size (which means the
// file shrank underneath us) to a plain error.
func readErr(err error) error {
	if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
		return fmt.Errorf("file shorter than expected: %w", err)
	}
	return err
}

// resync looks for the first valid record at an offset in [from, limit) whose
// seq is above prev and less than 2^32 above it. It returns that offset and seq.
func resync(r io.ReaderAt, from, limit int64, prev uint64) (off int64, seq uint64, found bool, err error) {
	const block = 1 << 20
	buf := make([]byte, block+recordHeaderSize)
	var payload []byte
	for base := from; base+recordHeaderSize <= limit; base += block {
		n := int64(len(buf))
		if base+n > limit {
			n = limit - base
		}
		if _, err := r.ReadAt(buf[:n], base); err != nil && !errors.Is(err, io.EOF) {
			return 0, 0, false, err
		}
		for i := int64(0); i < block && i+recordHeaderSize <= n; i++ {
			h := parseHeader(buf[i:])
			p := base + i
			if h.length > MaxRecordSize || p+framedSize(int(h.length)) > limit || h.seq <= prev || h.seq-prev > 1<<32 {
				continue
			}
			if cap(payload) < int(h.length) {
				payload = make([]byte, h.length)
			}
			payload = payload[:h.length]
			if _, err := r.ReadAt(payload, p+recordHeaderSize); err != nil && !errors.Is(err, io.EOF) {
				return 0, 0, false, err
			}
			if recordCRC(buf[i:i+recordHeaderSize], payload) == h.crc {
				return p, h.seq, true, nil
			}
		}
	}
	return 0, 0, false, nil
}
