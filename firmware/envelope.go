package firmware

import (
	"bytes"
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
)

// envelope is the detached signature envelope of docs/FIRMWARE.md §2.
type envelope struct {
	Manifest   string          `json:"manifest"`
	Signatures []envelopeSigJS `json:"signatures"`
}

type envelopeSigJS struct {
	KeyID string `json:"key_id"`
	Alg   string `json:"alg"`
	Sig   string `json:"sig"`
}

var (
	envelopeFields  = map[string]bool{"manifest": true, "signatures": true}
	signatureFields = map[string]bool{"key_id": true, "alg": true, "sig": true}
	manifestFields  = map[string]bool{"format": true, "name": true, "version": true, "security_version": true,
		"hardware": true, "size": true, "sha256": true, "chunk_size": true, "sources": true, "created": true}
	b64 = base64.StdEncoding.Strict()
)

// signedMessage is the byte string a release key signs: the context string, a zero byte, the manifest bytes.
func signedMessage(manifest []byte) []byte {
	msg := make([]byte, 0, len(signatureContext)+len(manifest))
	msg = append(msg, signatureContext...)
	return append(msg, manifest...)
}

// Sign validates m, encodes it as JSON and returns the signed envelope (the job payload). signer
// must hold an ECDSA P-256 or Ed25519 key; a TPM-backed crypto.Signer works (for ECDSA it is
// given the SHA-256 digest and crypto.SHA256). After Sign, m.Raw returns the signed bytes.
func Sign(m *Manifest, signer crypto.Signer) ([]byte, error) {
	if err := m.Validate(); err != nil {
		return nil, err
	}
	raw, err := json.Marshal(m)
	if err != nil {
		return nil, fmt.Errorf("firmware: encode manifest: %w", err)
	}
	sig, err := signBytes(raw, signer)
	if err != nil {
		return nil, err
	}
	m.raw = raw
	return json.Marshal(envelope{Manifest: b64.EncodeToString(raw), Signatures: []envelopeSigJS{sig}})
}

// AddSignature appends a signature by signer to an existing envelope (e.g. a second key during
// key rotation). The signed manifest bytes are unchanged; the existing signatures are not checked.
func AddSignature(envelopeJSON []byte, signer crypto.Signer) ([]byte, error) {
	env, err := decodeEnvelope(envelopeJSON)
	if err != nil {
		return nil, err
	}
	raw, _ := b64.DecodeString(env.Manifest) // checked by decodeEnvelope
	sig, err := signBytes(raw, signer)
	if err != nil {
		return nil, err
	}
	if len(env.Signatures) >= maxSignatures {
		return nil, fmt.Errorf("firmware: envelope already has %d signatures (the maximum)", maxSignatures)
	}
	env.Signatures = append(env.Signatures, sig)
	return json.Marshal(env)
}

func signBytes(raw []byte, signer crypto.Signer) (envelopeSigJS, error) {
	pub := signer.Public()
	alg, err := AlgOf(pub)
	if err != nil {
		return envelopeSigJS{}, err
	}
	id, err := KeyID(pub)
	if err != nil {
		return envelopeSigJS{}, err
	}
	msg := signedMessage(raw)
	var sig []byte
	switch alg {
	case AlgECDSAP256:
		d := sha256.Sum256(msg)
		sig, err = signer.Sign(rand.Reader, d[:], crypto.SHA256)
	case AlgEd25519:
		sig, err = signer.Sign(rand.Reader, msg, crypto.Hash(0))
	}
	if err != nil {
		return envelopeSigJS{}, fmt.Errorf("firmware: sign manifest with key %s: %w", id, err)
	}
	return envelopeSigJS{KeyID: id, Alg: string(alg), Sig: b64.EncodeToString(sig)}, nil
}

func envErr(field, format string, args ...any) error {
	return &FieldError{Where: "envelope", Field: field, Problem: fmt.Sprintf(format, args...)}
}

// decodeEnvelope parses the envelope strictly; it does not verify anything.
func decodeEnvelope(data []byte) (*envelope, error) {
	if len(data) > maxEnvelopeSize {
		return nil, envErr("", "envelope is %d bytes, the limit is %d", len(data), maxEnvelopeSize)
	}
	if err := checkStrictJSON(data, envelopeFields, signatureFields); err != nil {
		return nil, envErr("", "%v", err)
	}
	var env envelope
	if err := decodeStrict(data, &env); err != nil {
		return nil, jsonFieldErr("envelope", err)
	}
	if env.Manifest == "" {
		return nil, envErr("manifest", "missing")
	}
	if _, err := b64.DecodeString(env.Manifest); err != nil {
		return nil, envErr("manifest", "not standard base64: %v", err)
	}
	if len(env.Signatures) == 0 || len(env.Signatures) > maxSignatures {
		return nil, envErr("signatures", "must hold 1-%d signatures, has %d", maxSignatures, len(env.Signatures))
	}
	for i, s := range env.Signatures {
		if len(s.KeyID) != 16 {
			return nil, envErr(fmt.Sprintf("signatures[%d].key_id", i), "must be 16 lowercase hex characters")
		}
		if _, err := hex.DecodeString(s.KeyID); err != nil || bytes.ContainsAny([]byte(s.KeyID), "ABCDEF") {
			return nil, envErr(fmt.Sprintf("signatures[%d].key_id", i), "must be 16 lowercase hex characters")
		}
		if Alg(s.Alg) != AlgECDSAP256 && Alg(s.Alg) != AlgEd25519 {
			return nil, envErr(fmt.Sprintf("signatures[%d].alg", i), "%q is not %q or %q", s.Alg, AlgECDSAP256, AlgEd25519)
		}
		sig, err := b64.DecodeString(s.Sig)
		if err != nil || len(sig) == 0 || len(sig) > 128 {
			return nil, envErr(fmt.Sprintf("signatures[%d].sig", i), "must be standard base64 of 1-128 bytes")
		}
	}
	return &env, nil
}

