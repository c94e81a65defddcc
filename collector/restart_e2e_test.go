package collector_test

import (
	"bufio"
	"bytes"
	"context"
	"crypto"
	"encoding/json"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
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

// lab is a TLS mosquitto whose CA is also the fleet CA, the collector's key
// files and a `tpmagent collect` binary run with a state directory.
type lab struct {
	t      *testing.T
	pki    *testenv.PKI
	broker *testenv.Mosquitto
	priv   *seal.PrivateKey
	bin    string
	dir    string
	env    []string
	proc   *exec.Cmd
	exited chan struct{}
	log    string
}

func newLab(t *testing.T) *lab {
	t.Helper()
	l := &lab{t: t, pki: testenv.NewPKI(t, "", "fleet CA"), dir: t.TempDir()}
	l.broker = testenv.StartMosquitto(t, testenv.MosquittoOptions{PKI: l.pki})
	var err error
	if l.priv, err = seal.GenerateCollectorKey(seal.DefaultSuite); err != nil {
		t.Fatal(err)
	}
	keyFile := filepath.Join(l.dir, "c.key")
	if err := seal.WriteKeyFiles(keyFile, l.priv); err != nil {
		t.Fatal(err)
	}
	certFile, tlsKey, _ := l.pki.SoftClient(t, "collector")
	l.bin = filepath.Join(t.TempDir(), "tpmagent")
	build := exec.Command("go", "build", "-o", l.bin, "github.com/tpmagent/tpmagent/cmd/tpmagent")
	build.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("build tpmagent: %v\n%s", err, out)
	}
	l.log = filepath.Join(l.dir, "collect.log")
	l.env = append(os.Environ(),
		"TPMAGENT_BROKER_URLS="+l.broker.URL(),
		"TPMAGENT_BROKER_CA_FILE="+l.pki.CAFile,
		"TPMAGENT_BROKER_CERT_FILE="+certFile,
		"TPMAGENT_BROKER_KEY_FILE="+tlsKey,
		"TPMAGENT_BROKER_BACKOFF_BASE=50ms",
		"TPMAGENT_BROKER_BACKOFF_MAX=300ms",
		"TPMAGENT_SEAL_COLLECTOR_PRIVATE_KEY="+keyFile,
		"TPMAGENT_SEAL_FLEET_CA="+l.pki.CAFile,
		"TPMAGENT_SEAL_STATE_DIR="+filepath.Join(l.dir, "state"),
	)
	t.Cleanup(func() { l.signal(syscall.SIGKILL) })
	return l
}

func (l *lab) out() string { return filepath.Join(l.dir, "readings.jsonl") }

