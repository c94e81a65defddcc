package transport

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"sync"
	"testing"
	"time"
)

// BenchmarkPublish publishes 100-byte payloads over one mTLS connection to a
// test mosquitto (no subscriber: the broker's cost of fanning out is not
// the publisher's) and reports msgs/s and MQTT packets per TLS write, with
// the coalescing connection and without it:
//
//	go test -run xxx -bench Publish ./transport
func BenchmarkPublish(b *testing.B) {
	l := newMQLab(b)
	for _, qos := range []byte{0, 1} {
		for _, mode := range []string{"coalesced", "direct"} {
			b.Run(fmt.Sprintf("qos%d/%s", qos, mode), func(b *testing.B) {
				c, err := NewClient(ClientOptions{
					URLs:              []string{l.broker.URL()},
					TLS:               l.clientTLS(b, "bench"),
					ClientID:          "bench",
					DisableCoalescing: mode == "direct",
					Logger:            slog.New(slog.NewTextHandler(io.Discard, nil)),
				})
				if err != nil {
					b.Fatal(err)
				}
				if err := c.Start(context.Background()); err != nil {
					b.Fatal(err)
				}
				defer func() {
					ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
					defer cancel()
					_ = c.Close(ctx)
				}()
				mqWaitConnected(b, c, 10*time.Second)
				payload := make([]byte, 100)
				var wg sync.WaitGroup
				var failed sync.Once
				done := func(err error) {
					if err != nil {
						failed.Do(func() { b.Error(err) })
					}
					wg.Done()
				}
				before := c.Stats()
				b.SetBytes(int64(len(payload)))
				b.ResetTimer()
				start := time.Now()
				wg.Add(b.N)
				for i := 0; i < b.N; i++ {
					if err := c.Publish(context.Background(), "bench/telemetry", qos, false, payload, done); err != nil {
						b.Fatal(err)
					}
				}
				wg.Wait()
				el := time.Since(start)
				b.StopTimer()
				st := c.Stats()
				b.ReportMetric(float64(b.N)/el.Seconds(), "msgs/s")
				if sw := st.SocketWrites - before.SocketWrites; sw > 0 {
					b.ReportMetric(float64(st.PacketWrites-before.PacketWrites)/float64(sw), "pkts/write")
				}
			})
		}
	}
}
