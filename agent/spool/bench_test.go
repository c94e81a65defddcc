package spool

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"testing"
)

// BenchmarkAppend measures Append of one record per call for each fsync
// policy and record size. batch and always run parallel appenders (group
// commit is what they measure); never runs one appender. A consumer acks
// concurrently so the spool stays within MaxBytes.
func BenchmarkAppend(b *testing.B) {
	for _, pol := range []FsyncPolicy{FsyncAlways, FsyncBatch, FsyncNever} {
		b.Run(pol.String(), func(b *testing.B) {
			for _, size := range []int{100, 4096} {
				b.Run(fmt.Sprintf("%dB", size), func(b *testing.B) {
					benchAppend(b, pol, size)
				})
			}
		})
	}
}

func benchAppend(b *testing.B, pol FsyncPolicy, size int) {
	s, err := Open(b.TempDir(), Options{Fsync: pol, MaxBytes: 1 << 30, SegmentBytes: 64 << 20, Logger: slog.New(slog.NewTextHandler(benchLogOut, nil))})
	if err != nil {
		b.Fatal(err)
	}
	defer s.Close()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	done := make(chan struct{})
	go func() { // consumer: ack everything so segments are released
		defer close(done)
		var seqs []uint64
		for {
			recs, err := s.Next(ctx, 4096)
			if err != nil {
				return
			}
			seqs = seqs[:0]
			for _, r := range recs {
				seqs = append(seqs, r.Seq)
			}
			s.Ack(seqs...)
		}
	}()
	data := make([]byte, size)
	b.SetBytes(int64(size))
	b.ReportAllocs()
	b.ResetTimer()
	if pol == FsyncNever {
		for i := 0; i < b.N; i++ {
			if _, err := s.Append(ctx, data); err != nil {
				b.Fatal(err)
			}
		}
	} else {
		b.SetParallelism(64)
		b.RunParallel(func(pb *testing.PB) {
			for pb.Next() {
				if _, err := s.Append(ctx, data); err != nil {
					b.Error(err)
					return
				}
			}
		})
	}
	b.StopTimer()
	b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "records/s")
	st := s.Stats()
	if st.Fsyncs > 0 {
		b.ReportMetric(float64(b.N)/float64(st.Fsyncs), "records/fsync")
	}
	cancel()
	<-done
}

var benchLogOut io.Writer = io.Discard
