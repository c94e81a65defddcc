// Package batch groups readings into messages and encodes them.
//
// A Batcher collects readings until it holds batch_max of them, until their
// estimated encoded size reaches batch_bytes, or until linger has passed since
// the first reading of the batch, whichever comes first. An Encoder turns a
// batch into one message payload: a JSON array (the default) or a CBOR
// (RFC 8949) array. docs/TELEMETRY.md specifies both forms.
package batch

import (
	"fmt"
	"math"
	"sort"
	"strconv"
	"time"
	"unicode/utf8"

	"github.com/fxamacker/cbor/v2"

	"github.com/tpmagent/tpmagent/agent/reading"
)

// Encoder turns a batch of readings into one message payload.
type Encoder interface {
	// Name is the encoding's name as configured ("json", "cbor").
	Name() string
	// TopicSuffix is appended to the telemetry topic so that subscribers
	// can tell encodings apart without an envelope ("" for JSON, "/cbor").
	TopicSuffix() string
	// AppendBatch appends the encoding of rs to dst.
	AppendBatch(dst []byte, rs []reading.Reading) ([]byte, error)
}

// NewEncoder returns the encoder called name: "json" (or "") or "cbor".
func NewEncoder(name string) (Encoder, error) {
	switch name {
	case "", "json":
		return JSON{}, nil
	case "cbor":
		return NewCBOR()
	}
	return nil, fmt.Errorf("batch: unknown encoding %q: use json or cbor (telemetry.encoding)", name)
}

// JSON encodes a batch as a JSON array of objects
// {"name","value","unit"?,"ts","tags"?} with ts in RFC 3339 (nanoseconds,
// UTC) and tag keys sorted.
type JSON struct{}

// Name implements Encoder.
func (JSON) Name() string { return "json" }

// TopicSuffix implements Encoder: JSON is published on the topic as configured.
func (JSON) TopicSuffix() string { return "" }

// AppendBatch implements Encoder.
func (JSON) AppendBatch(dst []byte, rs []reading.Reading) ([]byte, error) {
	dst = append(dst, '[')
	var keys []string
	var ts tsCache
	for i := range rs {
		r := &rs[i]
		if i > 0 {
			dst = append(dst, ',')
		}
		dst = append(dst, `{"name":`...)
		dst = appendString(dst, r.Name)
		dst = append(dst, `,"value":`...)
		if math.IsNaN(r.Value) || math.IsInf(r.Value, 0) {
			return nil, fmt.Errorf("batch: reading %q: value %v has no JSON form", r.Name, r.Value)
		}
		dst = appendFloat(dst, r.Value)
		if r.Unit != "" {
			dst = append(dst, `,"unit":`...)
			dst = appendString(dst, r.Unit)
		}
		dst = append(dst, `,"ts":"`...)
		dst = ts.appendRFC3339Nano(dst, r.Time)
		dst = append(dst, '"')
		if len(r.Tags) > 0 {
			keys = sortedKeys(keys[:0], r.Tags)
			dst = append(dst, `,"tags":{`...)
			for j, k := range keys {
				if j > 0 {
					dst = append(dst, ',')
				}
				dst = appendString(dst, k)
				dst = append(dst, ':')
				dst = appendString(dst, r.Tags[k])
			}
			dst = append(dst, '}')
		}
		dst = append(dst, '}')
	}
	return append(dst, ']'), nil
}

// tsCache formats times as time.RFC3339Nano in UTC, reusing the date and
// time of day of the previous call when it falls in the same second (the
// readings of a batch mostly do): AppendFormat per reading was a tenth of
// the encoder's CPU time.
type tsCache struct {
	sec    int64
	prefix []byte // "2006-01-02T15:04:05" of sec
	ok     bool
}

func (c *tsCache) appendRFC3339Nano(dst []byte, t time.Time) []byte {
	t = t.UTC()
	if y := t.Year(); y < 0 || y > 9999 {
		return t.AppendFormat(dst, time.RFC3339Nano)
	}
	if sec := t.Unix(); !c.ok || sec != c.sec {
		c.sec, c.ok = sec, true
		c.prefix = t.AppendFormat(c.prefix[:0], "2006-01-02T15:04:05")
	}
	dst = append(dst, c.prefix...)
	if ns := t.Nanosecond(); ns != 0 {
		var b [10]byte // ".123456789", trailing zeros dropped as RFC3339Nano does
		b[0] = '.'
		for i := 9; i >= 1; i-- {
			b[i] = byte('0' + ns%10)
			ns /= 10
		}
		n := 10
		for b[n-1] == '0' {
			n--
		}
		dst = append(dst, b[:n]...)
	}
	return append(dst, 'Z')
}

func sortedKeys(dst []string, m map[string]string) []string {
	for k := range m {
		dst = append(dst, k)
	}
	sort.Strings(dst)
	return dst
}

