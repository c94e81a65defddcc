package agent

import (
	"context"
	"encoding/binary"
	"fmt"

	"github.com/tpmagent/tpmagent/agent/spool"
	"github.com/tpmagent/tpmagent/agent/status"
)

var _ Queue = (*spool.Spool)(nil)

// SpoolStats adapts the spool's statistics for status.Counters.SpoolStats.
func SpoolStats(s *spool.Spool) func() status.Spool {
	return func() status.Spool {
		st := s.Stats()
		return status.Spool{Records: st.Records, Bytes: st.Bytes, Dropped: st.Dropped, TornTailRepairs: st.TornTailRepairs, CorruptSkips: st.CorruptSkips}
	}
}

// Record is one spooled record as the queue returns it.
type Record = spool.Record

// Queue is the durable queue between batcher and publisher; agent/spool.Spool
// implements it. Append is durable on return; Next hands records to one
// consumer in order and blocks until there is one or ctx ends; Rewind goes
// back to the oldest unacknowledged record; Ack releases records in any order.
type Queue interface {
	Append(ctx context.Context, data ...[]byte) (first uint64, err error)
	Next(ctx context.Context, max int) ([]Record, error)
	Rewind()
	Ack(seqs ...uint64)
	Close() error
}

// Message is one MQTT message.
type Message struct {
	Topic    string
	Payload  []byte
	Retained bool
}

// Spooled message framing, version 1:
//
//	byte 0x01 | byte flags (bit 0: retained) | uvarint len(topic) | topic | payload
const (
	msgVersion      = 0x01
	msgFlagRetained = 0x01
)

// encodeMessage frames m for the spool.
func encodeMessage(m Message) []byte {
	b := make([]byte, 0, 2+binary.MaxVarintLen16+len(m.Topic)+len(m.Payload))
	var flags byte
	if m.Retained {
		flags |= msgFlagRetained
	}
	b = append(b, msgVersion, flags)
	b = binary.AppendUvarint(b, uint64(len(m.Topic)))
	b = append(b, m.Topic...)
	return append(b, m.Payload...)
}

// decodeMessage parses a spooled record made by encodeMessage. The payload
// aliases data.
func decodeMessage(data []byte) (Message, error) {
	if len(data) < 3 || data[0] != msgVersion {
		return Message{}, fmt.Errorf("agent: spool record is not a version-1 message (first byte %#x)", firstByte(data))
	}
	flags := data[1]
	n, k := binary.Uvarint(data[2:])
	if k <= 0 || n == 0 || n > 65535 || uint64(len(data)-2-k) < n {
		return Message{}, fmt.Errorf("agent: spool record has a bad topic length")
	}
	off := 2 + k
	return Message{
		Topic:    string(data[off : off+int(n)]),
		Payload:  data[off+int(n):],
		Retained: flags&msgFlagRetained != 0,
	}, nil
}

func firstByte(b []byte) byte {
	if len(b) == 0 {
		return 0
	}
	return b[0]
}

// Sealer seals an encoded batch for topic before it is spooled (sealed
// telemetry). It may return messages that must precede the frame on the wire
// (a session announcement); they are spooled first, in the same Append.
type Sealer interface {
	Seal(topic string, payload []byte) (frame []byte, before []Message, err error)
}

// Reannouncer is implemented by Sealers whose session announcement must be
// published again after a reconnection (a restarted broker lost its retained
// copy). The messages are published before the spool is rewound.
type Reannouncer interface {
	Reannounce() []Message
}