// start runs the collector and waits until it has subscribed.
func (l *lab) start() {
	l.t.Helper()
	f, err := os.OpenFile(l.log, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		l.t.Fatal(err)
	}
	before, _ := os.ReadFile(l.log)
	cmd := exec.Command(l.bin, "collect", "--output", l.out(), "--client-id", "collector", "--json-stats")
	cmd.Env = l.env
	cmd.Stdout, cmd.Stderr = f, f
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		l.t.Fatal(err)
	}
	exited := make(chan struct{})
	go func() { _ = cmd.Wait(); f.Close(); close(exited) }()
	l.proc, l.exited = cmd, exited
	deadline := time.Now().Add(20 * time.Second)
	for {
		b, _ := os.ReadFile(l.log)
		if bytes.Contains(b[len(before):], []byte("connected to broker")) {
			time.Sleep(200 * time.Millisecond) // the subscriptions follow the connection
			return
		}
		select {
		case <-exited:
			l.t.Fatalf("collector exited at start:\n%s", b)
		default:
		}
		if time.Now().After(deadline) {
			l.t.Fatalf("collector never connected:\n%s", b)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func (l *lab) signal(sig syscall.Signal) {
	if l.proc == nil {
		return
	}
	_ = l.proc.Process.Signal(sig)
	select {
	case <-l.exited:
	case <-time.After(15 * time.Second):
		_ = l.proc.Process.Kill()
		<-l.exited
	}
	l.proc = nil
}

// stats stops the collector with SIGINT and returns its counters.
func (l *lab) stats() collector.Stats {
	l.t.Helper()
	before, _ := os.ReadFile(l.log)
	l.signal(syscall.SIGINT)
	b, _ := os.ReadFile(l.log)
	for _, line := range strings.Split(string(b[len(before):]), "\n") {
		if strings.HasPrefix(line, `{"opened"`) {
			var s collector.Stats
			if err := json.Unmarshal([]byte(line), &s); err != nil {
				l.t.Fatal(err)
			}
			return s
		}
	}
	l.t.Fatalf("no counters in the collector's output:\n%s", b[len(before):])
	return collector.Stats{}
}

// client is a started, connected transport client for cn.
func (l *lab) client(cn string, signer crypto.Signer, certFile string) *transport.Client {
	l.t.Helper()
	id, err := transport.NewTLSConfig(transport.TLSOptions{Signer: signer, CertFile: certFile, CAFile: l.pki.CAFile, Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		l.t.Fatal(err)
	}
	c, err := testmqtt.Start(l.t, transport.ClientOptions{
		URLs: []string{l.broker.URL()}, TLS: id.Config(), ClientID: cn, StatusTopic: "-",
		BackoffBase: 50 * time.Millisecond, BackoffMax: 300 * time.Millisecond,
		Logger: slog.New(slog.DiscardHandler),
	}, 15*time.Second)
	if err != nil {
		l.t.Fatalf("client %s: %v", cn, err)
	}
	return c
}

// device is a swtpm-keyed device running the agent pipeline (real spool,
// seal adapter, QoS 1) over src.
func (l *lab) device(ctx context.Context, id string, src source.Source) error {
	l.t.Helper()
	sw := testenv.StartSwtpm(l.t)
	tp, err := tpmkeys.Open(ctx, sw.URL())
	if err != nil {
		l.t.Fatal(err)
	}
	l.t.Cleanup(func() { tp.Close() })
	if _, err := tp.CreateKey(ctx, tpmkeys.KeySpec{}, false); err != nil {
		l.t.Fatal(err)
	}
	k, err := tp.OpenKey(ctx, tpmkeys.KeySpec{})
	if err != nil {
		l.t.Fatal(err)
	}
	certFile := filepath.Join(l.t.TempDir(), id+".pem")
	l.pki.IssueClient(l.t, id, k.Public(), time.Now().Add(-time.Hour), time.Now().Add(24*time.Hour), certFile)
	chain, err := agent.LoadCertChain(certFile)
	if err != nil {
		l.t.Fatal(err)
	}
	g, err := agent.NewSealing(agent.SealingOptions{DeviceID: id, CollectorKey: l.priv.Public(), Signer: k, Chain: chain})
	if err != nil {
		l.t.Fatal(err)
	}
	sp, err := spool.Open(l.t.TempDir(), spool.Options{Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		l.t.Fatal(err)
	}
	p, err := agent.New(agent.Options{
		Topic: "devices/" + id + "/telemetry", QoS: 1,
		Batch:  batch.Options{Max: 8, Linger: 2 * time.Millisecond},
		Sealer: g, Queue: sp, Publisher: l.client(id, k, certFile),
		DrainTimeout: 30 * time.Second, StopWhenSourcesDone: true,
	})
	if err != nil {
		l.t.Fatal(err)
	}
	return p.Run(ctx, src)
}

// spy subscribes to the sealed frames and keeps the latest one.
func (l *lab) spy() func() transport.Message {
	l.t.Helper()
	certFile, _, cert := l.pki.SoftClient(l.t, "spy")
	c := l.client("spy", cert.PrivateKey.(crypto.Signer), certFile)
	var mu sync.Mutex
	var latest *transport.Message
	if err := c.Subscribe(l.t.Context(), collector.DefaultFramesFilter, 1, func(m transport.Message) {
		mu.Lock()
		latest = &m
		mu.Unlock()
	}); err != nil {
		l.t.Fatal(err)
	}
	return func() transport.Message {
		mu.Lock()
		defer mu.Unlock()
		if latest == nil {
			l.t.Fatal("the spy saw no frame")
		}
		return *latest
	}
}

// TestCollectorKilledMidStream runs `tpmagent collect` with a state
// directory while a swtpm device publishes sealed QoS 1 telemetry through
// mosquitto, kills it with SIGKILL twice mid-stream and restarts it. The
// output never holds a reading twice nor a torn line. Then an old frame
// published again after the restarts is rejected as a replay and counted.
//
// Readings can be missing: transport.Client acknowledges a message when it
// queues it for the handler, before the collector commits it (see
// docs/SEALED-TELEMETRY.md section 8.5); their number is bounded by what a
// commit interval and the subscription queue hold, and reported.
func TestCollectorKilledMidStream(t *testing.T) {
	t0 := time.Now()
	l := newLab(t)
	t.Logf("lab with the tpmagent binary built in %v", time.Since(t0).Round(time.Millisecond))
	l.start()
	last := l.spy()
	const n = 3000
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	devErr := make(chan error, 1)
	go func() { devErr <- l.device(ctx, "dev-0001", &paced{n: n, every: 2 * time.Millisecond}) }()

	for i := 0; i < 2; i++ {
		time.Sleep(1500 * time.Millisecond)
		l.signal(syscall.SIGKILL)
		time.Sleep(300 * time.Millisecond)
		l.start()
	}
	if err := <-devErr; err != nil {
		t.Fatalf("device: %v", err)
	}
	// Every reading is acknowledged by the broker; wait until the collector
	// has all or its output stopped growing for 2 s.
	deadline := time.Now().Add(30 * time.Second)
	prev, stable := -1, time.Now()
	for time.Now().Before(deadline) && time.Since(stable) < 2*time.Second {
		seen, lines := values(t, l.out())
		if len(seen) == n {
			time.Sleep(500 * time.Millisecond) // let late duplicates show, if any
			break
		}
		if lines != prev {
			prev, stable = lines, time.Now()
		}
		time.Sleep(100 * time.Millisecond)
	}

	seen, lines := values(t, l.out())

	// An old frame (the stream's last, committed), published again.
	old := last()
	certFile, _, cert := l.pki.SoftClient(t, "replayer")
	pub := l.client("replayer", cert.PrivateKey.(crypto.Signer), certFile)
	done := make(chan error, 1)
	if err := pub.Publish(ctx, old.Topic, 1, false, old.Payload, func(err error) { done <- err }); err != nil {
		t.Fatal(err)
	}
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	time.Sleep(time.Second)
	st := l.stats()
	if _, after := values(t, l.out()); after != lines {
		t.Fatalf("the replayed old frame was written: %d lines, %d before", after, lines)
	}
	if st.Replays < 1 {
		t.Fatalf("the replayed old frame was not counted as a replay: %+v", st)
	}
	var dups, missing []int
	for v := 0; v < n; v++ {
		switch c := seen[v]; {
		case c > 1:
			dups = append(dups, v)
		case c == 0:
			missing = append(missing, v)
		}
	}
	if len(dups) > 0 || lines != len(seen) {
		t.Fatalf("readings written more than once: %d (first %v); %d lines for %d readings", len(dups), dups[:min(len(dups), 20)], lines, len(seen))
	}
	t.Logf("%d readings, %d lines, %d missing; collector %+v", n, lines, len(missing), st)
	if len(missing) > 0 {
		t.Fatalf("%d readings missing after two kills (first %v): a frame was acknowledged before its commit", len(missing), missing[:min(len(missing), 40)])
	}
}

// values reads the output: value -> number of lines, and the line count.
func values(t *testing.T, path string) (map[int]int, int) {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	seen := map[int]int{}
	n := 0
	sc := bufio.NewScanner(bytes.NewReader(b))
	for sc.Scan() {
		_, r, err := collector.ParseLine(sc.Bytes())
		if err != nil || r == nil {
			t.Fatalf("output line %d %q: %v", n+1, sc.Text(), err)
		}
		seen[int(r.Value)]++
		n++
	}
	if len(b) > 0 && b[len(b)-1] != '\n' {
		t.Fatalf("output ends in a torn line: %q", b[max(0, len(b)-100):])
	}
	return seen, n
}

// paced submits readings from..from+n-1, one every `every`.
type paced struct {
	n     int
	every time.Duration
}

func (*paced) Name() string { return "paced" }

func (s *paced) Run(ctx context.Context, sink source.Sink) error {
	var wg sync.WaitGroup
	for i := 0; i < s.n; i++ {
		wg.Add(1)
		if err := sink.Submit(ctx, reading.Reading{Name: "v", Value: float64(i), Time: time.Now()}, func(error) { wg.Done() }); err != nil {
			wg.Done()
			return err
		}
		time.Sleep(s.every)
	}
	wg.Wait()
	return nil
}
