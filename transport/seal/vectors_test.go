package seal

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/sha256"
	"crypto/x509"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"math/big"
	"os"
	"path/filepath"
	"testing"
	"testing/cryptotest"
	"time"
)

// The vectors in testdata/vectors.json pin the wire format of
// docs/SEALED-TELEMETRY.md. TestVectors checks them both ways: it
// regenerates every deterministic value (collector key from its IKM, enc
// from the seeded HPKE randomness, exporter outputs, AAD, nonces, frames,
// the announcement's signed bytes) and opens every frame with a Collector.
// Set SEAL_UPDATE_VECTORS=1 to rewrite the file (only after a deliberate
// format change; say why in the commit).

const vectorsFile = "testdata/vectors.json"

type vectorFile struct {
	Comment        string          `json:"comment"`
	FleetCA        string          `json:"fleet_ca"`
	DeviceID       string          `json:"device_id"`
	DeviceKeyPKCS8 string          `json:"device_key_pkcs8"`
	DeviceChain    []string        `json:"device_chain"`
	Sessions       []vectorSession `json:"sessions"`
}

type vectorSession struct {
	Suite        string          `json:"suite"`
	KEM          uint16          `json:"kem_id"`
	KDF          uint16          `json:"kdf_id"`
	AEAD         uint16          `json:"aead_id"`
	RandomSeed   uint64          `json:"random_seed"`
	CollectorIKM string          `json:"collector_ikm"`
	CollectorSK  string          `json:"collector_sk"`
	CollectorPK  string          `json:"collector_pk"`
	SessionID    string          `json:"session_id"`
	StartTime    string          `json:"start_time"`
	SeqStart     uint64          `json:"seq_start"`
	HPKEInfo     string          `json:"hpke_info"`
	Enc          string          `json:"enc"`
	FrameKey     string          `json:"frame_key"`
	NonceBase    string          `json:"nonce_base"`
	Announcement string          `json:"announcement"`
	Frames       []vectorFrame   `json:"frames"`
	Failures     []vectorFailure `json:"failures"`
}

type vectorFrame struct {
	Topic     string `json:"topic"`
	Seq       uint64 `json:"seq"`
	Plaintext string `json:"plaintext"`
	AAD       string `json:"aad"`
	Nonce     string `json:"nonce"`
	Frame     string `json:"frame"`
}

type vectorFailure struct {
	Name    string `json:"name"`
	Kind    string `json:"kind"` // "frame" or "announcement"
	Topic   string `json:"topic"`
	Payload string `json:"payload"`
	Error   string `json:"error"`
}

var vectorErrors = map[string]error{
	"forged":           ErrForged,
	"replay":           ErrReplay,
	"too-old":          ErrTooOld,
	"wrong-device":     ErrWrongDevice,
	"malformed":        ErrMalformed,
	"bad-announcement": ErrBadAnnouncement,
}

var vectorSuites = []struct {
	suite Suite
	seed  uint64
	ikm   string
}{
	{DefaultSuite, 1, "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f"},
	{ChaChaSuite, 2, "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f"},
	{HybridPQSuite, 3, "202122232425262728292a2b2c2d2e2f303132333435363738393a3b3c3d3e3f"},
}

func unhex(t testing.TB, s string) []byte {
	t.Helper()
	b, err := hex.DecodeString(s)
	if err != nil {
		t.Fatalf("vector hex %q: %v", s, err)
	}
	return b
}

// vectorAnnouncement rebuilds a session's announcement fields (without
// enc and signature) from the vector.
func vectorAnnouncement(t testing.TB, vf *vectorFile, vs *vectorSession) *Announcement {
	start, err := time.Parse(time.RFC3339Nano, vs.StartTime)
	if err != nil {
		t.Fatal(err)
	}
	var chain [][]byte
	for _, c := range vf.DeviceChain {
		chain = append(chain, unhex(t, c))
	}
	return &Announcement{
		DeviceID:  vf.DeviceID,
		SessionID: getSessionID(unhex(t, vs.SessionID)),
		Suite:     Suite{vs.KEM, vs.KDF, vs.AEAD},
		StartTime: start,
		SeqStart:  vs.SeqStart,
		Chain:     chain,
		SigScheme: SigECDSAP256SHA256,
	}
}

