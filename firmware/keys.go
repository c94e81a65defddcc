package firmware

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"fmt"
	"os"
	"sort"
)

// Alg names a signature algorithm as it appears in the envelope's "alg" field.
type Alg string

// Supported signature algorithms (docs/FIRMWARE.md §2).
const (
	// AlgECDSAP256 is ECDSA over P-256 with SHA-256, ASN.1 DER signatures.
	AlgECDSAP256 Alg = "ecdsa-p256-sha256"
	// AlgEd25519 is pure Ed25519 (RFC 8032).
	AlgEd25519 Alg = "ed25519"
)

// AlgOf returns the algorithm for a public key, or an error for unsupported key types
// (only ECDSA P-256 and Ed25519 keys are accepted).
func AlgOf(pub crypto.PublicKey) (Alg, error) {
	switch k := pub.(type) {
	case *ecdsa.PublicKey:
		if k.Curve != elliptic.P256() {
			return "", fmt.Errorf("firmware: ECDSA key on curve %s: only P-256 is supported", k.Curve.Params().Name)
		}
		return AlgECDSAP256, nil
	case ed25519.PublicKey:
		if len(k) != ed25519.PublicKeySize {
			return "", fmt.Errorf("firmware: Ed25519 public key of %d bytes", len(k))
		}
		return AlgEd25519, nil
	default:
		return "", fmt.Errorf("firmware: unsupported public key type %T: use ECDSA P-256 or Ed25519", pub)
	}
}

// KeyID returns the key id of a public key: lowercase hex of the first 8 bytes of SHA-256 over
// its SubjectPublicKeyInfo DER encoding.
func KeyID(pub crypto.PublicKey) (string, error) {
	der, err := x509.MarshalPKIXPublicKey(pub)
	if err != nil {
		return "", fmt.Errorf("firmware: key id: %w", err)
	}
	sum := sha256.Sum256(der)
	return hex.EncodeToString(sum[:8]), nil
}

// GenerateReleaseKey creates a new release signing key of the given algorithm. The result is
// an *ecdsa.PrivateKey or an ed25519.PrivateKey.
func GenerateReleaseKey(alg Alg) (crypto.Signer, error) {
	switch alg {
	case AlgECDSAP256:
		return ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	case AlgEd25519:
		_, k, err := ed25519.GenerateKey(rand.Reader)
		return k, err
	default:
		return nil, fmt.Errorf("firmware: unknown algorithm %q: use %q or %q", alg, AlgECDSAP256, AlgEd25519)
	}
}

// WriteKeyFiles writes key as PKCS#8 PEM to path (mode 0600, refusing to overwrite an existing
// file) and its public key as PKIX PEM to path+".pub" (mode 0644).
func WriteKeyFiles(path string, key crypto.Signer) error {
	if _, err := AlgOf(key.Public()); err != nil {
		return err
	}
	der, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return fmt.Errorf("firmware: encode private key for %s: %w", path, err)
	}
	pubDER, err := x509.MarshalPKIXPublicKey(key.Public())
	if err != nil {
		return fmt.Errorf("firmware: encode public key for %s.pub: %w", path, err)
	}
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		if errors.Is(err, os.ErrExist) {
			return fmt.Errorf("firmware: %s already exists: remove it or choose another path (a release key is never overwritten)", path)
		}
		return fmt.Errorf("firmware: create key file: %w", err)
	}
	if err := pem.Encode(f, &pem.Block{Type: "PRIVATE KEY", Bytes: der}); err != nil {
		f.Close()
		return fmt.Errorf("firmware: write %s: %w", path, err)
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return fmt.Errorf("firmware: sync %s: %w", path, err)
	}
	if err := f.Close(); err != nil {
		return fmt.Errorf("firmware: close %s: %w", path, err)
	}
	pubPEM := pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: pubDER})
	if err := writeFileAtomic(path+".pub", pubPEM, 0o644); err != nil {
		return err
	}
	return nil
}

