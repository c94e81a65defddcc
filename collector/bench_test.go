package collector

import (
	"os"
	"path/filepath"
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
