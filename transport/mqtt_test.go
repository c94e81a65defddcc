package transport

import (
	"bytes"
	"context"
	"crypto/tls"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	mqtt "github.com/eclipse/paho.mqtt.golang"

	"github.com/tpmagent/tpmagent/internal/testenv"
)

// mqLab is one PKI and one TLS mosquitto for a test.
type mqLab struct {
	pki    *testenv.PKI
	broker *testenv.Mosquitto
}

func newMQLab(t testing.TB) *mqLab {
	t.Helper()
	pki := testenv.NewPKI(t, "", "transport test CA")
	return &mqLab{pki: pki, broker: testenv.StartMosquitto(t, testenv.MosquittoOptions{PKI: pki})}
}

// clientTLS is a software-key client configuration for cn (tests stand in
// for the TPM-backed configuration of transport.TLSIdentity).
func (l *mqLab) clientTLS(t testing.TB, cn string) *tls.Config {
	t.Helper()
	_, _, cert := l.pki.SoftClient(t, cn)
	return &tls.Config{
		Certificates:       []tls.Certificate{cert},
		RootCAs:            l.pki.Pool(),
		MinVersion:         tls.VersionTLS13,
		ClientSessionCache: tls.NewLRUClientSessionCache(8),
	}
}

// mqLogger logs to the test output.
func mqLogger(t testing.TB) *slog.Logger {
	return slog.New(slog.NewTextHandler(mqTWriter{t}, &slog.HandlerOptions{Level: slog.LevelDebug}))
}

type mqTWriter struct{ t testing.TB }

func (w mqTWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimRight(string(p), "\n"))
	return len(p), nil
}

// newClient makes and starts a Client; Close runs at cleanup.
func (l *mqLab) newClient(t testing.TB, mutate func(*ClientOptions)) *Client {
	t.Helper()
	opts := ClientOptions{
		URLs:        []string{l.broker.URL()},
		TLS:         l.clientTLS(t, "dev-0001"),
		ClientID:    "dev-0001",
		BackoffBase: 50 * time.Millisecond,
		BackoffMax:  500 * time.Millisecond,
		Logger:      mqLogger(t),
	}
	if mutate != nil {
		mutate(&opts)
	}
	c, err := NewClient(opts)
	if err != nil {
		t.Fatal(err)
	}
	if err := c.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_ = c.Close(ctx)
	})
	return c
}

func mqWaitConnected(t testing.TB, c *Client, d time.Duration) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), d)
	defer cancel()
	if err := c.WaitConnected(ctx); err != nil {
		t.Fatalf("not connected after %v: %v; stats %+v", d, err, c.Stats())
	}
}

// mqSubscriber is a plain paho client with its own certificate, connected
// straight to the broker.
type mqSubscriber struct {
	pc   mqtt.Client
	mu   sync.Mutex
	msgs map[string][][]byte // topic -> payloads (when keep)
	keep bool
	seen *mqSeqSet
	n    atomic.Int64
}

func (l *mqLab) subscribe(t testing.TB, cn, topic string, qos byte, seen *mqSeqSet, keep bool) *mqSubscriber {
	t.Helper()
	return l.subscribeSession(t, cn, topic, qos, seen, keep, true)
}

// subscribeSession is subscribe with a choice of clean session (false: the
// broker queues QoS 1 messages while the subscriber is away).
func (l *mqLab) subscribeSession(t testing.TB, cn, topic string, qos byte, seen *mqSeqSet, keep, clean bool) *mqSubscriber {
	t.Helper()
	return startMQSubscriber(t, l.broker.URL(), l.clientTLS(t, cn), cn, topic, qos, seen, keep, clean)
}

