package collector

import (
	"context"
	"os"
	"path/filepath"
	"sync/atomic"
	"testing"
	"time"

	"github.com/tpmagent/tpmagent/agent/reading"
	"github.com/tpmagent/tpmagent/transport/seal"
)

// benchFrames seals n frames of 16 readings each (the agent's default batch
// is up to 64) and returns the announcement and the frames.
func benchFrames(b *testing.B, f *fixture, n int) (ann []byte, frames [][]byte) {
	b.Helper()
	rs := make([]reading.Reading, 16)
	for i := range rs {
		rs[i] = reading.Reading{Name: "temp", Value: float64(i), Unit: "C", Time: time.Now()}
	}
	for i := 0; i < n; i++ {
		a, fr := f.seal(b, rs...)
		if a != nil {
			ann = a
		}
		frames = append(frames, fr)
	}
	return ann, frames
}

// BenchmarkHandleFrame: frames/s through HandleFrame (open, window, 16
// JSON lines each) into an in-memory output.
func BenchmarkHandleFrame(b *testing.B) {
	f := newFixture(b, seal.CollectorOptions{})
	ann, frames := benchFrames(b, f, b.N)
	f.run.HandleAnnouncement(msg(seal.SessionsTopic("dev-0001"), ann))
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		f.run.HandleFrame(msg(frameTopic, frames[i]))
	}
	b.StopTimer()
	b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "frames/s")
}

// BenchmarkHandleFrameFile: the same into an output file (one write per
// frame, no fsync: what the collector did before it had a state).
func BenchmarkHandleFrameFile(b *testing.B) {
	f := newFixture(b, seal.CollectorOptions{})
	out, err := os.OpenFile(filepath.Join(b.TempDir(), "out.jsonl"), os.O_RDWR|os.O_CREATE|os.O_APPEND, 0o600)
	if err != nil {
		b.Fatal(err)
	}
	defer out.Close()
	col, err := seal.NewCollector(f.priv, f.pool, seal.CollectorOptions{})
	if err != nil {
		b.Fatal(err)
	}
	f.run, err = New(Options{Collector: col, Output: out})
	if err != nil {
		b.Fatal(err)
	}
	ann, frames := benchFrames(b, f, b.N)
	f.run.HandleAnnouncement(msg(seal.SessionsTopic("dev-0001"), ann))
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		f.run.HandleFrame(msg(frameTopic, frames[i]))
	}
	if err := f.run.Flush(); err != nil {
		b.Fatal(err)
	}
	b.StopTimer()
	b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "frames/s")
}

// BenchmarkHandleFrameState: into a file with a State (group commit by
// Run every CommitEvery or CommitFrames, acknowledgements after the
// commit), and with a synchronous commit after every frame (what a handler
// that waits for its own commit would cost) for comparison.
func BenchmarkHandleFrameState(b *testing.B) {
	for _, bc := range []struct {
		name string
		each bool
	}{{"group", false}, {"every-frame", true}} {
		b.Run(bc.name, func(b *testing.B) {
			f := newFixture(b, seal.CollectorOptions{})
			dir := b.TempDir()
			out, err := os.OpenFile(filepath.Join(dir, "out.jsonl"), os.O_RDWR|os.O_CREATE|os.O_APPEND, 0o600)
			if err != nil {
				b.Fatal(err)
			}
			defer out.Close()
			st, err := OpenState(filepath.Join(dir, "state"), StateOptions{Output: out})
			if err != nil {
				b.Fatal(err)
			}
			defer st.Close()
			col, err := seal.NewCollector(f.priv, f.pool, seal.CollectorOptions{})
			if err != nil {
				b.Fatal(err)
			}
			run, err := New(Options{Collector: col, Output: out, State: st})
			if err != nil {
				b.Fatal(err)
			}
			ann, frames := benchFrames(b, f, b.N)
			var acked atomic.Int64
			ack := func() { acked.Add(1) }
			ctx, cancel := context.WithCancel(context.Background())
			done := make(chan error, 1)
			go func() { done <- run.Run(ctx) }()
			b.ResetTimer()
			run.handleAnnouncement(msg(seal.SessionsTopic("dev-0001"), ann), ack)
			for i := 0; i < b.N; i++ {
				m := msg(frameTopic, frames[i])
				m.Queued = b.N - 1 - i // a backlog draining, as after a reconnect
				run.handleFrame(m, ack)
				if bc.each {
					if err := run.Commit(); err != nil {
						b.Fatal(err)
					}
				}
			}
			cancel()
			if err := <-done; err != nil {
				b.Fatal(err)
			}
			b.StopTimer()
			if acked.Load() != int64(b.N)+1 {
				b.Fatalf("acknowledged %d of %d", acked.Load(), b.N+1)
			}
			s := run.Stats()
			b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "frames/s")
			b.ReportMetric(float64(s.Commits), "commits")
		})
	}
}
