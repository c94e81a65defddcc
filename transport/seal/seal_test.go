package seal

import (
	"bytes"
	"crypto/rand"
	"crypto/rsa"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"testing"
	"time"
)

// fixture wires one device, one collector and a shared clock.
type fixture struct {
	ca     *testCA
	dev    *testDevice
	key    *PrivateKey
	clk    *clock
	sealer *Sealer
	coll   *Collector
}

func newFixture(t testing.TB, suite Suite, sopts SealerOptions, copts CollectorOptions) *fixture {
	t.Helper()
	f := &fixture{ca: newTestCA(t, "fleet CA"), key: mustKey(t, suite), clk: newClock()}
	f.dev = newTestDevice(t, f.ca, "dev-0001")
	sopts.Suite = suite
	sopts.Now = f.clk.Now
	copts.Now = f.clk.Now
	var err error
	if f.sealer, err = NewSealer(f.dev.id, f.key.Public(), f.dev.key, f.dev.chain, sopts); err != nil {
		t.Fatal(err)
	}
	if f.coll, err = NewCollector(f.key, f.ca.pool(), copts); err != nil {
		t.Fatal(err)
	}
	return f
}

// seal seals n readings and returns frames and the announcements produced.
func (f *fixture) seal(t testing.TB, n int) (frames [][]byte, anns []*Announcement) {
	t.Helper()
	for i := range n {
		fr, a, err := f.sealer.Seal(telemetryTopic(f.dev.id), fmt.Appendf(nil, `{"temp":%d}`, i))
		if err != nil {
			t.Fatal(err)
		}
		if a != nil {
			anns = append(anns, a)
		}
		frames = append(frames, fr)
	}
	return frames, anns
}

func (f *fixture) announce(t testing.TB, a *Announcement) []Message {
	t.Helper()
	ms, err := f.coll.HandleAnnouncement(SessionsTopic(a.DeviceID), a.Marshal())
	if err != nil {
		t.Fatalf("HandleAnnouncement: %v", err)
	}
	return ms
}

func (f *fixture) open(t testing.TB, frame []byte) Message {
	t.Helper()
	m, err := f.coll.Open(telemetryTopic(f.dev.id), frame)
	if err != nil {
		t.Fatalf("Open: %v", err)
	}
	return m
}

var allSuites = []Suite{DefaultSuite, ChaChaSuite, HybridPQSuite, HybridPQChaChaSuite}

func TestRoundTripEverySuite(t *testing.T) {
	for _, s := range allSuites {
		t.Run(s.String(), func(t *testing.T) {
			f := newFixture(t, s, SealerOptions{}, CollectorOptions{})
			frames, anns := f.seal(t, 10)
			if len(anns) != 1 {
				t.Fatalf("got %d announcements for one session, want 1", len(anns))
			}
			if anns[0].Suite != s {
				t.Fatalf("announced suite %s, want %s", anns[0].Suite, s)
			}
			f.announce(t, anns[0])
			for i, fr := range frames {
				m := f.open(t, fr)
				want := fmt.Sprintf(`{"temp":%d}`, i)
				if string(m.Plaintext) != want || m.Seq != uint64(i) || m.DeviceID != "dev-0001" || m.SessionID != anns[0].SessionID {
					t.Fatalf("frame %d opened as %+v, want %s", i, m, want)
				}
				if bytes.Contains(fr, []byte("temp")) {
					t.Fatalf("frame %d carries plaintext", i)
				}
			}
			if st := f.coll.Stats(); st.Opened != 10 || st.Gaps != 0 || st.Announcements != 1 {
				t.Fatalf("stats %+v", st)
			}
		})
	}
}

func TestOverheadAtMost32Bytes(t *testing.T) {
	if FrameOverhead > 32 {
		t.Fatalf("FrameOverhead = %d, want <= 32", FrameOverhead)
	}
	for _, s := range allSuites {
		f := newFixture(t, s, SealerOptions{}, CollectorOptions{})
		for _, n := range []int{0, 1, 100, 1024, 65536} {
			fr, _, err := f.sealer.Seal(telemetryTopic(f.dev.id), make([]byte, n))
			if err != nil {
				t.Fatal(err)
			}
			if got := len(fr) - n; got != FrameOverhead || got > 32 {
				t.Fatalf("%s: %d-byte plaintext gave %d bytes of overhead, want %d (<= 32)", s, n, got, FrameOverhead)
			}
		}
	}
}