// startMQSubscriber connects a plain paho client (MQTT 3.1.1) with tlsCfg
// and client id cn to url and subscribes to topic at qos: it counts
// messages, records 8-byte sequence numbers in seen, and keeps payloads
// when keep is set.
func startMQSubscriber(t testing.TB, url string, tlsCfg *tls.Config, cn, topic string, qos byte, seen *mqSeqSet, keep, clean bool) *mqSubscriber {
	t.Helper()
	s := &mqSubscriber{msgs: map[string][][]byte{}, keep: keep, seen: seen}
	o := mqtt.NewClientOptions().AddBroker(url).SetClientID(cn).
		SetTLSConfig(tlsCfg).SetCleanSession(clean).SetAutoReconnect(false).
		SetProtocolVersion(4)
	s.pc = mqtt.NewClient(o)
	if tok := s.pc.Connect(); !tok.WaitTimeout(10*time.Second) || tok.Error() != nil {
		t.Fatalf("subscriber %s: connect to %s: %v", cn, url, tok.Error())
	}
	tok := s.pc.Subscribe(topic, qos, func(_ mqtt.Client, m mqtt.Message) {
		s.n.Add(1)
		if s.seen != nil && len(m.Payload()) >= 8 {
			s.seen.add(binary.BigEndian.Uint64(m.Payload()))
		}
		if s.keep {
			s.mu.Lock()
			s.msgs[m.Topic()] = append(s.msgs[m.Topic()], append([]byte(nil), m.Payload()...))
			s.mu.Unlock()
		}
	})
	if !tok.WaitTimeout(10*time.Second) || tok.Error() != nil {
		t.Fatalf("subscriber %s: subscribe %s: %v", cn, topic, tok.Error())
	}
	t.Cleanup(func() { s.pc.Disconnect(50) })
	return s
}

func (s *mqSubscriber) payloads(topic string) []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	var out []string
	for _, p := range s.msgs[topic] {
		out = append(out, string(p))
	}
	return out
}

// mqWaitFor polls cond until it holds or d passes.
func mqWaitFor(t testing.TB, d time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %v waiting for %s", d, what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// mqSeqSet records which sequence numbers arrived.
type mqSeqSet struct {
	mu    sync.Mutex
	count []uint32
	dups  int
}

func newMQSeqSet(n int) *mqSeqSet { return &mqSeqSet{count: make([]uint32, n)} }

func (s *mqSeqSet) add(seq uint64) {
	s.mu.Lock()
	if seq < uint64(len(s.count)) {
		if s.count[seq] > 0 {
			s.dups++
		}
		s.count[seq]++
	}
	s.mu.Unlock()
}

// missing returns how many sequence numbers were never seen, and the first.
func (s *mqSeqSet) missing() (int, int) {
	s.mu.Lock()
	defer s.mu.Unlock()
	n, first := 0, -1
	for i, c := range s.count {
		if c == 0 {
			if first < 0 {
				first = i
			}
			n++
		}
	}
	return n, first
}

func mqPayload(seq uint64, size int) []byte {
	p := make([]byte, size)
	binary.BigEndian.PutUint64(p, seq)
	return p
}

func TestParseMQTTURL(t *testing.T) {
	tests := []struct {
		raw        string
		plain      bool
		wantHost   string
		wantSecure bool
		wantErr    string
	}{
		{raw: "mqtts://broker", wantHost: "broker:8883", wantSecure: true},
		{raw: "ssl://10.0.0.1:8884", wantHost: "10.0.0.1:8884", wantSecure: true},
		{raw: "tls://[::1]:8883", wantHost: "[::1]:8883", wantSecure: true},
		{raw: "tcp://broker:1883", wantErr: "allow_plaintext"},
		{raw: "mqtt://broker", wantErr: "allow_plaintext"},
		{raw: "tcp://broker", plain: true, wantHost: "broker:1883"},
		{raw: "ws://broker", wantErr: "unsupported scheme"},
		{raw: "mqtts://", wantErr: "no host"},
	}
	for _, tt := range tests {
		t.Run(tt.raw, func(t *testing.T) {
			u, secure, err := parseMQTTURL(tt.raw, tt.plain)
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("err = %v, want it to mention %q", err, tt.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if u.Host != tt.wantHost || secure != tt.wantSecure {
				t.Fatalf("got %s secure=%v, want %s secure=%v", u.Host, secure, tt.wantHost, tt.wantSecure)
			}
		})
	}
}

func TestPlaintextRefused(t *testing.T) {
	var logBuf bytes.Buffer
	log := slog.New(slog.NewTextHandler(&mqSyncWriter{w: &logBuf}, nil))
	_, err := NewClient(ClientOptions{URLs: []string{"mqtts://127.0.0.1:1", "tcp://127.0.0.1:1883"}, TLS: &tls.Config{}, ClientID: "d", Logger: log})
	if err == nil || !strings.Contains(err.Error(), "broker.urls[1]") || !strings.Contains(err.Error(), "allow_plaintext") {
		t.Fatalf("plaintext URL without AllowPlaintext: err = %v, want a refusal naming broker.urls[1] and allow_plaintext", err)
	}
	if _, err := NewClient(ClientOptions{URLs: []string{"tcp://127.0.0.1:1883"}, AllowPlaintext: true, ClientID: "d", Logger: log}); err != nil {
		t.Fatalf("AllowPlaintext: %v", err)
	}
	if !strings.Contains(logBuf.String(), "level=WARN") || !strings.Contains(logBuf.String(), "plaintext") {
		t.Fatalf("no warning logged for a plaintext URL; log:\n%s", logBuf.String())
	}
}

type mqSyncWriter struct {
	mu sync.Mutex
	w  io.Writer
}

func (s *mqSyncWriter) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.w.Write(p)
}

func TestNewClientOptions(t *testing.T) {
	tests := []struct {
		name    string
		opts    ClientOptions
		wantErr string
	}{
		{"no id", ClientOptions{URLs: []string{"mqtts://h"}, TLS: &tls.Config{}}, "client id"},
		{"no urls", ClientOptions{ClientID: "d", TLS: &tls.Config{}}, "broker.urls"},
		{"no tls", ClientOptions{ClientID: "d", URLs: []string{"mqtts://h"}}, "TLS configuration"},
		{"window", ClientOptions{ClientID: "d", URLs: []string{"mqtts://h"}, TLS: &tls.Config{}, Inflight: 70000}, "inflight"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := NewClient(tt.opts)
			if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
				t.Fatalf("err = %v, want %q", err, tt.wantErr)
			}
		})
	}
}

