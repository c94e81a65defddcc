package agent_test

import (
	"bufio"
	"bytes"
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/tpmagent/tpmagent/agent"
	"github.com/tpmagent/tpmagent/agent/batch"
	"github.com/tpmagent/tpmagent/agent/reading"
	"github.com/tpmagent/tpmagent/agent/source"
	"github.com/tpmagent/tpmagent/agent/spool"
	"github.com/tpmagent/tpmagent/collector"
	"github.com/tpmagent/tpmagent/internal/testenv"
	"github.com/tpmagent/tpmagent/internal/testmqtt"
	"github.com/tpmagent/tpmagent/tpmkeys"
	"github.com/tpmagent/tpmagent/transport"
	"github.com/tpmagent/tpmagent/transport/seal"
)

// sentinel is in every reading's unit and tags; no broker-side payload may
// contain it.
const sentinel = "SENTINEL-5e4c9d"

// lockedBuffer is an io.Writer that tests can read while the runner writes.
type lockedBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *lockedBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *lockedBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// sealLab is a TLS mosquitto whose CA is also the fleet CA, a collector key
// pair and a running collector with its own certificate.
type sealLab struct {
	pki    *testenv.PKI
	broker *testenv.Mosquitto
	priv   *seal.PrivateKey
	out    lockedBuffer
	logs   lockedBuffer
	run    *collector.Runner
}

func newSealLab(t testing.TB, extra []string, colOpts seal.CollectorOptions) *sealLab {
	t.Helper()
	l := newBrokerLab(t, extra)
	col, err := seal.NewCollector(l.priv, l.pki.Pool(), colOpts)
	if err != nil {
		t.Fatal(err)
	}
	log := slog.New(slog.NewTextHandler(&l.logs, &slog.HandlerOptions{Level: slog.LevelDebug}))
	l.run, err = collector.New(collector.Options{Collector: col, Output: &l.out, SweepEvery: 100 * time.Millisecond, Logger: log})
	if err != nil {
		t.Fatal(err)
	}
	_, _, cert := l.pki.SoftClient(t, "collector")
	signer := cert.PrivateKey.(crypto.Signer)
	c := l.client(t, "collector", signer, filepath.Join(l.pki.Dir, "collector.pem"), func(o *transport.ClientOptions) {
		o.StatusTopic = "-"
		o.SubscriptionBuffer = 4096
	})
	if err := l.run.Subscribe(t.Context(), c); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- l.run.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("collector runner: %v", err)
		}
	})
	return l
}

// newBrokerLab is the broker and the collector key, without a collector.
func newBrokerLab(t testing.TB, extra []string) *sealLab {
	t.Helper()
	l := &sealLab{pki: testenv.NewPKI(t, "", "fleet CA")}
	l.broker = testenv.StartMosquitto(t, testenv.MosquittoOptions{PKI: l.pki, Extra: extra})
	var err error
	if l.priv, err = seal.GenerateCollectorKey(seal.DefaultSuite); err != nil {
		t.Fatal(err)
	}
	return l
}

