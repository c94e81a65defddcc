package reading

import (
	"errors"
	"math"
	"strings"
	"testing"
	"time"
)

var fixedNow = time.Date(2025, 1, 2, 3, 4, 5, 6, time.UTC)

func now() time.Time { return fixedNow }

func TestParseGood(t *testing.T) {
	tests := []struct {
		line string
		want Reading
	}{
		{`{"name":"temp","value":21.5}`, Reading{Name: "temp", Value: 21.5, Time: fixedNow}},
		{`  {"name":"temp","value":-1e3,"unit":"C"}  `, Reading{Name: "temp", Value: -1000, Unit: "C", Time: fixedNow}},
		{`{"name":"t","value":0,"ts":"2024-05-01T12:00:00.123456789Z"}`, Reading{Name: "t", Time: time.Date(2024, 5, 1, 12, 0, 0, 123456789, time.UTC)}},
		{`{"name":"t","value":1,"ts":1714564800123456789}`, Reading{Name: "t", Value: 1, Time: time.Unix(0, 1714564800123456789).UTC()}},
		{`{"name":"t","value":1,"ts":"1714564800123456789"}`, Reading{Name: "t", Value: 1, Time: time.Unix(0, 1714564800123456789).UTC()}},
		{`{"name":"t","value":2,"tags":{"room":"lab","n":3,"ok":true}}`, Reading{Name: "t", Value: 2, Time: fixedNow, Tags: map[string]string{"room": "lab", "n": "3", "ok": "true"}}},
		{`{"name":"t","value":2,"unit":null,"ts":null,"tags":null}`, Reading{Name: "t", Value: 2, Time: fixedNow}},
	}
	for _, tt := range tests {
		got, err := Parse([]byte(tt.line), now)
		if err != nil {
			t.Errorf("Parse(%s): %v", tt.line, err)
			continue
		}
		if got.Name != tt.want.Name || got.Value != tt.want.Value || got.Unit != tt.want.Unit || !got.Time.Equal(tt.want.Time) || len(got.Tags) != len(tt.want.Tags) {
			t.Errorf("Parse(%s) = %+v, want %+v", tt.line, got, tt.want)
		}
		for k, v := range tt.want.Tags {
			if got.Tags[k] != v {
				t.Errorf("Parse(%s) tag %s = %q, want %q", tt.line, k, got.Tags[k], v)
			}
		}
	}
}

func TestParseBad(t *testing.T) {
	tests := []struct {
		line, field, msg string
	}{
		{``, "", "empty line"},
		{`[1,2]`, "", "not a JSON object"},
		{`{"value":1}`, "name", "missing"},
		{`{"name":"","value":1}`, "name", "is empty"},
		{`{"name":5,"value":1}`, "name", "must be a string, got a number"},
		{`{"name":"t"}`, "value", "missing"},
		{`{"name":"t","value":"21.5"}`, "value", "not a number, got a string"},
		{`{"name":"t","value":true}`, "value", "not a number, got a boolean"},
		{`{"name":"t","value":1e999}`, "value", "out of range"},
		{`{"name":"t","value":1,"ts":"yesterday"}`, "ts", "neither RFC 3339"},
		{`{"name":"t","value":1,"ts":1714564800}`, "ts", "seconds or milliseconds"},
		{`{"name":"t","value":1,"ts":1.5e18}`, "ts", "not an integer"},
		{`{"name":"t","value":1,"ts":"0001-01-01T00:00:00Z"}`, "ts", "outside"},
		{`{"name":"t","value":1,"ts":{}}`, "ts", "got an object"},
		{`{"name":"t","value":1,"vlaue":2}`, "vlaue", "unknown field"},
		{`{"NAME":"t","value":1}`, "NAME", "unknown field"},
		{`{"name":"t","name":"u","value":1}`, "name", "appears twice"},
		{`{"name":"t","value":1,"tags":[]}`, "tags", "must be an object"},
		{`{"name":"t","value":1,"tags":{"a":{}}}`, "tags.a", "must be a string, number or boolean"},
		{`{"name":"t","value":1,"tags":{"a":null}}`, "tags.a", "is null"},
		{`{"name":"t","value":1`, "", "malformed JSON"},
		{`{"name":"t","value":1} {"name":"u","value":2}`, "", "trailing data"},
		{`{"name":"t","value":1}x`, "", "trailing data"},
		{`{"name":"a` + "\x01" + `","value":1}`, "", "malformed JSON"},
		{`{"name":"` + strings.Repeat("x", 300) + `","value":1}`, "name", "too long"},
		{"{\"name\":\"\xff\",\"value\":1}", "", "UTF-8"},
	}
	for _, tt := range tests {
		_, err := Parse([]byte(tt.line), now)
		var pe *Error
		if !errors.As(err, &pe) {
			t.Errorf("Parse(%q) error = %v, want *Error", tt.line, err)
			continue
		}
		if pe.Field != tt.field || !strings.Contains(pe.Msg, tt.msg) {
			t.Errorf("Parse(%q) = field %q msg %q, want field %q msg containing %q", tt.line, pe.Field, pe.Msg, tt.field, tt.msg)
		}
	}
}

func TestLineTooLong(t *testing.T) {
	err := LineTooLong(70000, MaxLineBytes)
	if !errors.Is(err, ErrLineTooLong) || !strings.Contains(err.Error(), "65536") {
		t.Fatalf("LineTooLong = %v", err)
	}
}

func FuzzParseReading(f *testing.F) {
	f.Add([]byte(`{"name":"temp","value":21.5,"unit":"C","ts":"2024-05-01T12:00:00Z","tags":{"room":"lab"}}`))
	f.Add([]byte(`{"name":"t","value":1,"ts":1714564800123456789}`))
	f.Add([]byte(`{"name":"t","value":"x"}`))
	f.Fuzz(func(t *testing.T, line []byte) {
		r, err := Parse(line, now)
		if err != nil {
			var pe *Error
			if !errors.As(err, &pe) || pe.Error() == "" {
				t.Fatalf("Parse(%q): error %v is not a non-empty *Error", line, err)
			}
			return
		}
		if r.Name == "" || math.IsNaN(r.Value) || math.IsInf(r.Value, 0) || r.Time.IsZero() {
			t.Fatalf("Parse(%q) accepted an invalid reading %+v", line, r)
		}
		if len(r.Tags) > MaxTags {
			t.Fatalf("Parse(%q): %d tags", line, len(r.Tags))
		}
	})
}