func TestVectors(t *testing.T) {
	if os.Getenv("SEAL_UPDATE_VECTORS") == "1" {
		writeVectors(t)
	}
	data, err := os.ReadFile(vectorsFile)
	if err != nil {
		t.Fatalf("%v (regenerate with SEAL_UPDATE_VECTORS=1 go test -run TestVectors)", err)
	}
	var vf vectorFile
	if err := json.Unmarshal(data, &vf); err != nil {
		t.Fatalf("%s: %v", vectorsFile, err)
	}
	if len(vf.Sessions) != len(vectorSuites) {
		t.Fatalf("%s has %d sessions, want %d", vectorsFile, len(vf.Sessions), len(vectorSuites))
	}
	for i := range vf.Sessions {
		vs := &vf.Sessions[i]
		t.Run(vs.Suite+"/regenerate", func(t *testing.T) { checkVectorRegenerate(t, &vf, vs) })
		t.Run(vs.Suite+"/open", func(t *testing.T) { checkVectorOpen(t, &vf, vs) })
	}
}

// checkVectorRegenerate recomputes every deterministic value from the
// vector's inputs.
func checkVectorRegenerate(t *testing.T, vf *vectorFile, vs *vectorSession) {
	a := vectorAnnouncement(t, vf, vs)
	if s, err := ParseSuite(vs.Suite); err != nil || s != a.Suite {
		t.Fatalf("suite %q = %v, ids %v (%v)", vs.Suite, s, a.Suite, err)
	}
	ck, err := DeriveCollectorKey(vs.KEM, unhex(t, vs.CollectorIKM))
	if err != nil {
		t.Fatal(err)
	}
	sk, _ := ck.Bytes()
	eq(t, "collector_sk", sk, vs.CollectorSK)
	eq(t, "collector_pk", ck.Public().Bytes(), vs.CollectorPK)
	eq(t, "hpke_info", a.hpkeInfo(), vs.HPKEInfo)

	cryptotest.SetGlobalRandom(t, vs.RandomSeed)
	enc, keys, key, err := senderContext(ck.Public(), a)
	if err != nil {
		t.Fatal(err)
	}
	// enc depends on how crypto/hpke draws its ephemeral randomness, which
	// Go does not promise to keep; everything after it is fixed by RFC 9180
	// and our spec. If only this check fails after a Go upgrade, the
	// randomness use changed, not the format: re-check the open direction
	// and regenerate.
	eq(t, "enc (seeded crypto/hpke ephemeral; see comment)", enc, vs.Enc)
	if !bytes.Equal(enc, unhex(t, vs.Enc)) {
		// Continue from the vector's enc so the rest is still checked.
		keys, key, err = recipientContext(ck, &Announcement{Enc: unhex(t, vs.Enc), DeviceID: a.DeviceID, SessionID: a.SessionID, Suite: a.Suite, StartTime: a.StartTime, SeqStart: a.SeqStart})
		if err != nil {
			t.Fatal(err)
		}
	}
	eq(t, "frame_key", key, vs.FrameKey)
	eq(t, "nonce_base", keys.nonceBase[:], vs.NonceBase)

	a.Enc = unhex(t, vs.Enc)
	tbs, err := a.tbs()
	if err != nil {
		t.Fatal(err)
	}
	ann := unhex(t, vs.Announcement)
	if !bytes.HasPrefix(ann, tbs) {
		t.Fatalf("announcement's signed part differs from the one rebuilt from its fields:\n got %x\nwant %x", ann[:min(len(ann), len(tbs))], tbs)
	}
	for i, fr := range vs.Frames {
		hdr := appendHeader(nil, a.SessionID, fr.Seq)
		eq(t, fmt.Sprintf("frames[%d].aad", i), appendAAD(nil, hdr, a.DeviceID, fr.Topic), fr.AAD)
		var n [nonceSize]byte
		frameNonce(&n, &keys.nonceBase, fr.Seq)
		eq(t, fmt.Sprintf("frames[%d].nonce", i), n[:], fr.Nonce)
		eq(t, fmt.Sprintf("frames[%d].frame", i), keys.seal(nil, a.SessionID, fr.Seq, a.DeviceID, fr.Topic, []byte(fr.Plaintext)), fr.Frame)
	}
}