// client makes, starts and connects a transport client for cn with signer
// and the certificate in certFile.
func (l *sealLab) client(t testing.TB, cn string, signer crypto.Signer, certFile string, tweak func(*transport.ClientOptions)) *transport.Client {
	t.Helper()
	id, err := transport.NewTLSConfig(transport.TLSOptions{Signer: signer, CertFile: certFile, CAFile: l.pki.CAFile, Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		t.Fatal(err)
	}
	o := transport.ClientOptions{
		URLs:         []string{l.broker.URL()},
		TLS:          id.Config(),
		ClientID:     cn,
		BackoffBase:  50 * time.Millisecond,
		BackoffMax:   300 * time.Millisecond,
		ExplainError: id.ExplainTLSError,
		Logger:       slog.New(slog.DiscardHandler),
	}
	if tweak != nil {
		tweak(&o)
	}
	c, err := testmqtt.Start(t, o, 15*time.Second)
	if err != nil {
		t.Fatalf("client %s: %v\n%s", cn, err, l.broker.LogText())
	}
	return c
}

// softDevice issues a certificate with CN id for a fresh software P-256 key.
func (l *sealLab) softDevice(t testing.TB, pki *testenv.PKI, id string) (crypto.Signer, string, [][]byte) {
	t.Helper()
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	path, chain := l.issue(t, pki, id, k.Public())
	return k, path, chain
}

// issue writes a device certificate for pub and returns its path and chain.
func (l *sealLab) issue(t testing.TB, pki *testenv.PKI, id string, pub crypto.PublicKey) (string, [][]byte) {
	t.Helper()
	path := filepath.Join(t.TempDir(), id+".pem")
	pki.IssueClient(t, id, pub, time.Now().Add(-time.Hour), time.Now().Add(24*time.Hour), path)
	chain, err := agent.LoadCertChain(path)
	if err != nil {
		t.Fatal(err)
	}
	return path, chain
}

// swtpmDevice creates the device key in a fresh swtpm and certifies it.
func (l *sealLab) swtpmDevice(t testing.TB, id string) (*tpmkeys.Key, string, [][]byte) {
	t.Helper()
	sw := testenv.StartSwtpm(t)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	tp, err := tpmkeys.Open(ctx, sw.URL())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { tp.Close() })
	if _, err := tp.CreateKey(ctx, tpmkeys.KeySpec{}, false); err != nil {
		t.Fatal(err)
	}
	k, err := tp.OpenKey(ctx, tpmkeys.KeySpec{})
	if err != nil {
		t.Fatal(err)
	}
	path, chain := l.issue(t, l.pki, id, k.Public())
	return k, path, chain
}

// device is one agent: real spool, real transport client, the seal adapter.
type device struct {
	id       string
	client   *transport.Client
	sealing  *agent.Sealing // nil: unsealed
	spool    string
	batchMax int // default 16
}

func (l *sealLab) device(t testing.TB, id string, signer crypto.Signer, certFile string, chain [][]byte) *device {
	t.Helper()
	g, err := agent.NewSealing(agent.SealingOptions{DeviceID: id, CollectorKey: l.priv.Public(), Signer: signer, Chain: chain})
	if err != nil {
		t.Fatal(err)
	}
	return &device{id: id, client: l.client(t, id, signer, certFile, nil), sealing: g, spool: t.TempDir()}
}

