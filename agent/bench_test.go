package agent

import (
	"context"
	"testing"
	"time"
)

func TestBenchAgainstMosquitto(t *testing.T) {
	tests := []struct {
		qos   byte
		batch int
	}{{0, 1}, {1, 1}, {1, 64}}
	for _, tt := range tests {
		l := newLab(t)
		const n = 50000
		cnt := newCounter(t, l, "devices/dev-0001/telemetry", n)
		cl := startClient(t, l, l.broker.URL())
		ctx, cancel := context.WithTimeout(context.Background(), 50*time.Second)
		r, err := Bench(ctx, cl, BenchOptions{Count: n, QoS: tt.qos, Size: 64, Batch: tt.batch, Topic: "devices/dev-0001/telemetry"})
		cancel()
		if err != nil {
			t.Fatal(err)
		}
		t.Logf("qos %d batch %d: %+v", tt.qos, tt.batch, r)
		if r.Readings != n || r.Messages == 0 || r.RSSPeakKiB <= 0 || r.RSSAnonKiB <= 0 || r.RSSFileKiB <= 0 || r.MsgsPerS <= 0 {
			t.Fatalf("result %+v", r)
		}
		if tt.qos == 1 {
			waitFor(t, "subscriber sees every reading", func() bool { m, _, _ := cnt.missing(); return m == 0 })
		}
	}
}
