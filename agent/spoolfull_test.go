package agent

import (
	"context"
	"log/slog"
	"testing"
	"time"

	"github.com/tpmagent/tpmagent/agent/batch"
	"github.com/tpmagent/tpmagent/agent/source"
	"github.com/tpmagent/tpmagent/agent/spool"
)

// TestSpoolFullPolicies fills a small real spool while the broker
// acknowledges nothing, then lets the broker acknowledge.
func TestSpoolFullPolicies(t *testing.T) {
	tests := []struct {
		name string
		full spool.FullPolicy
	}{
		{"block", spool.FullBlock},
		{"drop_oldest", spool.FullDropOldest},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			const n = 20000
			sp, err := spool.Open(t.TempDir(), spool.Options{MaxBytes: 256 << 10, SegmentBytes: 16 << 10, Fsync: spool.FsyncNever, Full: tt.full,
				Logger: slog.New(slog.DiscardHandler)})
			if err != nil {
				t.Fatal(err)
			}
			pub := newFakePub(100)
			pub.setHold(true)
			p, err := New(Options{Topic: "devices/d1/telemetry", QoS: 1, Queue: sp, Publisher: pub,
				Batch: batch.Options{Max: 4, Linger: time.Millisecond}, StopWhenSourcesDone: true, DrainTimeout: 30 * time.Second})
			if err != nil {
				t.Fatal(err)
			}
			p.Counters().SpoolStats = SpoolStats(sp)
			ctx, cancel := context.WithTimeout(context.Background(), 50*time.Second)
			defer cancel()
			runErr := make(chan error, 1)
			go func() { runErr <- p.Run(ctx, &source.Synthetic{Count: n, Size: 120}) }()

			switch tt.full {
			case spool.FullBlock:
				// The spool fills up and the source stalls.
				waitFor(t, "a full spool", func() bool { return sp.Stats().Bytes > 128<<10 })
				in := p.Counters().ReadingsIn.Load()
				time.Sleep(200 * time.Millisecond)
				if in2 := p.Counters().ReadingsIn.Load(); in2 >= n || in2-in > 8192+64 {
					t.Fatalf("source not blocked by a full spool: %d then %d readings in", in, in2)
				}
				if st := sp.Stats(); st.Bytes > 256<<10 || st.Dropped != 0 {
					t.Fatalf("block policy: spool %+v", st)
				}
			case spool.FullDropOldest:
				waitFor(t, "dropped records", func() bool { return p.Counters().Snapshot().Drops > 0 })
			}
			pub.setHold(false)
			if err := <-runErr; err != nil {
				t.Fatal(err)
			}
			got := seen(t, pub.messages(), p.Topic())
			snap := p.Counters().Snapshot()
			switch tt.full {
			case spool.FullBlock:
				checkAll(t, got, n)
				if snap.Drops != 0 {
					t.Fatalf("block policy dropped %d", snap.Drops)
				}
			case spool.FullDropOldest:
				// Dropped records may already have been in flight, so losses
				// are not asserted; the count and the newest readings are.
				if snap.Drops == 0 {
					t.Fatal("drop_oldest: drops not counted")
				}
				// Everything not dropped arrived: the newest readings are there.
				for i := n - 100; i < n; i++ {
					if got[i] == 0 {
						t.Fatalf("drop_oldest lost the newest reading %d", i)
					}
				}
				t.Logf("drop_oldest: %d of %d readings delivered, %d records dropped", len(got), n, snap.Drops)
			}
		})
	}
}
