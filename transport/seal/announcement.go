package seal

import (
	"bytes"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/x509"
	"encoding/binary"
	"errors"
	"fmt"
	"time"
)

// Signature schemes of an announcement (TLS 1.3 SignatureScheme values).
const (
	SigECDSAP256SHA256 uint16 = 0x0403 // ecdsa_secp256r1_sha256, ASN.1 DER signature
	SigRSAPKCS1SHA256  uint16 = 0x0401 // rsa_pkcs1_sha256
	SigRSAPSSSHA256    uint16 = 0x0804 // rsa_pss_rsae_sha256, salt length 32
)

const (
	announcementVersion = 0x01
	// signatureContext prefixes the signed bytes so that an announcement
	// signature can never be mistaken for a TLS CertificateVerify or a CSR.
	signatureContext = "tpmagent sealed telemetry announcement v1\x00"
	// infoLabel prefixes the HPKE info.
	infoLabel   = "tpmagent sealed telemetry v1\x00"
	maxDeviceID = 128
	maxChain    = 8
)

// Announcement starts a session: it tells the collector which device
// opened it, with which suite and HPKE encapsulated key, and carries the
// device's certificate chain and one signature by the device key over all
// of it. It is published QoS1, retained, on devices/{device_id}/sessions.
type Announcement struct {
	DeviceID  string
	SessionID uint64 // 48 bits
	Suite     Suite
	StartTime time.Time // encoded as Unix milliseconds
	SeqStart  uint64    // sequence number of the session's first frame
	Enc       []byte    // HPKE encapsulated key
	SigScheme uint16
	Chain     [][]byte // DER certificates, leaf first
	Signature []byte

	raw []byte // the full encoding as parsed or signed
}

// SessionsTopic returns the topic announcements of deviceID go to.
func SessionsTopic(deviceID string) string { return "devices/" + deviceID + "/sessions" }

// ValidDeviceID reports whether id can be a device id: 1 to 128 bytes of
// [A-Za-z0-9._:-] (safe in an MQTT topic level and a certificate CN).
func ValidDeviceID(id string) error {
	if len(id) == 0 || len(id) > maxDeviceID {
		return fmt.Errorf("device id %q: length %d, want 1..%d", id, len(id), maxDeviceID)
	}
	for i := 0; i < len(id); i++ {
		c := id[i]
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '.' || c == '_' || c == ':' || c == '-') {
			return fmt.Errorf("device id %q: byte %q not allowed (use A-Z a-z 0-9 . _ : -)", id, c)
		}
	}
	return nil
}

// appendCore appends the fields shared by the HPKE info and the signed
// bytes: device id, session id, suite, start time, sequence start.
func (a *Announcement) appendCore(b []byte) []byte {
	b = append(b, byte(len(a.DeviceID)))
	b = append(b, a.DeviceID...)
	b = putSessionID(b, a.SessionID)
	b = binary.BigEndian.AppendUint16(b, a.Suite.KEM)
	b = binary.BigEndian.AppendUint16(b, a.Suite.KDF)
	b = binary.BigEndian.AppendUint16(b, a.Suite.AEAD)
	b = binary.BigEndian.AppendUint64(b, uint64(a.StartTime.UnixMilli()))
	return binary.BigEndian.AppendUint64(b, a.SeqStart)
}

// hpkeInfo returns the HPKE info of the session (section 6.1).
func (a *Announcement) hpkeInfo() []byte {
	return a.appendCore([]byte(infoLabel))
}