func TestOutOfOrderReplayAndGaps(t *testing.T) {
	f := newFixture(t, DefaultSuite, SealerOptions{}, CollectorOptions{})
	frames, anns := f.seal(t, 20)
	f.announce(t, anns[0])
	order := []int{5, 0, 19, 3, 1, 2, 4, 18, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17}
	var got []uint64
	for i, idx := range order {
		got = append(got, f.open(t, frames[idx]).Seq)
		if i == 2 { // opened 5, 0, 19: missing 1-4 and 6-18
			if g := f.coll.Stats().Gaps; g != 17 {
				t.Fatalf("after 5,0,19 gaps = %d, want 17", g)
			}
		}
	}
	slices.Sort(got)
	for i, s := range got {
		if s != uint64(i) {
			t.Fatalf("opened seqs %v, want 0..19 once each", got)
		}
	}
	// Every frame again: QoS1 redelivery or an attacker replay.
	for _, fr := range frames {
		if _, err := f.coll.Open(telemetryTopic(f.dev.id), fr); !errors.Is(err, ErrReplay) {
			t.Fatalf("replay: err = %v, want ErrReplay", err)
		}
	}
	st := f.coll.Stats()
	if st.Opened != 20 || st.Replays != 20 || st.Gaps != 0 || st.Forged != 0 {
		t.Fatalf("stats %+v, want 20 opened, 20 replays, 0 gaps", st)
	}
}

func TestGapCountedAndWindow(t *testing.T) {
	f := newFixture(t, DefaultSuite, SealerOptions{}, CollectorOptions{Window: 64})
	frames, anns := f.seal(t, 200)
	f.announce(t, anns[0])
	for i, fr := range frames {
		if i%10 == 3 { // lose 20 frames
			continue
		}
		f.open(t, fr)
	}
	if st := f.coll.Stats(); st.Gaps != 20 || st.Opened != 180 {
		t.Fatalf("stats %+v, want 20 gaps, 180 opened", st)
	}
	// A lost frame still inside the window fills its gap.
	f.open(t, frames[193])
	// One far below the window is rejected: it cannot be told from a replay.
	if _, err := f.coll.Open(telemetryTopic(f.dev.id), frames[3]); !errors.Is(err, ErrTooOld) {
		t.Fatalf("frame below window: err = %v, want ErrTooOld", err)
	}
	if st := f.coll.Stats(); st.Gaps != 19 || st.TooOld != 1 {
		t.Fatalf("stats %+v, want 19 gaps, 1 too old", st)
	}
}

func TestRejections(t *testing.T) {
	f := newFixture(t, DefaultSuite, SealerOptions{}, CollectorOptions{})
	other := newTestDevice(t, f.ca, "dev-0002")
	otherSealer, err := NewSealer(other.id, f.key.Public(), other.key, other.chain, SealerOptions{Now: f.clk.Now})
	if err != nil {
		t.Fatal(err)
	}
	frames, anns := f.seal(t, 3)
	f.announce(t, anns[0])
	ofr, oann, err := otherSealer.Seal(telemetryTopic(other.id), []byte("other"))
	if err != nil {
		t.Fatal(err)
	}
	f.announce(t, oann)

	flip := func(b []byte, i int) []byte { c := bytes.Clone(b); c[i] ^= 0x01; return c }
	tests := []struct {
		name  string
		topic string
		frame []byte
		want  error
	}{
		{"flipped ciphertext bit", telemetryTopic(f.dev.id), flip(frames[0], FrameHeaderSize+2), ErrForged},
		{"flipped tag bit", telemetryTopic(f.dev.id), flip(frames[0], len(frames[0])-1), ErrForged},
		{"flipped sequence bit", telemetryTopic(f.dev.id), flip(frames[0], FrameHeaderSize-1), ErrForged},
		{"other topic of the same device", "devices/dev-0001/metrics", frames[0], ErrForged},
		{"moved to another device's topic", telemetryTopic(other.id), frames[0], ErrWrongDevice},
		{"other device's frame moved here", telemetryTopic(f.dev.id), ofr, ErrWrongDevice},
		{"truncated", telemetryTopic(f.dev.id), frames[0][:FrameOverhead-1], ErrMalformed},
		{"bad version", telemetryTopic(f.dev.id), flip(frames[0], 0), ErrMalformed},
		{"not a device topic", "telemetry/dev-0001", frames[0], ErrMalformed},
		{"on the sessions topic", SessionsTopic(f.dev.id), frames[0], ErrMalformed},
		{"unknown session (parked)", telemetryTopic(f.dev.id), flip(frames[0], 3), ErrUnknownSession},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			before := f.coll.Stats().Opened
			m, err := f.coll.Open(tc.topic, tc.frame)
			if !errors.Is(err, tc.want) {
				t.Fatalf("err = %v, want %v", err, tc.want)
			}
			if m.Plaintext != nil || f.coll.Stats().Opened != before {
				t.Fatal("rejected frame produced output")
			}
		})
	}
	// The untouched frames still open afterwards: nothing above consumed
	// their sequence numbers.
	for _, fr := range frames {
		f.open(t, fr)
	}
	st := f.coll.Stats()
	if st.Forged != 4 || st.WrongDevice != 2 || st.Malformed != 4 || st.Unknown != 1 || st.Opened != 3 {
		t.Fatalf("stats %+v", st)
	}
}

