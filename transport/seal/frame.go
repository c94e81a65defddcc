package seal

import (
	"encoding/binary"
	"fmt"
)

// Frame layout (docs/SEALED-TELEMETRY.md section 5):
//
//	version (1) | session id (6) | sequence (8, big endian) | ciphertext || tag (16)
const (
	// FrameVersion is the first byte of every version-1 frame.
	FrameVersion = 0x01
	// SessionIDSize is the length of a session id on the wire (48 bits).
	SessionIDSize = 6
	// FrameHeaderSize is the length of the cleartext frame header.
	FrameHeaderSize = 1 + SessionIDSize + 8
	// TagSize is the AEAD tag length of every supported suite.
	TagSize = 16
	// FrameOverhead is the number of bytes a frame adds to its plaintext.
	FrameOverhead = FrameHeaderSize + TagSize
	// MaxSessionID is the largest session id (2^48 - 1).
	MaxSessionID = 1<<(8*SessionIDSize) - 1
)

// Frame is a parsed, still sealed frame.
type Frame struct {
	Version    byte
	SessionID  uint64 // 48 bits
	Seq        uint64
	Ciphertext []byte // ciphertext || tag; aliases the parsed buffer
}

// ParseFrame splits a frame into its header fields and ciphertext. It does
// not authenticate anything.
func ParseFrame(b []byte) (Frame, error) {
	if len(b) < FrameOverhead {
		return Frame{}, fmt.Errorf("seal: frame of %d bytes is shorter than the %d-byte minimum: %w", len(b), FrameOverhead, ErrMalformed)
	}
	if b[0] != FrameVersion {
		return Frame{}, fmt.Errorf("seal: frame version 0x%02x, want 0x%02x: %w", b[0], FrameVersion, ErrMalformed)
	}
	return Frame{
		Version:    b[0],
		SessionID:  getSessionID(b[1:]),
		Seq:        binary.BigEndian.Uint64(b[1+SessionIDSize:]),
		Ciphertext: b[FrameHeaderSize:],
	}, nil
}

// appendHeader appends the 15-byte frame header.
func appendHeader(dst []byte, sid, seq uint64) []byte {
	dst = append(dst, FrameVersion)
	dst = putSessionID(dst, sid)
	return binary.BigEndian.AppendUint64(dst, seq)
}

func putSessionID(dst []byte, sid uint64) []byte {
	var b [8]byte
	binary.BigEndian.PutUint64(b[:], sid)
	return append(dst, b[8-SessionIDSize:]...)
}

func getSessionID(b []byte) uint64 {
	var v uint64
	if len(b) > SessionIDSize {
		b = b[:SessionIDSize]
	}
	for _, c := range b {
		v = v<<8 | uint64(c)
	}
	return v
}

// appendAAD appends the frame AAD (section 7): the frame header, then the
// device id and the topic, each length-prefixed.
func appendAAD(dst []byte, header []byte, deviceID, topic string) []byte {
	dst = append(dst, header...)
	dst = append(dst, byte(len(deviceID)))
	dst = append(dst, deviceID...)
	dst = binary.BigEndian.AppendUint16(dst, uint16(len(topic)))
	return append(dst, topic...)
}

// frameNonce computes nonce = nonce_base XOR (0^(Nn-8) || BE64(seq)).
func frameNonce(dst *[12]byte, base *[12]byte, seq uint64) {
	*dst = *base
	var s [8]byte
	binary.BigEndian.PutUint64(s[:], seq)
	for i := range s {
		dst[4+i] ^= s[i]
	}
}
