// Package reading defines one telemetry measurement and parses the JSON-line
// form that local applications write to the agent's telemetry socket:
//
//	{"name":"temp","value":21.5,"unit":"C","ts":"2024-05-01T12:00:00.5Z","tags":{"room":"lab"}}
//
// name and value are required; unit, ts and tags are optional. ts is an
// RFC 3339 time (nanoseconds allowed) or an integer count of nanoseconds since
// the Unix epoch, as a number or a string; a reading without ts gets the time
// it was parsed. Tag values are strings; numbers and booleans are kept as their
// JSON text. Any other field is an error, so a typo ("vlaue") is reported
// rather than silently dropped.
//
// Parse never panics and every error names the field and what a valid value
// looks like, so the agent can answer each bad line with the reason.
package reading

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	"strconv"
	"strings"
	"time"
	"unicode/utf8"
)

// Limits on one reading. They keep a single bad client from making the agent
// allocate without bound.
const (
	// MaxLineBytes is the default longest line the telemetry socket accepts.
	MaxLineBytes = 64 << 10
	// MaxNameBytes is the longest name, unit, tag key or tag value.
	MaxNameBytes = 256
	// MaxTags is the largest number of tags on one reading.
	MaxTags = 64
)

// Reading is one measurement.
type Reading struct {
	// Name says what was measured ("temp", "cpu.usage"). Never empty.
	Name string
	// Value is the measured value; never NaN or infinite.
	Value float64
	// Unit is optional ("C", "%", "bytes").
	Unit string
	// Time is when the value was measured.
	Time time.Time
	// Tags are optional labels (device-local: "room", "sensor").
	Tags map[string]string
}

// Error is a parse error: what is wrong with which field.
type Error struct {
	// Field is the JSON field at fault ("value", "tags.room"), or "" when the
	// line as a whole is at fault.
	Field string
	// Msg says what is wrong and what a valid value looks like.
	Msg string
}

func (e *Error) Error() string {
	if e.Field == "" {
		return e.Msg
	}
	return e.Field + ": " + e.Msg
}

// ErrLineTooLong is returned (wrapped) for lines longer than the limit.
var ErrLineTooLong = errors.New("line too long")

// LineTooLong returns the error for a line of n bytes or more against max.
func LineTooLong(n, max int) error {
	return fmt.Errorf("%w (%d bytes, the limit is %d): split the data into several readings", ErrLineTooLong, n, max)
}

type wire struct {
	Name  json.RawMessage            `json:"name"`
	Value json.RawMessage            `json:"value"`
	Unit  json.RawMessage            `json:"unit"`
	TS    json.RawMessage            `json:"ts"`
	Tags  map[string]json.RawMessage `json:"tags"`
}

var knownFields = map[string]bool{"name": true, "value": true, "unit": true, "ts": true, "tags": true}

// Parse parses one JSON line (without its newline). now supplies the time
// of readings that carry no ts.
func Parse(line []byte, now func() time.Time) (Reading, error) {
	line = bytes.TrimSpace(line)
	if len(line) == 0 {
		return Reading{}, &Error{Msg: "empty line: send one JSON object per line"}
	}
	if line[0] != '{' {
		return Reading{}, &Error{Msg: fmt.Sprintf("not a JSON object (starts with %s): send {\"name\":...,\"value\":...}", quoteByte(line[0]))}
	}
	if !utf8.Valid(line) {
		return Reading{}, &Error{Msg: "not valid UTF-8"}
	}
	if err := checkFields(line); err != nil {
		return Reading{}, err
	}
	var w wire
	if err := json.Unmarshal(line, &w); err != nil {
		return Reading{}, jsonError(err)
	}
	var r Reading
	var err error
	if r.Name, err = str("name", w.Name, true); err != nil {
		return Reading{}, err
	}
	if r.Value, err = number(w.Value); err != nil {
		return Reading{}, err
	}
	if r.Unit, err = str("unit", w.Unit, false); err != nil {
		return Reading{}, err
	}
	if r.Time, err = timestamp(w.TS, now); err != nil {
		return Reading{}, err
	}
	if r.Tags, err = tags(w.Tags); err != nil {
		return Reading{}, err
	}
	return r, nil
}

