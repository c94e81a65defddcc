package firmware

import (
	"bytes"
	"encoding/base64"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
)

// vectorTrust trusts the two release keys in testdata/keys (not the stranger key).
func vectorTrust(t testing.TB) *TrustStore {
	t.Helper()
	ts, err := LoadTrustStore("testdata/keys/release-ed25519.key.pub", "testdata/keys/release-ecdsa.key.pub")
	if err != nil {
		t.Fatal(err)
	}
	return ts
}

func readCorpusFile(t testing.TB, path string) []byte {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	lines := strings.SplitN(string(b), "\n", 3)
	if len(lines) < 2 || lines[0] != "go test fuzz v1" || !strings.HasPrefix(lines[1], "[]byte(") || !strings.HasSuffix(lines[1], ")") {
		t.Fatalf("%s: not a go fuzz v1 []byte file", path)
	}
	s, err := strconv.Unquote(strings.TrimSuffix(strings.TrimPrefix(lines[1], "[]byte("), ")"))
	if err != nil {
		t.Fatalf("%s: %v", path, err)
	}
	return []byte(s)
}

// TestVectors pins the outcome of every vector in the seed corpus: ok_* verifies, and
// fail_<reason>_* fails with that status reason (testdata/gen_vectors.go writes them).
func TestVectors(t *testing.T) {
	trust := vectorTrust(t)
	files, _ := filepath.Glob("testdata/fuzz/FuzzParseManifest/*")
	if len(files) < 20 {
		t.Fatalf("only %d vectors in testdata/fuzz/FuzzParseManifest", len(files))
	}
	reasons := []string{ReasonUnknownKey, ReasonBadSignature, ReasonMalformed}
	for _, f := range files {
		name := filepath.Base(f)
		t.Run(name, func(t *testing.T) {
			m, err := ParseAndVerify(readCorpusFile(t, f), trust)
			if strings.HasPrefix(name, "ok_") {
				if err != nil {
					t.Fatal(err)
				}
				mustEqual(t, "name", m.Name, map[bool]string{true: "a", false: "tpmagent"}[name == "ok_minimal"])
				return
			}
			want := ""
			for _, r := range reasons {
				if strings.HasPrefix(name, "fail_"+r) {
					want = r
				}
			}
			if want == "" {
				t.Fatalf("vector name %q says no outcome", name)
			}
			if err == nil {
				t.Fatal("verified")
			}
			mustEqual(t, "reason", Reason(err), want)
		})
	}
}

// FuzzParseManifest feeds data to ParseAndVerify twice: as an envelope, and as manifest bytes
// inside an envelope signed by a trusted key (so the fuzzer reaches the manifest parser behind
// the signature). It must never panic, every error must carry a status reason, and whatever
// verifies must be a valid manifest whose Raw bytes are exactly what was signed.
func FuzzParseManifest(f *testing.F) {
	trust := vectorTrust(f)
	signer, err := LoadPrivateKey("testdata/keys/release-ed25519.key")
	if err != nil {
		f.Fatal(err)
	}
	f.Add([]byte(`{"format":1,"name":"a","version":"1","security_version":0,"hardware":["h"],"size":1,"sha256":"` + strings.Repeat("0", 64) + `","chunk_size":512,"sources":["mqtt"]}`))
	f.Fuzz(func(t *testing.T, data []byte) {
		check := func(m *Manifest, err error, signed []byte) {
			if err != nil {
				if m != nil {
					t.Fatal("manifest returned with an error")
				}
				if Reason(err) == "" {
					t.Fatalf("error without a status reason: %v", err)
				}
				return
			}
			if verr := m.Validate(); verr != nil {
				t.Fatalf("verified manifest does not validate: %v", verr)
			}
			if signed != nil && !bytes.Equal(m.Raw(), signed) {
				t.Fatal("Raw differs from the signed bytes")
			}
			if CheckCompatible(m, m.Hardware[0]) != nil {
				t.Fatal("listed hardware incompatible")
			}
		}
		m, err := ParseAndVerify(data, trust)
		check(m, err, nil)
		if err == nil {
			// Re-encoding the verified manifest and signing it again must round-trip.
			env2, serr := Sign(m, signer)
			if serr != nil {
				t.Fatalf("re-sign verified manifest: %v", serr)
			}
			m2, err2 := ParseAndVerify(env2, trust)
			if err2 != nil || m2.Digest() != m.Digest() && !jsonEqual(m2.Raw(), m.Raw()) {
				t.Fatalf("re-signed manifest: %v", err2)
			}
		}
		if len(data) > maxEnvelopeSize/2 {
			return
		}
		s, err := signBytes(data, signer)
		if err != nil {
			t.Fatal(err)
		}
		env, _ := json.Marshal(envelope{Manifest: base64.StdEncoding.EncodeToString(data), Signatures: []envelopeSigJS{s}})
		m, err = ParseAndVerify(env, trust)
		if errors.Is(err, ErrBadSignature) || errors.Is(err, ErrUnknownKey) {
			t.Fatalf("trusted signature over fuzz bytes rejected: %v", err)
		}
		check(m, err, data)
	})
}

func jsonEqual(a, b []byte) bool {
	var x, y any
	if json.Unmarshal(a, &x) != nil || json.Unmarshal(b, &y) != nil {
		return false
	}
	xa, _ := json.Marshal(x)
	ya, _ := json.Marshal(y)
	return bytes.Equal(xa, ya)
}

// FuzzChunkFraming: decoders never panic, and what decodes re-encodes to the same frame.
func FuzzChunkFraming(f *testing.F) {
	f.Add(EncodeChunkResponse(65536, []byte("data")))
	f.Add(EncodeChunkError(0, "range beyond image size"))
	f.Add([]byte(`{"device":"dev-0001","offset":0,"length":65536}`))
	f.Fuzz(func(t *testing.T, data []byte) {
		if r, err := DecodeChunkResponse(data); err == nil {
			var again []byte
			if r.Err != "" {
				again = EncodeChunkError(r.Offset, r.Err)
			} else {
				again = EncodeChunkResponse(r.Offset, r.Data)
			}
			if r.Err != "unspecified error" && !bytes.Equal(again, data) {
				t.Fatalf("re-encoded frame differs")
			}
		}
		if req, err := DecodeChunkRequest(data); err == nil {
			if req.Length <= 0 || req.Offset < 0 || !identOK(req.Device, 128) {
				t.Fatalf("accepted bad request %+v", req)
			}
		}
	})
}