// run runs a pipeline over src until every reading is acknowledged by the
// broker (or ctx ends).
func (d *device) run(t testing.TB, ctx context.Context, src source.Source) {
	t.Helper()
	sp, err := spool.Open(d.spool, spool.Options{Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		t.Fatal(err)
	}
	var sealer agent.Sealer
	if d.sealing != nil {
		sealer = d.sealing
	}
	if d.batchMax == 0 {
		d.batchMax = 16
	}
	p, err := agent.New(agent.Options{
		Topic:               "devices/" + d.id + "/telemetry",
		QoS:                 1,
		Batch:               batch.Options{Max: d.batchMax, Linger: 2 * time.Millisecond},
		Sealer:              sealer,
		Queue:               sp,
		Publisher:           d.client,
		DrainTimeout:        30 * time.Second,
		StopWhenSourcesDone: true,
	})
	if err != nil {
		t.Fatal(err)
	}
	if err := p.Run(ctx, src); err != nil {
		t.Fatalf("pipeline: %v", err)
	}
	if n := p.Counters().MessagesFailed.Load(); n > 0 {
		t.Logf("pipeline: %d publishes failed and were resent", n)
	}
}

// readings is a source of n readings with values from..from+n-1, each
// carrying the sentinel, paced by every (0: as fast as the pipeline takes
// them). pause, when set, is called before reading number at.
type readings struct {
	from, n int
	every   time.Duration
	at      int
	pause   func()
}

func (*readings) Name() string { return "test-readings" }

func (s *readings) Run(ctx context.Context, sink source.Sink) error {
	var wg sync.WaitGroup
	var mu sync.Mutex
	var firstErr error
	for i := s.from; i < s.from+s.n; i++ {
		if s.pause != nil && i == s.at {
			s.pause()
		}
		r := reading.Reading{
			Name:  "temp",
			Value: float64(i),
			Unit:  sentinel,
			Time:  time.Now(),
			Tags:  map[string]string{"secret": sentinel},
		}
		wg.Add(1)
		err := sink.Submit(ctx, r, func(err error) {
			if err != nil {
				mu.Lock()
				if firstErr == nil {
					firstErr = err
				}
				mu.Unlock()
			}
			wg.Done()
		})
		if err != nil {
			wg.Done()
			return err
		}
		if s.every > 0 {
			time.Sleep(s.every)
		}
	}
	wg.Wait()
	return firstErr
}

// waitFor polls cond until it holds or the timeout passes.
func waitFor(t testing.TB, timeout time.Duration, what string, cond func() bool, info func() string) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s: %s", what, info())
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func (l *sealLab) waitReadings(t testing.TB, n uint64) {
	t.Helper()
	waitFor(t, 30*time.Second, fmt.Sprintf("%d readings at the collector", n), func() bool {
		return l.run.Stats().Readings >= n
	}, func() string { return fmt.Sprintf("%+v\n%s", l.run.Stats(), tail(l.logs.String(), 2000)) })
}

// checkOutput parses the collector's output and checks that every value in
// [0, n) was written exactly once, by device id, and nothing else.
func (l *sealLab) checkOutput(t *testing.T, id string, n int) []collector.Line {
	t.Helper()
	var lines []collector.Line
	seen := make([]int, n)
	sc := bufio.NewScanner(strings.NewReader(l.out.String()))
	for sc.Scan() {
		line, r, err := collector.ParseLine(sc.Bytes())
		if err != nil {
			t.Fatalf("output line %q: %v", sc.Text(), err)
		}
		if r == nil {
			t.Fatalf("output line without a reading: %s", sc.Text())
		}
		if line.Device != id || line.Topic != "devices/"+id+"/telemetry/sealed" || len(line.Session) != 12 {
			t.Fatalf("output line %s: wrong device, topic or session", sc.Text())
		}
		if r.Name != "temp" || r.Unit != sentinel || r.Tags["secret"] != sentinel {
			t.Fatalf("output line %s: reading altered: %+v", sc.Text(), r)
		}
		v := int(r.Value)
		if v < 0 || v >= n || float64(v) != r.Value {
			t.Fatalf("output line %s: value out of range", sc.Text())
		}
		seen[v]++
		lines = append(lines, line)
	}
	var missing, dup []int
	for v, c := range seen {
		switch {
		case c == 0:
			missing = append(missing, v)
		case c > 1:
			dup = append(dup, v)
		}
	}
	if len(missing) > 0 || len(dup) > 0 {
		t.Fatalf("collector output not exactly once: %d lines for %d readings; missing %s, duplicated %s",
			len(lines), n, head(missing), head(dup))
	}
	return lines
}

func head(v []int) string {
	if len(v) > 10 {
		return fmt.Sprint(v[:10], "...")
	}
	return fmt.Sprint(v)
}

func tail(s string, n int) string {
	if len(s) > n {
		return "..." + s[len(s)-n:]
	}
	return s
}

// spy is a plain subscriber to everything under devices/: what the broker
// (or anyone allowed to subscribe on it) sees.
type spy struct {
	mu   sync.Mutex
	msgs []transport.Message
}

func (l *sealLab) spy(t *testing.T) *spy {
	t.Helper()
	_, _, cert := l.pki.SoftClient(t, "spy")
	c := l.client(t, "spy", cert.PrivateKey.(crypto.Signer), filepath.Join(l.pki.Dir, "spy.pem"), func(o *transport.ClientOptions) {
		o.StatusTopic = "-"
		o.CleanSession = true
		o.SubscriptionBuffer = 4096
	})
	s := &spy{}
	if err := c.Subscribe(t.Context(), "devices/#", 1, func(m transport.Message) {
		s.mu.Lock()
		s.msgs = append(s.msgs, m)
		s.mu.Unlock()
	}); err != nil {
		t.Fatal(err)
	}
	return s
}

func (s *spy) messages() []transport.Message {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]transport.Message(nil), s.msgs...)
}

