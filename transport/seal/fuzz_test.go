package seal

import (
	"bytes"
	"encoding/hex"
	"encoding/json"
	"os"
	"testing"
)

// vectorSeeds returns frames and announcements from the vectors as seeds.
func vectorSeeds(f *testing.F) (frames, anns [][]byte) {
	data, err := os.ReadFile(vectorsFile)
	if err != nil {
		f.Fatal(err)
	}
	var vf vectorFile
	if err := json.Unmarshal(data, &vf); err != nil {
		f.Fatal(err)
	}
	for _, s := range vf.Sessions {
		a, _ := hex.DecodeString(s.Announcement)
		anns = append(anns, a)
		for _, fr := range s.Frames {
			b, _ := hex.DecodeString(fr.Frame)
			frames = append(frames, b)
		}
	}
	return frames, anns
}

// FuzzParseFrame checks that ParseFrame never panics, that what it accepts
// has the fixed layout, and that a collector given arbitrary bytes on a
// known session only ever rejects them.
func FuzzParseFrame(f *testing.F) {
	frames, _ := vectorSeeds(f)
	for _, fr := range frames {
		f.Add(fr)
	}
	fx := newFixture(f, DefaultSuite, SealerOptions{}, CollectorOptions{HoldUnknown: -1})
	good, anns := fx.seal(f, 1)
	fx.announce(f, anns[0])
	f.Add(good[0])
	f.Fuzz(func(t *testing.T, b []byte) {
		fr, err := ParseFrame(b)
		if err != nil {
			return
		}
		if len(b) < FrameOverhead || fr.Version != FrameVersion || fr.SessionID > MaxSessionID ||
			len(fr.Ciphertext) != len(b)-FrameHeaderSize || !bytes.Equal(appendHeader(nil, fr.SessionID, fr.Seq), b[:FrameHeaderSize]) {
			t.Fatalf("ParseFrame accepted %x as %+v", b, fr)
		}
		if bytes.Equal(b, good[0]) {
			return
		}
		if m, err := fx.coll.Open(telemetryTopic(fx.dev.id), b); err == nil {
			t.Fatalf("collector opened fuzzed bytes %x as %+v", b, m)
		}
	})
}

// FuzzParseAnnouncement checks that ParseAnnouncement never panics, that
// what it accepts re-encodes to the same bytes (one encoding per
// announcement), and that the collector rejects whatever is not the
// genuine announcement.
func FuzzParseAnnouncement(f *testing.F) {
	_, anns := vectorSeeds(f)
	for _, a := range anns {
		f.Add(a)
	}
	fx := newFixture(f, DefaultSuite, SealerOptions{}, CollectorOptions{})
	_, own := fx.seal(f, 1)
	genuine := own[0].Marshal()
	f.Add(genuine)
	f.Fuzz(func(t *testing.T, b []byte) {
		a, err := ParseAnnouncement(b)
		if err != nil {
			return
		}
		tbs, err := a.tbs()
		if err != nil {
			t.Fatalf("accepted announcement does not re-encode: %v", err)
		}
		re := append(append(tbs, byte(len(a.Signature)>>8), byte(len(a.Signature))), a.Signature...)
		if !bytes.Equal(re, b) {
			t.Fatalf("re-encoding differs:\n in %x\nout %x", b, re)
		}
		if bytes.Equal(b, genuine) {
			return
		}
		if _, err := fx.coll.HandleAnnouncement(SessionsTopic(a.DeviceID), b); err == nil {
			t.Fatalf("collector accepted fuzzed announcement %x", b)
		}
	})
}
