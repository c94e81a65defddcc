package spool

import (
	"bytes"
	"errors"
	"testing"
)

func TestDecodeRecord(t *testing.T) {
	valid := appendRecord(nil, 42, []byte("hello"))
	flipped := bytes.Clone(valid)
	flipped[recordHeaderSize+1] ^= 1
	huge := bytes.Clone(valid)
	huge[3] = 0x7f
	for _, tc := range []struct {
		name string
		in   []byte
		want error
	}{
		{"valid", valid, nil},
		{"valid with trailing bytes", append(bytes.Clone(valid), 1, 2, 3), nil},
		{"empty payload", appendRecord(nil, 1, nil), nil},
		{"empty input", nil, errShortRecord},
		{"header cut", valid[:10], errShortRecord},
		{"payload cut", valid[:len(valid)-1], errShortRecord},
		{"payload bit flipped", flipped, errChecksum},
		{"length too large", huge, errRecordLength},
	} {
		t.Run(tc.name, func(t *testing.T) {
			seq, p, n, err := decodeRecord(tc.in)
			if !errors.Is(err, tc.want) {
				t.Fatalf("err %v, want %v", err, tc.want)
			}
			if err == nil && (n != len(appendRecord(nil, seq, p)) || !bytes.Equal(appendRecord(nil, seq, p), tc.in[:n])) {
				t.Fatalf("decoded seq %d payload %q n %d does not re-encode to the input", seq, p, n)
			}
		})
	}
}

// FuzzDecodeRecord checks that the record decoder never panics, never reads
// past its input, and accepts only what re-encodes to the same bytes.
func FuzzDecodeRecord(f *testing.F) {
	f.Add(appendRecord(nil, 1, []byte("seed")))
	f.Add(appendRecord(nil, 1<<40, nil))
	f.Fuzz(func(t *testing.T, b []byte) {
		seq, payload, n, err := decodeRecord(b)
		if err != nil {
			if !errors.Is(err, errShortRecord) && !errors.Is(err, errRecordLength) && !errors.Is(err, errChecksum) {
				t.Fatalf("unexpected error type: %v", err)
			}
			return
		}
		if n < recordHeaderSize || n > len(b) || len(payload) != n-recordHeaderSize {
			t.Fatalf("n %d, payload %d bytes, input %d bytes", n, len(payload), len(b))
		}
		if enc := appendRecord(nil, seq, payload); !bytes.Equal(enc, b[:n]) {
			t.Fatalf("re-encoding differs:\n got %x\nwant %x", enc, b[:n])
		}
		// Every proper prefix of a valid record is reported as short.
		if _, _, _, err := decodeRecord(b[:n-1]); !errors.Is(err, errShortRecord) {
			t.Fatalf("prefix of a valid record: %v", err)
		}
	})
}
