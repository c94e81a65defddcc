// Package collector is the backend side of sealed telemetry as a running
// service: it subscribes to the device announcements and sealed frames on an
// MQTT broker (with its own mTLS identity), feeds them to a seal.Collector
// (which verifies announcements against the fleet CA, opens frames, rejects
// forgeries and replays, and counts gaps), and writes every opened reading
// exactly once as a JSON line:
//
//	{"device":"dev-0001","session":"0123456789a0","seq":1000,"topic":"devices/dev-0001/telemetry/sealed","reading":{"name":"temp","value":21.5,"ts":"2026-01-02T03:04:05.678Z"}}
//
// Rejected frames and announcements produce no output; they are counted in
// Stats. The wire format and the checks are specified in
// docs/SEALED-TELEMETRY.md; `tpmagent collect` wires this package to a
// transport.Client.
package collector

import (
	"bufio"
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/tpmagent/tpmagent/agent/batch"
	"github.com/tpmagent/tpmagent/agent/reading"
	"github.com/tpmagent/tpmagent/transport"
	"github.com/tpmagent/tpmagent/transport/seal"
)

// Default topic filters: every device's announcements, and the sealed frames
// of the default telemetry topic (telemetry.topic + agent.SealedSuffix).
const (
	DefaultSessionsFilter = "devices/+/sessions"
	DefaultFramesFilter   = "devices/+/telemetry/sealed"
	DefaultSweepEvery     = time.Second
)

// Subscriber is what the runner needs of a broker connection;
// *transport.Client implements it. Subscriptions must survive reconnects.
type Subscriber interface {
	Subscribe(ctx context.Context, topic string, qos byte, handler func(transport.Message)) error
}

// Options configure a Runner.
type Options struct {
	// Collector opens what arrives. Required.
	Collector *seal.Collector
	// Output receives one JSON line per reading. Required. Writes are
	// serialized and flushed after every message.
	Output io.Writer
	// SessionsFilter and FramesFilter are the MQTT topic filters
	// subscribed at QoS 1 (defaults DefaultSessionsFilter and
	// DefaultFramesFilter).
	SessionsFilter, FramesFilter string
	// SweepEvery is how often parked frames whose announcement did not come
	// are expired (default 1 s).
	SweepEvery time.Duration
	// Logger; nil discards.
	Logger *slog.Logger
}

// Stats are the runner's counters: the seal.Collector's verdicts plus what
// was written.
type Stats struct {
	Opened           uint64 `json:"opened"`            // frames opened, each exactly once
	Readings         uint64 `json:"readings"`          // JSON lines written
	Gaps             uint64 `json:"gaps"`              // sequence numbers missing now
	Replays          uint64 `json:"replays_rejected"`  // authentic duplicates (QoS1 redelivery, replays)
	TooOld           uint64 `json:"too_old_rejected"`  // below the replay window or of a retired session
	Forged           uint64 `json:"forged_rejected"`   // failed authentication (altered, wrong topic)
	WrongDevice      uint64 `json:"wrong_device"`      // frames moved to another device's topic
	Malformed        uint64 `json:"malformed"`         // unparsable frames or topics
	Unknown          uint64 `json:"unknown_session"`   // frames that came before their announcement
	Held             int    `json:"held"`              // of those, parked now
	Expired          uint64 `json:"expired"`           // parked frames dropped unannounced
	Announcements    uint64 `json:"announcements"`     // sessions accepted
	BadAnnouncements uint64 `json:"bad_announcements"` // announcements rejected
	Sessions         int    `json:"sessions"`          // sessions open now
	DecodeErrors     uint64 `json:"decode_errors"`     // authentic frames whose plaintext is no batch (written raw)
	WriteErrors      uint64 `json:"write_errors"`      // output write failures
}

// Rejected sums the frames and announcements refused: replays (a QoS1
// duplicate and a replay cannot be told apart), too old, forged, wrong
// device, malformed, and bad announcements. Parked frames are not counted.
func (s Stats) Rejected() uint64 {
	return s.Replays + s.TooOld + s.Forged + s.WrongDevice + s.Malformed + s.BadAnnouncements
}

