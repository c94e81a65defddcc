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
	"strings"
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
	DefaultCommitEvery    = 20 * time.Millisecond
	DefaultCommitFrames   = 2048
)

// Subscriber is what the runner needs of a broker connection;
// *transport.Client implements it. Subscriptions must survive reconnects.
type Subscriber interface {
	Subscribe(ctx context.Context, topic string, qos byte, handler func(transport.Message)) error
}

// AckSubscriber is a Subscriber that leaves each QoS 1 message
// unacknowledged until the handler calls ack. A Runner with a State calls
// ack only after the message's output and state are committed, which is
// what makes the output exactly-once across crashes: a message not
// committed is not acknowledged, so the broker delivers it again.
// *transport.Client implements it with SubscribeAck (docs/SEALED-TELEMETRY.md
// section 8.5).
type AckSubscriber interface {
	SubscribeAck(ctx context.Context, topic string, qos byte, handler func(m transport.Message, ack func())) error
}

// The collector's real subscriber acknowledges after the commit.
var _ AckSubscriber = (*transport.Client)(nil)

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
	// State, when set, makes the output exactly-once across restarts:
	// output and replay windows are committed together (group commit every
	// CommitEvery or CommitFrames frames), acknowledgements wait for the
	// commit, and the sessions it holds are announced to Collector again
	// at New. The Output must then be the State's output file (or
	// standard output when the State has none).
	State *State
	// CommitEvery (default 20 ms) and CommitFrames (default 2048) bound
	// how long and how many frames a commit waits for.
	CommitEvery  time.Duration
	CommitFrames int
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
	Commits          uint64 `json:"commits"`           // state commits (0 without a state)
	Restored         int    `json:"restored_sessions"` // sessions read from the state at start
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

	mu      sync.Mutex // guards out, the state and what follows
	out     *bufio.Writer
	buf     []byte
	state   *State
	written int64 // output bytes handed to out
	acks    []func()
	frames  int // frames opened since the last commit
	// Frames and announcements the state rejected after the seal.Collector
	// accepted them (it forgot them in a restart).
	stReplays, stTooOld, stBadAnn, stAfterOpen uint64
	restored                                   int
	restoredAnns                               uint64

	commitMu sync.Mutex // serializes commits
	failed   error      // first commit failure: nothing is acknowledged after it
	kick     chan struct{}

	readings     atomic.Uint64
	decodeErrors atomic.Uint64
	writeErrors  atomic.Uint64
	commits      atomic.Uint64
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
	if opts.CommitEvery <= 0 {
		opts.CommitEvery = DefaultCommitEvery
	}
	if opts.CommitFrames <= 0 {
		opts.CommitFrames = DefaultCommitFrames
	}
	r := &Runner{opts: opts, c: opts.Collector, log: opts.Logger, out: bufio.NewWriterSize(opts.Output, 64<<10),
		state: opts.State, kick: make(chan struct{}, 1)}
	if r.state != nil {
		r.written = r.state.OutputLen()
		r.restored = r.state.Restored()
		topics, payloads := r.state.Sessions()
		for i := range topics {
			if _, err := r.c.HandleAnnouncement(topics[i], payloads[i]); err != nil {
				r.log.Warn("session from the collector state no longer accepted; its frames will be parked and expire", "topic", topics[i], "err", err)
				continue
			}
			r.restoredAnns++
		}
	}
	return r, nil
}

// Subscribe subscribes the announcement and frame filters at QoS 1 on sub.
// Announcements are subscribed first, so that a retained announcement
// usually arrives before the frames it opens (frames that overtake it are
// parked, not lost).
func (r *Runner) Subscribe(ctx context.Context, sub Subscriber) error {
	if as, ok := sub.(AckSubscriber); ok {
		if err := as.SubscribeAck(ctx, r.opts.SessionsFilter, 1, r.handleAnnouncement); err != nil {
			return fmt.Errorf("collector: subscribe %s: %w", r.opts.SessionsFilter, err)
		}
		if err := as.SubscribeAck(ctx, r.opts.FramesFilter, 1, r.handleFrame); err != nil {
			return fmt.Errorf("collector: subscribe %s: %w", r.opts.FramesFilter, err)
		}
		return nil
	}
	if err := sub.Subscribe(ctx, r.opts.SessionsFilter, 1, r.HandleAnnouncement); err != nil {
		return fmt.Errorf("collector: subscribe %s: %w", r.opts.SessionsFilter, err)
	}
	if err := sub.Subscribe(ctx, r.opts.FramesFilter, 1, r.HandleFrame); err != nil {
		return fmt.Errorf("collector: subscribe %s: %w", r.opts.FramesFilter, err)
	}
	return nil
}