// checkFields reports unknown and duplicate top-level fields. encoding/json
// matches names case-insensitively and keeps the last duplicate; both would
// hide mistakes.
func checkFields(line []byte) error {
	dec := json.NewDecoder(bytes.NewReader(line))
	if _, err := dec.Token(); err != nil { // '{'
		return jsonError(err)
	}
	seen := map[string]bool{}
	for dec.More() {
		tok, err := dec.Token()
		if err != nil {
			return jsonError(err)
		}
		key, ok := tok.(string)
		if !ok {
			return &Error{Msg: "malformed JSON object"}
		}
		if !knownFields[key] {
			return &Error{Field: key, Msg: "unknown field (known: name, value, unit, ts, tags)"}
		}
		if seen[key] {
			return &Error{Field: key, Msg: "appears twice"}
		}
		seen[key] = true
		var skip json.RawMessage
		if err := dec.Decode(&skip); err != nil {
			return jsonError(err)
		}
	}
	if _, err := dec.Token(); err != nil { // '}'
		return jsonError(err)
	}
	if dec.More() {
		return &Error{Msg: "trailing data after the JSON object: send one object per line"}
	}
	if _, err := dec.Token(); err == nil {
		return &Error{Msg: "trailing data after the JSON object: send one object per line"}
	}
	return nil
}

func jsonError(err error) error {
	var se *json.SyntaxError
	if errors.As(err, &se) {
		return &Error{Msg: fmt.Sprintf("malformed JSON at byte %d: %s", se.Offset, strings.TrimPrefix(se.Error(), "json: "))}
	}
	var te *json.UnmarshalTypeError
	if errors.As(err, &te) {
		f := te.Field
		if f == "" {
			return &Error{Msg: "not a JSON object: send {\"name\":...,\"value\":...}"}
		}
		return &Error{Field: f, Msg: "must be " + kindOf(f) + ", got " + te.Value}
	}
	if errors.Is(err, io.ErrUnexpectedEOF) || errors.Is(err, io.EOF) {
		return &Error{Msg: "malformed JSON: the object is not closed"}
	}
	return &Error{Msg: "malformed JSON: " + strings.TrimPrefix(err.Error(), "json: ")}
}

func kindOf(field string) string {
	if field == "tags" {
		return "an object of string values"
	}
	return "a string"
}

func isNull(raw json.RawMessage) bool {
	return len(raw) == 0 || string(raw) == "null"
}

func typeName(raw json.RawMessage) string {
	switch raw[0] {
	case '"':
		return "a string"
	case '{':
		return "an object"
	case '[':
		return "an array"
	case 't', 'f':
		return "a boolean"
	case 'n':
		return "null"
	}
	return "a number"
}

func str(field string, raw json.RawMessage, required bool) (string, error) {
	if isNull(raw) {
		if required {
			return "", &Error{Field: field, Msg: "missing: every reading needs a " + field}
		}
		return "", nil
	}
	if raw[0] != '"' {
		return "", &Error{Field: field, Msg: "must be a string, got " + typeName(raw)}
	}
	var s string
	if err := json.Unmarshal(raw, &s); err != nil {
		return "", &Error{Field: field, Msg: "malformed string"}
	}
	if required && strings.TrimSpace(s) == "" {
		return "", &Error{Field: field, Msg: "is empty: every reading needs a " + field}
	}
	if len(s) > MaxNameBytes {
		return "", &Error{Field: field, Msg: fmt.Sprintf("too long (%d bytes, the limit is %d)", len(s), MaxNameBytes)}
	}
	for _, c := range s {
		if c < 0x20 || c == 0x7f {
			return "", &Error{Field: field, Msg: "contains a control character"}
		}
	}
	return s, nil
}

func number(raw json.RawMessage) (float64, error) {
	if isNull(raw) {
		return 0, &Error{Field: "value", Msg: "missing: every reading needs a numeric value"}
	}
	if raw[0] != '-' && (raw[0] < '0' || raw[0] > '9') {
		return 0, &Error{Field: "value", Msg: "not a number, got " + typeName(raw) + " " + clip(raw) + ": write it without quotes, e.g. 21.5"}
	}
	v, err := strconv.ParseFloat(string(raw), 64)
	if err != nil || math.IsInf(v, 0) || math.IsNaN(v) {
		return 0, &Error{Field: "value", Msg: "out of range for a 64-bit float: " + clip(raw)}
	}
	return v, nil
}