// LoadPrivateKey reads a PKCS#8 PEM release key written by WriteKeyFiles (or `openssl genpkey`).
func LoadPrivateKey(path string) (crypto.Signer, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("firmware: read release key: %w", err)
	}
	block, _ := pem.Decode(data)
	if block == nil || block.Type != "PRIVATE KEY" {
		return nil, fmt.Errorf("firmware: %s: no PKCS#8 \"PRIVATE KEY\" PEM block", path)
	}
	k, err := x509.ParsePKCS8PrivateKey(block.Bytes)
	if err != nil {
		return nil, fmt.Errorf("firmware: %s: %w", path, err)
	}
	s, ok := k.(crypto.Signer)
	if !ok {
		return nil, fmt.Errorf("firmware: %s: key type %T cannot sign", path, k)
	}
	if _, err := AlgOf(s.Public()); err != nil {
		return nil, fmt.Errorf("firmware: %s: %w", path, err)
	}
	return s, nil
}

// TrustStore holds the release public keys a device accepts, indexed by key id. The zero
// value is empty and usable; it is safe for concurrent reads once built.
type TrustStore struct {
	keys map[string]crypto.PublicKey
}

// NewTrustStore returns a store holding the given public keys.
func NewTrustStore(keys ...crypto.PublicKey) (*TrustStore, error) {
	t := &TrustStore{}
	for _, k := range keys {
		if _, err := t.Add(k); err != nil {
			return nil, err
		}
	}
	return t, nil
}

// Add adds a public key (ECDSA P-256 or Ed25519) and returns its key id.
func (t *TrustStore) Add(pub crypto.PublicKey) (string, error) {
	if _, err := AlgOf(pub); err != nil {
		return "", err
	}
	id, err := KeyID(pub)
	if err != nil {
		return "", err
	}
	if t.keys == nil {
		t.keys = make(map[string]crypto.PublicKey)
	}
	t.keys[id] = pub
	return id, nil
}

// Lookup returns the key with the given id.
func (t *TrustStore) Lookup(keyID string) (crypto.PublicKey, bool) {
	if t == nil {
		return nil, false
	}
	k, ok := t.keys[keyID]
	return k, ok
}

// KeyIDs returns the ids of all trusted keys, sorted.
func (t *TrustStore) KeyIDs() []string {
	if t == nil {
		return nil
	}
	ids := make([]string, 0, len(t.keys))
	for id := range t.keys {
		ids = append(ids, id)
	}
	sort.Strings(ids)
	return ids
}

// LoadTrustStore reads the files of the firmware.trust list; each may hold several
// "PUBLIC KEY" PEM blocks. An empty list, a file without keys or an unsupported key is an error.
func LoadTrustStore(paths ...string) (*TrustStore, error) {
	if len(paths) == 0 {
		return nil, errors.New("firmware: firmware.trust is empty: list at least one release public key file")
	}
	t := &TrustStore{}
	for _, p := range paths {
		data, err := os.ReadFile(p)
		if err != nil {
			return nil, fmt.Errorf("firmware: read trust file: %w", err)
		}
		n := 0
		for {
			var block *pem.Block
			block, data = pem.Decode(data)
			if block == nil {
				break
			}
			if block.Type != "PUBLIC KEY" {
				return nil, fmt.Errorf("firmware: trust file %s: PEM block %q: only \"PUBLIC KEY\" blocks are allowed", p, block.Type)
			}
			pub, err := x509.ParsePKIXPublicKey(block.Bytes)
			if err != nil {
				return nil, fmt.Errorf("firmware: trust file %s: key %d: %w", p, n+1, err)
			}
			if _, err := t.Add(pub); err != nil {
				return nil, fmt.Errorf("firmware: trust file %s: key %d: %w", p, n+1, err)
			}
			n++
		}
		if n == 0 {
			return nil, fmt.Errorf("firmware: trust file %s holds no \"PUBLIC KEY\" PEM block", p)
		}
	}
	return t, nil
}