func TestBadAnnouncements(t *testing.T) {
	f := newFixture(t, DefaultSuite, SealerOptions{}, CollectorOptions{})
	_, anns := f.seal(t, 1)
	good := anns[0]

	resign := func(t *testing.T, dev *testDevice, mutate func(a *Announcement)) []byte {
		a := *good
		a.DeviceID = dev.id
		a.Chain = dev.chain
		if mutate != nil {
			mutate(&a)
		}
		if err := a.sign(dev.key); err != nil {
			t.Fatal(err)
		}
		return a.Marshal()
	}
	badSig := good.Marshal()
	badSig[len(badSig)-5] ^= 0x40
	otherCA := newTestCA(t, "someone else's CA")
	foreign := newTestDevice(t, otherCA, "dev-0001")
	wrongCN := &testDevice{id: "dev-0001", key: f.dev.key, chain: [][]byte{f.ca.issue(t, "dev-0009", f.dev.key.Public())}}
	expired := &testDevice{id: "dev-0001", key: f.dev.key, chain: [][]byte{f.ca.issueAt(t, "dev-0001", f.dev.key.Public(), time.Now().Add(-48*time.Hour), time.Now().Add(-24*time.Hour))}}
	rsaKey, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	// Signed by another key than the certificate's.
	stolenChain := &testDevice{id: "dev-0001", key: rsaKey, chain: f.dev.chain}
	otherDev := newTestDevice(t, f.ca, "dev-0002")

	tests := []struct {
		name    string
		topic   string
		payload []byte
		want    []error
	}{
		{"bad signature", SessionsTopic("dev-0001"), badSig, []error{ErrBadAnnouncement}},
		{"chain to another CA", SessionsTopic("dev-0001"), resign(t, foreign, nil), []error{ErrBadAnnouncement}},
		{"CN differs from device id", SessionsTopic("dev-0001"), resign(t, wrongCN, nil), []error{ErrBadAnnouncement}},
		{"expired certificate", SessionsTopic("dev-0001"), resign(t, expired, nil), []error{ErrBadAnnouncement}},
		{"key not the certificate's", SessionsTopic("dev-0001"), resign(t, stolenChain, nil), []error{ErrBadAnnouncement}},
		{"valid but on another device's topic", SessionsTopic("dev-0002"), good.Marshal(), []error{ErrBadAnnouncement, ErrWrongDevice}},
		{"other device's on its own topic, wrong suite", SessionsTopic("dev-0002"), resign(t, otherDev, func(a *Announcement) { a.Suite = HybridPQSuite }), []error{ErrBadAnnouncement}},
		{"too old", SessionsTopic("dev-0002"), resign(t, otherDev, func(a *Announcement) { a.StartTime = a.StartTime.Add(-31 * 24 * time.Hour) }), []error{ErrBadAnnouncement}},
		{"enc altered", SessionsTopic("dev-0001"), func() []byte { b := good.Marshal(); b[1+1+8+6+6+8+8+2] ^= 1; return b }(), []error{ErrBadAnnouncement}},
		{"truncated", SessionsTopic("dev-0001"), good.Marshal()[:40], []error{ErrMalformed}},
		{"trailing byte", SessionsTopic("dev-0001"), append(good.Marshal(), 0), []error{ErrMalformed}},
		{"not a sessions topic", "devices/dev-0001/telemetry", good.Marshal(), []error{ErrMalformed}},
	}
	for i, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			_, err := f.coll.HandleAnnouncement(tc.topic, tc.payload)
			for _, w := range tc.want {
				if !errors.Is(err, w) {
					t.Fatalf("err = %v, want %v", err, w)
				}
			}
			if st := f.coll.Stats(); st.BadAnnouncements != uint64(i+1) || st.Sessions != 0 {
				t.Fatalf("stats %+v after %d bad announcements", st, i+1)
			}
		})
	}
	// The good one is accepted, and again (retained copy) without effect;
	// a conflicting one for the same session is rejected.
	f.announce(t, good)
	f.announce(t, good)
	conflict := resign(t, f.dev, func(a *Announcement) { a.SeqStart = 1000 })
	if _, err := f.coll.HandleAnnouncement(SessionsTopic("dev-0001"), conflict); !errors.Is(err, ErrBadAnnouncement) {
		t.Fatalf("conflicting announcement: err = %v", err)
	}
	if st := f.coll.Stats(); st.Announcements != 1 || st.Sessions != 1 {
		t.Fatalf("stats %+v", st)
	}
}

