package agent

import (
	"context"
	"errors"
	"sync"
	"testing"
	"time"

	"github.com/tpmagent/tpmagent/agent/batch"
	"github.com/tpmagent/tpmagent/agent/reading"
	"github.com/tpmagent/tpmagent/agent/source"
)

// seen decodes every published message and counts readings per value.
func seen(t *testing.T, msgs []Message, topic string) map[int]int {
	t.Helper()
	got := map[int]int{}
	for _, m := range msgs {
		if m.Topic != topic {
			t.Fatalf("message on topic %q, want %q", m.Topic, topic)
		}
		rs, err := batch.Decode(m.Payload)
		if err != nil {
			t.Fatalf("published payload does not decode: %v", err)
		}
		for _, r := range rs {
			got[int(r.Value)]++
		}
	}
	return got
}

func checkAll(t *testing.T, got map[int]int, n int) {
	t.Helper()
	missing := 0
	for i := 0; i < n; i++ {
		if got[i] == 0 {
			missing++
		}
	}
	if missing > 0 {
		t.Fatalf("%d of %d readings never published", missing, n)
	}
}

func TestPipelineDeliversEveryReading(t *testing.T) {
	tests := []struct {
		name string
		enc  string
		qos  byte
		max  int
	}{
		{"json-qos1-batch16", "json", 1, 16},
		{"cbor-qos1-batch64", "cbor", 1, 64},
		{"json-qos0-batch1", "json", 0, 1},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			const n = 20000
			enc, err := batch.NewEncoder(tt.enc)
			if err != nil {
				t.Fatal(err)
			}
			q, pub := newMemQueue(), newFakePub(100)
			p, err := New(Options{Topic: "devices/d1/telemetry", QoS: tt.qos, Encoder: enc, Queue: q, Publisher: pub,
				Batch: batch.Options{Max: tt.max, Linger: time.Millisecond}, StopWhenSourcesDone: true})
			if err != nil {
				t.Fatal(err)
			}
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			if err := p.Run(ctx, &source.Synthetic{Count: n, Size: 100}); err != nil {
				t.Fatal(err)
			}
			checkAll(t, seen(t, pub.messages(), p.Topic()), n)
			c := p.Counters().Snapshot()
			if c.ReadingsIn != n || c.MessagesAcked != c.MessagesPublished || c.MessagesAcked != uint64(len(q.recs)) {
				t.Fatalf("counters %+v, spool records %d", c, len(q.recs))
			}
			if q.unacked() != 0 || len(q.ackLog) != len(q.recs) || !q.closed {
				t.Fatalf("spool: %d unacked, %d acks for %d records, closed %v", q.unacked(), len(q.ackLog), len(q.recs), q.closed)
			}
			if tt.max > 1 && len(q.recs) > n/tt.max+n/100 {
				t.Errorf("%d messages for %d readings in batches of %d: batching does not work", len(q.recs), n, tt.max)
			}
		})
	}
}