func TestBackoffFullJitter(t *testing.T) {
	base, limit := 100*time.Millisecond, 2*time.Second
	for attempt := 0; attempt < 40; attempt++ {
		ceil := limit
		if attempt < 5 {
			ceil = base << attempt
		}
		var hi time.Duration
		for i := 0; i < 200; i++ {
			d := backoff(base, limit, attempt)
			if d < 0 || d >= ceil {
				t.Fatalf("attempt %d: backoff %v outside [0, %v)", attempt, d, ceil)
			}
			hi = max(hi, d)
		}
		if hi < ceil/2 {
			t.Fatalf("attempt %d: 200 draws all below %v: not spread over [0, %v)", attempt, ceil/2, ceil)
		}
	}
}

// TestPublishCounted: every message of 100,000 at QoS 1 and 200,000 at
// QoS 0 reaches a mqSubscriber with its own certificate; done callbacks run
// in publish order; the window is never exceeded.
func TestPublishCounted(t *testing.T) {
	l := newMQLab(t)
	c := l.newClient(t, func(o *ClientOptions) { o.Inflight = 512 })
	mqWaitConnected(t, c, 10*time.Second)
	for _, tc := range []struct {
		qos byte
		n   int
	}{{1, 100_000}, {0, 200_000}} {
		t.Run(fmt.Sprintf("qos%d", tc.qos), func(t *testing.T) {
			topic := fmt.Sprintf("devices/dev-0001/telemetry/q%d", tc.qos)
			seen := newMQSeqSet(tc.n)
			sub := l.subscribe(t, fmt.Sprintf("counter-q%d", tc.qos), topic, 1, seen, false)
			before := c.Stats()
			var next atomic.Uint64 // next expected callback sequence
			var orderErr atomic.Value
			start := time.Now()
			for i := 0; i < tc.n; i++ {
				seq := uint64(i)
				err := c.Publish(context.Background(), topic, tc.qos, false, mqPayload(seq, 100), func(err error) {
					if err != nil {
						orderErr.CompareAndSwap(nil, fmt.Errorf("done(%d): %w", seq, err))
					}
					if got := next.Add(1) - 1; got != seq {
						orderErr.CompareAndSwap(nil, fmt.Errorf("done for %d called in position %d", seq, got))
					}
				})
				if err != nil {
					t.Fatalf("publish %d: %v", i, err)
				}
			}
			mqWaitFor(t, 30*time.Second, "all callbacks", func() bool { return next.Load() == uint64(tc.n) })
			pubTime := time.Since(start)
			mqWaitFor(t, 30*time.Second, fmt.Sprintf("mqSubscriber to count %d", tc.n), func() bool { return sub.n.Load() >= int64(tc.n) })
			if e := orderErr.Load(); e != nil {
				t.Fatal(e)
			}
			if miss, first := seen.missing(); miss > 0 {
				t.Fatalf("%d of %d messages never arrived (first %d)", miss, tc.n, first)
			}
			st := c.Stats()
			if st.InflightHi > 512 {
				t.Fatalf("in-flight peak %d exceeds the window 512", st.InflightHi)
			}
			if got := st.Acked - before.Acked; got != uint64(tc.n) {
				t.Fatalf("acked %d, want %d", got, tc.n)
			}
			pw, sw := st.PacketWrites-before.PacketWrites, st.SocketWrites-before.SocketWrites
			t.Logf("QoS%d: %d messages in %v (%.0f msg/s incl. mqSubscriber), %d packet writes in %d TLS writes (%.1f per write), in-flight peak %d, duplicates %d",
				tc.qos, tc.n, pubTime.Round(time.Millisecond), float64(tc.n)/pubTime.Seconds(), pw, sw, float64(pw)/float64(max(sw, 1)), st.InflightHi, seen.dups)
			if sw >= pw {
				t.Errorf("coalescing did not coalesce: %d socket writes for %d packets", sw, pw)
			}
		})
	}
}

