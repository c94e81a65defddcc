package source

import (
	"context"
	"strings"
	"time"

	"github.com/tpmagent/tpmagent/agent/reading"
)

// Synthetic produces Count readings named "synthetic" whose values are their
// sequence numbers 0..Count-1, padded with a "pad" tag so that one reading
// encodes to about Size bytes of JSON. bench uses it; a subscriber can check
// every sequence number.
type Synthetic struct {
	// Count is the number of readings.
	Count int
	// Size is the approximate JSON size of one reading in bytes (minimum
	// about 70: a reading without padding).
	Size int
	// Now stamps the readings; nil means time.Now.
	Now func() time.Time
}

// Name implements Source.
func (*Synthetic) Name() string { return "synthetic" }

// syntheticBase is the JSON size of a synthetic reading without the pad tag
// (a 6-digit value and a nanosecond timestamp), and padOverhead the size the
// tag adds around its value.
const (
	syntheticBase = 71
	padOverhead   = 17
)

// Run implements Source: it submits Count readings as fast as the sink takes
// them and returns nil when all are submitted.
func (s *Synthetic) Run(ctx context.Context, sink Sink) error {
	now := s.Now
	if now == nil {
		now = time.Now
	}
	pad := ""
	if n := s.Size - syntheticBase - padOverhead; n > 0 {
		pad = strings.Repeat("x", n)
	}
	tags := map[string]string(nil)
	if pad != "" {
		tags = map[string]string{"pad": pad} // shared: readings are read-only downstream
	}
	for i := 0; i < s.Count; i++ {
		r := reading.Reading{Name: "synthetic", Value: float64(i), Time: now(), Tags: tags}
		if err := sink.Submit(ctx, r, nil); err != nil {
			if ctx.Err() != nil {
				return nil
			}
			return err
		}
	}
	return nil
}
