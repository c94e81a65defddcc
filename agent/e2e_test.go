package agent

import (
	"context"
	"crypto/tls"
	"io"
	"log/slog"
	"net"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	mqtt "github.com/eclipse/paho.mqtt.golang"

	"github.com/tpmagent/tpmagent/agent/batch"
	"github.com/tpmagent/tpmagent/agent/source"
	"github.com/tpmagent/tpmagent/agent/spool"
	"github.com/tpmagent/tpmagent/internal/testenv"
	"github.com/tpmagent/tpmagent/transport"
)

// lab is a TLS mosquitto, a gate proxy in front of it for the agent, and a
// software-key client identity per CN.
type lab struct {
	pki    *testenv.PKI
	broker *testenv.Mosquitto
	proxy  *gateProxy
}

func newLab(t *testing.T) *lab {
	pki := testenv.NewPKI(t, "", "agent e2e CA")
	b := testenv.StartMosquitto(t, testenv.MosquittoOptions{PKI: pki})
	return &lab{pki: pki, broker: b, proxy: newGateProxy(t, b.Addr())}
}

func (l *lab) tls(t *testing.T, cn string) *tls.Config {
	_, _, cert := l.pki.SoftClient(t, cn)
	return &tls.Config{Certificates: []tls.Certificate{cert}, RootCAs: l.pki.Pool(), MinVersion: tls.VersionTLS13,
		ClientSessionCache: tls.NewLRUClientSessionCache(8)}
}

// gateProxy forwards TCP to the broker. While closed it refuses
// connections, so a test decides when the agent may reconnect; while frozen
// it holds the agent's bytes, so messages stay unacknowledged in flight.
type gateProxy struct {
	l      net.Listener
	target string
	open   atomic.Bool
	frozen atomic.Bool
}

func newGateProxy(t *testing.T, target string) *gateProxy {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	g := &gateProxy{l: l, target: target}
	g.open.Store(true)
	t.Cleanup(func() { l.Close() })
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			if !g.open.Load() {
				c.Close()
				continue
			}
			b, err := net.Dial("tcp", target)
			if err != nil {
				c.Close()
				continue
			}
			go func() {
				buf := make([]byte, 32<<10)
				for {
					n, err := c.Read(buf)
					for g.frozen.Load() {
						time.Sleep(time.Millisecond)
					}
					if n > 0 {
						if _, werr := b.Write(buf[:n]); werr != nil {
							break
						}
					}
					if err != nil {
						break
					}
				}
				b.Close()
				c.Close()
			}()
			go func() { io.Copy(c, b); b.Close(); c.Close() }()
		}
	}()
	return g
}

func (g *gateProxy) URL() string { return "mqtts://" + g.l.Addr().String() }

// counter subscribes to the telemetry topic and counts reading values.
type counter struct {
	t     *testing.T
	lab   *lab
	topic string
	cfg   *tls.Config
	mu    sync.Mutex
	seen  []uint32
	total int
	pc    mqtt.Client
}

func newCounter(t *testing.T, l *lab, topic string, n int) *counter {
	c := &counter{t: t, lab: l, topic: topic, cfg: l.tls(t, "collector"), seen: make([]uint32, n)}
	c.connect()
	t.Cleanup(func() { c.pc.Disconnect(50) })
	return c
}

// connect (re)connects straight to the broker and subscribes at QoS 1.
func (c *counter) connect() {
	c.t.Helper()
	o := mqtt.NewClientOptions().AddBroker(c.lab.broker.URL()).SetClientID("collector").SetTLSConfig(c.cfg).
		SetCleanSession(true).SetAutoReconnect(false).SetProtocolVersion(4).SetOrderMatters(false)
	pc := mqtt.NewClient(o)
	if tok := pc.Connect(); !tok.WaitTimeout(10*time.Second) || tok.Error() != nil {
		c.t.Fatalf("counter: connect: %v", tok.Error())
	}
	tok := pc.Subscribe(c.topic, 1, func(_ mqtt.Client, m mqtt.Message) {
		rs, err := batch.Decode(m.Payload())
		if err != nil {
			c.t.Errorf("counter: payload on %s does not decode: %v", m.Topic(), err)
			return
		}
		c.mu.Lock()
		for _, r := range rs {
			if v := int(r.Value); v >= 0 && v < len(c.seen) {
				c.seen[v]++
			}
		}
		c.total += len(rs)
		c.mu.Unlock()
	})
	if !tok.WaitTimeout(10*time.Second) || tok.Error() != nil {
		c.t.Fatalf("counter: subscribe: %v", tok.Error())
	}
	c.pc = pc
}

// missing returns how many values were never seen, the first missing one,
// and the number of readings received (duplicates included).
func (c *counter) missing() (n, first, total int) {
	c.mu.Lock()
	defer c.mu.Unlock()
	first = -1
	for i, s := range c.seen {
		if s == 0 {
			if first < 0 {
				first = i
			}
			n++
		}
	}
	return n, first, c.total
}