// TestSealedEndToEndSwtpm: readings go through a pipeline (real spool,
// mTLS client, seal adapter with the device key in swtpm) and mosquitto to
// the collector. The broker-side view holds no plaintext; the collector
// writes every reading exactly once; the TPM signed once for TLS and once
// per session, never per frame.
func TestSealedEndToEndSwtpm(t *testing.T) {
	l := newSealLab(t, nil, seal.CollectorOptions{})
	sp := l.spy(t)
	key, certFile, chain := l.swtpmDevice(t, "dev-0001")
	d := l.device(t, "dev-0001", key, certFile, chain)
	const n = 2000
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	d.run(t, ctx, &readings{n: n})
	l.waitReadings(t, n)
	l.checkOutput(t, "dev-0001", n)

	st := l.run.Stats()
	frames := d.sealing.Frames()
	if st.Opened != frames || st.Gaps != 0 || st.Rejected() != 0 || st.Announcements != 1 || st.Sessions != 1 || st.DecodeErrors != 0 {
		t.Fatalf("collector stats %+v, device sealed %d frames in %d sessions", st, frames, d.sealing.Sessions())
	}
	if got, want := key.Signatures(), 1+d.sealing.Sessions(); got != want {
		t.Fatalf("TPM signed %d times, want %d (one TLS handshake, one announcement)", got, want)
	}

	// What the broker saw: frames and one announcement, no plaintext.
	waitFor(t, 10*time.Second, "the spy to see every frame", func() bool {
		c := 0
		for _, m := range sp.messages() {
			if strings.HasSuffix(m.Topic, "/telemetry/sealed") {
				c++
			}
		}
		return uint64(c) >= frames
	}, func() string { return fmt.Sprint(len(sp.messages()), " messages") })
	var sawAnn bool
	for _, m := range sp.messages() {
		if bytes.Contains(m.Payload, []byte(sentinel)) || bytes.Contains(m.Payload, []byte(`"value"`)) {
			t.Fatalf("broker-side payload on %s holds plaintext: %q", m.Topic, m.Payload)
		}
		if m.Topic == seal.SessionsTopic("dev-0001") {
			if _, err := seal.ParseAnnouncement(m.Payload); err != nil {
				t.Fatalf("announcement on %s: %v", m.Topic, err)
			}
			sawAnn = true
		}
		if strings.HasSuffix(m.Topic, "/telemetry/sealed") {
			if _, err := seal.ParseFrame(m.Payload); err != nil {
				t.Fatalf("frame on %s: %v", m.Topic, err)
			}
		}
	}
	if !sawAnn {
		t.Fatal("the broker never saw the session announcement")
	}
	// The spool at rest: whatever segment files are left hold no plaintext.
	_ = filepath.Walk(d.spool, func(path string, fi os.FileInfo, err error) error {
		if err == nil && fi.Mode().IsRegular() {
			if b, _ := os.ReadFile(path); bytes.Contains(b, []byte(sentinel)) {
				t.Errorf("spool file %s holds plaintext", path)
			}
		}
		return nil
	})
	t.Logf("%d readings in %d frames, 1 session; collector %+v", n, frames, st)
}

// publishRaw publishes payload at QoS 1 from c and waits for the PUBACK.
func publishRaw(t *testing.T, c *transport.Client, topic string, retained bool, payload []byte) {
	t.Helper()
	done := make(chan error, 1)
	if err := c.Publish(t.Context(), topic, 1, retained, payload, func(err error) { done <- err }); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("publish %s: %v", topic, err)
		}
	case <-time.After(10 * time.Second):
		t.Fatalf("publish %s: no PUBACK", topic)
	}
}

