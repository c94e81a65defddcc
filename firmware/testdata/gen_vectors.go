//go:build ignore

// gen_vectors writes the test keys (testdata/keys) and the signed-manifest vectors that double
// as the seed corpus of FuzzParseManifest (testdata/fuzz/FuzzParseManifest). File names say the
// expected outcome: ok_* verifies, fail_<reason>_* fails with that status reason. Run from the
// firmware directory: go run testdata/gen_vectors.go. Existing keys are reused so the vectors
// stay stable; TestVectors checks every file.
package main

import (
	"bytes"
	"crypto"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"log"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/tpmagent/tpmagent/firmware"
)

const keys = "testdata/keys"
const corpus = "testdata/fuzz/FuzzParseManifest"

func key(name string, alg firmware.Alg) crypto.Signer {
	p := filepath.Join(keys, name+".key")
	if k, err := firmware.LoadPrivateKey(p); err == nil {
		return k
	}
	k, err := firmware.GenerateReleaseKey(alg)
	if err != nil {
		log.Fatal(err)
	}
	if err := firmware.WriteKeyFiles(p, k); err != nil {
		log.Fatal(err)
	}
	return k
}

type sig struct {
	KeyID string `json:"key_id"`
	Alg   string `json:"alg"`
	Sig   string `json:"sig"`
}

func sign(k crypto.Signer, raw []byte) sig {
	alg, _ := firmware.AlgOf(k.Public())
	id, _ := firmware.KeyID(k.Public())
	msg := append([]byte("tpmagent-firmware-manifest-v1\x00"), raw...)
	var s []byte
	var err error
	if alg == firmware.AlgEd25519 {
		s, err = k.Sign(rand.Reader, msg, crypto.Hash(0))
	} else {
		d := sha256.Sum256(msg)
		s, err = k.Sign(rand.Reader, d[:], crypto.SHA256)
	}
	if err != nil {
		log.Fatal(err)
	}
	return sig{id, string(alg), base64.StdEncoding.EncodeToString(s)}
}

func env(raw []byte, sigs ...sig) []byte {
	b, _ := json.Marshal(struct {
		Manifest   string `json:"manifest"`
		Signatures []sig  `json:"signatures"`
	}{base64.StdEncoding.EncodeToString(raw), sigs})
	return b
}

func write(name string, data []byte) {
	content := "go test fuzz v1\n[]byte(" + strconv.Quote(string(data)) + ")\n"
	if err := os.WriteFile(filepath.Join(corpus, name), []byte(content), 0o644); err != nil {
		log.Fatal(err)
	}
}

func main() {
	ed := key("release-ed25519", firmware.AlgEd25519)
	ec := key("release-ecdsa", firmware.AlgECDSAP256)
	stranger := key("stranger-ed25519", firmware.AlgEd25519)
	sha := strings.Repeat("ab", 32)
	good := []byte(`{"format":1,"name":"tpmagent","version":"1.4.2","security_version":3,"hardware":["rpi4-arm64","imx8mm"],"size":9437184,"sha256":"` + sha + `","chunk_size":65536,"sources":["mqtt","https://fw.example.com/tpmagent/1.4.2/image"],"created":"2026-12-04T16:00:00Z"}`)
	minimal := []byte(`{"format":1,"name":"a","version":"1","security_version":0,"hardware":["h"],"size":1,"sha256":"` + sha + `","chunk_size":512,"sources":["mqtt"]}`)
	with := func(old, new string) []byte { return bytes.Replace(good, []byte(old), []byte(new), 1) }

	write("ok_ed25519", env(good, sign(ed, good)))
	write("ok_ecdsa", env(good, sign(ec, good)))
	write("ok_minimal", env(minimal, sign(ed, minimal)))
	write("ok_unknown_then_trusted", env(good, sign(stranger, good), sign(ec, good)))
	write("fail_unknown_key", env(good, sign(stranger, good)))
	e := env(good, sign(ed, good))
	edited := env(with(`"security_version":3`, `"security_version":1`))
	var ev, ee map[string]any
	json.Unmarshal(e, &ev)
	json.Unmarshal(edited, &ee)
	ev["manifest"] = ee["manifest"]
	b, _ := json.Marshal(ev)
	write("fail_bad_signature_edited", b)
	s := sign(ed, good)
	s.Alg = "ecdsa-p256-sha256"
	write("fail_bad_signature_alg_mismatch", env(good, s))
	write("fail_bad_signature_other_manifest", env(good, sign(ec, with("1.4.2", "1.4.3"))))
	write("fail_malformed_not_json", []byte("not json"))
	write("fail_malformed_empty_object", []byte("{}"))
	write("fail_malformed_no_signatures", env(good))
	write("fail_malformed_trailing", append(env(good, sign(ed, good)), []byte("{}")...))
	write("fail_malformed_dup_envelope_key", []byte(`{"manifest":"e30=","manifest":"e30=","signatures":[]}`))
	for name, raw := range map[string][]byte{
		"chunk_size":   with(`"chunk_size":65536`, `"chunk_size":7`),
		"http_source":  with(`https://fw`, `http://fw`),
		"version_plus": with(`"version":"1.4.2"`, `"version":"1.4.2+b"`),
		"unknown":      with(`"format":1,`, `"format":1,"extra":true,`),
		"dup_key":      with(`"format":1,`, `"format":1,"format":1,`),
		"case_key":     with(`"format":1,`, `"Format":1,`),
		"float_size":   with(`"size":9437184`, `"size":9.5`),
		"sv_too_big":   with(`"security_version":3`, `"security_version":9007199254740992`),
		"format_2":     with(`"format":1`, `"format":2`),
		"not_object":   []byte(`[1,2,3]`),
		"no_hardware":  with(`["rpi4-arm64","imx8mm"]`, `[]`),
		"userinfo_url": with(`https://fw.`, `https://u:p@fw.`),
	} {
		write("fail_malformed_signed_"+name, env(raw, sign(ed, raw)))
	}
	fmt.Println("vectors written to", corpus)
}
