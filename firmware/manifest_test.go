package firmware

import (
	"bytes"
	"crypto/ed25519"
	"encoding/base64"
	"encoding/json"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

func TestSignAndVerifyBothAlgorithms(t *testing.T) {
	for _, alg := range []Alg{AlgECDSAP256, AlgEd25519} {
		t.Run(string(alg), func(t *testing.T) {
			rel := newRelease(t, alg, 4096)
			m := rel.manifest(t, "1.2.3", SourceMQTT, "https://fw.example.com/a/b")
			env := rel.sign(t, m)
			got, err := ParseAndVerify(env, rel.trust)
			if err != nil {
				t.Fatal(err)
			}
			mustEqual(t, "version", got.Version, "1.2.3")
			mustEqual(t, "size", got.Size, int64(4096))
			mustEqual(t, "digest", got.Digest(), m.Digest())
			if !bytes.Equal(got.Raw(), m.Raw()) {
				t.Fatal("verified bytes differ from signed bytes")
			}
			if err := CheckCompatible(got, "hw-1"); err != nil {
				t.Fatal(err)
			}
			if err := CheckCompatible(got, "hw-9"); !errors.Is(err, ErrIncompatible) {
				t.Fatalf("hw-9: %v, want ErrIncompatible", err)
			}
		})
	}
}

func TestVerifyRejections(t *testing.T) {
	rel := newRelease(t, AlgEd25519, 1000)
	other := newRelease(t, AlgECDSAP256, 10)
	m := rel.manifest(t, "1.0.0")
	env := rel.sign(t, m)

	// A second signature by an unknown key next to a good one is fine.
	twoSigs, err := AddSignature(env, other.key)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := ParseAndVerify(twoSigs, rel.trust); err != nil {
		t.Fatalf("good + unknown signature: %v", err)
	}
	// The ECDSA key alone verifies the same envelope for a device that trusts only it.
	if _, err := ParseAndVerify(twoSigs, other.trust); err != nil {
		t.Fatalf("rotation key: %v", err)
	}

	mSigned := func(edit func(*Manifest)) []byte {
		mm := rel.manifest(t, "1.0.0")
		edit(mm)
		raw, _ := json.Marshal(mm)
		sig, err := signBytes(raw, rel.key)
		if err != nil {
			t.Fatal(err)
		}
		out, _ := json.Marshal(envelope{Manifest: base64.StdEncoding.EncodeToString(raw), Signatures: []envelopeSigJS{sig}})
		return out
	}
	rawSigned := func(manifest string) []byte { // sign arbitrary manifest bytes
		sig, err := signBytes([]byte(manifest), rel.key)
		if err != nil {
			t.Fatal(err)
		}
		out, _ := json.Marshal(envelope{Manifest: base64.StdEncoding.EncodeToString([]byte(manifest)), Signatures: []envelopeSigJS{sig}})
		return out
	}
	sigOf := func(env []byte) envelopeSigJS {
		var e envelope
		json.Unmarshal(env, &e)
		return e.Signatures[0]
	}
	goodSig := sigOf(env)
	var e envelope
	json.Unmarshal(env, &e)

	tests := []struct {
		name  string
		data  []byte
		want  error
		field string // for malformed: the field named
	}{
		{"unknown key", other.sign(t, other.manifest(t, "1.0.0")), ErrUnknownKey, ""},
		{"edited after signing", editEnvelope(t, env, func(b []byte) []byte {
			return bytes.Replace(b, []byte(`"hw-0"`), []byte(`"hw-9"`), 1)
		}), ErrBadSignature, ""},
		{"sig of another manifest", []byte(`{"manifest":"` + e.Manifest + `","signatures":[{"key_id":"` + goodSig.KeyID + `","alg":"ed25519","sig":"` + sigOf(rel.sign(t, rel.manifest(t, "9.9.9"))).Sig + `"}]}`), ErrBadSignature, ""},
		{"alg does not match trusted key", []byte(`{"manifest":"` + e.Manifest + `","signatures":[{"key_id":"` + goodSig.KeyID + `","alg":"ecdsa-p256-sha256","sig":"` + goodSig.Sig + `"}]}`), ErrBadSignature, ""},
		{"not json", []byte("hello"), ErrMalformed, ""},
		{"trailing data", append(bytes.Clone(env), []byte(" {}")...), ErrMalformed, ""},
		{"duplicate envelope key", []byte(`{"manifest":"` + e.Manifest + `","manifest":"` + e.Manifest + `","signatures":[]}`), ErrMalformed, ""},
		{"case-variant envelope key", []byte(`{"Manifest":"` + e.Manifest + `","signatures":[]}`), ErrMalformed, ""},
		{"no signatures", []byte(`{"manifest":"` + e.Manifest + `","signatures":[]}`), ErrMalformed, "signatures"},
		{"bad base64 manifest", []byte(`{"manifest":"%%%","signatures":[]}`), ErrMalformed, "manifest"},
		{"bad key id", []byte(`{"manifest":"` + e.Manifest + `","signatures":[{"key_id":"XYZ","alg":"ed25519","sig":"` + goodSig.Sig + `"}]}`), ErrMalformed, "signatures[0].key_id"},
		{"bad alg", []byte(`{"manifest":"` + e.Manifest + `","signatures":[{"key_id":"` + goodSig.KeyID + `","alg":"rsa","sig":"` + goodSig.Sig + `"}]}`), ErrMalformed, "signatures[0].alg"},
		{"chunk_size too small (signed)", mSigned(func(m *Manifest) { m.ChunkSize = 10 }), ErrMalformed, "chunk_size"},
		{"http source (signed)", mSigned(func(m *Manifest) { m.Sources = []string{"http://x/y"} }), ErrMalformed, "sources[0]"},
		{"topic wildcard in version (signed)", mSigned(func(m *Manifest) { m.Version = "1.0+build" }), ErrMalformed, "version"},
		{"uppercase sha256 (signed)", mSigned(func(m *Manifest) { m.SHA256 = strings.ToUpper(m.SHA256) }), ErrMalformed, "sha256"},
		{"no hardware (signed)", mSigned(func(m *Manifest) { m.Hardware = nil }), ErrMalformed, "hardware"},
		{"format 2 (signed)", mSigned(func(m *Manifest) { m.Format = 2 }), ErrMalformed, "format"},
		{"unknown manifest field (signed)", rawSigned(`{"format":1,"name":"a","version":"1","security_version":0,"hardware":["h"],"size":1,"sha256":"` + strings.Repeat("a", 64) + `","chunk_size":512,"sources":["mqtt"],"extra":1}`), ErrMalformed, ""},
		{"negative security_version (signed)", rawSigned(`{"format":1,"name":"a","version":"1","security_version":-1,"hardware":["h"],"size":1,"sha256":"` + strings.Repeat("a", 64) + `","chunk_size":512,"sources":["mqtt"]}`), ErrMalformed, "security_version"},
		{"duplicate manifest key (signed)", rawSigned(`{"format":1,"name":"a","name":"b","version":"1","security_version":0,"hardware":["h"],"size":1,"sha256":"` + strings.Repeat("a", 64) + `","chunk_size":512,"sources":["mqtt"]}`), ErrMalformed, ""},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			_, err := ParseAndVerify(tc.data, rel.trust)
			if !errors.Is(err, tc.want) {
				t.Fatalf("err = %v, want %v", err, tc.want)
			}
			if Reason(err) == "" {
				t.Fatalf("no status reason for %v", err)
			}
			if tc.field != "" {
				var fe *FieldError
				if !errors.As(err, &fe) || fe.Field != tc.field {
					t.Fatalf("err = %v, want a FieldError naming %q", err, tc.field)
				}
				if !strings.Contains(err.Error(), tc.field) {
					t.Fatalf("message %q does not name the field", err)
				}
			}
		})
	}
}