// TestSealedAttacks: an attacker with its own certificate on the same broker
// (no ACL) flips a bit in a frame, replays a frame, moves a frame to another
// device's topic, sends an announcement with a bad signature and one signed
// by a key certified by another CA (with a frame of that session). Each is
// rejected and counted; the output gains nothing.
func TestSealedAttacks(t *testing.T) {
	l := newSealLab(t, nil, seal.CollectorOptions{HoldUnknown: 500 * time.Millisecond})
	sp := l.spy(t)
	signer, certFile, chain := l.softDevice(t, l.pki, "dev-0001")
	d := l.device(t, "dev-0001", signer, certFile, chain)
	const n = 200
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	d.run(t, ctx, &readings{n: n})
	l.waitReadings(t, n)
	l.checkOutput(t, "dev-0001", n)
	before := l.run.Stats()
	if before.Rejected() != 0 || before.Gaps != 0 {
		t.Fatalf("rejections before any attack: %+v", before)
	}
	outBefore := l.out.String()

	var frame []byte
	waitFor(t, 10*time.Second, "the spy to see a frame", func() bool {
		for _, m := range sp.messages() {
			if m.Topic == "devices/dev-0001/telemetry/sealed" {
				frame = m.Payload
				return true
			}
		}
		return false
	}, func() string { return "" })

	_, _, acert := l.pki.SoftClient(t, "attacker")
	attacker := l.client(t, "attacker", acert.PrivateKey.(crypto.Signer), filepath.Join(l.pki.Dir, "attacker.pem"), func(o *transport.ClientOptions) { o.StatusTopic = "-" })

	// A second, legitimate session of the same device whose announcement
	// the attacker tampers with: only the signature makes it fail.
	other, err := seal.NewSealer("dev-0001", l.priv.Public(), signer, chain, seal.SealerOptions{})
	if err != nil {
		t.Fatal(err)
	}
	_, ann, err := other.Seal("devices/dev-0001/telemetry/sealed", []byte("[]"))
	if err != nil {
		t.Fatal(err)
	}
	badSig := ann.Marshal()
	badSig[len(badSig)-5] ^= 0x01

	// A device key certified by a rogue CA, claiming dev-0001.
	rogue := testenv.NewPKI(t, "", "rogue CA")
	rsigner, _, rchain := l.softDevice(t, rogue, "dev-0001")
	rs, err := seal.NewSealer("dev-0001", l.priv.Public(), rsigner, rchain, seal.SealerOptions{})
	if err != nil {
		t.Fatal(err)
	}
	plain, err := batch.JSON{}.AppendBatch(nil, []reading.Reading{{Name: "temp", Value: 99999, Unit: "FORGED", Time: time.Now()}})
	if err != nil {
		t.Fatal(err)
	}
	rframe, rann, err := rs.Seal("devices/dev-0001/telemetry/sealed", plain)
	if err != nil {
		t.Fatal(err)
	}

	flipped := bytes.Clone(frame)
	flipped[len(flipped)-20] ^= 0x80

	attacks := []struct {
		name    string
		topic   string
		payload []byte
		check   func(before, after collector.Stats) bool
	}{
		{"flipped bit", "devices/dev-0001/telemetry/sealed", flipped,
			func(b, a collector.Stats) bool { return a.Forged == b.Forged+1 }},
		{"replayed frame", "devices/dev-0001/telemetry/sealed", frame,
			func(b, a collector.Stats) bool { return a.Replays == b.Replays+1 }},
		{"frame moved to another device", "devices/dev-0002/telemetry/sealed", frame,
			func(b, a collector.Stats) bool { return a.WrongDevice == b.WrongDevice+1 }},
		{"announcement with a bad signature", seal.SessionsTopic("dev-0001"), badSig,
			func(b, a collector.Stats) bool { return a.BadAnnouncements == b.BadAnnouncements+1 }},
		{"announcement from another CA", seal.SessionsTopic("dev-0001"), rann.Marshal(),
			func(b, a collector.Stats) bool { return a.BadAnnouncements == b.BadAnnouncements+1 }},
		{"frame of the rogue session", "devices/dev-0001/telemetry/sealed", rframe,
			func(b, a collector.Stats) bool { return a.Unknown == b.Unknown+1 && a.Held == 1 }},
	}
	for _, at := range attacks {
		b := l.run.Stats()
		publishRaw(t, attacker, at.topic, false, at.payload)
		waitFor(t, 10*time.Second, at.name+" to be counted", func() bool { return at.check(b, l.run.Stats()) },
			func() string { return fmt.Sprintf("before %+v\nafter  %+v", b, l.run.Stats()) })
		if got := l.run.Stats(); got.Opened != before.Opened || got.Readings != before.Readings {
			t.Fatalf("%s: something was opened: %+v", at.name, got)
		}
	}
	// The rogue frame stays parked until HoldUnknown, then expires.
	waitFor(t, 5*time.Second, "the rogue frame to expire", func() bool { s := l.run.Stats(); return s.Expired == 1 && s.Held == 0 },
		func() string { return fmt.Sprintf("%+v", l.run.Stats()) })

	after := l.run.Stats()
	want := before
	want.Forged++
	want.Replays++
	want.WrongDevice++
	want.BadAnnouncements += 2
	want.Unknown++
	want.Expired++
	if after != want {
		t.Fatalf("counters after the attacks:\n got  %+v\n want %+v", after, want)
	}
	if l.out.String() != outBefore {
		t.Fatalf("the attacks added output:\n%s", strings.TrimPrefix(l.out.String(), outBefore))
	}
	logs := l.logs.String()
	for _, s := range []string{"authentication failed", "replayed frame", "wrong device", "signature", "does not chain to the fleet CA"} {
		if !strings.Contains(logs, s) {
			t.Errorf("collector log does not mention %q:\n%s", s, tail(logs, 3000))
		}
	}
}

