package spool

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"testing"
)

// benchLogOut receives the spool's log in benchmarks (SPOOL_DEBUG=1: stderr).
var benchLogOut io.Writer = io.Discard

// BenchmarkAppend measures Append of one record per call for each fsync
// policy and record size: always and batch with 128 parallel appenders (what
// group commit is for), never with one appender (one write(2) per Append).
// Reports records/s and, where fsync is used, records per fsync.
//
//	go test -run xxx -bench Append ./agent/spool
func BenchmarkAppend(b *testing.B) {
	for _, pol := range []FsyncPolicy{FsyncAlways, FsyncBatch, FsyncNever} {
		b.Run(pol.String(), func(b *testing.B) {
			for _, size := range []int{100, 4096} {
				b.Run(fmt.Sprintf("%dB", size), func(b *testing.B) {
					benchAppend(b, pol, size, 1, pol != FsyncNever)
				})
			}
		})
	}
}

// BenchmarkAppendMulti appends 64 records of 100 bytes per call from one
// goroutine (a batcher handing over what it has): b.N counts records.
func BenchmarkAppendMulti(b *testing.B) {
	for _, pol := range []FsyncPolicy{FsyncAlways, FsyncBatch, FsyncNever} {
		b.Run(pol.String()+"/64x100B", func(b *testing.B) {
			benchAppend(b, pol, 100, 64, false)
		})
	}
}

func benchAppend(b *testing.B, pol FsyncPolicy, size, perCall int, parallel bool) {
	s, err := Open(b.TempDir(), Options{Fsync: pol, MaxBytes: 8 << 30, SegmentBytes: 64 << 20, Logger: slog.New(slog.NewTextHandler(benchLogOut, nil))})
	if err != nil {
		b.Fatal(err)
	}
	defer s.Close()
	ctx := context.Background()
	rec := make([]byte, size)
	data := make([][]byte, perCall)
	for i := range data {
		data[i] = rec
	}
	b.SetBytes(int64(size))
	b.ReportAllocs()
	b.ResetTimer()
	if parallel {
		b.SetParallelism(64)
		b.RunParallel(func(pb *testing.PB) {
			for pb.Next() {
				if _, err := s.Append(ctx, rec); err != nil {
					b.Error(err)
					return
				}
			}
		})
	} else {
		for i := 0; i < b.N; i += perCall {
			if _, err := s.Append(ctx, data[:min(perCall, b.N-i)]...); err != nil {
				b.Fatal(err)
			}
		}
	}
	b.StopTimer()
	b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "records/s")
	if st := s.Stats(); st.Fsyncs > 0 {
		b.ReportMetric(float64(b.N)/float64(st.Fsyncs), "records/fsync")
	}
}

// BenchmarkAppendAsync appends 100-byte records one per call from one
// goroutine with AppendAsync, waiting for durability of each record only when
// 4096 are outstanding: a producer that pipelines instead of blocking per
// record (e.g. the socket source answering "ok" when Wait returns).
func BenchmarkAppendAsync(b *testing.B) {
	for _, pol := range []FsyncPolicy{FsyncAlways, FsyncBatch, FsyncNever} {
		b.Run(pol.String()+"/100B", func(b *testing.B) {
			s, err := Open(b.TempDir(), Options{Fsync: pol, MaxBytes: 8 << 30, SegmentBytes: 64 << 20, Logger: slog.New(slog.NewTextHandler(benchLogOut, nil))})
			if err != nil {
				b.Fatal(err)
			}
			defer s.Close()
			ctx := context.Background()
			rec := make([]byte, 100)
			const window = 4096
			ring := make([]Pending, window)
			b.SetBytes(100)
			b.ReportAllocs()
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				if i >= window {
					if err := ring[i%window].Wait(ctx); err != nil {
						b.Fatal(err)
					}
				}
				p, err := s.AppendAsync(ctx, rec)
				if err != nil {
					b.Fatal(err)
				}
				ring[i%window] = p
			}
			for i := max(0, b.N-window); i < b.N; i++ {
				if err := ring[i%window].Wait(ctx); err != nil {
					b.Fatal(err)
				}
			}
			b.StopTimer()
			b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "records/s")
			if st := s.Stats(); st.Fsyncs > 0 {
				b.ReportMetric(float64(b.N)/float64(st.Fsyncs), "records/fsync")
			}
		})
	}
}
