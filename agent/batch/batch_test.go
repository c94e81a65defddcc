package batch

import (
	"bytes"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"strings"
	"testing"
	"time"

	"github.com/tpmagent/tpmagent/agent/reading"
)

func sample(n int) []reading.Reading {
	rs := make([]reading.Reading, n)
	t0 := time.Date(2025, 3, 4, 5, 6, 7, 891011121, time.UTC)
	for i := range rs {
		rs[i] = reading.Reading{
			Name:  fmt.Sprintf("sensor.%d", i%8),
			Value: float64(i) * 1.25,
			Unit:  "C",
			Time:  t0.Add(time.Duration(i) * time.Millisecond),
			Tags:  map[string]string{"room": "lab", "seq": fmt.Sprint(i)},
		}
	}
	return rs
}

func TestJSONRoundTripAndCompat(t *testing.T) {
	tests := []reading.Reading{
		{Name: "plain", Value: 21.5, Time: time.Unix(1, 2).UTC()},
		{Name: "q\"uo\\te\n<&>\u2028\x01", Value: -0.000001234, Unit: "µs", Time: time.Unix(0, 1714564800123456789).UTC(), Tags: map[string]string{"b": "2", "a": "x\ty"}},
		{Name: "big", Value: 1e300, Time: time.Unix(5, 0).UTC()},
		{Name: "int", Value: 123456789012, Time: time.Unix(5, 0).UTC()},
	}
	b, err := JSON{}.AppendBatch(nil, tests)
	if err != nil {
		t.Fatal(err)
	}
	// Must be what encoding/json produces for the same values.
	want, _ := json.Marshal(toWire(tests))
	if !bytes.Equal(b, want) {
		t.Errorf("JSON encoding differs from encoding/json:\n got %s\nwant %s", b, want)
	}
	got, err := Decode(b)
	if err != nil {
		t.Fatal(err)
	}
	check(t, got, tests)
}

type wireR struct {
	Name  string            `json:"name"`
	Value float64           `json:"value"`
	Unit  string            `json:"unit,omitempty"`
	TS    string            `json:"ts"`
	Tags  map[string]string `json:"tags,omitempty"`
}

func toWire(rs []reading.Reading) []wireR {
	out := make([]wireR, len(rs))
	for i, r := range rs {
		out[i] = wireR{r.Name, r.Value, r.Unit, r.Time.UTC().Format(time.RFC3339Nano), r.Tags}
	}
	return out
}

func check(t *testing.T, got, want []reading.Reading) {
	t.Helper()
	if len(got) != len(want) {
		t.Fatalf("decoded %d readings, want %d", len(got), len(want))
	}
	for i := range want {
		g, w := got[i], want[i]
		if g.Value != w.Value || g.Unit != w.Unit || !g.Time.Equal(w.Time) || len(g.Tags) != len(w.Tags) {
			t.Errorf("reading %d = %+v, want %+v", i, g, w)
		}
		if !strings.Contains(w.Name, "\x01") && g.Name != w.Name {
			t.Errorf("reading %d name %q, want %q", i, g.Name, w.Name)
		}
		for k, v := range w.Tags {
			if g.Tags[k] != v {
				t.Errorf("reading %d tag %s = %q, want %q", i, k, g.Tags[k], v)
			}
		}
	}
}

func TestCBORRoundTrip(t *testing.T) {
	enc, err := NewEncoder("cbor")
	if err != nil {
		t.Fatal(err)
	}
	rs := sample(64)
	b, err := enc.AppendBatch(nil, rs)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.HasPrefix(b, SelfDescribe) || enc.TopicSuffix() != "/cbor" {
		t.Fatalf("cbor payload prefix % x, suffix %q", b[:3], enc.TopicSuffix())
	}
	got, err := Decode(b)
	if err != nil {
		t.Fatal(err)
	}
	check(t, got, rs)
	j, _ := JSON{}.AppendBatch(nil, rs)
	t.Logf("64 readings: json %d bytes, cbor %d bytes", len(j), len(b))
}

func TestNewEncoderUnknown(t *testing.T) {
	if _, err := NewEncoder("xml"); err == nil || !strings.Contains(err.Error(), "telemetry.encoding") {
		t.Fatalf("NewEncoder(xml) = %v", err)
	}
}