// Runner subscribes, opens and writes. Make one with New, call Subscribe,
// then Run.
type Runner struct {
	opts Options
	c    *seal.Collector
	log  *slog.Logger

	mu  sync.Mutex // guards out
	out *bufio.Writer
	buf []byte

	readings     atomic.Uint64
	decodeErrors atomic.Uint64
	writeErrors  atomic.Uint64
}

// New checks opts and returns a Runner.
func New(opts Options) (*Runner, error) {
	if opts.Collector == nil || opts.Output == nil {
		return nil, errors.New("collector: a seal.Collector and an output are required")
	}
	if opts.SessionsFilter == "" {
		opts.SessionsFilter = DefaultSessionsFilter
	}
	if opts.FramesFilter == "" {
		opts.FramesFilter = DefaultFramesFilter
	}
	if opts.SweepEvery <= 0 {
		opts.SweepEvery = DefaultSweepEvery
	}
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	return &Runner{opts: opts, c: opts.Collector, log: opts.Logger, out: bufio.NewWriterSize(opts.Output, 64<<10)}, nil
}

// Subscribe subscribes the announcement and frame filters at QoS 1 on sub.
// Announcements are subscribed first, so that a retained announcement
// usually arrives before the frames it opens (frames that overtake it are
// parked, not lost).
func (r *Runner) Subscribe(ctx context.Context, sub Subscriber) error {
	if err := sub.Subscribe(ctx, r.opts.SessionsFilter, 1, r.HandleAnnouncement); err != nil {
		return fmt.Errorf("collector: subscribe %s: %w", r.opts.SessionsFilter, err)
	}
	if err := sub.Subscribe(ctx, r.opts.FramesFilter, 1, r.HandleFrame); err != nil {
		return fmt.Errorf("collector: subscribe %s: %w", r.opts.FramesFilter, err)
	}
	return nil
}

// Run expires parked frames every SweepEvery until ctx ends, then flushes
// the output. Call Subscribe first.
func (r *Runner) Run(ctx context.Context) error {
	t := time.NewTicker(r.opts.SweepEvery)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return r.Flush()
		case <-t.C:
			if n := r.c.Sweep(); n > 0 {
				r.log.Warn("parked frames dropped: their announcement never came", "frames", n)
			}
		}
	}
}

// HandleAnnouncement verifies an announcement (a message on the sessions
// filter) and writes the parked frames it opens.
func (r *Runner) HandleAnnouncement(m transport.Message) {
	msgs, err := r.c.HandleAnnouncement(m.Topic, m.Payload)
	if err != nil {
		r.log.Warn("session announcement rejected", "topic", m.Topic, "bytes", len(m.Payload), "err", err)
	}
	if len(msgs) > 0 {
		r.write(msgs...)
	}
}

// HandleFrame opens a sealed frame (a message on the frames filter) and
// writes its readings; a rejected frame writes nothing.
func (r *Runner) HandleFrame(m transport.Message) {
	msg, err := r.c.Open(m.Topic, m.Payload)
	switch {
	case err == nil:
		r.write(msg)
	case errors.Is(err, seal.ErrUnknownSession):
		r.log.Debug("frame parked until its announcement arrives", "topic", m.Topic, "err", err)
	case errors.Is(err, seal.ErrReplay):
		// QoS1 redelivery looks exactly like this; not worth a warning.
		r.log.Debug("duplicate frame dropped", "topic", m.Topic, "err", err)
	default:
		r.log.Warn("frame rejected", "topic", m.Topic, "bytes", len(m.Payload), "err", err)
	}
}

// Flush writes buffered output.
func (r *Runner) Flush() error {
	r.mu.Lock()
	defer r.mu.Unlock()
	if err := r.out.Flush(); err != nil {
		r.writeErrors.Add(1)
		return fmt.Errorf("collector: write output: %w", err)
	}
	return nil
}