// TestInflightWindowNeverExceeded checks the window from inside the done
// callbacks with a small window and several publishing goroutines.
func TestInflightWindowNeverExceeded(t *testing.T) {
	l := newMQLab(t)
	const window = 8
	c := l.newClient(t, func(o *ClientOptions) { o.Inflight = window })
	mqWaitConnected(t, c, 10*time.Second)
	var outstanding, peak atomic.Int64
	var wg sync.WaitGroup
	var done sync.WaitGroup
	for g := 0; g < 4; g++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; i < 2000; i++ {
				done.Add(1)
				// Count before Publish: the callback may run before Publish returns.
				n := outstanding.Add(1)
				err := c.Publish(context.Background(), "devices/dev-0001/w", byte(i%2), false, mqPayload(uint64(i), 32), func(error) {
					outstanding.Add(-1)
					done.Done()
				})
				if err != nil {
					t.Error(err)
					outstanding.Add(-1)
					done.Done()
					return
				}
				_ = n
				if cur := c.Stats().Inflight; cur > peak.Load() {
					peak.Store(cur)
				}
			}
		}()
	}
	wg.Wait()
	done.Wait()
	st := c.Stats()
	if st.InflightHi > window || peak.Load() > window {
		t.Fatalf("in-flight peak %d (sampled %d) exceeds window %d", st.InflightHi, peak.Load(), window)
	}
	if st.InflightHi < window/2 {
		t.Fatalf("in-flight peak %d: the window of %d was hardly used, the test proves nothing", st.InflightHi, window)
	}
	if st.Inflight != 0 {
		t.Fatalf("in-flight %d after every callback ran", st.Inflight)
	}
}

// TestFailover: the first URL is a closed port, the second a broker.
func TestFailover(t *testing.T) {
	l := newMQLab(t)
	closed := fmt.Sprintf("mqtts://127.0.0.1:%d", testenv.FreePort(t))
	c := l.newClient(t, func(o *ClientOptions) { o.URLs = []string{closed, l.broker.URL()} })
	mqWaitConnected(t, c, 10*time.Second)
	st := c.Stats()
	if st.Broker != l.broker.URL() {
		t.Fatalf("connected to %q, want the second URL %q", st.Broker, l.broker.URL())
	}
	if st.Failures < 1 || !strings.Contains(st.LastError, "refused") {
		t.Fatalf("first URL's failure not recorded: failures %d, last error %q", st.Failures, st.LastError)
	}
	if !strings.Contains(l.broker.LogText(), "dev-0001") {
		t.Fatalf("broker log does not show the client:\n%s", l.broker.LogText())
	}
	cs, ok := c.ConnectionState()
	if !ok || cs.Version != tls.VersionTLS13 {
		t.Fatalf("ConnectionState: ok=%v version %x, want TLS 1.3", ok, cs.Version)
	}
}

// mqProxy forwards loopback connections to a target. Cut drops every
// connection (a network failure as the broker sees it); SetUp(false) closes
// the listening port (connection refused, as for a broker that is down) and
// SetUp(true) listens on it again.
type mqProxy struct {
	t      testing.TB
	addr   string
	target string
	mu     sync.Mutex
	ln     net.Listener
	conns  map[net.Conn]struct{}
}

func newMQProxy(t testing.TB, target string) *mqProxy {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := &mqProxy{t: t, addr: ln.Addr().String(), ln: ln, target: target, conns: map[net.Conn]struct{}{}}
	go p.serve(ln)
	t.Cleanup(func() { p.SetUp(false); p.Cut() })
	return p
}