// checkVectorOpen feeds the vector's announcement, frames and failures to
// a Collector holding the vector's collector key.
func checkVectorOpen(t *testing.T, vf *vectorFile, vs *vectorSession) {
	a := vectorAnnouncement(t, vf, vs)
	ck, err := NewPrivateKey(vs.KEM, unhex(t, vs.CollectorSK))
	if err != nil {
		t.Fatal(err)
	}
	ca, err := x509.ParseCertificate(unhex(t, vf.FleetCA))
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	pool.AddCert(ca)
	now := a.StartTime.Add(time.Minute)
	c, err := NewCollector(ck, pool, CollectorOptions{Now: func() time.Time { return now }})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c.HandleAnnouncement(SessionsTopic(vf.DeviceID), unhex(t, vs.Announcement)); err != nil {
		t.Fatalf("vector announcement: %v", err)
	}
	for i, fr := range vs.Frames {
		m, err := c.Open(fr.Topic, unhex(t, fr.Frame))
		if err != nil {
			t.Fatalf("frames[%d]: %v", i, err)
		}
		if string(m.Plaintext) != fr.Plaintext || m.Seq != fr.Seq || m.SessionID != a.SessionID || m.DeviceID != vf.DeviceID {
			t.Fatalf("frames[%d] opened as %+v", i, m)
		}
	}
	for _, f := range vs.Failures {
		want := vectorErrors[f.Error]
		var err error
		if f.Kind == "announcement" {
			_, err = c.HandleAnnouncement(f.Topic, unhex(t, f.Payload))
		} else {
			_, err = c.Open(f.Topic, unhex(t, f.Payload))
		}
		if want == nil || !errors.Is(err, want) {
			t.Fatalf("failure vector %q: err = %v, want %s", f.Name, err, f.Error)
		}
	}
	st := c.Stats()
	if st.Opened != uint64(len(vs.Frames)) || st.Gaps != 3 {
		t.Fatalf("stats %+v: want %d opened and 3 gaps (seqs skipped in the vectors)", st, len(vs.Frames))
	}
}

func eq(t *testing.T, name string, got []byte, want string) {
	t.Helper()
	if hex.EncodeToString(got) != want {
		t.Errorf("%s:\n got %x\nwant %s", name, got, want)
	}
}