// Stats returns a snapshot of the counters.
func (r *Runner) Stats() Stats {
	s := r.c.Stats()
	return Stats{
		Opened:           s.Opened,
		Readings:         r.readings.Load(),
		Gaps:             s.Gaps,
		Replays:          s.Replays,
		TooOld:           s.TooOld,
		Forged:           s.Forged,
		WrongDevice:      s.WrongDevice,
		Malformed:        s.Malformed,
		Unknown:          s.Unknown,
		Held:             s.Held,
		Expired:          s.Expired,
		Announcements:    s.Announcements,
		BadAnnouncements: s.BadAnnouncements,
		Sessions:         s.Sessions,
		DecodeErrors:     r.decodeErrors.Load(),
		WriteErrors:      r.writeErrors.Load(),
	}
}

// write emits one line per reading of each opened message and flushes.
func (r *Runner) write(msgs ...seal.Message) {
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, m := range msgs {
		rs, err := batch.Decode(m.Plaintext)
		if err != nil {
			r.decodeErrors.Add(1)
			r.log.Warn("opened frame is not a telemetry batch; written raw", "device", m.DeviceID, "seq", m.Seq, "err", err)
			r.buf = appendHead(r.buf[:0], m)
			r.buf = append(r.buf, `,"raw":"`...)
			r.buf = base64.StdEncoding.AppendEncode(r.buf, m.Plaintext)
			r.buf = append(r.buf, "\"}\n"...)
			r.emit()
			continue
		}
		for i := range rs {
			r.buf = appendHead(r.buf[:0], m)
			r.buf = append(r.buf, `,"reading":`...)
			b, err := batch.JSON{}.AppendBatch(r.buf, rs[i:i+1])
			if err != nil { // NaN or Inf cannot come out of Decode; keep the line valid anyway
				b = append(r.buf, "null"...)
			} else {
				// AppendBatch wrote "[{...}]": drop the brackets.
				obj := b[len(r.buf)+1 : len(b)-1]
				b = append(r.buf, obj...)
			}
			r.buf = append(b, "}\n"...)
			r.emit()
			r.readings.Add(1)
		}
	}
	if err := r.out.Flush(); err != nil {
		r.writeErrors.Add(1)
		r.log.Error("collector output not written", "err", err)
	}
}

func (r *Runner) emit() {
	if _, err := r.out.Write(r.buf); err != nil {
		r.writeErrors.Add(1)
	}
}

// appendHead writes {"device":…,"session":…,"seq":…,"topic":… (no closing brace).
func appendHead(b []byte, m seal.Message) []byte {
	b = append(b, `{"device":`...)
	b = appendJSONString(b, m.DeviceID)
	b = append(b, `,"session":"`...)
	b = appendSessionID(b, m.SessionID)
	b = append(b, `","seq":`...)
	b = strconv.AppendUint(b, m.Seq, 10)
	b = append(b, `,"topic":`...)
	return appendJSONString(b, m.Topic)
}

// appendSessionID writes the 48-bit session id as 12 hex digits.
func appendSessionID(b []byte, id uint64) []byte {
	const hex = "0123456789abcdef"
	for shift := 44; shift >= 0; shift -= 4 {
		b = append(b, hex[(id>>uint(shift))&0xf])
	}
	return b
}

func appendJSONString(b []byte, s string) []byte {
	q, _ := json.Marshal(s) // a string always marshals
	return append(b, q...)
}

// Line is one output line, for consumers and tests that read the output back.
type Line struct {
	Device  string          `json:"device"`
	Session string          `json:"session"`
	Seq     uint64          `json:"seq"`
	Topic   string          `json:"topic"`
	Reading json.RawMessage `json:"reading,omitempty"`
	Raw     []byte          `json:"raw,omitempty"`
}

// ParseLine decodes one output line and, when it carries a reading, the
// reading itself.
func ParseLine(b []byte) (Line, *reading.Reading, error) {
	var l Line
	if err := json.Unmarshal(b, &l); err != nil {
		return Line{}, nil, fmt.Errorf("collector: output line: %w", err)
	}
	if len(l.Reading) == 0 {
		return l, nil, nil
	}
	rs, err := batch.DecodeJSON(append(append([]byte{'['}, l.Reading...), ']'))
	if err != nil || len(rs) != 1 {
		return l, nil, fmt.Errorf("collector: output line: reading: %v", err)
	}
	return l, &rs[0], nil
}
