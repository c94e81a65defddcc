package agent

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"time"

	"github.com/tpmagent/tpmagent/agent/batch"
	"github.com/tpmagent/tpmagent/agent/source"
	"github.com/tpmagent/tpmagent/agent/spool"
	"github.com/tpmagent/tpmagent/agent/status"
	"github.com/tpmagent/tpmagent/transport"
)

// BenchOptions configure Bench.
type BenchOptions struct {
	// Count is the number of synthetic readings (default 200,000).
	Count int
	// QoS is 0 or 1.
	QoS byte
	// Size is the approximate JSON size of one reading (default 64).
	Size int
	// Batch is the most readings per message (default 1: one reading per
	// message, comparable with a plain publisher).
	Batch int
	// Linger bounds how long a batch waits to fill (default 2 ms).
	Linger time.Duration
	// Topic is the telemetry topic (required).
	Topic string
	// Encoder; nil means JSON.
	Encoder batch.Encoder
	// Sealer seals every batch (bench --seal); nil publishes plain batches.
	Sealer Sealer
	// SpoolDir holds the bench's own spool; empty means a temporary
	// directory, removed afterwards. It must not be the agent's spool.
	SpoolDir string
	// Fsync is the spool's durability policy (default batch).
	Fsync spool.FsyncPolicy
	// TPMSignatures reports the TPM's signature count (before and after).
	TPMSignatures func() uint64
	// Logger; nil discards.
	Logger *slog.Logger
}

// BenchResult is what `tpmagent bench --json` prints.
type BenchResult struct {
	Messages      uint64  `json:"messages"`
	Readings      uint64  `json:"readings"`
	Bytes         uint64  `json:"bytes"`
	Seconds       float64 `json:"seconds"`
	MsgsPerS      float64 `json:"msgs_per_s"`
	ReadingsPerS  float64 `json:"readings_per_s"`
	MBPerS        float64 `json:"mb_per_s"`
	TPMSignatures uint64  `json:"tpm_signatures"`
	RSSPeakKiB    int64   `json:"rss_peak_kib"`
	// RSSAnonKiB and RSSFileKiB split the resident set at the end of the
	// run: private memory (heap, stacks, runtime) and pages of the binary
	// (shared with the page cache, reclaimable).
	RSSAnonKiB int64  `json:"rss_anon_kib"`
	RSSFileKiB int64  `json:"rss_file_kib"`
	QoS        byte   `json:"qos"`
	Batch      int    `json:"batch"`
	Size       int    `json:"size"`
	Sealed     bool   `json:"sealed"`
	Failed     uint64 `json:"failed"`
	Reconnects uint64 `json:"reconnects"`
}

// Bench runs synthetic source → batcher → (sealer) → spool → publisher for
// opts.Count readings and returns when the broker acknowledged every message
// (QoS 1) or every message was written (QoS 0), or ctx ends. The publisher
// must already be started; Bench does not close it.
func Bench(ctx context.Context, pub transport.Publisher, opts BenchOptions) (BenchResult, error) {
	if opts.Count <= 0 {
		opts.Count = 200000
	}
	if opts.Size <= 0 {
		opts.Size = 64
	}
	if opts.Batch <= 0 {
		opts.Batch = 1
	}
	if opts.Linger <= 0 {
		opts.Linger = 2 * time.Millisecond
	}
	dir := opts.SpoolDir
	if dir == "" {
		d, err := os.MkdirTemp("", "tpmagent-bench-spool-")
		if err != nil {
			return BenchResult{}, fmt.Errorf("bench: spool directory: %w", err)
		}
		defer os.RemoveAll(d)
		dir = d
	}
	log := opts.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	sp, err := spool.Open(dir, spool.Options{Fsync: opts.Fsync, Logger: log})
	if err != nil {
		return BenchResult{}, fmt.Errorf("bench: %w", err)
	}
	c := &status.Counters{SpoolStats: SpoolStats(sp)}
	p, err := New(Options{Topic: opts.Topic, QoS: opts.QoS, Encoder: opts.Encoder, Sealer: opts.Sealer, Queue: sp, Publisher: pub,
		Counters: c, Logger: log, Batch: batch.Options{Max: opts.Batch, Linger: opts.Linger},
		StopWhenSourcesDone: true, DrainTimeout: 24 * time.Hour})
	if err != nil {
		sp.Close()
		return BenchResult{}, fmt.Errorf("bench: %w", err)
	}
	var sig0 uint64
	if opts.TPMSignatures != nil {
		sig0 = opts.TPMSignatures()
	}
	runCtx, cancel := context.WithCancel(context.Background())
	defer cancel()
	stop := context.AfterFunc(ctx, cancel)
	defer stop()
	start := time.Now()
	err = p.Run(runCtx, &source.Synthetic{Count: opts.Count, Size: opts.Size})
	elapsed := time.Since(start).Seconds()
	s := c.Snapshot()
	r := BenchResult{
		Messages: s.MessagesAcked, Readings: s.ReadingsIn, Bytes: s.BytesPublished, Seconds: elapsed,
		QoS: opts.QoS, Batch: opts.Batch, Size: opts.Size, Sealed: opts.Sealer != nil,
		Failed: s.MessagesFailed, Reconnects: s.Reconnects,
	}
	if elapsed > 0 {
		r.MsgsPerS = float64(r.Messages) / elapsed
		r.ReadingsPerS = float64(r.Readings) / elapsed
		r.MBPerS = float64(r.Bytes) / elapsed / 1e6
	}
	if opts.TPMSignatures != nil {
		r.TPMSignatures = opts.TPMSignatures() - sig0
	}
	r.RSSPeakKiB, r.RSSAnonKiB, r.RSSFileKiB = -1, -1, -1
	if m := status.ReadMemory(); m != nil {
		r.RSSPeakKiB, r.RSSAnonKiB, r.RSSFileKiB = m.RSSPeakKiB, m.AnonKiB, m.FileKiB
	}
	if err != nil {
		return r, fmt.Errorf("bench: %w", err)
	}
	if ctx.Err() != nil {
		return r, fmt.Errorf("bench: stopped after %.1fs: %w", elapsed, ctx.Err())
	}
	if s.Spool.Records != 0 {
		return r, fmt.Errorf("bench: %d messages were not acknowledged by the broker", s.Spool.Records)
	}
	return r, nil
}
