//go:build chaos

package chaos

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"math"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/tpmagent/tpmagent/agent/batch"
	"github.com/tpmagent/tpmagent/agent/source"
	"github.com/tpmagent/tpmagent/agent/status"
	"github.com/tpmagent/tpmagent/internal/testdevice"
	"github.com/tpmagent/tpmagent/internal/testenv"
	"github.com/tpmagent/tpmagent/internal/testmqtt"
	"github.com/tpmagent/tpmagent/transport"
)

// tracker keeps what was offered to the agent (readings it answered "ok"
// for, i.e. spooled) and what the subscriber received.
type tracker struct {
	mu      sync.Mutex
	offered []int
	isOff   map[int]bool
	seen    map[int]int
	total   int
	last    time.Time // last delivery
}

func newTracker() *tracker { return &tracker{isOff: map[int]bool{}, seen: map[int]int{}} }

func (tr *tracker) offer(v int) {
	tr.mu.Lock()
	defer tr.mu.Unlock()
	if !tr.isOff[v] {
		tr.isOff[v] = true
		tr.offered = append(tr.offered, v)
	}
}

func (tr *tracker) deliver(v int) {
	tr.mu.Lock()
	defer tr.mu.Unlock()
	tr.seen[v]++
	tr.total++
	tr.last = time.Now()
}

// delivered is the number of messages' readings received (with duplicates).
func (tr *tracker) delivered() int {
	tr.mu.Lock()
	defer tr.mu.Unlock()
	return tr.total
}

// snapshot returns a copy of the values offered so far.
func (tr *tracker) snapshot() []int {
	tr.mu.Lock()
	defer tr.mu.Unlock()
	return append([]int(nil), tr.offered...)
}