// Run expires parked frames every SweepEvery and, with a State, commits
// every CommitEvery, until ctx ends; then it flushes the output (and with a
// State commits and writes a snapshot). Call Subscribe first. With a State
// a failed commit ends Run with its error: nothing more is acknowledged.
func (r *Runner) Run(ctx context.Context) error {
	t := time.NewTicker(r.opts.SweepEvery)
	defer t.Stop()
	var commitC <-chan time.Time
	if r.state != nil {
		ct := time.NewTicker(r.opts.CommitEvery)
		defer ct.Stop()
		commitC = ct.C
	}
	for {
		select {
		case <-ctx.Done():
			return r.Flush()
		case <-t.C:
			if n := r.c.Sweep(); n > 0 {
				r.log.Warn("parked frames dropped: their announcement never came", "frames", n)
			}
		case <-commitC:
			if err := r.Commit(); err != nil {
				return err
			}
		case <-r.kick:
			if err := r.Commit(); err != nil {
				return err
			}
		}
	}
}

// HandleAnnouncement verifies an announcement (a message on the sessions
// filter) and writes the parked frames it opens.
func (r *Runner) HandleAnnouncement(m transport.Message) { r.handleAnnouncement(m, nil) }

func (r *Runner) handleAnnouncement(m transport.Message, ack func()) {
	r.mu.Lock()
	defer r.done(ack, m.Queued)
	defer r.mu.Unlock()
	if r.state != nil {
		if a, err := seal.ParseAnnouncement(m.Payload); err == nil && topicDevice(m.Topic) == a.DeviceID && r.state.retiredSession(a.DeviceID, a.SessionID) {
			r.stBadAnn++
			r.log.Warn("session announcement rejected: the collector state retired this session (replay of an old announcement?)", "topic", m.Topic, "session", hex12(a.SessionID))
			return
		}
	}
	msgs, err := r.c.HandleAnnouncement(m.Topic, m.Payload)
	if err != nil {
		r.log.Warn("session announcement rejected", "topic", m.Topic, "bytes", len(m.Payload), "err", err)
	} else if r.state != nil {
		if _, err := r.state.addAnnouncement(m.Topic, m.Payload, time.Now()); err != nil {
			r.log.Error("accepted announcement not recorded in the collector state", "topic", m.Topic, "err", err)
		}
	}
	if len(msgs) > 0 {
		r.writeLocked(msgs...)
	}
}

// done acknowledges a message handled (ack may be nil): at once without a
// State, after the next commit with one. With a State it starts the commit
// when the group is full or when no message is queued behind this one
// (queued = transport.Message.Queued): the broker sends only so many
// unacknowledged messages (mosquitto's max_inflight_messages, default 20),
// so waiting for the CommitEvery tick would stall the stream. Called after
// r.mu is released.
func (r *Runner) done(ack func(), queued int) {
	if r.state == nil {
		if ack != nil {
			ack()
		}
		return
	}
	r.mu.Lock()
	if ack != nil {
		r.acks = append(r.acks, ack)
	}
	full := len(r.acks)+r.frames >= r.opts.CommitFrames
	r.mu.Unlock()
	if full || queued == 0 {
		select {
		case r.kick <- struct{}{}:
		default:
		}
	}
}

// HandleFrame opens a sealed frame (a message on the frames filter) and
// writes its readings; a rejected frame writes nothing.
func (r *Runner) HandleFrame(m transport.Message) { r.handleFrame(m, nil) }

func (r *Runner) handleFrame(m transport.Message, ack func()) {
	r.mu.Lock()
	defer r.done(ack, m.Queued)
	defer r.mu.Unlock()
	if r.state != nil {
		if f, err := seal.ParseFrame(m.Payload); err == nil && r.state.retiredSession(topicDevice(m.Topic), f.SessionID) {
			r.stTooOld++
			r.log.Debug("frame of a session the collector state retired dropped", "topic", m.Topic, "session", hex12(f.SessionID), "seq", f.Seq)
			return
		}
	}
	msg, err := r.c.Open(m.Topic, m.Payload)
	switch {
	case err == nil:
		r.writeLocked(msg)
	case errors.Is(err, seal.ErrUnknownSession):
		r.log.Debug("frame parked until its announcement arrives", "topic", m.Topic, "err", err)
	case errors.Is(err, seal.ErrReplay):
		// QoS1 redelivery looks exactly like this; not worth a warning.
		r.log.Debug("duplicate frame dropped", "topic", m.Topic, "err", err)
	default:
		r.log.Warn("frame rejected", "topic", m.Topic, "bytes", len(m.Payload), "err", err)
	}
}

