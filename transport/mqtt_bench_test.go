package transport

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"sync"
	"testing"
	"time"

	mqtt "github.com/eclipse/paho.mqtt.golang"
)

// BenchmarkPublish publishes 100-byte payloads over one mTLS connection to a
// test mosquitto (no subscriber: the broker's cost of fanning out is not
// the publisher's) and reports msgs/s and MQTT packets per TLS write, with
// the coalescing connection and without it, and for reference a plain paho
// client as its README suggests (tokens collected, at most 1,024
// unacknowledged, one TLS record per packet):
//
//	go test -run xxx -bench Publish ./transport
func BenchmarkPublish(b *testing.B) {
	l := newMQLab(b)
	for _, qos := range []byte{0, 1} {
		b.Run(fmt.Sprintf("qos%d/paho", qos), func(b *testing.B) { benchPlainPaho(b, l, qos) })
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

// benchPlainPaho is the reference: paho alone, tokens waited on 1,024 behind.
func benchPlainPaho(b *testing.B, l *mqLab, qos byte) {
	o := mqtt.NewClientOptions().AddBroker(l.broker.URL()).SetClientID("bench-paho").
		SetTLSConfig(l.clientTLS(b, "bench-paho")).SetAutoReconnect(false).SetProtocolVersion(4)
	pc := mqtt.NewClient(o)
	if tok := pc.Connect(); !tok.WaitTimeout(10*time.Second) || tok.Error() != nil {
		b.Fatalf("paho connect: %v", tok.Error())
	}
	defer pc.Disconnect(100)
	payload := make([]byte, 100)
	const window = 1024
	toks := make([]mqtt.Token, window)
	wait := func(tok mqtt.Token) {
		if !tok.WaitTimeout(30*time.Second) || tok.Error() != nil {
			b.Fatalf("paho publish: %v", tok.Error())
		}
	}
	b.SetBytes(int64(len(payload)))
	b.ResetTimer()
	start := time.Now()
	for i := 0; i < b.N; i++ {
		if t := toks[i%window]; t != nil {
			wait(t)
		}
		toks[i%window] = pc.Publish("bench/telemetry", qos, false, payload)
	}
	for _, t := range toks {
		if t != nil {
			wait(t)
		}
	}
	el := time.Since(start)
	b.StopTimer()
	b.ReportMetric(float64(b.N)/el.Seconds(), "msgs/s")
}