func TestAnnouncementIntermediateAndRSA(t *testing.T) {
	root := newTestCA(t, "fleet root")
	inter := root.intermediate(t, "fleet issuing CA")
	rsaKey, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	chain := [][]byte{inter.issue(t, "dev-rsa", rsaKey.Public()), inter.der}
	ck := mustKey(t, DefaultSuite)
	s, err := NewSealer("dev-rsa", ck.Public(), rsaKey, chain, SealerOptions{})
	if err != nil {
		t.Fatal(err)
	}
	c, err := NewCollector(ck, root.pool(), CollectorOptions{})
	if err != nil {
		t.Fatal(err)
	}
	fr, a, err := s.Seal("devices/dev-rsa/telemetry", []byte("x"))
	if err != nil {
		t.Fatal(err)
	}
	if a.SigScheme != SigRSAPKCS1SHA256 {
		t.Fatalf("scheme 0x%04x, want PKCS#1 v1.5", a.SigScheme)
	}
	if _, err := c.HandleAnnouncement(SessionsTopic("dev-rsa"), a.Marshal()); err != nil {
		t.Fatal(err)
	}
	if m, err := c.Open("devices/dev-rsa/telemetry", fr); err != nil || string(m.Plaintext) != "x" {
		t.Fatalf("open: %v %q", err, m.Plaintext)
	}
}