func TestKeyFilesAndTrustStore(t *testing.T) {
	dir := t.TempDir()
	var pubFiles []string
	for _, alg := range []Alg{AlgECDSAP256, AlgEd25519} {
		key, err := GenerateReleaseKey(alg)
		if err != nil {
			t.Fatal(err)
		}
		p := filepath.Join(dir, string(alg)+".key")
		if err := WriteKeyFiles(p, key); err != nil {
			t.Fatal(err)
		}
		fi, err := os.Stat(p)
		if err != nil {
			t.Fatal(err)
		}
		mustEqual(t, "private key mode", fi.Mode().Perm(), os.FileMode(0o600))
		if err := WriteKeyFiles(p, key); err == nil || !strings.Contains(err.Error(), "already exists") {
			t.Fatalf("overwrite: %v, want refusal", err)
		}
		loaded, err := LoadPrivateKey(p)
		if err != nil {
			t.Fatal(err)
		}
		id1, _ := KeyID(key.Public())
		id2, _ := KeyID(loaded.Public())
		mustEqual(t, "key id after reload", id2, id1)
		pubFiles = append(pubFiles, p+".pub")

		// The key id is what the spec's openssl recipe computes.
		out, err := exec.Command("sh", "-c", "openssl pkey -pubin -in '"+p+".pub' -outform DER | sha256sum | cut -c1-16").Output()
		if err != nil {
			t.Fatalf("openssl (Debian package openssl) key id recipe: %v", err)
		}
		mustEqual(t, "openssl key id", strings.TrimSpace(string(out)), id1)
	}
	// Both public keys in one trust file, as the config allows.
	both := filepath.Join(dir, "trust.pem")
	a, _ := os.ReadFile(pubFiles[0])
	b, _ := os.ReadFile(pubFiles[1])
	os.WriteFile(both, append(a, b...), 0o644)
	ts, err := LoadTrustStore(both)
	if err != nil {
		t.Fatal(err)
	}
	mustEqual(t, "trusted keys", len(ts.KeyIDs()), 2)

	for name, content := range map[string]string{
		"empty.pem": "",
		"cert.pem":  "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
	} {
		p := filepath.Join(dir, name)
		os.WriteFile(p, []byte(content), 0o644)
		if _, err := LoadTrustStore(p); err == nil || !strings.Contains(err.Error(), p) {
			t.Fatalf("%s: %v, want an error naming the file", name, err)
		}
	}
	if _, err := LoadTrustStore(); err == nil {
		t.Fatal("empty trust list accepted")
	}
}