// tbs returns the to-be-signed encoding: everything but the signature.
func (a *Announcement) tbs() ([]byte, error) {
	if err := ValidDeviceID(a.DeviceID); err != nil {
		return nil, err
	}
	if a.SessionID > MaxSessionID {
		return nil, fmt.Errorf("session id %d exceeds 48 bits", a.SessionID)
	}
	if len(a.Enc) == 0 || len(a.Enc) > 0xFFFF {
		return nil, fmt.Errorf("enc of %d bytes", len(a.Enc))
	}
	if len(a.Chain) == 0 || len(a.Chain) > maxChain {
		return nil, fmt.Errorf("certificate chain of %d certificates, want 1..%d", len(a.Chain), maxChain)
	}
	b := []byte{announcementVersion}
	b = a.appendCore(b)
	b = binary.BigEndian.AppendUint16(b, uint16(len(a.Enc)))
	b = append(b, a.Enc...)
	b = binary.BigEndian.AppendUint16(b, a.SigScheme)
	b = append(b, byte(len(a.Chain)))
	for i, c := range a.Chain {
		if len(c) == 0 || len(c) > 0xFFFF {
			return nil, fmt.Errorf("certificate %d of %d bytes", i, len(c))
		}
		b = binary.BigEndian.AppendUint16(b, uint16(len(c)))
		b = append(b, c...)
	}
	return b, nil
}

// signedMessage returns the bytes whose SHA-256 the device key signs.
func signedMessage(tbs []byte) []byte {
	return append([]byte(signatureContext), tbs...)
}

// Marshal returns the canonical, signed encoding (section 4). It is the
// exact payload to publish.
func (a *Announcement) Marshal() []byte { return bytes.Clone(a.raw) }

// sign fills SigScheme (from the signer's key), Signature and raw.
func (a *Announcement) sign(signer crypto.Signer) error {
	scheme, opts, err := schemeFor(signer.Public())
	if err != nil {
		return err
	}
	a.SigScheme = scheme
	tbs, err := a.tbs()
	if err != nil {
		return fmt.Errorf("seal: announcement: %w", err)
	}
	digest := sha256.Sum256(signedMessage(tbs))
	sig, err := signer.Sign(rand.Reader, digest[:], opts)
	if err != nil {
		return fmt.Errorf("seal: sign announcement of session %012x with the device key: %w", a.SessionID, err)
	}
	if len(sig) > 0xFFFF {
		return fmt.Errorf("seal: signature of %d bytes", len(sig))
	}
	a.Signature = sig
	raw := binary.BigEndian.AppendUint16(tbs, uint16(len(sig)))
	a.raw = append(raw, sig...)
	return nil
}

// schemeFor picks the signature scheme for a device public key: ECDSA
// P-256 signs with 0x0403, RSA with PKCS#1 v1.5 (0x0401).
func schemeFor(pub crypto.PublicKey) (uint16, crypto.SignerOpts, error) {
	switch k := pub.(type) {
	case *ecdsa.PublicKey:
		if k.Curve != elliptic.P256() {
			return 0, nil, fmt.Errorf("seal: device key is ECDSA %s, want P-256", k.Curve.Params().Name)
		}
		return SigECDSAP256SHA256, crypto.SHA256, nil
	case *rsa.PublicKey:
		return SigRSAPKCS1SHA256, crypto.SHA256, nil
	}
	return 0, nil, fmt.Errorf("seal: device key of type %T not supported (want ECDSA P-256 or RSA)", pub)
}

// verifySignature checks a.Signature with pub under a.SigScheme.
func (a *Announcement) verifySignature(pub crypto.PublicKey) error {
	tbs := a.raw[:len(a.raw)-2-len(a.Signature)]
	digest := sha256.Sum256(signedMessage(tbs))
	switch a.SigScheme {
	case SigECDSAP256SHA256:
		k, ok := pub.(*ecdsa.PublicKey)
		if !ok || k.Curve != elliptic.P256() {
			return fmt.Errorf("scheme 0x0403 needs an ECDSA P-256 certificate key, have %T", pub)
		}
		if !ecdsa.VerifyASN1(k, digest[:], a.Signature) {
			return errors.New("ECDSA signature does not verify")
		}
		return nil
	case SigRSAPKCS1SHA256, SigRSAPSSSHA256:
		k, ok := pub.(*rsa.PublicKey)
		if !ok {
			return fmt.Errorf("scheme 0x%04x needs an RSA certificate key, have %T", a.SigScheme, pub)
		}
		var err error
		if a.SigScheme == SigRSAPKCS1SHA256 {
			err = rsa.VerifyPKCS1v15(k, crypto.SHA256, digest[:], a.Signature)
		} else {
			err = rsa.VerifyPSS(k, crypto.SHA256, digest[:], a.Signature, &rsa.PSSOptions{SaltLength: rsa.PSSSaltLengthEqualsHash})
		}
		if err != nil {
			return fmt.Errorf("RSA signature does not verify: %w", err)
		}
		return nil
	}
	return fmt.Errorf("unsupported signature scheme 0x%04x", a.SigScheme)
}

