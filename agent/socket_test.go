package agent

import (
	"bufio"
	"context"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/tpmagent/tpmagent/agent/batch"
	"github.com/tpmagent/tpmagent/agent/source"
)

// gatedQueue holds every Append until the gate opens.
type gatedQueue struct {
	*memQueue
	gate chan struct{}
}

func (g *gatedQueue) Append(ctx context.Context, data ...[]byte) (uint64, error) {
	select {
	case <-g.gate:
	case <-ctx.Done():
		return 0, ctx.Err()
	}
	return g.memQueue.Append(ctx, data...)
}

func startSocketPipeline(t *testing.T, q Queue) (*Pipeline, string, func()) {
	t.Helper()
	pub := newFakePub(100)
	p, err := New(Options{Topic: "devices/d1/telemetry", QoS: 1, Queue: q, Publisher: pub, Batch: batch.Options{Max: 64, Linger: time.Millisecond}})
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(t.TempDir(), "telemetry.sock")
	src := &source.Socket{Path: path}
	ctx, cancel := context.WithCancel(context.Background())
	runErr := make(chan error, 1)
	go func() { runErr <- p.Run(ctx, src) }()
	select {
	case <-src.Ready():
	case err := <-runErr:
		t.Fatalf("pipeline stopped: %v", err)
	case <-time.After(5 * time.Second):
		t.Fatal("socket not listening")
	}
	stop := func() {
		cancel()
		if err := <-runErr; err != nil {
			t.Error(err)
		}
	}
	return p, path, stop
}

func TestSocketRejectsBadLinesIndividually(t *testing.T) {
	q := newMemQueue()
	p, path, stop := startSocketPipeline(t, q)
	defer stop()
	fi, err := os.Stat(path)
	if err != nil || fi.Mode().Perm() != 0o660 || fi.Mode()&os.ModeSocket == 0 {
		t.Fatalf("telemetry socket mode %v, %v; want a 0660 socket", fi.Mode(), err)
	}
	long := `{"name":"t","value":1,"unit":"` + strings.Repeat("x", 70000) + `"}`
	lines := []struct{ line, reply string }{
		{`{"name":"temp","value":21.5,"unit":"C"}`, "ok"},
		{`{"name":"temp","value":"hot"}`, `error: line 2: value: not a number, got a string "hot"`},
		{`{"value":1}`, "error: line 3: name: missing"},
		{`not json`, "error: line 4: not a JSON object"},
		{long, "error: line 5: line too long (70032 bytes, the limit is 65536)"},
		{`{"name":"t","value":1,"ts":"noon"}`, "error: line 6: ts: "},
		{`{"name":"t","value":2,"colour":"red"}`, "error: line 7: colour: unknown field"},
		{`{"name":"hum","value":40,"ts":1714564800123456789,"tags":{"room":"lab"}}`, "ok"},
		{`{"name":"last","value":3}`, "ok"},
	}
	var in strings.Builder
	for _, l := range lines {
		in.WriteString(l.line + "\n")
	}
	var replies []string
	ok, rejected, err := source.Send(context.Background(), path, strings.NewReader(in.String()), func(_ int, r string) { replies = append(replies, r) })
	if err != nil {
		t.Fatal(err)
	}
	if len(replies) != len(lines) {
		t.Fatalf("%d replies for %d lines: %q", len(replies), len(lines), replies)
	}
	for i, l := range lines {
		if !strings.HasPrefix(replies[i], l.reply) {
			t.Errorf("line %d: reply %q, want prefix %q", i+1, replies[i], l.reply)
		}
	}
	if ok != 3 || rejected != 6 {
		t.Errorf("ok %d rejected %d, want 3 and 6", ok, rejected)
	}
	c := p.Counters()
	if c.ReadingsIn.Load() != 3 || c.ReadingsRejected.Load() != 6 {
		t.Errorf("counters in %d rejected %d, want 3 and 6", c.ReadingsIn.Load(), c.ReadingsRejected.Load())
	}
	// The three good readings are in the spool.
	n := 0
	for _, r := range q.recs {
		m, err := decodeMessage(r.Data)
		if err != nil {
			t.Fatal(err)
		}
		rs, err := batch.Decode(m.Payload)
		if err != nil {
			t.Fatal(err)
		}
		n += len(rs)
	}
	if n != 3 {
		t.Errorf("spool holds %d readings, want 3", n)
	}
}

func TestSocketOKOnlyAfterDurable(t *testing.T) {
	gq := &gatedQueue{memQueue: newMemQueue(), gate: make(chan struct{})}
	_, path, stop := startSocketPipeline(t, gq)
	defer stop()
	c, err := net.Dial("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	fmt.Fprintf(c, "{\"name\":\"t\",\"value\":1}\nbad\n")
	replies := make(chan string, 4)
	go func() {
		sc := bufio.NewScanner(c)
		for sc.Scan() {
			replies <- sc.Text()
		}
		close(replies)
	}()
	select {
	case r := <-replies:
		t.Fatalf("reply %q before the spool made the reading durable", r)
	case <-time.After(200 * time.Millisecond):
	}
	gq.mu.Lock()
	spooled := len(gq.recs)
	gq.mu.Unlock()
	if spooled != 0 {
		t.Fatal("record in spool before the gate opened")
	}
	close(gq.gate)
	if r := <-replies; r != "ok" {
		t.Fatalf("first reply %q, want ok", r)
	}
	if r := <-replies; !strings.HasPrefix(r, "error: line 2: not a JSON object") {
		t.Fatalf("second reply %q", r)
	}
	gq.mu.Lock()
	spooled = len(gq.recs)
	gq.mu.Unlock()
	if spooled != 1 {
		t.Fatalf("%d records spooled, want 1", spooled)
	}
}

func TestSocketManyClients(t *testing.T) {
	q := newMemQueue()
	p, path, stop := startSocketPipeline(t, q)
	const clients, per = 8, 2000
	var wg sync.WaitGroup
	for c := 0; c < clients; c++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			var b strings.Builder
			for i := 0; i < per; i++ {
				fmt.Fprintf(&b, "{\"name\":\"c%d\",\"value\":%d}\n", c, c*per+i)
				if i%100 == 0 {
					b.WriteString("{oops\n")
				}
			}
			ok, rej, err := source.Send(context.Background(), path, strings.NewReader(b.String()), nil)
			if err != nil || ok != per || rej != per/100 {
				t.Errorf("client %d: ok %d rejected %d err %v", c, ok, rej, err)
			}
		}()
	}
	wg.Wait()
	stop()
	if got := p.Counters().ReadingsIn.Load(); got != clients*per {
		t.Fatalf("readings in %d, want %d", got, clients*per)
	}
	if q.unacked() != 0 {
		t.Fatalf("%d records not acknowledged after drain", q.unacked())
	}
}