// writeVectors generates testdata/vectors.json.
func writeVectors(t *testing.T) {
	day := time.Date(2025, 1, 1, 0, 0, 0, 0, time.UTC)
	caKey := fixedECDSA(t, "tpmagent seal vectors fleet CA")
	ca := selfSignedCA(t, "tpmagent test fleet CA", caKey, day, day.AddDate(100, 0, 0))
	devKey := fixedECDSA(t, "tpmagent seal vectors device dev-0001")
	leaf := ca.issueAt(t, "dev-0001", devKey.Public(), day, day.AddDate(100, 0, 0))
	pkcs8, err := x509.MarshalPKCS8PrivateKey(devKey)
	if err != nil {
		t.Fatal(err)
	}
	vf := vectorFile{
		Comment:        "Test vectors for docs/SEALED-TELEMETRY.md. Keys are for tests only. enc was produced by crypto/hpke with testing/cryptotest.SetGlobalRandom(random_seed).",
		FleetCA:        hex.EncodeToString(ca.der),
		DeviceID:       "dev-0001",
		DeviceKeyPKCS8: hex.EncodeToString(pkcs8),
		DeviceChain:    []string{hex.EncodeToString(leaf)},
	}
	start := time.Date(2026, 1, 2, 3, 4, 5, 678000000, time.UTC)
	for i, vsu := range vectorSuites {
		ck, err := DeriveCollectorKey(vsu.suite.KEM, unhex(t, vsu.ikm))
		if err != nil {
			t.Fatal(err)
		}
		sk, _ := ck.Bytes()
		a := &Announcement{
			DeviceID:  vf.DeviceID,
			SessionID: 0x0123456789a0 + uint64(i),
			Suite:     vsu.suite,
			StartTime: start,
			SeqStart:  1000,
			Chain:     [][]byte{leaf},
		}
		cryptotest.SetGlobalRandom(t, vsu.seed)
		enc, keys, key, err := senderContext(ck.Public(), a)
		if err != nil {
			t.Fatal(err)
		}
		a.Enc = enc
		if err := a.sign(devKey); err != nil {
			t.Fatal(err)
		}
		vs := vectorSession{
			Suite: vsu.suite.String(), KEM: vsu.suite.KEM, KDF: vsu.suite.KDF, AEAD: vsu.suite.AEAD,
			RandomSeed: vsu.seed, CollectorIKM: vsu.ikm,
			CollectorSK: hex.EncodeToString(sk), CollectorPK: hex.EncodeToString(ck.Public().Bytes()),
			SessionID: hex.EncodeToString(putSessionID(nil, a.SessionID)),
			StartTime: start.Format(time.RFC3339Nano), SeqStart: a.SeqStart,
			HPKEInfo: hex.EncodeToString(a.hpkeInfo()), Enc: hex.EncodeToString(enc),
			FrameKey: hex.EncodeToString(key), NonceBase: hex.EncodeToString(keys.nonceBase[:]),
			Announcement: hex.EncodeToString(a.Marshal()),
		}
		topic := "devices/dev-0001/telemetry"
		plain := []string{
			`[{"name":"temp","value":21.5,"ts":1767323045678}]`,
			`[{"name":"temp","value":21.6,"ts":1767323045683},{"name":"rh","value":40,"ts":1767323045683}]`,
			``,
			`[{"name":"temp","value":21.7,"ts":1767323045690}]`,
		}
		seqs := []uint64{1000, 1001, 1002, 1006} // 1003..1005 lost: 3 gaps
		var frames [][]byte
		for j, p := range plain {
			hdr := appendHeader(nil, a.SessionID, seqs[j])
			var n [nonceSize]byte
			frameNonce(&n, &keys.nonceBase, seqs[j])
			fr := keys.seal(nil, a.SessionID, seqs[j], a.DeviceID, topic, []byte(p))
			frames = append(frames, fr)
			vs.Frames = append(vs.Frames, vectorFrame{
				Topic: topic, Seq: seqs[j], Plaintext: p,
				AAD:   hex.EncodeToString(appendAAD(nil, hdr, a.DeviceID, topic)),
				Nonce: hex.EncodeToString(n[:]), Frame: hex.EncodeToString(fr),
			})
		}
		flip := func(b []byte, i int) string { c := bytes.Clone(b); c[i] ^= 0x01; return hex.EncodeToString(c) }
		annBytes := a.Marshal()
		sigByte := len(annBytes) - 10
		vs.Failures = []vectorFailure{
			{"flipped ciphertext bit", "frame", topic, flip(frames[0], FrameHeaderSize), "forged"},
			{"flipped tag bit", "frame", topic, flip(frames[1], len(frames[1])-1), "forged"},
			{"flipped sequence bit (nonce and AAD change)", "frame", topic, flip(frames[0], FrameHeaderSize-1), "forged"},
			{"wrong AAD topic", "frame", "devices/dev-0001/other", hex.EncodeToString(frames[0]), "forged"},
			{"replay of frames[0]", "frame", topic, hex.EncodeToString(frames[0]), "replay"},
			{"moved to another device's topic", "frame", "devices/dev-0002/telemetry", hex.EncodeToString(frames[3]), "wrong-device"},
			{"below sequence start", "frame", topic, hex.EncodeToString(keys.seal(nil, a.SessionID, 999, a.DeviceID, topic, []byte("x"))), "too-old"},
			{"truncated frame", "frame", topic, hex.EncodeToString(frames[0][:FrameOverhead-1]), "malformed"},
			{"announcement with a flipped signature bit", "announcement", SessionsTopic("dev-0001"), flip(annBytes, sigByte), "bad-announcement"},
			{"announcement on another device's topic", "announcement", SessionsTopic("dev-0002"), hex.EncodeToString(annBytes), "wrong-device"},
		}
		vf.Sessions = append(vf.Sessions, vs)
	}
	out, err := json.MarshalIndent(&vf, "", "  ")
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.FromSlash(vectorsFile), append(out, '\n'), 0o644); err != nil {
		t.Fatal(err)
	}
	t.Logf("wrote %s", vectorsFile)
}

// fixedECDSA derives a P-256 key from a label (test vectors only).
func fixedECDSA(t *testing.T, label string) *ecdsa.PrivateKey {
	h := sha256.Sum256([]byte(label))
	d := new(big.Int).SetBytes(h[:])
	d.Mod(d, new(big.Int).Sub(elliptic.P256().Params().N, big.NewInt(1)))
	d.Add(d, big.NewInt(1))
	b := make([]byte, 32)
	k, err := ecdsa.ParseRawPrivateKey(elliptic.P256(), d.FillBytes(b))
	if err != nil {
		t.Fatal(err)
	}
	return k
}