func TestRekeyByCountAndTime(t *testing.T) {
	f := newFixture(t, DefaultSuite, SealerOptions{RekeyMessages: 5, RekeyAfter: time.Minute}, CollectorOptions{})
	frames, anns := f.seal(t, 12) // sessions of 5, 5, 2 frames
	if len(anns) != 3 {
		t.Fatalf("%d announcements for 12 frames at 5 per session, want 3", len(anns))
	}
	f.clk.Add(61 * time.Second)
	more, anns2 := f.seal(t, 2) // time-based rekey on the first
	if len(anns2) != 1 {
		t.Fatalf("%d announcements after rekey_after passed, want 1", len(anns2))
	}
	anns = append(anns, anns2...)
	frames = append(frames, more...)
	ids := map[uint64]bool{}
	for i, a := range anns {
		ids[a.SessionID] = true
		if want := []uint64{0, 5, 10, 12}[i]; a.SeqStart != want {
			t.Fatalf("session %d starts at seq %d, want %d", i, a.SeqStart, want)
		}
		if i > 0 && bytes.Equal(a.Enc, anns[i-1].Enc) {
			t.Fatal("rekey reused enc")
		}
	}
	if len(ids) != 4 {
		t.Fatalf("session ids not distinct: %v", ids)
	}
	// Announcements in reverse, frames in reverse: every session opens.
	for i := len(anns) - 1; i >= 0; i-- {
		f.announce(t, anns[i])
	}
	for i := len(frames) - 1; i >= 0; i-- {
		if m := f.open(t, frames[i]); m.Seq != uint64(i) {
			t.Fatalf("frame %d opened as seq %d", i, m.Seq)
		}
	}
	if st := f.coll.Stats(); st.Opened != 14 || st.Gaps != 0 || st.Sessions != 4 {
		t.Fatalf("stats %+v", st)
	}
	// A new Sealer (agent restart) starts a new session even at seq 0.
	s2, err := NewSealer(f.dev.id, f.key.Public(), f.dev.key, f.dev.chain, SealerOptions{Now: f.clk.Now})
	if err != nil {
		t.Fatal(err)
	}
	fr, a, err := s2.Seal(telemetryTopic(f.dev.id), []byte("after restart"))
	if err != nil || a == nil || a.SeqStart != 0 || ids[a.SessionID] {
		t.Fatalf("restart: err %v, announcement %+v", err, a)
	}
	f.announce(t, a)
	if m := f.open(t, fr); string(m.Plaintext) != "after restart" || m.Seq != 0 {
		t.Fatalf("after restart: %+v", m)
	}
	// Forced rekey.
	f.sealer.Rekey()
	if _, a, _ := f.sealer.Seal(telemetryTopic(f.dev.id), nil); a == nil {
		t.Fatal("Rekey did not start a new session")
	}
}

func TestFrameBeforeAnnouncementIsHeld(t *testing.T) {
	f := newFixture(t, DefaultSuite, SealerOptions{}, CollectorOptions{HoldUnknown: 10 * time.Second})
	frames, anns := f.seal(t, 5)
	for _, fr := range frames[:4] {
		if _, err := f.coll.Open(telemetryTopic(f.dev.id), fr); !errors.Is(err, ErrUnknownSession) {
			t.Fatalf("err = %v, want ErrUnknownSession", err)
		}
	}
	// A duplicate while parked opens only once.
	f.coll.Open(telemetryTopic(f.dev.id), frames[0])
	if st := f.coll.Stats(); st.Held != 5 || st.Unknown != 5 || st.Opened != 0 {
		t.Fatalf("stats %+v", st)
	}
	f.clk.Add(5 * time.Second)
	ms := f.announce(t, anns[0])
	if len(ms) != 4 {
		t.Fatalf("announcement released %d frames, want 4", len(ms))
	}
	for i, m := range ms {
		if m.Seq != uint64(i) || string(m.Plaintext) != fmt.Sprintf(`{"temp":%d}`, i) {
			t.Fatalf("released %+v", m)
		}
	}
	f.open(t, frames[4])
	if st := f.coll.Stats(); st.Held != 0 || st.Opened != 5 || st.Replays != 1 || st.Gaps != 0 {
		t.Fatalf("stats %+v", st)
	}

	// Frames whose announcement never comes expire.
	g := newFixture(t, DefaultSuite, SealerOptions{}, CollectorOptions{HoldUnknown: 10 * time.Second, MaxHeld: 3})
	frames, _ = g.seal(t, 4)
	for _, fr := range frames {
		g.coll.Open(telemetryTopic(g.dev.id), fr)
	}
	if st := g.coll.Stats(); st.Held != 3 || st.Expired != 1 {
		t.Fatalf("stats %+v, want 3 held, 1 dropped at MaxHeld", st)
	}
	g.clk.Add(11 * time.Second)
	if n := g.coll.Sweep(); n != 3 {
		t.Fatalf("Sweep dropped %d, want 3", n)
	}
	if st := g.coll.Stats(); st.Held != 0 || st.Expired != 4 {
		t.Fatalf("stats %+v", st)
	}
}

func TestSessionRetirement(t *testing.T) {
	f := newFixture(t, DefaultSuite, SealerOptions{RekeyMessages: 1}, CollectorOptions{MaxSessionsPerDevice: 2})
	frames, anns := f.seal(t, 3)
	for i := range anns {
		f.announce(t, anns[i])
		f.clk.Add(time.Millisecond)
	}
	// Session 0 was retired for session 2: its frames and a re-announcement
	// are rejected, so an old announcement cannot reset a replay window.
	if _, err := f.coll.Open(telemetryTopic(f.dev.id), frames[0]); !errors.Is(err, ErrTooOld) {
		t.Fatalf("frame of retired session: err = %v", err)
	}
	if _, err := f.coll.HandleAnnouncement(SessionsTopic(f.dev.id), anns[0].Marshal()); !errors.Is(err, ErrBadAnnouncement) {
		t.Fatalf("re-announced retired session: err = %v", err)
	}
	f.open(t, frames[1])
	f.open(t, frames[2])
}