// TestSealedBrokerRestart: the broker (persistence on) restarts while a
// device streams QoS 1 sealed telemetry; the device resends what was not
// acknowledged, the collector's persistent session gets what was queued, and
// the output is still exactly once with no gaps.
func TestSealedBrokerRestart(t *testing.T) {
	persist := t.TempDir()
	l := newSealLab(t, []string{"persistence true", "persistence_location " + persist + "/"}, seal.CollectorOptions{})
	signer, certFile, chain := l.softDevice(t, l.pki, "dev-0001")
	d := l.device(t, "dev-0001", signer, certFile, chain)
	const n = 3000
	restarted := make(chan struct{})
	src := &readings{n: n, every: 200 * time.Microsecond, at: n / 2, pause: func() {
		// Mid-stream: let some frames be in flight, then restart.
		go func() {
			l.broker.Restart()
			close(restarted)
		}()
		time.Sleep(5 * time.Millisecond)
	}}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	d.run(t, ctx, src)
	<-restarted
	l.waitReadings(t, n)
	l.checkOutput(t, "dev-0001", n)
	waitFor(t, 5*time.Second, "gaps to close", func() bool { return l.run.Stats().Gaps == 0 }, func() string { return fmt.Sprintf("%+v", l.run.Stats()) })
	st := l.run.Stats()
	if st.Forged != 0 || st.BadAnnouncements != 0 || st.Malformed != 0 || st.WrongDevice != 0 || st.TooOld != 0 {
		t.Fatalf("collector stats after the restart: %+v", st)
	}
	dst := d.client.Stats()
	if dst.Reconnects < 1 {
		t.Fatalf("the device never reconnected: %+v", dst)
	}
	t.Logf("restart: device %+v; collector %+v", dst, st)
}