// Flush writes buffered output; with a State it commits and writes a
// snapshot.
func (r *Runner) Flush() error {
	if r.state != nil {
		return r.commit(true)
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if err := r.out.Flush(); err != nil {
		r.writeErrors.Add(1)
		return fmt.Errorf("collector: write output: %w", err)
	}
	return nil
}

// Commit makes what was written durable with the state (output fsync, then
// the state record), then acknowledges the messages it covers. Without a
// State it only flushes. After a failed commit every later one fails with
// the same error and nothing more is acknowledged.
func (r *Runner) Commit() error {
	if r.state == nil {
		return r.Flush()
	}
	return r.commit(false)
}

func (r *Runner) commit(snapshot bool) error {
	r.commitMu.Lock()
	defer r.commitMu.Unlock()
	if r.failed != nil {
		return r.failed
	}
	r.mu.Lock()
	locked := true
	defer func() {
		if locked {
			r.mu.Unlock()
		}
	}()
	if err := r.out.Flush(); err != nil {
		r.writeErrors.Add(1)
		r.failed = fmt.Errorf("collector: write output: %w", err)
		return r.failed
	}
	snapshot = snapshot || r.state.needsCompaction()
	if len(r.acks) == 0 && r.frames == 0 && len(r.state.pend.Anns) == 0 && len(r.state.pend.Marks) == 0 && !snapshot {
		return nil
	}
	rec := r.state.takePending(r.written)
	acks := r.acks
	r.acks, r.frames = nil, 0
	if !snapshot {
		// Handlers go on writing (beyond rec.Out) while this commits.
		r.mu.Unlock()
		locked = false
	}
	if err := r.state.commit(rec); err != nil {
		r.failed = err
		return err
	}
	if snapshot {
		// Under r.mu: nothing is pending, so the windows are all committed.
		if err := r.state.snapshot(); err != nil {
			r.failed = err
			return err
		}
	}
	r.commits.Add(1)
	for _, a := range acks {
		a()
	}
	return nil
}

// Stats returns a snapshot of the counters.
func (r *Runner) Stats() Stats {
	s := r.c.Stats()
	if r.state != nil {
		r.mu.Lock()
		s.Gaps = r.state.gaps()
		s.Replays += r.stReplays
		s.TooOld += r.stTooOld
		s.BadAnnouncements += r.stBadAnn
		s.Opened -= r.stAfterOpen
		s.Announcements -= r.restoredAnns
		r.mu.Unlock()
	}
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
		Commits:          r.commits.Load(),
		Restored:         r.restored,
	}
}

// writeLocked emits one line per reading of each opened message the state
// (if any) has not seen, and flushes unless a State's commit will. The
// caller holds r.mu.
func (r *Runner) writeLocked(msgs ...seal.Message) {
	for _, m := range msgs {
		if r.state != nil {
			switch err := r.state.check(m.DeviceID, m.SessionID, m.Seq); {
			case errors.Is(err, seal.ErrReplay):
				r.stReplays++
				r.stAfterOpen++
				r.log.Debug("frame already written before a restart dropped", "device", m.DeviceID, "session", hex12(m.SessionID), "seq", m.Seq)
				continue
			case err != nil:
				// Too old, or (never expected) a session the state lacks.
				r.stTooOld++
				r.stAfterOpen++
				r.log.Debug("frame dropped by the collector state", "device", m.DeviceID, "session", hex12(m.SessionID), "seq", m.Seq, "err", err)
				continue
			}
			r.state.mark(m.DeviceID, m.SessionID, m.Seq, time.Now())
			r.frames++
		}
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
	if r.state != nil {
		return // the commit flushes
	}
	if err := r.out.Flush(); err != nil {
		r.writeErrors.Add(1)
		r.log.Error("collector output not written", "err", err)
	}
}

func (r *Runner) emit() {
	n, err := r.out.Write(r.buf)
	r.written += int64(n)
	if err != nil {
		r.writeErrors.Add(1)
	}
}

// topicDevice is the device id of devices/{id}/... ("" otherwise).
func topicDevice(topic string) string {
	rest, ok := strings.CutPrefix(topic, "devices/")
	if !ok {
		return ""
	}
	id, _, _ := strings.Cut(rest, "/")
	return id
}

// hex12 is a session id as 12 hex digits.
func hex12(id uint64) string { return string(appendSessionID(nil, id)) }

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
