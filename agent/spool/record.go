package spool

import (
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
)

// Record framing (little endian), see the package comment:
//
//	offset 0  uint32  payload length L (≤ MaxRecordSize)
//	offset 4  uint32  CRC-32C over bytes 0..3, 8..15 and the payload
//	offset 8  uint64  sequence number
//	offset 16 L bytes payload
const (
	recordHeaderSize = 16
	// MaxRecordSize is the largest payload Append accepts (16 MiB).
	MaxRecordSize = 16 << 20
)

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

var (
	// errShortRecord: the buffer ends before the record does (a torn tail when it is the end of a file).
	errShortRecord = errors.New("record truncated")
	// errRecordLength: the length field is larger than MaxRecordSize.
	errRecordLength = errors.New("record length out of range")
	// errChecksum: the CRC-32C does not match the header and payload.
	errChecksum = errors.New("record checksum mismatch")
)

// appendRecord appends the framed record (seq, data) to dst.
func appendRecord(dst []byte, seq uint64, data []byte) []byte {
	var h [recordHeaderSize]byte
	binary.LittleEndian.PutUint32(h[0:4], uint32(len(data)))
	binary.LittleEndian.PutUint64(h[8:16], seq)
	binary.LittleEndian.PutUint32(h[4:8], recordCRC(h[:], data))
	dst = append(dst, h[:]...)
	return append(dst, data...)
}

// recordCRC computes the checksum of a record from its header (crc field ignored) and payload.
func recordCRC(h []byte, payload []byte) uint32 {
	c := crc32.Update(0, castagnoli, h[0:4])
	c = crc32.Update(c, castagnoli, h[8:16])
	return crc32.Update(c, castagnoli, payload)
}

// header is a parsed record header.
type header struct {
	length uint32
	crc    uint32
	seq    uint64
}

func parseHeader(h []byte) header {
	return header{
		length: binary.LittleEndian.Uint32(h[0:4]),
		crc:    binary.LittleEndian.Uint32(h[4:8]),
		seq:    binary.LittleEndian.Uint64(h[8:16]),
	}
}

// framedSize is the on-disk size of a record with a payload of n bytes.
func framedSize(n int) int64 { return recordHeaderSize + int64(n) }

// decodeRecord decodes the record at the start of b. It returns its sequence
// number, its payload (aliasing b) and the number of bytes it occupies. The
// errors are errShortRecord, errRecordLength and errChecksum (wrapped).
func decodeRecord(b []byte) (seq uint64, payload []byte, n int, err error) {
	if len(b) < recordHeaderSize {
		return 0, nil, 0, fmt.Errorf("%w: %d header bytes of %d", errShortRecord, len(b), recordHeaderSize)
	}
	h := parseHeader(b)
	if h.length > MaxRecordSize {
		return 0, nil, 0, fmt.Errorf("%w: %d bytes", errRecordLength, h.length)
	}
	end := recordHeaderSize + int(h.length)
	if len(b) < end {
		return 0, nil, 0, fmt.Errorf("%w: %d payload bytes of %d", errShortRecord, len(b)-recordHeaderSize, h.length)
	}
	payload = b[recordHeaderSize:end]
	if got := recordCRC(b, payload); got != h.crc {
		return 0, nil, 0, fmt.Errorf("%w: seq %d: stored %08x, computed %08x", errChecksum, h.seq, h.crc, got)
	}
	return h.seq, payload, end, nil
}
