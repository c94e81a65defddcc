package collector

import (
	"bufio"
	"bytes"
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/tpmagent/tpmagent/agent/batch"
	"github.com/tpmagent/tpmagent/agent/reading"
	"github.com/tpmagent/tpmagent/internal/testenv"
	"github.com/tpmagent/tpmagent/transport"
	"github.com/tpmagent/tpmagent/transport/seal"
)

// fixture is a fleet CA, a collector key, a device sealer and a runner
// writing into a buffer.
type fixture struct {
	sealer *seal.Sealer
	run    *Runner
	out    *bytes.Buffer
	priv   *seal.PrivateKey
	pool   *x509.CertPool
	key    crypto.Signer
	chain  [][]byte
}

func newFixture(t testing.TB, opts seal.CollectorOptions) *fixture {
	t.Helper()
	pki := testenv.NewPKI(t, "", "fleet CA")
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(t.TempDir(), "dev.pem")
	cert := pki.IssueClient(t, "dev-0001", k.Public(), time.Now().Add(-time.Hour), time.Now().Add(time.Hour), path)
	priv, err := seal.GenerateCollectorKey(seal.DefaultSuite)
	if err != nil {
		t.Fatal(err)
	}
	s, err := seal.NewSealer("dev-0001", priv.Public(), crypto.Signer(k), [][]byte{cert.Raw}, seal.SealerOptions{})
	if err != nil {
		t.Fatal(err)
	}
	col, err := seal.NewCollector(priv, pki.Pool(), opts)
	if err != nil {
		t.Fatal(err)
	}
	f := &fixture{sealer: s, out: new(bytes.Buffer), priv: priv, pool: pki.Pool(), key: k, chain: [][]byte{cert.Raw}}
	f.run, err = New(Options{Collector: col, Output: f.out, SweepEvery: 10 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	return f
}

const frameTopic = "devices/dev-0001/telemetry/sealed"

// seal returns the announcement (nil after the first) and frame for rs.
func (f *fixture) seal(t testing.TB, rs ...reading.Reading) (ann, frame []byte) {
	t.Helper()
	plain, err := batch.JSON{}.AppendBatch(nil, rs)
	if err != nil {
		t.Fatal(err)
	}
	fr, a, err := f.sealer.Seal(frameTopic, plain)
	if err != nil {
		t.Fatal(err)
	}
	if a != nil {
		ann = a.Marshal()
	}
	return ann, fr
}

func msg(topic string, payload []byte) transport.Message {
	return transport.Message{Topic: topic, Payload: payload, QoS: 1}
}

// TestOutputLines: one line per reading, with device, session, seq and
// topic, and the reading in the telemetry JSON form; ParseLine reads it back.
func TestOutputLines(t *testing.T) {
	f := newFixture(t, seal.CollectorOptions{})
	ts := time.Date(2026, 1, 2, 3, 4, 5, 678000000, time.UTC)
	ann, fr := f.seal(t,
		reading.Reading{Name: "temp", Value: 21.5, Unit: "C", Time: ts, Tags: map[string]string{"room": "lab", "q": `"x"`}},
		reading.Reading{Name: "hum", Value: 40, Time: ts})
	a, err := seal.ParseAnnouncement(ann)
	if err != nil {
		t.Fatal(err)
	}
	f.run.HandleAnnouncement(msg(seal.SessionsTopic("dev-0001"), ann))
	f.run.HandleFrame(msg(frameTopic, fr))
	sid := hex12(a.SessionID)
	if len(sid) != 12 || strings.Trim(sid, "0123456789abcdef") != "" {
		t.Fatalf("session id %q: want 12 lower-case hex digits", sid)
	}
	want := `{"device":"dev-0001","session":"` + sid + `","seq":0,"topic":"devices/dev-0001/telemetry/sealed","reading":{"name":"temp","value":21.5,"unit":"C","ts":"2026-01-02T03:04:05.678Z","tags":{"q":"\"x\"","room":"lab"}}}` + "\n" +
		`{"device":"dev-0001","session":"` + sid + `","seq":0,"topic":"devices/dev-0001/telemetry/sealed","reading":{"name":"hum","value":40,"ts":"2026-01-02T03:04:05.678Z"}}` + "\n"
	if got := f.out.String(); got != want {
		t.Fatalf("output:\n%s\nwant:\n%s", got, want)
	}
	line, r, err := ParseLine([]byte(strings.SplitN(want, "\n", 2)[0]))
	if err != nil || line.Device != "dev-0001" || line.Session != sid || r == nil || r.Name != "temp" || r.Tags["q"] != `"x"` || !r.Time.Equal(ts) {
		t.Fatalf("ParseLine: %+v %+v %v", line, r, err)
	}
	st := f.run.Stats()
	if st.Opened != 1 || st.Readings != 2 || st.Announcements != 1 || st.Sessions != 1 || st.Rejected() != 0 {
		t.Fatalf("stats %+v", st)
	}
}

// TestRejections: duplicates, forgeries, moved and malformed frames write
// nothing and are counted; a frame before its announcement is parked and
// written once the announcement arrives; a plaintext that is not a batch is
// written raw and counted.
func TestRejections(t *testing.T) {
	f := newFixture(t, seal.CollectorOptions{})
	ann, fr1 := f.seal(t, reading.Reading{Name: "a", Value: 1, Time: time.Now()})
	_, fr2 := f.seal(t, reading.Reading{Name: "b", Value: 2, Time: time.Now()})
	plain := []byte("not a batch")
	fr3, _, err := f.sealer.Seal(frameTopic, plain)
	if err != nil {
		t.Fatal(err)
	}
	// Frame 2 overtakes the announcement: parked.
	f.run.HandleFrame(msg(frameTopic, fr2))
	if f.out.Len() != 0 || f.run.Stats().Held != 1 {
		t.Fatalf("parked frame: out %q stats %+v", f.out.String(), f.run.Stats())
	}
	f.run.HandleAnnouncement(msg(seal.SessionsTopic("dev-0001"), ann))
	f.run.HandleAnnouncement(msg(seal.SessionsTopic("dev-0001"), ann)) // QoS1 redelivery: no change
	f.run.HandleFrame(msg(frameTopic, fr1))
	f.run.HandleFrame(msg(frameTopic, fr1)) // duplicate
	f.run.HandleFrame(msg(frameTopic, fr2)) // duplicate of the parked one
	flipped := bytes.Clone(fr1)
	flipped[len(flipped)-1] ^= 1
	f.run.HandleFrame(msg(frameTopic, flipped))
	f.run.HandleFrame(msg("devices/dev-0002/telemetry/sealed", fr1))
	f.run.HandleFrame(msg(frameTopic, []byte("short")))
	f.run.HandleAnnouncement(msg(seal.SessionsTopic("dev-0001"), []byte("junk")))
	f.run.HandleFrame(msg(frameTopic, fr3))

	var names []string
	sc := bufio.NewScanner(bytes.NewReader(f.out.Bytes()))
	for sc.Scan() {
		l, r, err := ParseLine(sc.Bytes())
		if err != nil {
			t.Fatal(err)
		}
		switch {
		case r != nil:
			names = append(names, r.Name)
		case string(l.Raw) == string(plain):
			names = append(names, "raw")
		default:
			t.Fatalf("line %s", sc.Text())
		}
	}
	if got := strings.Join(names, ","); got != "b,a,raw" {
		t.Fatalf("output readings %q, want b,a,raw", got)
	}
	want := Stats{Opened: 3, Readings: 2, Replays: 2, Forged: 1, WrongDevice: 1, Malformed: 1, Unknown: 1,
		Announcements: 1, BadAnnouncements: 1, Sessions: 1, DecodeErrors: 1}
	if got := f.run.Stats(); got != want {
		t.Fatalf("stats\n got  %+v\n want %+v", got, want)
	}
	if want.Rejected() != 6 {
		t.Fatalf("Rejected %d", want.Rejected())
	}
}

// fakeSub records subscriptions.
type fakeSub struct {
	topics []string
	qos    []byte
}

func (s *fakeSub) Subscribe(_ context.Context, topic string, qos byte, _ func(transport.Message)) error {
	s.topics = append(s.topics, topic)
	s.qos = append(s.qos, qos)
	return nil
}

// TestRunSweeps: Subscribe asks for announcements first, both at QoS 1;
// Run expires a parked frame whose announcement never comes, and returns
// when its context ends.
func TestRunSweeps(t *testing.T) {
	f := newFixture(t, seal.CollectorOptions{HoldUnknown: 30 * time.Millisecond})
	var sub fakeSub
	if err := f.run.Subscribe(t.Context(), &sub); err != nil {
		t.Fatal(err)
	}
	if strings.Join(sub.topics, " ") != DefaultSessionsFilter+" "+DefaultFramesFilter || sub.qos[0] != 1 || sub.qos[1] != 1 {
		t.Fatalf("subscriptions %v %v", sub.topics, sub.qos)
	}
	_, _ = f.seal(t, reading.Reading{Name: "a", Value: 1, Time: time.Now()})
	_, fr := f.seal(t, reading.Reading{Name: "b", Value: 1, Time: time.Now()})
	f.run.HandleFrame(msg(frameTopic, fr))
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- f.run.Run(ctx) }()
	deadline := time.Now().Add(5 * time.Second)
	for f.run.Stats().Expired != 1 {
		if time.Now().After(deadline) {
			t.Fatalf("parked frame never expired: %+v", f.run.Stats())
		}
		time.Sleep(5 * time.Millisecond)
	}
	cancel()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if st := f.run.Stats(); st.Held != 0 || f.out.Len() != 0 {
		t.Fatalf("after sweep: %+v, output %q", st, f.out.String())
	}
}

// FuzzHandle feeds arbitrary topics and payloads to both handlers of a
// runner with a fresh collector key: nothing may panic and nothing may be
// written, since no one else can make a session this collector accepts.
func FuzzHandle(f *testing.F) {
	fx := newFixture(f, seal.CollectorOptions{})
	ann, fr := fx.seal(f, reading.Reading{Name: "a", Value: 1, Time: time.Now()})
	f.Add("devices/dev-0001/sessions", ann, true)
	f.Add(frameTopic, fr, false)
	f.Add("devices//sessions", []byte{1}, true)
	f.Add("devices/dev-0001/", make([]byte, 31), false)
	f.Add("x", []byte{}, false)
	// An independent collector: the seeds' announcement is for the
	// fixture's key, so even it may only be rejected here.
	other := newFixture(f, seal.CollectorOptions{})
	f.Fuzz(func(t *testing.T, topic string, payload []byte, isAnn bool) {
		m := msg(topic, payload)
		if isAnn {
			other.run.HandleAnnouncement(m)
		} else {
			other.run.HandleFrame(m)
		}
		if other.out.Len() != 0 {
			t.Fatalf("output from %q: %q", topic, other.out.String())
		}
	})
}