func (c *counter) distinct() int {
	n, _, _ := c.missing()
	return len(c.seen) - n
}

func startClient(t *testing.T, l *lab, url string) *transport.Client {
	cl, err := transport.NewClient(transport.ClientOptions{URLs: []string{url}, TLS: l.tls(t, "dev-0001"), ClientID: "dev-0001",
		BackoffBase: 20 * time.Millisecond, BackoffMax: 200 * time.Millisecond, StatusTopic: "-", Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		t.Fatal(err)
	}
	if err := cl.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_ = cl.Close(ctx)
	})
	return cl
}

func TestEndToEndMosquitto(t *testing.T) {
	tests := []struct {
		name     string
		restarts int
		batch    int
	}{
		{"100k-qos1", 0, 1},
		{"100k-qos1-broker-killed-twice", 2, 1},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			const n = 100000
			const topic = "devices/dev-0001/telemetry"
			l := newLab(t)
			cnt := newCounter(t, l, topic, n)
			cl := startClient(t, l, l.proxy.URL())
			sp, err := spool.Open(t.TempDir(), spool.Options{Fsync: spool.FsyncBatch, Logger: slog.New(slog.DiscardHandler)})
			if err != nil {
				t.Fatal(err)
			}
			p, err := New(Options{Topic: topic, QoS: 1, Queue: sp, Publisher: cl, Batch: batch.Options{Max: tt.batch, Linger: 2 * time.Millisecond},
				StopWhenSourcesDone: true, DrainTimeout: 40 * time.Second})
			if err != nil {
				t.Fatal(err)
			}
			ctx, cancel := context.WithTimeout(context.Background(), 55*time.Second)
			defer cancel()
			start := time.Now()
			runErr := make(chan error, 1)
			go func() { runErr <- p.Run(ctx, &source.Synthetic{Count: n, Size: 64}) }()
			for i := 1; i <= tt.restarts; i++ {
				at := n * i / (tt.restarts + 1)
				deadline := time.Now().Add(20 * time.Second)
				// Count what the broker acknowledged, not what the subscriber
				// saw: the subscriber lags, so after a restart its count may
				// already be past the next mark while the agent is still
				// reconnecting, and the kill would find nothing in flight.
				for p.Counters().MessagesAcked.Load() < uint64(at) {
					if time.Now().After(deadline) {
						t.Log(l.broker.LogText())
						t.Fatalf("stuck before kill %d: %d distinct received; pipeline %+v; client %+v", i, cnt.distinct(), p.Counters().Snapshot(), cl.Stats())
					}
					time.Sleep(5 * time.Millisecond)
				}
				// Hold the agent's bytes, let the subscriber drain what the
				// broker already has (a killed broker loses what it queued
				// for a subscriber), then kill with messages in flight.
				l.proxy.frozen.Store(true)
				for last, stable := -1, 0; stable < 30; time.Sleep(10 * time.Millisecond) {
					if d := cnt.distinct(); d == last {
						stable++
					} else {
						last, stable = d, 0
					}
				}
				l.proxy.open.Store(false)
				inflight := cl.Stats().Inflight
				l.broker.Kill()
				l.proxy.frozen.Store(false)
				t.Logf("broker killed: %d distinct readings received, %d messages acked, %d in flight", cnt.distinct(), p.Counters().MessagesAcked.Load(), inflight)
				if inflight == 0 {
					t.Errorf("kill %d: no message in flight: the test did not kill mid-stream", i)
				}
				l.broker.Start()
				cnt.connect() // the counter subscribes again before the agent may reconnect
				l.proxy.open.Store(true)
			}
			if err := <-runErr; err != nil {
				t.Fatal(err)
			}
			elapsed := time.Since(start)
			deadline := time.Now().Add(10 * time.Second)
			for {
				miss, first, total := cnt.missing()
				if miss == 0 {
					snap := p.Counters().Snapshot()
					t.Logf("%d readings in %v (%.0f readings/s); received %d (duplicates %d); published %d, acked %d, failed %d, reconnects %d",
						n, elapsed.Round(time.Millisecond), n/elapsed.Seconds(), total, total-n, snap.MessagesPublished, snap.MessagesAcked, snap.MessagesFailed, snap.Reconnects)
					if tt.restarts > 0 && snap.Reconnects < uint64(tt.restarts) {
						t.Errorf("reconnects = %d, want at least %d", snap.Reconnects, tt.restarts)
					}
					break
				}
				if time.Now().After(deadline) {
					t.Fatalf("%d of %d readings never reached the subscriber (first %d); stats %+v", miss, n, first, p.Counters().Snapshot())
				}
				time.Sleep(20 * time.Millisecond)
			}
			if strings.Contains(l.broker.LogText(), "out of memory") {
				t.Error("broker dropped a client for memory")
			}
		})
	}
}