func TestPipelineRewindResendsUnacked(t *testing.T) {
	q, pub := newMemQueue(), newFakePub(1000)
	pub.setHold(true)
	p, err := New(Options{Topic: "devices/d1/telemetry", QoS: 1, Queue: q, Publisher: pub,
		Batch: batch.Options{Max: 10, Linger: time.Millisecond}})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	runErr := make(chan error, 1)
	go func() { runErr <- p.Run(ctx) }()
	submit := func(from, to int) {
		var wg sync.WaitGroup
		for i := from; i < to; i++ {
			wg.Add(1)
			if err := p.Submit(ctx, reading.Reading{Name: "x", Value: float64(i), Time: time.Now()}, func(err error) {
				if err != nil {
					t.Errorf("reading %d not spooled: %v", i, err)
				}
				wg.Done()
			}); err != nil {
				t.Fatal(err)
			}
		}
		wg.Wait()
	}
	submit(0, 500)
	inFlight := 0
	waitFor(t, "every spooled message in flight", func() bool {
		q.mu.Lock()
		inFlight = len(q.recs)
		q.mu.Unlock()
		return p.Counters().MessagesPublished.Load() == uint64(inFlight)
	})
	if q.unacked() != inFlight || len(q.ackLog) != 0 {
		t.Fatalf("before PUBACKs: %d unacked, %d acked", q.unacked(), len(q.ackLog))
	}
	pub.drop() // every in-flight message fails
	submit(500, 1000)
	time.Sleep(20 * time.Millisecond)
	if q.unacked() < inFlight+50 {
		t.Fatalf("after connection loss: %d unacked records, want at least %d", q.unacked(), inFlight+50)
	}
	before := len(pub.messages())
	pub.reconnect()
	pub.setHold(false)
	waitFor(t, "all records acknowledged after reconnect", func() bool { return q.unacked() == 0 })
	msgs := pub.messages()
	checkAll(t, seen(t, msgs[before:], p.Topic()), 1000)
	if got := p.Counters().Reconnects.Load(); got != 1 {
		t.Errorf("reconnects = %d, want 1", got)
	}
	if got := p.Counters().MessagesFailed.Load(); got != uint64(inFlight) {
		t.Errorf("failed = %d, want %d", got, inFlight)
	}
	cancel()
	if err := <-runErr; err != nil {
		t.Fatal(err)
	}
}

func TestPipelineDrainFlushesAndWaitsForAcks(t *testing.T) {
	q, pub := newMemQueue(), newFakePub(1000)
	p, err := New(Options{Topic: "devices/d1/telemetry", QoS: 1, Queue: q, Publisher: pub,
		Batch: batch.Options{Max: 1000, Linger: time.Hour}, DrainTimeout: 5 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	runErr := make(chan error, 1)
	go func() { runErr <- p.Run(ctx) }()
	var durable sync.WaitGroup
	for i := 0; i < 10; i++ {
		durable.Add(1)
		if err := p.Submit(ctx, reading.Reading{Name: "x", Value: float64(i), Time: time.Now()}, func(error) { durable.Done() }); err != nil {
			t.Fatal(err)
		}
	}
	pub.setHold(true)
	cancel() // the batch lingers for an hour: only the drain can flush it
	waitFor(t, "the drained batch in flight", func() bool { return p.Counters().MessagesPublished.Load() == 1 })
	select {
	case <-runErr:
		t.Fatal("Run returned before the broker acknowledged")
	case <-time.After(50 * time.Millisecond):
	}
	pub.setHold(false)
	if err := <-runErr; err != nil {
		t.Fatal(err)
	}
	durable.Wait()
	if q.unacked() != 0 || !q.closed {
		t.Fatalf("after drain: %d unacked, closed %v", q.unacked(), q.closed)
	}
	if err := p.Submit(context.Background(), reading.Reading{Name: "x", Time: time.Now()}, nil); !errors.Is(err, ErrStopped) {
		t.Fatalf("Submit after drain = %v, want ErrStopped", err)
	}
}

func TestPipelineDrainTimeout(t *testing.T) {
	q, pub := newMemQueue(), newFakePub(1000)
	pub.setHold(true) // the broker never acknowledges
	p, err := New(Options{Topic: "devices/d1/telemetry", QoS: 1, Queue: q, Publisher: pub, DrainTimeout: 200 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	runErr := make(chan error, 1)
	go func() { runErr <- p.Run(ctx) }()
	if err := p.Submit(ctx, reading.Reading{Name: "x", Time: time.Now()}, nil); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "published", func() bool { return p.Counters().MessagesPublished.Load() == 1 })
	start := time.Now()
	cancel()
	select {
	case <-runErr:
	case <-time.After(5 * time.Second):
		t.Fatal("Run did not give up after DrainTimeout")
	}
	if d := time.Since(start); d < 150*time.Millisecond {
		t.Fatalf("Run returned after %v, before the 200ms drain timeout", d)
	}
	if q.unacked() != 1 {
		t.Fatalf("%d unacked records, want the 1 unacknowledged to stay spooled", q.unacked())
	}
}

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(2 * time.Millisecond)
	}
}
