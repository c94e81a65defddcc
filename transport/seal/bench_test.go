package seal

import (
	"fmt"
	"strings"
	"testing"
)

// benchPayloads are a 1 KiB blob and a batch of 64 JSON readings (the
// batcher's default batch_max), about 3.4 KB.
func benchPayloads() []struct {
	name string
	data []byte
} {
	var sb strings.Builder
	sb.WriteByte('[')
	for i := range 64 {
		if i > 0 {
			sb.WriteByte(',')
		}
		fmt.Fprintf(&sb, `{"name":"sensor.temp.%02d","value":%d.%03d,"ts":1767323045%03d}`, i, 20+i%5, i*7, i)
	}
	sb.WriteByte(']')
	return []struct {
		name string
		data []byte
	}{
		{"1KiB", make([]byte, 1024)},
		{"64readings", []byte(sb.String())},
	}
}

// BenchmarkSeal measures Sealer.Seal per frame (MB/s of plaintext). The
// one-off session start (HPKE + signature) is done before the timer.
func BenchmarkSeal(b *testing.B) {
	for _, s := range []Suite{DefaultSuite, ChaChaSuite} {
		for _, p := range benchPayloads() {
			b.Run(s.String()+"/"+p.name, func(b *testing.B) {
				f := newFixture(b, s, SealerOptions{RekeyMessages: 1 << 62}, CollectorOptions{})
				topic := telemetryTopic(f.dev.id)
				if _, _, err := f.sealer.Seal(topic, p.data); err != nil {
					b.Fatal(err)
				}
				b.SetBytes(int64(len(p.data)))
				b.ReportAllocs()
				b.ResetTimer()
				for b.Loop() {
					if _, _, err := f.sealer.Seal(topic, p.data); err != nil {
						b.Fatal(err)
					}
				}
			})
		}
	}
}

// BenchmarkOpen measures Collector.Open per frame (authentication, replay
// window, gap accounting; MB/s of plaintext). Frames are sealed in chunks
// outside the timer.
func BenchmarkOpen(b *testing.B) {
	for _, s := range []Suite{DefaultSuite, ChaChaSuite} {
		for _, p := range benchPayloads() {
			b.Run(s.String()+"/"+p.name, func(b *testing.B) {
				f := newFixture(b, s, SealerOptions{RekeyMessages: 1 << 62}, CollectorOptions{})
				topic := telemetryTopic(f.dev.id)
				const chunk = 4096
				frames := make([][]byte, 0, chunk)
				refill := func() {
					frames = frames[:0]
					for range chunk {
						fr, a, err := f.sealer.Seal(topic, p.data)
						if err != nil {
							b.Fatal(err)
						}
						if a != nil {
							f.announce(b, a)
						}
						frames = append(frames, fr)
					}
				}
				refill()
				b.SetBytes(int64(len(p.data)))
				b.ReportAllocs()
				b.ResetTimer()
				i := 0
				for b.Loop() {
					if i == len(frames) {
						b.StopTimer()
						refill()
						i = 0
						b.StartTimer()
					}
					if _, err := f.coll.Open(topic, frames[i]); err != nil {
						b.Fatal(err)
					}
					i++
				}
			})
		}
	}
}

// BenchmarkSessionStart measures one new session on the device side (HPKE
// encapsulation + software ECDSA signature; a TPM adds 25-190 ms) and its
// verification on the collector (chain, signature, decapsulation).
func BenchmarkSessionStart(b *testing.B) {
	for _, s := range []Suite{DefaultSuite, HybridPQSuite} {
		b.Run(s.String(), func(b *testing.B) {
			f := newFixture(b, s, SealerOptions{RekeyMessages: 1}, CollectorOptions{MaxSessionsPerDevice: 1 << 30})
			topic := telemetryTopic(f.dev.id)
			for b.Loop() {
				_, a, err := f.sealer.Seal(topic, nil)
				if err != nil || a == nil {
					b.Fatal(err)
				}
				if _, err := f.coll.HandleAnnouncement(SessionsTopic(f.dev.id), a.Marshal()); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
