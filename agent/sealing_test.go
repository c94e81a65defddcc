package agent_test

import (
	"bytes"
	"crypto/x509"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/tpmagent/tpmagent/agent"
	"github.com/tpmagent/tpmagent/agent/batch"
	"github.com/tpmagent/tpmagent/agent/config"
	"github.com/tpmagent/tpmagent/agent/reading"
	"github.com/tpmagent/tpmagent/internal/testenv"
	"github.com/tpmagent/tpmagent/transport/seal"
)

// TestSealingAdapter: the first frame of a session comes with its signed
// announcement (retained, on the sessions topic, ahead of the frame); later
// frames come alone; Rekey starts a new session; Reannounce repeats the
// current announcement; a collector with the fleet CA opens every frame.
func TestSealingAdapter(t *testing.T) {
	pki := testenv.NewPKI(t, "", "fleet CA")
	l := &sealLab{pki: pki}
	signer, _, chain := l.softDevice(t, pki, "dev-0001")
	priv, err := seal.GenerateCollectorKey(seal.DefaultSuite)
	if err != nil {
		t.Fatal(err)
	}
	g, err := agent.NewSealing(agent.SealingOptions{DeviceID: "dev-0001", CollectorKey: priv.Public(), Signer: signer, Chain: chain})
	if err != nil {
		t.Fatal(err)
	}
	col, err := seal.NewCollector(priv, pki.Pool(), seal.CollectorOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if g.Reannounce() != nil {
		t.Fatal("Reannounce before the first frame should be empty")
	}
	const topic = "devices/dev-0001/telemetry/sealed"
	steps := []struct {
		name    string
		rekey   bool
		wantAnn bool
	}{
		{"first frame", false, true},
		{"second frame", false, false},
		{"third frame", false, false},
		{"after Rekey", true, true},
		{"after that", false, false},
	}
	var lastAnn []byte
	for i, st := range steps {
		if st.rekey {
			g.Rekey()
		}
		plain := []byte(`[{"name":"n","value":` + string(rune('0'+i)) + `,"ts":"2026-01-01T00:00:00Z"}]`)
		frame, before, err := g.Seal(topic, plain)
		if err != nil {
			t.Fatalf("%s: %v", st.name, err)
		}
		if len(frame) != len(plain)+seal.FrameOverhead {
			t.Errorf("%s: frame of %d bytes for %d bytes of plaintext, want overhead %d", st.name, len(frame), len(plain), seal.FrameOverhead)
		}
		if bytes.Contains(frame, plain) {
			t.Fatalf("%s: plaintext visible in the frame", st.name)
		}
		if got := len(before) == 1; got != st.wantAnn || len(before) > 1 {
			t.Fatalf("%s: %d messages before the frame, want announcement=%v", st.name, len(before), st.wantAnn)
		}
		if st.wantAnn {
			m := before[0]
			if m.Topic != "devices/dev-0001/sessions" || !m.Retained {
				t.Fatalf("%s: announcement on %q retained=%v", st.name, m.Topic, m.Retained)
			}
			if _, err := col.HandleAnnouncement(m.Topic, m.Payload); err != nil {
				t.Fatalf("%s: collector rejects the announcement: %v", st.name, err)
			}
			lastAnn = m.Payload
		}
		msg, err := col.Open(topic, frame)
		if err != nil || !bytes.Equal(msg.Plaintext, plain) || msg.DeviceID != "dev-0001" {
			t.Fatalf("%s: open: %v, %+v", st.name, err, msg)
		}
		re := g.Reannounce()
		if len(re) != 1 || !bytes.Equal(re[0].Payload, lastAnn) || !re[0].Retained || re[0].Topic != "devices/dev-0001/sessions" {
			t.Fatalf("%s: Reannounce = %+v, want the current announcement", st.name, re)
		}
	}
	if g.Sessions() != 2 || g.Frames() != uint64(len(steps)) {
		t.Fatalf("Sessions %d Frames %d", g.Sessions(), g.Frames())
	}
	if st := col.Stats(); st.Opened != uint64(len(steps)) || st.Gaps != 0 || st.Announcements != 2 {
		t.Fatalf("collector %+v", st)
	}
}

// TestNewSealingErrors: misconfigurations fail at construction with a
// message that says what to fix.
func TestNewSealingErrors(t *testing.T) {
	pki := testenv.NewPKI(t, "", "fleet CA")
	l := &sealLab{pki: pki}
	signer, _, chain := l.softDevice(t, pki, "dev-0001")
	other, _, _ := l.softDevice(t, pki, "dev-0002")
	x, err := seal.GenerateCollectorKey(seal.DefaultSuite)
	if err != nil {
		t.Fatal(err)
	}
	pq, err := seal.GenerateCollectorKey(seal.HybridPQSuite)
	if err != nil {
		t.Fatal(err)
	}
	cases := []struct {
		name string
		o    agent.SealingOptions
		want string
	}{
		{"CN differs", agent.SealingOptions{DeviceID: "dev-0009", CollectorKey: x.Public(), Signer: signer, Chain: chain}, "differs from device id"},
		{"cert of another key", agent.SealingOptions{DeviceID: "dev-0001", CollectorKey: x.Public(), Signer: other, Chain: chain}, "does not hold the signer's public key"},
		{"suite vs key", agent.SealingOptions{DeviceID: "dev-0001", CollectorKey: pq.Public(), Signer: signer, Chain: chain, Suite: seal.DefaultSuite}, "collector key"},
		{"no chain", agent.SealingOptions{DeviceID: "dev-0001", CollectorKey: x.Public(), Signer: signer}, "certificate chain"},
		{"no collector key", agent.SealingOptions{DeviceID: "dev-0001", Signer: signer, Chain: chain}, "collector key"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			_, err := agent.NewSealing(c.o)
			if err == nil || !bytes.Contains([]byte(err.Error()), []byte(c.want)) {
				t.Fatalf("err = %v, want it to mention %q", err, c.want)
			}
		})
	}
	// A hybrid post-quantum key with its default suite works.
	if _, err := agent.NewSealing(agent.SealingOptions{DeviceID: "dev-0001", CollectorKey: pq.Public(), Signer: signer, Chain: chain}); err != nil {
		t.Fatal(err)
	}
}