func TestBatcherLimits(t *testing.T) {
	tests := []struct {
		name  string
		opts  Options
		n     int
		sizes []int
	}{
		{"max", Options{Max: 4, Linger: time.Hour}, 10, []int{4, 4, 2}},
		{"bytes", Options{Max: 100, Bytes: 300, Linger: time.Hour}, 10, nil},
		{"one", Options{Max: 1, Linger: time.Hour}, 3, []int{1, 1, 1}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			in := make(chan Item, tt.n)
			for _, r := range sample(tt.n) {
				in <- Item{Reading: r}
			}
			close(in)
			var sizes []int
			New(tt.opts).Run(in, func(items []Item) { sizes = append(sizes, len(items)) })
			total := 0
			for _, s := range sizes {
				total += s
			}
			if total != tt.n {
				t.Fatalf("batches %v hold %d readings, want %d", sizes, total, tt.n)
			}
			if tt.sizes != nil && fmt.Sprint(sizes) != fmt.Sprint(tt.sizes) {
				t.Fatalf("batch sizes %v, want %v", sizes, tt.sizes)
			}
			if tt.name == "bytes" {
				est := sample(1)[0].EstimatedSize()
				for _, s := range sizes[:len(sizes)-1] {
					if s*est < tt.opts.Bytes || (s-1)*est >= tt.opts.Bytes {
						t.Fatalf("batch of %d readings (est %d B each) does not stop at %d bytes: %v", s, est, tt.opts.Bytes, sizes)
					}
				}
			}
		})
	}
}

func TestBatcherLinger(t *testing.T) {
	in := make(chan Item)
	got := make(chan []Item, 4)
	go New(Options{Max: 64, Linger: 20 * time.Millisecond}).Run(in, func(items []Item) { got <- items })
	start := time.Now()
	in <- Item{Reading: sample(1)[0]}
	in <- Item{Reading: sample(1)[0]}
	select {
	case b := <-got:
		if len(b) != 2 {
			t.Fatalf("lingered batch has %d items, want 2", len(b))
		}
		if d := time.Since(start); d < 15*time.Millisecond {
			t.Fatalf("batch emitted after %v, before the 20ms linger", d)
		}
	case <-time.After(2 * time.Second):
		t.Fatal("lingered batch never emitted")
	}
	close(in)
}

func benchEncode(b *testing.B, enc Encoder) {
	rs := sample(64)
	var buf []byte
	var err error
	b.ReportAllocs()
	for b.Loop() {
		buf, err = enc.AppendBatch(buf[:0], rs)
		if err != nil {
			b.Fatal(err)
		}
	}
	b.SetBytes(int64(len(buf)))
	b.ReportMetric(float64(b.N*64)/b.Elapsed().Seconds(), "readings/s")
}

// BenchmarkEncodeJSON64 encodes batches of 64 readings as JSON.
func BenchmarkEncodeJSON64(b *testing.B) { benchEncode(b, JSON{}) }

// BenchmarkEncodeCBOR64 encodes batches of 64 readings as CBOR.
func BenchmarkEncodeCBOR64(b *testing.B) {
	enc, err := NewCBOR()
	if err != nil {
		b.Fatal(err)
	}
	benchEncode(b, enc)
}

// TestTimestampLikeAppendFormat: the cached RFC3339Nano formatting gives
// exactly what time.AppendFormat gives, across second boundaries, zero
// and trailing-zero nanoseconds, other zones and out-of-range years.
func TestTimestampLikeAppendFormat(t *testing.T) {
	base := time.Date(2026, 12, 4, 23, 59, 59, 999999999, time.UTC)
	ts := []time.Time{
		base,
		base.Add(time.Nanosecond),     // next second, next day, 0 ns
		base.Add(2 * time.Nanosecond), // same second as the previous
		base.Add(-999999999),          // .000000000 → no fraction
		base.Add(-999999999 + 100),    // .0000001
		time.Date(2026, 1, 2, 3, 4, 5, 120000000, time.FixedZone("CET", 3600)),
		time.Date(1970, 1, 1, 0, 0, 0, 0, time.UTC),
		time.Date(10000, 1, 1, 0, 0, 0, 5, time.UTC), // beyond RFC 3339's 4-digit year
		time.Date(-1, 1, 1, 0, 0, 0, 5, time.UTC),
		time.Unix(0, 1),
	}
	r := rand.New(rand.NewPCG(1, 2))
	for i := 0; i < 2000; i++ {
		ts = append(ts, time.Unix(r.Int64N(4e9), r.Int64N(1e9)))
		ts = append(ts, ts[len(ts)-1].Add(time.Duration(r.Int64N(3e9))))
	}
	var c tsCache
	for _, tm := range ts {
		got := string(c.appendRFC3339Nano(nil, tm))
		want := tm.UTC().Format(time.RFC3339Nano)
		if got != want {
			t.Fatalf("%v: got %s, want %s", tm, got, want)
		}
	}
}