func TestSealerConfigErrors(t *testing.T) {
	ca := newTestCA(t, "ca")
	dev := newTestDevice(t, ca, "dev-1")
	x := mustKey(t, DefaultSuite)
	tests := []struct {
		name  string
		id    string
		pub   *PublicKey
		chain [][]byte
		opts  SealerOptions
	}{
		{"bad device id", "dev/1", x.Public(), dev.chain, SealerOptions{}},
		{"suite KEM differs from key", "dev-1", x.Public(), dev.chain, SealerOptions{Suite: HybridPQSuite}},
		{"CN differs", "dev-2", x.Public(), dev.chain, SealerOptions{}},
		{"no chain", "dev-1", x.Public(), nil, SealerOptions{}},
		{"cert of another key", "dev-1", x.Public(), newTestDevice(t, ca, "dev-1").chain, SealerOptions{}},
		{"unknown AEAD", "dev-1", x.Public(), dev.chain, SealerOptions{Suite: Suite{KEMX25519, KDFHKDFSHA256, 0x0002}}},
	}
	for _, tc := range tests {
		if _, err := NewSealer(tc.id, tc.pub, dev.key, tc.chain, tc.opts); err == nil {
			t.Errorf("%s: NewSealer succeeded", tc.name)
		}
	}
	s, err := NewSealer("dev-1", x.Public(), dev.key, dev.chain, SealerOptions{})
	if err != nil {
		t.Fatal(err)
	}
	for _, topic := range []string{"devices/dev-2/telemetry", "devices/dev-1/", "devices/dev-1/sessions", "dev-1/telemetry"} {
		if _, _, err := s.Seal(topic, nil); err == nil {
			t.Errorf("Seal on %q succeeded", topic)
		}
	}
}

func TestKeyFiles(t *testing.T) {
	for _, s := range []Suite{DefaultSuite, HybridPQSuite} {
		dir := t.TempDir()
		path := filepath.Join(dir, "collector.key")
		k := mustKey(t, s)
		if err := WriteKeyFiles(path, k); err != nil {
			t.Fatal(err)
		}
		if err := WriteKeyFiles(path, k); err == nil {
			t.Fatal("WriteKeyFiles overwrote an existing key")
		}
		if fi, err := os.Stat(path); err != nil || fi.Mode().Perm() != 0o600 {
			t.Fatalf("private key mode %v, %v", fi.Mode(), err)
		}
		priv, err := LoadPrivateKey(path)
		if err != nil {
			t.Fatal(err)
		}
		pub, err := LoadPublicKey(path + ".pub")
		if err != nil {
			t.Fatal(err)
		}
		if pub.KEM() != s.KEM || !bytes.Equal(pub.Bytes(), k.Public().Bytes()) || !bytes.Equal(priv.Public().Bytes(), pub.Bytes()) {
			t.Fatalf("%s: loaded keys differ", s)
		}
		if _, err := LoadPublicKey(path); err == nil {
			t.Fatal("LoadPublicKey accepted a private key file")
		}
	}
}

func TestParseSuite(t *testing.T) {
	for _, s := range allSuites {
		got, err := ParseSuite(s.String())
		if err != nil || got != s {
			t.Fatalf("ParseSuite(%q) = %v, %v", s.String(), got, err)
		}
	}
	for name, want := range map[string]Suite{"": DefaultSuite, "chacha": ChaChaSuite, "hybrid-pq": HybridPQSuite, "X25519-AES128GCM": DefaultSuite} {
		if got, err := ParseSuite(name); err != nil || got != want {
			t.Fatalf("ParseSuite(%q) = %v, %v", name, got, err)
		}
	}
	if _, err := ParseSuite("rot13"); err == nil {
		t.Fatal("ParseSuite accepted rot13")
	}
}