// TestLoadCertChain reads leaf and intermediates in order and names the
// file when there is no certificate.
func TestLoadCertChain(t *testing.T) {
	pki := testenv.NewPKI(t, "", "fleet CA")
	l := &sealLab{pki: pki}
	_, path, chain := l.softDevice(t, pki, "dev-0001")
	if len(chain) != 1 {
		t.Fatalf("chain of %d", len(chain))
	}
	leaf, err := x509.ParseCertificate(chain[0])
	if err != nil || leaf.Subject.CommonName != "dev-0001" {
		t.Fatalf("leaf %v %v", leaf, err)
	}
	_ = path
	if _, err := agent.LoadCertChain(pki.ServerKeyFile); err == nil || !bytes.Contains([]byte(err.Error()), []byte(pki.ServerKeyFile)) {
		t.Fatalf("key file as chain: %v", err)
	}
}

// BenchmarkSealingSeal is the adapter's cost per batch of 64 readings
// (~6 KiB of JSON): one AEAD seal, no signature (the session's one signature
// is amortised over 2^20 frames). Compare with BenchmarkEncodeOnly.
func BenchmarkSealingSeal(b *testing.B) {
	for _, suite := range []seal.Suite{seal.DefaultSuite, seal.ChaChaSuite} {
		b.Run(suite.String(), func(b *testing.B) {
			g, _, err := agent.NewBenchSealing("dev-bench", nil, nil, suite)
			if err != nil {
				b.Fatal(err)
			}
			plain := benchBatch(b)
			b.SetBytes(int64(len(plain)))
			b.ReportAllocs()
			for b.Loop() {
				if _, _, err := g.Seal("devices/dev-bench/telemetry/sealed", plain); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

// BenchmarkEncodeOnly encodes the same batch without sealing, as the
// baseline for BenchmarkSealingSeal.
func BenchmarkEncodeOnly(b *testing.B) {
	rs := benchReadings()
	var buf []byte
	b.ReportAllocs()
	for b.Loop() {
		var err error
		if buf, err = (batch.JSON{}).AppendBatch(buf[:0], rs); err != nil {
			b.Fatal(err)
		}
	}
	b.SetBytes(int64(len(buf)))
}

func benchReadings() []reading.Reading {
	rs := make([]reading.Reading, 64)
	now := time.Now()
	for i := range rs {
		rs[i] = reading.Reading{Name: "synthetic", Value: float64(i), Time: now, Tags: map[string]string{"pad": "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"}}
	}
	return rs
}

func benchBatch(b *testing.B) []byte {
	p, err := batch.JSON{}.AppendBatch(nil, benchReadings())
	if err != nil {
		b.Fatal(err)
	}
	return p
}

// TestNewSealingFromConfig reads seal.collector_key and broker.cert_file and
// names the setting at fault.
func TestNewSealingFromConfig(t *testing.T) {
	pki := testenv.NewPKI(t, "", "fleet CA")
	l := &sealLab{pki: pki}
	signer, certFile, _ := l.softDevice(t, pki, "dev-0001")
	priv, err := seal.GenerateCollectorKey(seal.ChaChaSuite)
	if err != nil {
		t.Fatal(err)
	}
	keyFile := filepath.Join(t.TempDir(), "collector.key")
	if err := seal.WriteKeyFiles(keyFile, priv); err != nil {
		t.Fatal(err)
	}
	good := config.Seal{Enabled: true, CollectorKey: keyFile + ".pub", Suite: "x25519-chacha20poly1305", RekeyMessages: 10, RekeyAfter: time.Hour}
	g, err := agent.NewSealingFromConfig("dev-0001", good, signer, certFile)
	if err != nil {
		t.Fatal(err)
	}
	_, before, err := g.Seal("devices/dev-0001/telemetry/sealed", []byte("[]"))
	if err != nil || len(before) != 1 {
		t.Fatalf("seal: %v, %d before", err, len(before))
	}
	a, err := seal.ParseAnnouncement(before[0].Payload)
	if err != nil || a.Suite != seal.ChaChaSuite {
		t.Fatalf("announcement %+v: %v", a, err)
	}

	cases := []struct {
		name     string
		mod      func(*config.Seal)
		certFile string
		want     string
		field    bool
	}{
		{"bad suite", func(s *config.Seal) { s.Suite = "rot13" }, certFile, "seal.suite", true},
		{"no key", func(s *config.Seal) { s.CollectorKey = "" }, certFile, "seal.collector_key", true},
		{"missing key", func(s *config.Seal) { s.CollectorKey = keyFile + ".nope" }, certFile, "seal.collector_key", false},
		{"private key as public", func(s *config.Seal) { s.CollectorKey = keyFile }, certFile, "PUBLIC KEY", false},
		{"missing cert", func(s *config.Seal) {}, "/nonexistent/device.pem", "/nonexistent/device.pem", false},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			sc := good
			c.mod(&sc)
			_, err := agent.NewSealingFromConfig("dev-0001", sc, signer, c.certFile)
			if err == nil || !strings.Contains(err.Error(), c.want) {
				t.Fatalf("err = %v, want it to mention %q", err, c.want)
			}
			if config.IsConfigError(err) != c.field {
				t.Fatalf("IsConfigError = %v, want %v", !c.field, c.field)
			}
		})
	}
}
