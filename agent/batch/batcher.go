package batch

import (
	"encoding/json"
	"fmt"
	"time"

	"github.com/tpmagent/tpmagent/agent/reading"
)

// Item is one reading on its way into a batch, with the callback that learns
// whether the batch carrying it became durable (nil) or failed.
type Item struct {
	Reading reading.Reading
	// Done, when not nil, is called exactly once with the batch's fate.
	Done func(error)
}

// DefaultMax is Options.Max when not set.
const DefaultMax = 64

// Options bound a batch. Zero values take the defaults.
type Options struct {
	// Max is the largest number of readings in one batch (batch_max,
	// default 64).
	Max int
	// Bytes bounds the estimated encoded size of a batch (batch_bytes,
	// default 256 KiB); a single reading larger than it still makes a batch.
	Bytes int
	// Linger is the longest a reading waits for others to join its batch
	// (linger, default 5 ms). With Max 1 readings never wait.
	Linger time.Duration
}

func (o Options) withDefaults() Options {
	if o.Max <= 0 {
		o.Max = DefaultMax
	}
	if o.Bytes <= 0 {
		o.Bytes = 256 << 10
	}
	if o.Linger <= 0 {
		o.Linger = 5 * time.Millisecond
	}
	return o
}

// Batcher collects items into batches. It is driven by Run from one
// goroutine.
type Batcher struct {
	opts  Options
	items []Item
	bytes int
}

// New returns a Batcher with opts.
func New(opts Options) *Batcher {
	opts = opts.withDefaults()
	return &Batcher{opts: opts, items: make([]Item, 0, opts.Max)}
}

// Options returns the effective options.
func (b *Batcher) Options() Options { return b.opts }

// Add adds it and reports whether the batch is now full.
func (b *Batcher) Add(it Item) bool {
	b.items = append(b.items, it)
	b.bytes += it.Reading.EstimatedSize()
	return len(b.items) >= b.opts.Max || b.bytes >= b.opts.Bytes
}

// Len is the number of items waiting.
func (b *Batcher) Len() int { return len(b.items) }

// Take returns the waiting items and starts a new batch. The returned slice
// belongs to the caller.
func (b *Batcher) Take() []Item {
	out := b.items
	b.items = make([]Item, 0, b.opts.Max)
	b.bytes = 0
	return out
}

// Run reads items from in until in is closed, and calls emit with every batch
// (full, lingered, or the remainder when in closes). emit runs on Run's
// goroutine; Run returns after the last emit.
func (b *Batcher) Run(in <-chan Item, emit func([]Item)) {
	timer := time.NewTimer(time.Hour)
	timer.Stop()
	armed := false
	for {
		var tc <-chan time.Time
		if armed {
			tc = timer.C
		}
		select {
		case it, ok := <-in:
			// Take what is already queued without a select per item (a
			// plain non-blocking receive is cheaper; the select was a
			// fifth of the pipeline's CPU at 64-reading batches).
			for {
				if !ok {
					if b.Len() > 0 {
						emit(b.Take())
					}
					return
				}
				if b.Add(it) {
					if armed {
						timer.Stop()
						armed = false
					}
					emit(b.Take())
				}
				var more bool
				select {
				case it, ok = <-in:
					more = true
				default:
				}
				if !more {
					break
				}
			}
			if b.Len() > 0 && !armed {
				timer.Reset(b.opts.Linger)
				armed = true
			}
		case <-tc:
			armed = false
			if b.Len() > 0 {
				emit(b.Take())
			}
		}
	}
}

// Readings returns the readings of items.
func Readings(items []Item) []reading.Reading {
	rs := make([]reading.Reading, len(items))
	for i := range items {
		rs[i] = items[i].Reading
	}
	return rs
}

type jsonReading struct {
	Name  string            `json:"name"`
	Value float64           `json:"value"`
	Unit  string            `json:"unit"`
	TS    time.Time         `json:"ts"`
	Tags  map[string]string `json:"tags"`
}

// DecodeJSON decodes a JSON payload made by JSON.AppendBatch (for collectors
// and tests).
func DecodeJSON(payload []byte) ([]reading.Reading, error) {
	var w []jsonReading
	if err := json.Unmarshal(payload, &w); err != nil {
		return nil, fmt.Errorf("batch: decode json batch: %w", err)
	}
	rs := make([]reading.Reading, len(w))
	for i, x := range w {
		rs[i] = reading.Reading{Name: x.Name, Value: x.Value, Unit: x.Unit, Time: x.TS, Tags: x.Tags}
	}
	return rs, nil
}

// Decode decodes a payload in either encoding, telling them apart by the
// first byte ('[' for JSON, 0xd9 for self-described CBOR).
func Decode(payload []byte) ([]reading.Reading, error) {
	if len(payload) > 0 && payload[0] == 0xd9 {
		return DecodeCBOR(payload)
	}
	return DecodeJSON(payload)
}