// TestOpenSSLVerifiesECDSASignature checks the spec's claim that the envelope can be checked
// offline with openssl: signed message = context || 0x00 || manifest bytes, ASN.1 signature.
func TestOpenSSLVerifiesECDSASignature(t *testing.T) {
	dir := t.TempDir()
	key, _ := GenerateReleaseKey(AlgECDSAP256)
	kp := filepath.Join(dir, "release.key")
	if err := WriteKeyFiles(kp, key); err != nil {
		t.Fatal(err)
	}
	rel := newRelease(t, AlgECDSAP256, 100)
	rel.key = key
	env := rel.sign(t, rel.manifest(t, "2.0.0"))
	var e envelope
	json.Unmarshal(env, &e)
	raw, _ := base64.StdEncoding.DecodeString(e.Manifest)
	sig, _ := base64.StdEncoding.DecodeString(e.Signatures[0].Sig)
	os.WriteFile(filepath.Join(dir, "msg"), append([]byte("tpmagent-firmware-manifest-v1\x00"), raw...), 0o644)
	os.WriteFile(filepath.Join(dir, "sig.der"), sig, 0o644)
	out, err := exec.Command("openssl", "dgst", "-sha256", "-verify", kp+".pub", "-signature", filepath.Join(dir, "sig.der"), filepath.Join(dir, "msg")).CombinedOutput()
	if err != nil || !strings.Contains(string(out), "Verified OK") {
		t.Fatalf("openssl dgst -verify: %v: %s", err, out)
	}
}

func TestEd25519SignatureIsPure(t *testing.T) {
	rel := newRelease(t, AlgEd25519, 10)
	m := rel.manifest(t, "1.0.0")
	env := rel.sign(t, m)
	var e envelope
	json.Unmarshal(env, &e)
	sig, _ := base64.StdEncoding.DecodeString(e.Signatures[0].Sig)
	pub := rel.key.Public().(ed25519.PublicKey)
	if !ed25519.Verify(pub, append([]byte(signatureContext), m.Raw()...), sig) {
		t.Fatal("Ed25519 signature is not over context||manifest")
	}
}