// TestSealedReannounceAfterRestart: a broker without persistence loses the
// retained announcement when it restarts; after the device reconnects the
// pipeline republishes it (Reannouncer), so a collector that subscribes
// later still finds the current session's announcement retained.
func TestSealedReannounceAfterRestart(t *testing.T) {
	l := newSealLab(t, nil, seal.CollectorOptions{})
	signer, certFile, chain := l.softDevice(t, l.pki, "dev-0001")
	d := l.device(t, "dev-0001", signer, certFile, chain)
	const n = 100
	src := &readings{n: n, at: n / 2, pause: func() {
		// The announcement went out (and was retained) before the restart.
		waitFor(t, 10*time.Second, "the announcement at the collector", func() bool { return l.run.Stats().Announcements == 1 },
			func() string { return fmt.Sprintf("%+v", l.run.Stats()) })
		l.broker.Restart()
		waitFor(t, 15*time.Second, "the device to reconnect", func() bool { return d.client.Stats().Reconnects >= 1 && d.client.Connected() },
			func() string { return fmt.Sprintf("%+v", d.client.Stats()) })
	}}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	d.run(t, ctx, src)
	want := d.sealing.Reannounce()
	if len(want) != 1 || d.sealing.Sessions() != 1 {
		t.Fatalf("sessions %d, reannounce %d", d.sealing.Sessions(), len(want))
	}
	// A late subscriber gets the retained announcement.
	_, _, cert := l.pki.SoftClient(t, "late")
	late := l.client(t, "late", cert.PrivateKey.(crypto.Signer), filepath.Join(l.pki.Dir, "late.pem"), func(o *transport.ClientOptions) {
		o.StatusTopic = "-"
		o.CleanSession = true
	})
	got := make(chan transport.Message, 4)
	if err := late.Subscribe(t.Context(), seal.SessionsTopic("dev-0001"), 1, func(m transport.Message) { got <- m }); err != nil {
		t.Fatal(err)
	}
	select {
	case m := <-got:
		if !m.Retained || !bytes.Equal(m.Payload, want[0].Payload) {
			t.Fatalf("retained announcement after the restart: retained=%v, same=%v", m.Retained, bytes.Equal(m.Payload, want[0].Payload))
		}
	case <-time.After(5 * time.Second):
		t.Fatal("no retained announcement after the broker restart: the device did not reannounce")
	}
	// The collector, subscribed throughout, still has every reading that
	// the broker accepted; the restarted broker (no persistence) may have
	// lost frames acknowledged to the device but not yet delivered, which
	// the collector sees as gaps, not as anything else.
	st := l.run.Stats()
	if st.Rejected() != 0 || st.Announcements != 1 {
		t.Fatalf("collector %+v", st)
	}
}

// BenchmarkPipelineSeal runs the whole device side (synthetic readings,
// batcher, encoder, sealer or not, real spool with fsync, mTLS client at
// QoS 1, mosquitto acknowledging) and reports readings/s and msgs/s for
// plain and sealed telemetry: the cost of sealing in the pipeline. Each
// iteration sends 50,000 readings in batches of 64 and waits for every
// PUBACK.
//
//	go test ./agent -run '^$' -bench PipelineSeal -benchtime 5x
func BenchmarkPipelineSeal(b *testing.B) {
	for _, sealed := range []bool{false, true} {
		name := "plain"
		if sealed {
			name = "sealed"
		}
		b.Run(name, func(b *testing.B) {
			l := newBrokerLab(b, nil)
			signer, certFile, chain := l.softDevice(b, l.pki, "dev-bench")
			d := l.device(b, "dev-bench", signer, certFile, chain)
			d.batchMax = 64
			if !sealed {
				d.sealing = nil
			}
			const n = 50000
			var total time.Duration
			var msgs uint64
			from := 0
			for b.Loop() {
				before := d.client.Stats().Acked
				start := time.Now()
				d.run(b, context.Background(), &readings{from: from, n: n})
				total += time.Since(start)
				msgs += d.client.Stats().Acked - before
				from += n
			}
			b.ReportMetric(float64(from)/total.Seconds(), "readings/s")
			b.ReportMetric(float64(msgs)/total.Seconds(), "msgs/s")
		})
	}
}
