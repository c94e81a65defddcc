package seal

import (
	"crypto/aes"
	"crypto/cipher"
	"crypto/ecdh"
	"crypto/hpke"
	"fmt"
	"strings"

	"golang.org/x/crypto/chacha20poly1305"
)

// HPKE algorithm identifiers (RFC 9180 section 7, draft-ietf-hpke-pq) used
// in a [Suite]. The AEAD identifiers name the frame AEAD; the HPKE context
// itself is always export-only (0xFFFF).
const (
	KEMX25519         uint16 = 0x0020 // DHKEM(X25519, HKDF-SHA256)
	KEMMLKEM768X25519 uint16 = 0x647a // MLKEM768-X25519 (X-Wing), hybrid post-quantum
	KDFHKDFSHA256     uint16 = 0x0001 // HKDF-SHA256
	AEADAES128GCM     uint16 = 0x0001 // AES-128-GCM
	AEADChaCha20      uint16 = 0x0003 // ChaCha20-Poly1305
)

// Suite names the algorithms of one sealed-telemetry session: the HPKE KEM
// and KDF that establish the session and the AEAD that seals its frames.
type Suite struct {
	KEM, KDF, AEAD uint16
}

// The suites this package implements.
var (
	// DefaultSuite is DHKEM(X25519, HKDF-SHA256), HKDF-SHA256, AES-128-GCM.
	DefaultSuite = Suite{KEMX25519, KDFHKDFSHA256, AEADAES128GCM}
	// ChaChaSuite replaces AES-128-GCM with ChaCha20-Poly1305, for CPUs
	// without AES instructions (many Cortex-A7/A53 parts).
	ChaChaSuite = Suite{KEMX25519, KDFHKDFSHA256, AEADChaCha20}
	// HybridPQSuite uses the hybrid ML-KEM-768 + X25519 KEM with AES-128-GCM.
	HybridPQSuite = Suite{KEMMLKEM768X25519, KDFHKDFSHA256, AEADAES128GCM}
	// HybridPQChaChaSuite is the hybrid KEM with ChaCha20-Poly1305.
	HybridPQChaChaSuite = Suite{KEMMLKEM768X25519, KDFHKDFSHA256, AEADChaCha20}
)

var suiteNames = []struct {
	name  string
	suite Suite
}{
	{"x25519-aes128gcm", DefaultSuite},
	{"x25519-chacha20poly1305", ChaChaSuite},
	{"mlkem768x25519-aes128gcm", HybridPQSuite},
	{"mlkem768x25519-chacha20poly1305", HybridPQChaChaSuite},
}

var suiteAliases = map[string]Suite{
	"":          DefaultSuite,
	"default":   DefaultSuite,
	"chacha":    ChaChaSuite,
	"chacha20":  ChaChaSuite,
	"hybrid":    HybridPQSuite,
	"hybrid-pq": HybridPQSuite,
	"pq":        HybridPQSuite,
}

// ParseSuite returns the suite with the given name: one of
// "x25519-aes128gcm" (also "default" or ""), "x25519-chacha20poly1305"
// ("chacha"), "mlkem768x25519-aes128gcm" ("hybrid-pq", "pq") or
// "mlkem768x25519-chacha20poly1305". Names are case-insensitive.
func ParseSuite(name string) (Suite, error) {
	n := strings.ToLower(strings.TrimSpace(name))
	for _, s := range suiteNames {
		if s.name == n {
			return s.suite, nil
		}
	}
	if s, ok := suiteAliases[n]; ok {
		return s, nil
	}
	names := make([]string, len(suiteNames))
	for i, s := range suiteNames {
		names[i] = s.name
	}
	return Suite{}, fmt.Errorf("seal: unknown suite %q: use one of %s", name, strings.Join(names, ", "))
}

// String returns the suite's name as accepted by [ParseSuite], or its
// identifiers in hex if it has no name.
func (s Suite) String() string {
	for _, n := range suiteNames {
		if n.suite == s {
			return n.name
		}
	}
	return fmt.Sprintf("kem=0x%04x,kdf=0x%04x,aead=0x%04x", s.KEM, s.KDF, s.AEAD)
}

// check reports whether this package implements every algorithm of s.
func (s Suite) check() error {
	if _, err := kemFor(s.KEM); err != nil {
		return err
	}
	if s.KDF != KDFHKDFSHA256 {
		return fmt.Errorf("seal: suite %s: unsupported KDF 0x%04x (only HKDF-SHA256, 0x0001)", s, s.KDF)
	}
	if _, err := aeadKeySize(s.AEAD); err != nil {
		return fmt.Errorf("seal: suite %s: %w", s, err)
	}
	return nil
}

// kemFor returns the crypto/hpke KEM for a KEM identifier.
func kemFor(id uint16) (hpke.KEM, error) {
	switch id {
	case KEMX25519:
		return hpke.DHKEM(ecdh.X25519()), nil
	case KEMMLKEM768X25519:
		return hpke.MLKEM768X25519(), nil
	}
	return nil, fmt.Errorf("seal: unsupported KEM 0x%04x (want 0x0020 X25519 or 0x647a MLKEM768-X25519)", id)
}

// kemName returns a human-readable KEM name for key files and messages.
func kemName(id uint16) string {
	switch id {
	case KEMX25519:
		return "DHKEM(X25519, HKDF-SHA256)"
	case KEMMLKEM768X25519:
		return "MLKEM768-X25519"
	}
	return fmt.Sprintf("KEM 0x%04x", id)
}

// aeadKeySize returns Nk for a frame AEAD identifier.
func aeadKeySize(id uint16) (int, error) {
	switch id {
	case AEADAES128GCM:
		return 16, nil
	case AEADChaCha20:
		return chacha20poly1305.KeySize, nil
	}
	return 0, fmt.Errorf("unsupported AEAD 0x%04x (want 0x0001 AES-128-GCM or 0x0003 ChaCha20-Poly1305)", id)
}

// newAEAD instantiates the frame AEAD identified by id with key.
func newAEAD(id uint16, key []byte) (cipher.AEAD, error) {
	switch id {
	case AEADAES128GCM:
		b, err := aes.NewCipher(key)
		if err != nil {
			return nil, err
		}
		return cipher.NewGCM(b)
	case AEADChaCha20:
		return chacha20poly1305.New(key)
	}
	return nil, fmt.Errorf("unsupported AEAD 0x%04x", id)
}