func (p *mqProxy) URL() string { return "mqtts://" + p.addr }

func (p *mqProxy) serve(ln net.Listener) {
	for {
		in, err := ln.Accept()
		if err != nil {
			return
		}
		out, err := net.Dial("tcp", p.target)
		if err != nil {
			in.Close()
			continue
		}
		p.mu.Lock()
		p.conns[in], p.conns[out] = struct{}{}, struct{}{}
		p.mu.Unlock()
		go func() { _, _ = io.Copy(out, in); out.Close(); in.Close() }()
		go func() { _, _ = io.Copy(in, out); out.Close(); in.Close() }()
	}
}

func (p *mqProxy) SetUp(up bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	switch {
	case !up && p.ln != nil:
		p.ln.Close()
		p.ln = nil
	case up && p.ln == nil:
		var err error
		for i := 0; i < 100; i++ {
			if p.ln, err = net.Listen("tcp", p.addr); err == nil {
				go p.serve(p.ln)
				return
			}
			time.Sleep(10 * time.Millisecond)
		}
		p.t.Errorf("proxy: listen again on %s: %v", p.addr, err)
	}
}

func (p *mqProxy) Cut() {
	p.mu.Lock()
	defer p.mu.Unlock()
	for c := range p.conns {
		c.Close()
		delete(p.conns, c)
	}
}

// TestLastWillAndReconnect: the connection drops (as the broker sees it:
// socket closed without DISCONNECT) → the mqSubscriber sees the last will
// "offline"; the path comes back → the client reconnects after backoff and
// "online" is published again.
func TestLastWillAndReconnect(t *testing.T) {
	l := newMQLab(t)
	proxy := newMQProxy(t, l.broker.Addr())
	status := "devices/dev-0001/status"
	sub := l.subscribe(t, "watcher", status, 1, nil, true)
	c := l.newClient(t, func(o *ClientOptions) {
		o.URLs = []string{proxy.URL()}
		o.TLS.ServerName = "127.0.0.1"
	})
	mqWaitConnected(t, c, 10*time.Second)
	mqWaitFor(t, 5*time.Second, `"online"`, func() bool { return strings.Join(sub.payloads(status), ",") == "online" })

	proxy.SetUp(false)
	proxy.Cut()
	mqWaitFor(t, 5*time.Second, `last will "offline"`, func() bool { return strings.Join(sub.payloads(status), ",") == "online,offline" })
	mqWaitFor(t, 5*time.Second, "client to notice", func() bool { return !c.Connected() })
	mqWaitFor(t, 10*time.Second, "two failed reconnect rounds", func() bool { return c.Stats().Failures >= 2 })
	if !strings.Contains(l.broker.LogText(), "dev-0001") {
		t.Fatal("broker log lacks the client")
	}

	proxy.SetUp(true)
	select {
	case <-c.Connections():
	case <-time.After(10 * time.Second):
	}
	mqWaitConnected(t, c, 10*time.Second)
	mqWaitFor(t, 5*time.Second, `"online" again`, func() bool { return strings.Join(sub.payloads(status), ",") == "online,offline,online" })
	st := c.Stats()
	if st.Reconnects != 1 {
		t.Fatalf("reconnects = %d, want 1", st.Reconnects)
	}
	if !st.Resumed {
		t.Errorf("reconnection did not resume the TLS session (shared cache)")
	}
}

// TestBrokerKilled: the broker goes down during a QoS 1 stream; messages
// outstanding get ErrConnectionLost, Publish blocks while down (QoS 0 is not
// dropped), the client reconnects with backoff once the broker is back, and
// resending the failed messages delivers them.
//
// "kill" is SIGKILL without broker persistence: messages the broker had
// acknowledged but not yet forwarded die with it (the broker's loss, not
// the publisher's): the test checks that only such messages are missing.
// "stop" is SIGTERM with persistence and a persistent subscriber session:
// the broker keeps what it acknowledged, so every sequence number arrives.
func TestBrokerKilled(t *testing.T) {
	for _, tc := range []struct {
		name       string
		persistent bool
	}{{"kill", false}, {"stop", true}} {
		t.Run(tc.name, func(t *testing.T) { testBrokerDown(t, tc.persistent) })
	}
}