// Earliest and latest times accepted in ts; anything else is a unit mistake
// (seconds or milliseconds sent as nanoseconds, or a typo in the year).
var (
	minTime = time.Date(1970, 1, 1, 0, 0, 0, 0, time.UTC)
	maxTime = time.Date(2262, 1, 1, 0, 0, 0, 0, time.UTC)
)

func timestamp(raw json.RawMessage, now func() time.Time) (time.Time, error) {
	if isNull(raw) {
		if now == nil {
			return time.Now(), nil
		}
		return now(), nil
	}
	var text string
	switch c := raw[0]; {
	case c == '"':
		if err := json.Unmarshal(raw, &text); err != nil {
			return time.Time{}, &Error{Field: "ts", Msg: "malformed string"}
		}
	case c == '-' || (c >= '0' && c <= '9'):
		text = string(raw)
	default:
		return time.Time{}, &Error{Field: "ts", Msg: "must be an RFC 3339 string or Unix nanoseconds, got " + typeName(raw)}
	}
	if text != "" && text[0] >= '0' && text[0] <= '9' && !strings.ContainsAny(text, "-:T") {
		ns, err := strconv.ParseInt(text, 10, 64)
		if err != nil {
			return time.Time{}, &Error{Field: "ts", Msg: fmt.Sprintf("%s is not an integer count of Unix nanoseconds", clip([]byte(text)))}
		}
		t := time.Unix(0, ns).UTC()
		if ns < 1e15 {
			return time.Time{}, &Error{Field: "ts", Msg: fmt.Sprintf("%d is before 1970-01-12 in Unix nanoseconds: seconds or milliseconds? multiply to nanoseconds", ns)}
		}
		return t, nil
	}
	t, err := time.Parse(time.RFC3339Nano, text)
	if err != nil {
		return time.Time{}, &Error{Field: "ts", Msg: fmt.Sprintf("%s is neither RFC 3339 (2006-01-02T15:04:05.999999999Z07:00) nor Unix nanoseconds", clip([]byte(strconv.Quote(text))))}
	}
	if t.Before(minTime) || !t.Before(maxTime) {
		return time.Time{}, &Error{Field: "ts", Msg: fmt.Sprintf("%s is outside 1970..2261", text)}
	}
	return t, nil
}

func tags(in map[string]json.RawMessage) (map[string]string, error) {
	if len(in) == 0 {
		return nil, nil
	}
	if len(in) > MaxTags {
		return nil, &Error{Field: "tags", Msg: fmt.Sprintf("too many tags (%d, the limit is %d)", len(in), MaxTags)}
	}
	out := make(map[string]string, len(in))
	for k, raw := range in {
		f := "tags." + k
		if k == "" {
			return nil, &Error{Field: "tags", Msg: "empty tag name"}
		}
		if len(k) > MaxNameBytes {
			return nil, &Error{Field: "tags", Msg: fmt.Sprintf("tag name too long (%d bytes, the limit is %d)", len(k), MaxNameBytes)}
		}
		if isNull(raw) {
			return nil, &Error{Field: f, Msg: "is null: give it a string value or leave the tag out"}
		}
		var v string
		switch raw[0] {
		case '"':
			s, err := str(f, raw, false)
			if err != nil {
				return nil, err
			}
			v = s
		case '{', '[':
			return nil, &Error{Field: f, Msg: "must be a string, number or boolean, got " + typeName(raw)}
		default:
			v = string(raw)
		}
		out[k] = v
	}
	return out, nil
}

func clip(b []byte) string {
	const n = 40
	if len(b) > n {
		return string(b[:n]) + "…"
	}
	return string(b)
}

func quoteByte(c byte) string {
	return strconv.QuoteRune(rune(c))
}

// EstimatedSize approximates the encoded size of r in a batch, in bytes. The
// batcher compares it against batch_bytes.
func (r *Reading) EstimatedSize() int {
	n := 64 + len(r.Name) + len(r.Unit)
	for k, v := range r.Tags {
		n += len(k) + len(v) + 6
	}
	return n
}