// waitDelivered waits until every value in want was received; it returns
// how long that took and whether it happened before timeout.
func (tr *tracker) waitDelivered(want []int, timeout time.Duration) (time.Duration, bool) {
	start := time.Now()
	i := 0
	for {
		tr.mu.Lock()
		for i < len(want) && tr.seen[want[i]] > 0 {
			i++
		}
		tr.mu.Unlock()
		if i == len(want) {
			return time.Since(start), true
		}
		if time.Since(start) > timeout {
			return time.Since(start), false
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// mark returns the number of readings offered so far (a fault's end).
func (tr *tracker) mark() int {
	tr.mu.Lock()
	defer tr.mu.Unlock()
	return len(tr.offered)
}

// recovered waits until every reading offered before mark and the first
// one offered after it were delivered: the backlog is through and new
// readings flow end to end again. It returns the time since from.
func (tr *tracker) recovered(mark int, from time.Time, timeout time.Duration) (time.Duration, bool) {
	i := 0
	for {
		tr.mu.Lock()
		for i <= mark && i < len(tr.offered) && tr.seen[tr.offered[i]] > 0 {
			i++
		}
		tr.mu.Unlock()
		if i > mark {
			return time.Since(from), true
		}
		if time.Since(from) > timeout {
			return time.Since(from), false
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// result computes the row: lost are offered readings never received,
// duplicates are receptions beyond the first of a value.
func (tr *tracker) result(n int, name string, rec time.Duration) result {
	tr.mu.Lock()
	defer tr.mu.Unlock()
	r := result{N: n, Scenario: name, Offered: len(tr.offered), Delivered: len(tr.seen), Recovery: rec}
	for _, v := range tr.offered {
		if tr.seen[v] == 0 {
			r.Lost++
		}
	}
	r.Duplicates = tr.total - len(tr.seen)
	return r
}

// missing describes the offered values not received as ranges ("2900-4999
// 5100"), at most 10 of them, for failure messages.
func (tr *tracker) missing() string {
	tr.mu.Lock()
	defer tr.mu.Unlock()
	var spans []string
	lo, hi, n := -1, -1, 0
	flush := func() {
		if lo < 0 {
			return
		}
		if lo == hi {
			spans = append(spans, fmt.Sprint(lo))
		} else {
			spans = append(spans, fmt.Sprintf("%d-%d", lo, hi))
		}
		lo = -1
	}
	for _, v := range tr.offered {
		if tr.seen[v] != 0 {
			continue
		}
		n++
		if lo >= 0 && v == hi+1 {
			hi = v
			continue
		}
		flush()
		lo, hi = v, v
	}
	flush()
	if len(spans) > 10 {
		spans = append(spans[:10], "…")
	}
	return fmt.Sprintf("%d missing: [%s]", n, strings.Join(spans, " "))
}

// stream sends readings {"name":"t","value":N} with rising N to the agent's
// telemetry socket: chunk readings every interval. A reading counts as
// offered when the agent answered "ok" (it is spooled); readings without an
// "ok" (agent down, spool full) are sent again in the next chunk.
type stream struct {
	tr       *tracker
	sock     string
	chunk    int
	interval time.Duration
	timeout  time.Duration

	mu      sync.Mutex
	next    int
	pending []int
	errs    int
	lastErr error

	stop chan struct{}
	done chan struct{}
}

func startStream(t *testing.T, tr *tracker, sock string, chunk int, interval time.Duration) *stream {
	s := &stream{tr: tr, sock: sock, chunk: chunk, interval: interval, timeout: 5 * time.Second, stop: make(chan struct{}), done: make(chan struct{})}
	go s.run()
	t.Cleanup(s.halt)
	return s
}

func (s *stream) run() {
	defer close(s.done)
	tick := time.NewTicker(s.interval)
	defer tick.Stop()
	for {
		select {
		case <-s.stop:
			return
		case <-tick.C:
		}
		s.mu.Lock()
		vals := s.pending
		s.pending = nil
		for len(vals) < s.chunk {
			vals = append(vals, s.next)
			s.next++
		}
		s.mu.Unlock()
		var b strings.Builder
		for _, v := range vals {
			fmt.Fprintf(&b, "{\"name\":\"t\",\"value\":%d}\n", v)
		}
		acked := make([]bool, len(vals))
		ctx, cancel := context.WithTimeout(context.Background(), s.timeout)
		_, _, err := source.Send(ctx, s.sock, strings.NewReader(b.String()), func(line int, reply string) {
			if reply == "ok" && line <= len(vals) {
				acked[line-1] = true
				s.tr.offer(vals[line-1])
			}
		})
		cancel()
		s.mu.Lock()
		for i, ok := range acked {
			if !ok {
				s.pending = append(s.pending, vals[i])
			}
		}
		if err != nil {
			s.errs++
			s.lastErr = err
		}
		s.mu.Unlock()
	}
}

// halt stops the stream and waits for the chunk in flight.
func (s *stream) halt() {
	select {
	case <-s.stop:
	default:
		close(s.stop)
	}
	<-s.done
}

// subscriber counts readings on the device's telemetry topic through a
// persistent QoS 1 session (clean_session false), so deliveries queued
// while it is away survive broker restarts (the chaos broker persists).
func subscriber(t *testing.T, pki *testenv.PKI, broker *testenv.Mosquitto, topic string, tr *tracker, extraCAs ...*x509.Certificate) *transport.Client {
	t.Helper()
	_, _, cert := pki.SoftClient(t, "chaos-subscriber")
	pool := pki.Pool()
	for _, c := range extraCAs {
		pool.AddCert(c)
	}
	c, err := testmqtt.Start(t, transport.ClientOptions{
		URLs:        []string{broker.URL()},
		TLS:         &tls.Config{RootCAs: pool, Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS13},
		ClientID:    "chaos-subscriber",
		StatusTopic: "-",
		BackoffBase: 50 * time.Millisecond,
		BackoffMax:  500 * time.Millisecond,
	}, 15*time.Second)
	if err != nil {
		t.Fatalf("subscriber: %v", err)
	}
	if err := c.Subscribe(context.Background(), topic, 1, func(m transport.Message) {
		rs, err := batch.Decode(m.Payload)
		if err != nil {
			t.Errorf("subscriber: undecodable batch on %s: %v", m.Topic, err)
			return
		}
		for _, r := range rs {
			if r.Name == "t" && r.Value == math.Trunc(r.Value) {
				tr.deliver(int(r.Value))
			}
		}
	}); err != nil {
		t.Fatal(err)
	}
	return c
}

// chaosBroker starts a TLS mosquitto that persists sessions (autosave every
// second), so the subscriber's subscription and queue survive a restart.
func chaosBroker(t *testing.T, pki *testenv.PKI) (*testenv.Mosquitto, testenv.MosquittoOptions) {
	opts := testenv.MosquittoOptions{PKI: pki, Extra: persistence(t.TempDir())}
	return testenv.StartMosquitto(t, opts), opts
}

func persistence(dir string) []string {
	return []string{"persistence true", "persistence_location " + dir + "/", "autosave_interval 1"}
}

// confOpts are the agent settings a scenario changes.
type confOpts struct {
	URL        string // broker URL (default the device's broker)
	ServerName string
	TPM        string // tpm.device (default the device's swtpm)
	SpoolDir   string
	SpoolMax   string
	Keepalive  string
	Backoff    [2]string // base, max
	KeyLog     string
}

// writeConfig writes the agent's YAML for d with o applied and returns its path.
func writeConfig(t *testing.T, d *testdevice.Device, o confOpts) string {
	t.Helper()
	c := d.Config
	if o.URL == "" {
		o.URL = c.Broker.URLs[0]
	}
	if o.TPM == "" {
		o.TPM = c.TPM.Device
	}
	if o.SpoolDir == "" {
		o.SpoolDir = c.Spool.Dir
	}
	if o.SpoolMax == "" {
		o.SpoolMax = "256MiB"
	}
	if o.Keepalive == "" {
		o.Keepalive = "5s"
	}
	if o.Backoff[0] == "" {
		o.Backoff = [2]string{"100ms", "1s"}
	}
	var b strings.Builder
	fmt.Fprintf(&b, "device_id: %s\nstate_dir: %s\n", c.DeviceID, c.StateDir)
	fmt.Fprintf(&b, "tpm: { device: %q }\n", o.TPM)
	fmt.Fprintf(&b, "broker:\n  urls: [%q]\n  ca_file: %s\n  cert_file: %s\n  keepalive: %s\n  backoff_base: %s\n  backoff_max: %s\n",
		o.URL, c.Broker.CAFile, c.Broker.CertFile, o.Keepalive, o.Backoff[0], o.Backoff[1])
	if o.ServerName != "" {
		fmt.Fprintf(&b, "  server_name: %s\n", o.ServerName)
	}
	if o.KeyLog != "" {
		fmt.Fprintf(&b, "  keylog: %s\n", o.KeyLog)
	}
	fmt.Fprintf(&b, "telemetry: { socket: %s, qos: 1 }\n", c.Telemetry.Socket)
	fmt.Fprintf(&b, "status: { socket: %s }\n", c.Status.Socket)
	fmt.Fprintf(&b, "spool: { dir: %s, max_bytes: %s, on_full: block }\n", o.SpoolDir, o.SpoolMax)
	fmt.Fprintf(&b, "firmware: { slots: { a: %s, b: %s } }\n", c.Firmware.Slots.A, c.Firmware.Slots.B)
	fmt.Fprintf(&b, "log: { level: info }\n")
	p := filepath.Join(d.Dir, "chaos-agent.yaml")
	if err := os.WriteFile(p, []byte(b.String()), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

// agentProc is `tpmagent run` as a separate process, optionally inside a
// network namespace (`ip netns exec NS tpmagent run`, which execs, so the
// pid is the agent's).
type agentProc struct {
	t      *testing.T
	cfg    string
	ns     string
	log    string
	status string
	sock   string
	mu     sync.Mutex
	cmd    *exec.Cmd
	exited chan struct{}
	starts int
}

func newAgent(t *testing.T, d *testdevice.Device, cfg, ns string) *agentProc {
	a := &agentProc{t: t, cfg: cfg, ns: ns, log: filepath.Join(d.Dir, "agent.log"), status: d.Config.Status.Socket, sock: d.Config.Telemetry.Socket}
	t.Cleanup(a.stop)
	return a
}

// start starts the agent and waits until its status socket answers.
func (a *agentProc) start() {
	a.t.Helper()
	args := []string{agentBin, "run", "--config", a.cfg}
	if a.ns != "" {
		args = append([]string{"ip", "netns", "exec", a.ns}, args...)
	}
	out, err := os.OpenFile(a.log, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		a.t.Fatal(err)
	}
	fmt.Fprintf(out, "=== start %d: %s\n", a.starts, strings.Join(args, " "))
	cmd := exec.Command(args[0], args[1:]...)
	cmd.Stdout, cmd.Stderr = out, out
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		a.t.Fatalf("start agent: %v", err)
	}
	exited := make(chan struct{})
	go func() { _ = cmd.Wait(); out.Close(); close(exited) }()
	a.mu.Lock()
	a.cmd, a.exited = cmd, exited
	a.starts++
	a.mu.Unlock()
	deadline := time.Now().Add(20 * time.Second)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		_, err := status.Fetch(ctx, a.status)
		cancel()
		if err == nil {
			if _, err := os.Stat(a.sock); err == nil {
				return
			}
		}
		select {
		case <-exited:
			a.t.Fatalf("agent exited at start:\n%s", tail(a.log, 3000))
		default:
		}
		if time.Now().After(deadline) {
			a.t.Fatalf("agent status socket never answered: %v\n%s", err, tail(a.log, 3000))
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// kill9 kills the agent with SIGKILL and waits for it.
func (a *agentProc) kill9() { a.signal(syscall.SIGKILL) }

// stop stops the agent with SIGTERM (a graceful drain), then SIGKILL.
func (a *agentProc) stop() { a.signal(syscall.SIGTERM) }

func (a *agentProc) signal(sig syscall.Signal) {
	a.mu.Lock()
	cmd, exited := a.cmd, a.exited
	a.cmd = nil
	a.mu.Unlock()
	if cmd == nil {
		return
	}
	_ = cmd.Process.Signal(sig)
	select {
	case <-exited:
	case <-time.After(15 * time.Second):
		_ = cmd.Process.Kill()
		<-exited
	}
}

// snap reads the agent's status socket.
func (a *agentProc) snap() (status.Snapshot, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	return status.Fetch(ctx, a.status)
}

// waitConnected waits until the agent reports a broker connection.
func (a *agentProc) waitConnected(timeout time.Duration) bool {
	deadline := time.Now().Add(timeout)
	for time.Now().Before(deadline) {
		if s, err := a.snap(); err == nil && s.Connected {
			return true
		}
		time.Sleep(20 * time.Millisecond)
	}
	return false
}

func tail(path string, n int) string {
	b, _ := os.ReadFile(path)
	if len(b) > n {
		b = b[len(b)-n:]
	}
	return string(b)
}

// finish stops the stream, waits until every offered reading arrived (or
// drainTimeout), records the row and fails the test on a loss.
func finish(t *testing.T, n int, name, note string, tr *tracker, s *stream, rec time.Duration, drainTimeout time.Duration, agentLog string) result {
	t.Helper()
	s.halt()
	want := tr.snapshot()
	if _, ok := tr.waitDelivered(want, drainTimeout); !ok {
		t.Errorf("%s: not every offered reading arrived within %v; %v", name, drainTimeout, tr.missing())
	}
	// Late duplicates (resent after a lost PUBACK) arrive after the drain.
	time.Sleep(300 * time.Millisecond)
	r := tr.result(n, name, rec)
	r.Note = note
	record(r)
	t.Logf("%s: offered %d delivered %d lost %d duplicates %d recovery %.2fs (stream send errors %d)", name, r.Offered, r.Delivered, r.Lost, r.Duplicates, rec.Seconds(), s.errs)
	if r.Offered == 0 {
		t.Errorf("%s: nothing was offered", name)
	}
	if r.Lost != 0 {
		t.Errorf("%s: %d QoS 1 readings lost; agent log tail:\n%s", name, r.Lost, tail(agentLog, 4000))
	}
	return r
}

func itoa(n int) string { return fmt.Sprint(n) }