func testBrokerDown(t *testing.T, persistent bool) {
	pki := testenv.NewPKI(t, "", "transport test CA")
	bo := testenv.MosquittoOptions{PKI: pki}
	if persistent {
		bo.Extra = []string{"persistence true", "persistence_location " + t.TempDir() + "/"}
	}
	l := &mqLab{pki: pki, broker: testenv.StartMosquitto(t, bo)}
	// The publisher reaches the broker through a proxy so the test can hold
	// it back until the subscriber is back after the restart; otherwise a
	// clean-session subscriber would miss what is published before it is.
	proxy := newMQProxy(t, l.broker.Addr())
	const n = 30_000
	topic := "devices/dev-0001/telemetry"
	seen := newMQSeqSet(n)
	sub := l.subscribeSession(t, "counter", topic, 1, seen, false, !persistent)
	c := l.newClient(t, func(o *ClientOptions) {
		o.URLs = []string{proxy.URL()}
		o.Inflight = 1024
	})
	mqWaitConnected(t, c, 10*time.Second)

	var mu sync.Mutex
	var lost []uint64
	var order []uint64
	var doneCount atomic.Int64
	var otherErr error
	cb := func(seq uint64) func(error) {
		return func(err error) {
			mu.Lock()
			defer mu.Unlock()
			order = append(order, seq)
			switch {
			case err == nil:
			case errors.Is(err, ErrConnectionLost):
				lost = append(lost, seq)
			default:
				otherErr = err
			}
			doneCount.Add(1)
		}
	}
	publishErr := make(chan error, 1)
	go func() {
		for i := uint64(0); i < n; i++ {
			if err := c.Publish(context.Background(), topic, 1, false, mqPayload(i, 100), cb(i)); err != nil {
				publishErr <- err
				return
			}
		}
		publishErr <- nil
	}()
	mqWaitFor(t, 20*time.Second, "5,000 acknowledged", func() bool { return c.Stats().Acked >= 5000 })
	proxy.SetUp(false)
	if persistent {
		l.broker.Stop()
	} else {
		l.broker.Kill()
	}
	mqWaitFor(t, 5*time.Second, "connection loss noticed", func() bool { return !c.Connected() })

	// While down, Publish (QoS 0 too) blocks instead of dropping.
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	err := c.Publish(ctx, "devices/dev-0001/q0", 0, false, []byte("x"), nil)
	cancel()
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("QoS 0 publish while disconnected returned %v, want it to block until ctx ends", err)
	}
	time.Sleep(300 * time.Millisecond)
	if f := c.Stats().Failures; f < 1 {
		t.Fatalf("no reconnect attempt while the broker was down (failures %d)", f)
	}

	l.broker.Start()
	l.subscribeSession(t, "counter", topic, 1, seen, false, !persistent)
	proxy.SetUp(true)
	mqWaitConnected(t, c, 15*time.Second)
	if err := <-publishErr; err != nil {
		t.Fatalf("publish stream: %v", err)
	}
	mqWaitFor(t, 30*time.Second, "every callback", func() bool { return doneCount.Load() == n })

	mu.Lock()
	resend := append([]uint64(nil), lost...)
	if otherErr != nil {
		t.Fatalf("callback error other than ErrConnectionLost: %v", otherErr)
	}
	for i, seq := range order {
		if seq != uint64(i) {
			t.Fatalf("callback %d was for %d: not in publish order", i, seq)
		}
	}
	mu.Unlock()
	if len(resend) == 0 {
		t.Fatal("no message was outstanding when the broker went down: ErrConnectionLost not exercised")
	}
	var resent sync.WaitGroup
	for _, seq := range resend {
		resent.Add(1)
		if err := c.Publish(context.Background(), topic, 1, false, mqPayload(seq, 100), func(err error) {
			if err != nil {
				t.Errorf("resend %d: %v", seq, err)
			}
			resent.Done()
		}); err != nil {
			t.Fatal(err)
		}
	}
	resent.Wait()
	firstLost := resend[0]
	// Everything from the first lost message on was resent or published
	// after the reconnect: all of it must arrive.
	mqWaitFor(t, 10*time.Second, "every sequence number from the first lost one", func() bool {
		seen.mu.Lock()
		defer seen.mu.Unlock()
		for _, c := range seen.count[firstLost:] {
			if c == 0 {
				return false
			}
		}
		return true
	})
	if persistent {
		mqWaitFor(t, 10*time.Second, "every sequence number", func() bool { m, _ := seen.missing(); return m == 0 })
	}
	missing, first := seen.missing()
	st := c.Stats()
	t.Logf("%d got ErrConnectionLost (from %d) and were resent; acknowledged by the broker but lost with it: %d (first %d); subscriber saw %d before the outage, duplicates %d; reconnects %d, failures %d",
		len(resend), firstLost, missing, first, sub.n.Load(), seen.dups, st.Reconnects, st.Failures)
	if st.Reconnects != 1 {
		t.Fatalf("reconnects %d, want 1", st.Reconnects)
	}
}

