package agent

import (
	"context"
	"slices"
	"sync"

	"github.com/tpmagent/tpmagent/transport"
)

// memQueue is an in-memory Queue with the spool's semantics.
type memQueue struct {
	mu     sync.Mutex
	recs   []Record // all appended, index = seq-1
	acked  map[uint64]bool
	cursor int
	wake   chan struct{}
	closed bool
	ackLog []uint64
}

func newMemQueue() *memQueue {
	return &memQueue{acked: map[uint64]bool{}, wake: make(chan struct{}, 1)}
}

func (q *memQueue) Append(ctx context.Context, data ...[]byte) (uint64, error) {
	q.mu.Lock()
	defer q.mu.Unlock()
	first := uint64(len(q.recs) + 1)
	for _, d := range data {
		q.recs = append(q.recs, Record{Seq: uint64(len(q.recs) + 1), Data: slices.Clone(d)})
	}
	select {
	case q.wake <- struct{}{}:
	default:
	}
	return first, nil
}

func (q *memQueue) Next(ctx context.Context, max int) ([]Record, error) {
	for {
		q.mu.Lock()
		for q.cursor < len(q.recs) && q.acked[q.recs[q.cursor].Seq] {
			q.cursor++
		}
		if q.cursor < len(q.recs) {
			var out []Record
			for q.cursor < len(q.recs) && len(out) < max {
				if !q.acked[q.recs[q.cursor].Seq] {
					out = append(out, q.recs[q.cursor])
				}
				q.cursor++
			}
			q.mu.Unlock()
			return out, nil
		}
		q.mu.Unlock()
		select {
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-q.wake:
		}
	}
}

func (q *memQueue) Rewind() {
	q.mu.Lock()
	q.cursor = 0
	q.mu.Unlock()
	select {
	case q.wake <- struct{}{}:
	default:
	}
}

func (q *memQueue) Ack(seqs ...uint64) {
	q.mu.Lock()
	for _, s := range seqs {
		q.acked[s] = true
	}
	q.ackLog = append(q.ackLog, seqs...)
	q.mu.Unlock()
}

func (q *memQueue) Close() error {
	q.mu.Lock()
	q.closed = true
	q.mu.Unlock()
	return nil
}

func (q *memQueue) unacked() int {
	q.mu.Lock()
	defer q.mu.Unlock()
	return len(q.recs) - len(q.acked)
}

// fakePub is a Publisher that acknowledges in order from its own goroutine,
// can hold acknowledgements back and can drop its "connection".
type fakePub struct {
	mu        sync.Mutex
	cond      *sync.Cond
	up        bool
	hold      bool // keep messages in flight
	window    int
	inflight  []pending
	sent      []Message
	conns     chan struct{}
	acks      chan pending
	published int
}

type pending struct {
	done func(error)
	err  error
}

func newFakePub(window int) *fakePub {
	f := &fakePub{up: true, window: window, conns: make(chan struct{}, 1), acks: make(chan pending, 1<<16)}
	f.cond = sync.NewCond(&f.mu)
	f.conns <- struct{}{}
	go func() {
		for a := range f.acks {
			a.done(a.err)
		}
	}()
	return f
}

func (f *fakePub) Publish(ctx context.Context, topic string, qos byte, retained bool, payload []byte, done func(error)) error {
	stop := context.AfterFunc(ctx, f.wakeAll)
	defer stop()
	f.mu.Lock()
	defer f.mu.Unlock()
	for !f.up || len(f.inflight) >= f.window {
		if ctx.Err() != nil {
			return ctx.Err()
		}
		f.cond.Wait()
	}
	f.sent = append(f.sent, Message{Topic: topic, Payload: slices.Clone(payload), Retained: retained})
	f.published++
	f.inflight = append(f.inflight, pending{done: done})
	if !f.hold {
		f.flushLocked(nil)
	}
	return nil
}

func (f *fakePub) flushLocked(err error) {
	for _, p := range f.inflight {
		p.err = err
		f.acks <- p
	}
	f.inflight = f.inflight[:0]
	f.cond.Broadcast()
}

// release acknowledges everything held.
// drop fails everything in flight with ErrConnectionLost and blocks Publish.
func (f *fakePub) drop() {
	f.mu.Lock()
	f.up = false
	f.flushLocked(transport.ErrConnectionLost)
	f.mu.Unlock()
}

// reconnect brings the connection back and signals Connections.
func (f *fakePub) reconnect() {
	f.mu.Lock()
	f.up = true
	f.cond.Broadcast()
	f.mu.Unlock()
	select {
	case f.conns <- struct{}{}:
	default:
	}
}

func (f *fakePub) setHold(h bool) {
	f.mu.Lock()
	f.hold = h
	if !h {
		f.flushLocked(nil)
	}
	f.mu.Unlock()
}

func (f *fakePub) Connected() bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.up
}

func (f *fakePub) Connections() <-chan struct{} { return f.conns }

func (f *fakePub) messages() []Message {
	f.mu.Lock()
	defer f.mu.Unlock()
	return slices.Clone(f.sent)
}

// wakeAll lets blocked Publish calls notice a cancelled context.
func (f *fakePub) wakeAll() {
	f.mu.Lock()
	f.cond.Broadcast()
	f.mu.Unlock()
}