// appendFloat writes v the way encoding/json does (ES6 number formatting).
func appendFloat(dst []byte, v float64) []byte {
	abs := math.Abs(v)
	format := byte('f')
	if abs != 0 && (abs < 1e-6 || abs >= 1e21) {
		format = 'e'
	}
	dst = strconv.AppendFloat(dst, v, format, -1, 64)
	if format == 'e' {
		// clean up e-09 to e-9
		n := len(dst)
		if n >= 4 && dst[n-4] == 'e' && dst[n-3] == '-' && dst[n-2] == '0' {
			dst[n-2] = dst[n-1]
			dst = dst[:n-1]
		}
	}
	return dst
}

const hexDigits = "0123456789abcdef"

// appendString writes s as a JSON string; invalid UTF-8 becomes U+FFFD.
func appendString(dst []byte, s string) []byte {
	dst = append(dst, '"')
	start := 0
	for i := 0; i < len(s); {
		c := s[i]
		if c < utf8.RuneSelf {
			if c >= 0x20 && c != '"' && c != '\\' && c != '<' && c != '>' && c != '&' {
				i++
				continue
			}
			dst = append(dst, s[start:i]...)
			switch c {
			case '"', '\\':
				dst = append(dst, '\\', c)
			case '\n':
				dst = append(dst, '\\', 'n')
			case '\r':
				dst = append(dst, '\\', 'r')
			case '\t':
				dst = append(dst, '\\', 't')
			default:
				dst = append(dst, '\\', 'u', '0', '0', hexDigits[c>>4], hexDigits[c&0xf])
			}
			i++
			start = i
			continue
		}
		r, size := utf8.DecodeRuneInString(s[i:])
		if r == utf8.RuneError && size == 1 {
			dst = append(dst, s[start:i]...)
			dst = append(dst, `\ufffd`...)
			i += size
			start = i
			continue
		}
		if r == '\u2028' || r == '\u2029' {
			dst = append(dst, s[start:i]...)
			dst = append(dst, '\\', 'u', '2', '0', '2', hexDigits[r&0xf])
			i += size
			start = i
			continue
		}
		i += size
	}
	dst = append(dst, s[start:]...)
	return append(dst, '"')
}

// CBOR encodes a batch as a CBOR array of maps with the same text keys as
// the JSON form; ts is an integer of Unix nanoseconds. The payload starts
// with the self-described CBOR tag 55799 (0xd9d9f7) so that it can be told
// from JSON by its first bytes.
type CBOR struct{ em cbor.EncMode }

// cborReading is the CBOR shape of a reading.
type cborReading struct {
	Name  string            `cbor:"name"`
	Value float64           `cbor:"value"`
	Unit  string            `cbor:"unit,omitempty"`
	TS    int64             `cbor:"ts"`
	Tags  map[string]string `cbor:"tags,omitempty"`
}

// NewCBOR returns the CBOR encoder (core deterministic encoding, RFC 8949
// section 4.2.1, with floats in their shortest exact form).
func NewCBOR() (CBOR, error) {
	opts := cbor.CoreDetEncOptions()
	em, err := opts.EncMode()
	if err != nil {
		return CBOR{}, fmt.Errorf("batch: cbor encoder: %w", err)
	}
	return CBOR{em: em}, nil
}

// Name implements Encoder.
func (CBOR) Name() string { return "cbor" }

// TopicSuffix implements Encoder.
func (CBOR) TopicSuffix() string { return "/cbor" }

// SelfDescribe is the tag 55799 prefix of every CBOR payload.
var SelfDescribe = []byte{0xd9, 0xd9, 0xf7}

// AppendBatch implements Encoder.
func (c CBOR) AppendBatch(dst []byte, rs []reading.Reading) ([]byte, error) {
	w := make([]cborReading, len(rs))
	for i := range rs {
		r := &rs[i]
		w[i] = cborReading{Name: r.Name, Value: r.Value, Unit: r.Unit, TS: r.Time.UnixNano(), Tags: r.Tags}
	}
	b, err := c.em.Marshal(w)
	if err != nil {
		return nil, fmt.Errorf("batch: cbor encode %d readings: %w", len(rs), err)
	}
	dst = append(dst, SelfDescribe...)
	return append(dst, b...), nil
}

// DecodeCBOR decodes a CBOR payload made by CBOR.AppendBatch (for collectors
// and tests).
func DecodeCBOR(payload []byte) ([]reading.Reading, error) {
	if len(payload) < 3 || payload[0] != 0xd9 || payload[1] != 0xd9 || payload[2] != 0xf7 {
		return nil, fmt.Errorf("batch: cbor payload does not start with the self-described CBOR tag d9d9f7")
	}
	var w []cborReading
	if err := cbor.Unmarshal(payload[3:], &w); err != nil {
		return nil, fmt.Errorf("batch: decode cbor batch: %w", err)
	}
	rs := make([]reading.Reading, len(w))
	for i, x := range w {
		rs[i] = reading.Reading{Name: x.Name, Value: x.Value, Unit: x.Unit, Time: time.Unix(0, x.TS).UTC(), Tags: x.Tags}
	}
	return rs, nil
}