// TestGracefulClose: Close publishes "offline" retained and disconnects
// cleanly (the broker logs a DISCONNECT, not a socket error); Publish then
// returns ErrClosed.
func TestGracefulClose(t *testing.T) {
	l := newMQLab(t)
	status := "devices/dev-0001/status"
	sub := l.subscribe(t, "watcher", status, 1, nil, true)
	c := l.newClient(t, nil)
	mqWaitConnected(t, c, 10*time.Second)
	var acked atomic.Int64
	for i := 0; i < 1000; i++ {
		if err := c.Publish(context.Background(), "devices/dev-0001/t", 1, false, mqPayload(uint64(i), 50), func(err error) {
			if err == nil {
				acked.Add(1)
			}
		}); err != nil {
			t.Fatal(err)
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := c.Close(ctx); err != nil {
		t.Fatal(err)
	}
	if acked.Load() != 1000 {
		t.Fatalf("Close drained %d of 1000 in-flight messages", acked.Load())
	}
	mqWaitFor(t, 5*time.Second, `"offline"`, func() bool { return strings.Join(sub.payloads(status), ",") == "online,offline" })
	if err := c.Publish(context.Background(), "x", 0, false, nil, nil); !errors.Is(err, ErrClosed) {
		t.Fatalf("Publish after Close: %v, want ErrClosed", err)
	}
	mqWaitFor(t, 2*time.Second, "broker log of the disconnect", func() bool {
		return strings.Contains(l.broker.LogText(), "Client dev-0001 disconnected.")
	})
	if log := l.broker.LogText(); strings.Contains(log, "Client dev-0001 closed its connection") || strings.Contains(log, "Socket error on client dev-0001") {
		t.Fatalf("broker saw an unclean disconnect:\n%s", log)
	}
	// A new mqSubscriber sees the retained "offline".
	late := l.subscribe(t, "late", status, 1, nil, true)
	mqWaitFor(t, 5*time.Second, `retained "offline"`, func() bool { return strings.Join(late.payloads(status), ",") == "offline" })
}

// TestCancelDropsWithLastWill: cancelling Start's context drops the
// connection without DISCONNECT, so the broker publishes the last will.
func TestCancelDropsWithLastWill(t *testing.T) {
	l := newMQLab(t)
	status := "devices/dev-0001/status"
	sub := l.subscribe(t, "watcher", status, 1, nil, true)
	c, err := NewClient(ClientOptions{URLs: []string{l.broker.URL()}, TLS: l.clientTLS(t, "dev-0001"), ClientID: "dev-0001", Logger: mqLogger(t)})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	if err := c.Start(ctx); err != nil {
		t.Fatal(err)
	}
	mqWaitConnected(t, c, 10*time.Second)
	cancel()
	mqWaitFor(t, 5*time.Second, `last will "offline"`, func() bool { return strings.Join(sub.payloads(status), ",") == "online,offline" })
	cctx, ccancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer ccancel()
	if err := c.Close(cctx); err != nil {
		t.Fatal(err)
	}
}

// TestSubscribe: a handler that blocks does not stall the connection; the
// subscription survives a reconnect.
func TestSubscribe(t *testing.T) {
	l := newMQLab(t)
	proxy := newMQProxy(t, l.broker.Addr())
	c := l.newClient(t, func(o *ClientOptions) {
		o.URLs = []string{proxy.URL()}
		o.TLS.ServerName = "127.0.0.1"
		o.Keepalive = time.Second
	})
	mqWaitConnected(t, c, 10*time.Second)
	got := make(chan Message, 100)
	release := make(chan struct{})
	if err := c.Subscribe(context.Background(), "devices/dev-0001/firmware/#", 1, func(m Message) {
		<-release
		got <- m
	}); err != nil {
		t.Fatal(err)
	}
	pub := l.subscribe(t, "backend", "unused/x", 0, nil, false).pc
	send := func(p string) {
		if tok := pub.Publish("devices/dev-0001/firmware/job", 1, false, p); !tok.WaitTimeout(5*time.Second) || tok.Error() != nil {
			t.Fatalf("backend publish: %v", tok.Error())
		}
	}
	send("one")
	// Handler blocked for longer than 2 keepalives: the connection must stay up.
	time.Sleep(2500 * time.Millisecond)
	if !c.Connected() || c.Stats().Reconnects != 0 {
		t.Fatalf("blocked handler stalled the connection: %+v", c.Stats())
	}
	close(release)
	if m := <-got; string(m.Payload) != "one" || m.Topic != "devices/dev-0001/firmware/job" {
		t.Fatalf("got %+v", m)
	}
	proxy.Cut()
	mqWaitFor(t, 10*time.Second, "reconnect", func() bool { return c.Stats().Reconnects == 1 && c.Connected() })
	send("two")
	select {
	case m := <-got:
		if string(m.Payload) != "two" {
			t.Fatalf("got %q after reconnect", m.Payload)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("subscription lost across the reconnect")
	}
}

// TestSubscribeAck: messages a SubscribeAck handler did not acknowledge
// come back after the connection is cut (persistent session); acknowledged
// ones do not. A plain Subscribe acknowledges on enqueue: nothing comes back.
func TestSubscribeAck(t *testing.T) {
	l := newMQLab(t)
	proxy := newMQProxy(t, l.broker.Addr())
	c := l.newClient(t, func(o *ClientOptions) {
		o.URLs = []string{proxy.URL()}
		o.TLS.ServerName = "127.0.0.1"
	})
	mqWaitConnected(t, c, 10*time.Second)
	type rx struct {
		m      Message
		manual bool
	}
	got := make(chan rx, 200)
	var ackAll atomic.Bool
	if err := c.SubscribeAck(context.Background(), "devices/dev-0001/acked/#", 1, func(m Message, ack func()) {
		// Acknowledge the first five (and everything once ackAll is set).
		if n, _ := strconv.Atoi(string(m.Payload)); n < 5 || ackAll.Load() {
			ack()
			ack() // twice is harmless
		}
		got <- rx{m, true}
	}); err != nil {
		t.Fatal(err)
	}
	if err := c.Subscribe(context.Background(), "devices/dev-0001/plain/#", 1, func(m Message) { got <- rx{m, false} }); err != nil {
		t.Fatal(err)
	}
	pub := l.subscribe(t, "backend", "unused/x", 0, nil, false).pc
	for i := 0; i < 10; i++ {
		for _, sub := range []string{"acked", "plain"} {
			if tok := pub.Publish("devices/dev-0001/"+sub+"/x", 1, false, strconv.Itoa(i)); !tok.WaitTimeout(5*time.Second) || tok.Error() != nil {
				t.Fatalf("backend publish: %v", tok.Error())
			}
		}
	}
	// collect gathers what arrives until quiet for d.
	collect := func(d time.Duration) (acked, plain []string) {
		for {
			select {
			case r := <-got:
				if r.manual {
					acked = append(acked, string(r.m.Payload))
				} else {
					plain = append(plain, string(r.m.Payload))
				}
			case <-time.After(d):
				return acked, plain
			}
		}
	}
	acked, plain := collect(time.Second)
	if len(acked) != 10 || len(plain) != 10 {
		t.Fatalf("first delivery: acked-subscription %v, plain %v; want 10 each", acked, plain)
	}
	ackAll.Store(true)
	proxy.Cut()
	mqWaitFor(t, 10*time.Second, "reconnect", func() bool { return c.Stats().Reconnects == 1 && c.Connected() })
	acked, plain = collect(1500 * time.Millisecond)
	slices.Sort(acked)
	if want := []string{"5", "6", "7", "8", "9"}; !slices.Equal(acked, want) || len(plain) != 0 {
		t.Fatalf("after the cut: acked-subscription redelivered %v (want %v), plain %v (want none)", acked, want, plain)
	}
	proxy.Cut()
	mqWaitFor(t, 10*time.Second, "second reconnect", func() bool { return c.Stats().Reconnects == 2 && c.Connected() })
	if acked, plain = collect(1500 * time.Millisecond); len(acked) != 0 || len(plain) != 0 {
		t.Fatalf("after acknowledging everything: redelivered %v and %v", acked, plain)
	}
}