// ParseAndVerify checks a job payload: the envelope's structure, then a signature by a key in
// trust over the manifest bytes, and only then parses and validates the manifest. It never
// touches the network or the disk, so it runs before anything is downloaded. Errors wrap
// ErrMalformed (*FieldError naming the field), ErrUnknownKey (*UnknownKeyError) or
// ErrBadSignature (*SignatureError).
func ParseAndVerify(data []byte, trust *TrustStore) (*Manifest, error) {
	env, err := decodeEnvelope(data)
	if err != nil {
		return nil, err
	}
	raw, _ := b64.DecodeString(env.Manifest)
	msg := signedMessage(raw)
	var unknown []string
	var sigErr error
	verified := false
	for _, s := range env.Signatures {
		pub, ok := trust.Lookup(s.KeyID)
		if !ok {
			unknown = append(unknown, s.KeyID)
			continue
		}
		sig, _ := b64.DecodeString(s.Sig)
		if err := verifySig(pub, Alg(s.Alg), msg, sig); err != nil {
			if sigErr == nil {
				sigErr = &SignatureError{KeyID: s.KeyID, Alg: s.Alg, Err: err}
			}
			continue
		}
		verified = true
		break
	}
	if !verified {
		if sigErr != nil {
			return nil, sigErr
		}
		return nil, &UnknownKeyError{KeyIDs: unknown}
	}
	m, err := parseManifest(raw)
	if err != nil {
		return nil, err
	}
	return m, nil
}

func verifySig(pub crypto.PublicKey, alg Alg, msg, sig []byte) error {
	keyAlg, err := AlgOf(pub)
	if err != nil {
		return err
	}
	if keyAlg != alg {
		return fmt.Errorf("envelope says %s but the trusted key is %s", alg, keyAlg)
	}
	switch k := pub.(type) {
	case *ecdsa.PublicKey:
		d := sha256.Sum256(msg)
		if !ecdsa.VerifyASN1(k, d[:], sig) {
			return errors.New("ECDSA verification failed")
		}
	case ed25519.PublicKey:
		if !ed25519.Verify(k, msg, sig) {
			return errors.New("Ed25519 verification failed")
		}
	}
	return nil
}

// parseManifest decodes verified manifest bytes strictly and validates them.
func parseManifest(raw []byte) (*Manifest, error) {
	if err := checkStrictJSON(raw, manifestFields, nil); err != nil {
		return nil, fieldErr("", "%v", err)
	}
	var m Manifest
	if err := decodeStrict(raw, &m); err != nil {
		return nil, jsonFieldErr("manifest", err)
	}
	if err := m.Validate(); err != nil {
		return nil, err
	}
	m.raw = bytes.Clone(raw)
	return &m, nil
}

func decodeStrict(data []byte, v any) error {
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.DisallowUnknownFields()
	return dec.Decode(v)
}

func jsonFieldErr(where string, err error) error {
	var te *json.UnmarshalTypeError
	if errors.As(err, &te) {
		return &FieldError{Where: where, Field: te.Field, Problem: fmt.Sprintf("must be a JSON %s, not %s", te.Type, te.Value)}
	}
	return &FieldError{Where: where, Field: "", Problem: err.Error()}
}

// checkStrictJSON accepts exactly one JSON object whose keys are in top (exact case; Go's
// decoder would otherwise match keys case-insensitively), objects inside arrays limited to
// nested (if non-nil), no duplicate keys anywhere, nesting ≤ 8, and nothing after the value.
func checkStrictJSON(data []byte, top, nested map[string]bool) error {
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.UseNumber()
	tok, err := dec.Token()
	if err != nil {
		return fmt.Errorf("not JSON: %v", err)
	}
	if d, ok := tok.(json.Delim); !ok || d != '{' {
		return errors.New("not a JSON object")
	}
	if err := walkObject(dec, top, nested, 1); err != nil {
		return err
	}
	if _, err := dec.Token(); err != io.EOF {
		return errors.New("data after the JSON object")
	}
	return nil
}

// walkObject consumes an object whose '{' was read.
func walkObject(dec *json.Decoder, allowed, nested map[string]bool, depth int) error {
	seen := map[string]bool{}
	for dec.More() {
		tok, err := dec.Token()
		if err != nil {
			return fmt.Errorf("not JSON: %v", err)
		}
		key, ok := tok.(string)
		if !ok {
			return errors.New("not JSON: object key is not a string")
		}
		if seen[key] {
			return fmt.Errorf("duplicate key %q", key)
		}
		seen[key] = true
		if allowed != nil && !allowed[key] {
			return fmt.Errorf("unknown field %q", key)
		}
		if err := walkValue(dec, nested, depth+1); err != nil {
			return err
		}
	}
	if _, err := dec.Token(); err != nil {
		return fmt.Errorf("not JSON: %v", err)
	}
	return nil
}

func walkValue(dec *json.Decoder, nested map[string]bool, depth int) error {
	if depth > 8 {
		return errors.New("nested too deeply")
	}
	tok, err := dec.Token()
	if err != nil {
		return fmt.Errorf("not JSON: %v", err)
	}
	d, ok := tok.(json.Delim)
	if !ok {
		return nil
	}
	switch d {
	case '{':
		return walkObject(dec, nested, nil, depth)
	case '[':
		for dec.More() {
			if err := walkValue(dec, nested, depth+1); err != nil {
				return err
			}
		}
		if _, err := dec.Token(); err != nil {
			return fmt.Errorf("not JSON: %v", err)
		}
	}
	return nil
}