// ParseAnnouncement decodes an announcement. It checks the encoding only:
// [Collector.HandleAnnouncement] verifies chain and signature.
func ParseAnnouncement(b []byte) (*Announcement, error) {
	r := reader{b: b}
	a := &Announcement{}
	if v := r.u8(); v != announcementVersion && r.err == nil {
		return nil, fmt.Errorf("seal: announcement version 0x%02x, want 0x%02x: %w", v, announcementVersion, ErrMalformed)
	}
	a.DeviceID = string(r.bytes(int(r.u8())))
	a.SessionID = getSessionID(r.bytes(SessionIDSize))
	a.Suite = Suite{r.u16(), r.u16(), r.u16()}
	a.StartTime = time.UnixMilli(int64(r.u64()))
	a.SeqStart = r.u64()
	a.Enc = r.bytes(int(r.u16()))
	a.SigScheme = r.u16()
	n := int(r.u8())
	if r.err == nil && (n == 0 || n > maxChain) {
		return nil, fmt.Errorf("seal: announcement: certificate chain of %d certificates, want 1..%d: %w", n, maxChain, ErrMalformed)
	}
	for i := 0; i < n && r.err == nil; i++ {
		c := r.bytes(int(r.u16()))
		if r.err == nil && len(c) == 0 {
			return nil, fmt.Errorf("seal: announcement: empty certificate %d: %w", i, ErrMalformed)
		}
		a.Chain = append(a.Chain, c)
	}
	a.Signature = r.bytes(int(r.u16()))
	if r.err != nil {
		return nil, fmt.Errorf("seal: announcement truncated: %w", ErrMalformed)
	}
	if len(r.b) != 0 {
		return nil, fmt.Errorf("seal: announcement has %d trailing bytes: %w", len(r.b), ErrMalformed)
	}
	if err := ValidDeviceID(a.DeviceID); err != nil {
		return nil, fmt.Errorf("seal: announcement: %v: %w", err, ErrMalformed)
	}
	if len(a.Enc) == 0 || len(a.Signature) == 0 {
		return nil, fmt.Errorf("seal: announcement: empty enc or signature: %w", ErrMalformed)
	}
	a.raw = bytes.Clone(b)
	// Re-encode to enforce a single (canonical) encoding per announcement.
	if tbs, err := a.tbs(); err != nil || !bytes.Equal(tbs, a.raw[:len(tbs)]) {
		return nil, fmt.Errorf("seal: announcement is not canonical: %w", ErrMalformed)
	}
	return a, nil
}

// leaf parses the chain; it returns the leaf and the intermediates.
func (a *Announcement) certificates() (*x509.Certificate, *x509.CertPool, error) {
	var leaf *x509.Certificate
	inter := x509.NewCertPool()
	for i, der := range a.Chain {
		c, err := x509.ParseCertificate(der)
		if err != nil {
			return nil, nil, fmt.Errorf("certificate %d: %w", i, err)
		}
		if i == 0 {
			leaf = c
		} else {
			inter.AddCert(c)
		}
	}
	return leaf, inter, nil
}

// reader is a bounds-checked big-endian decoder; the first overrun sets err
// and makes every later read return zero values.
type reader struct {
	b   []byte
	err error
}

func (r *reader) bytes(n int) []byte {
	if r.err != nil || n > len(r.b) {
		r.err = ErrMalformed
		return nil
	}
	v := r.b[:n:n]
	r.b = r.b[n:]
	return v
}

func (r *reader) u8() uint8 {
	if b := r.bytes(1); b != nil {
		return b[0]
	}
	return 0
}

func (r *reader) u16() uint16 {
	if b := r.bytes(2); b != nil {
		return binary.BigEndian.Uint16(b)
	}
	return 0
}

func (r *reader) u64() uint64 {
	if b := r.bytes(8); b != nil {
		return binary.BigEndian.Uint64(b)
	}
	return 0
}
