package seal

import (
	"crypto/hpke"
	"encoding/binary"
	"encoding/pem"
	"errors"
	"fmt"
	"os"
)

// PEM block types of collector key files.
const (
	pemPrivateType = "TPMAGENT SEAL PRIVATE KEY"
	pemPublicType  = "TPMAGENT SEAL PUBLIC KEY"
)

// PublicKey is a collector's HPKE public key: the key agents seal to.
type PublicKey struct {
	kem uint16
	key hpke.PublicKey
}

// PrivateKey is a collector's HPKE private key. It opens every session
// sealed to its public key; keep it on the backend only.
type PrivateKey struct {
	kem uint16
	key hpke.PrivateKey
}

// GenerateCollectorKey returns a fresh collector key pair for the KEM of
// suite (the AEAD is chosen per session by the agent).
func GenerateCollectorKey(suite Suite) (*PrivateKey, error) {
	kem, err := kemFor(suite.KEM)
	if err != nil {
		return nil, err
	}
	k, err := kem.GenerateKey()
	if err != nil {
		return nil, fmt.Errorf("seal: generate %s key: %w", kemName(suite.KEM), err)
	}
	return &PrivateKey{kem: suite.KEM, key: k}, nil
}

// DeriveCollectorKey derives a collector key pair deterministically from
// ikm (RFC 9180 DeriveKeyPair, at least 32 bytes). It exists for test
// vectors; production keys come from [GenerateCollectorKey].
func DeriveCollectorKey(kemID uint16, ikm []byte) (*PrivateKey, error) {
	kem, err := kemFor(kemID)
	if err != nil {
		return nil, err
	}
	if len(ikm) < 32 {
		return nil, fmt.Errorf("seal: derive key: ikm is %d bytes, want at least 32", len(ikm))
	}
	k, err := kem.DeriveKeyPair(ikm)
	if err != nil {
		return nil, fmt.Errorf("seal: derive %s key: %w", kemName(kemID), err)
	}
	return &PrivateKey{kem: kemID, key: k}, nil
}

// NewPrivateKey deserializes a private key (RFC 9180 SerializePrivateKey;
// the 32-byte seed for MLKEM768-X25519).
func NewPrivateKey(kemID uint16, b []byte) (*PrivateKey, error) {
	kem, err := kemFor(kemID)
	if err != nil {
		return nil, err
	}
	k, err := kem.NewPrivateKey(b)
	if err != nil {
		return nil, fmt.Errorf("seal: %s private key: %w", kemName(kemID), err)
	}
	return &PrivateKey{kem: kemID, key: k}, nil
}

// NewPublicKey deserializes a public key (RFC 9180 SerializePublicKey).
func NewPublicKey(kemID uint16, b []byte) (*PublicKey, error) {
	kem, err := kemFor(kemID)
	if err != nil {
		return nil, err
	}
	k, err := kem.NewPublicKey(b)
	if err != nil {
		return nil, fmt.Errorf("seal: %s public key: %w", kemName(kemID), err)
	}
	return &PublicKey{kem: kemID, key: k}, nil
}

// KEM returns the key's KEM identifier.
func (k *PrivateKey) KEM() uint16 { return k.kem }

// Bytes returns the serialized private key.
func (k *PrivateKey) Bytes() ([]byte, error) { return k.key.Bytes() }

// Public returns the matching public key.
func (k *PrivateKey) Public() *PublicKey { return &PublicKey{kem: k.kem, key: k.key.PublicKey()} }

// KEM returns the key's KEM identifier.
func (k *PublicKey) KEM() uint16 { return k.kem }

// Bytes returns the serialized public key.
func (k *PublicKey) Bytes() []byte { return k.key.Bytes() }

// MarshalPEM encodes the private key as a PEM block whose body is the
// 2-byte KEM identifier followed by the serialized key.
func (k *PrivateKey) MarshalPEM() ([]byte, error) {
	b, err := k.key.Bytes()
	if err != nil {
		return nil, fmt.Errorf("seal: serialize private key: %w", err)
	}
	return encodeKeyPEM(pemPrivateType, k.kem, b), nil
}

// MarshalPEM encodes the public key like [PrivateKey.MarshalPEM].
func (k *PublicKey) MarshalPEM() []byte {
	return encodeKeyPEM(pemPublicType, k.kem, k.key.Bytes())
}

func encodeKeyPEM(typ string, kem uint16, key []byte) []byte {
	body := binary.BigEndian.AppendUint16(make([]byte, 0, 2+len(key)), kem)
	return pem.EncodeToMemory(&pem.Block{
		Type:    typ,
		Headers: map[string]string{"KEM": kemName(kem)},
		Bytes:   append(body, key...),
	})
}

func decodeKeyPEM(data []byte, typ, what string) (uint16, []byte, error) {
	block, _ := pem.Decode(data)
	if block == nil {
		return 0, nil, fmt.Errorf("no PEM block found: is this a %s file?", what)
	}
	if block.Type != typ {
		return 0, nil, fmt.Errorf("PEM block is %q, want %q (a %s)", block.Type, typ, what)
	}
	if len(block.Bytes) < 2 {
		return 0, nil, errors.New("PEM body too short")
	}
	return binary.BigEndian.Uint16(block.Bytes), block.Bytes[2:], nil
}

// ParsePrivateKeyPEM decodes a key written by [PrivateKey.MarshalPEM].
func ParsePrivateKeyPEM(data []byte) (*PrivateKey, error) {
	kem, b, err := decodeKeyPEM(data, pemPrivateType, "collector private key")
	if err != nil {
		return nil, fmt.Errorf("seal: %w", err)
	}
	return NewPrivateKey(kem, b)
}

// ParsePublicKeyPEM decodes a key written by [PublicKey.MarshalPEM].
func ParsePublicKeyPEM(data []byte) (*PublicKey, error) {
	kem, b, err := decodeKeyPEM(data, pemPublicType, "collector public key")
	if err != nil {
		return nil, fmt.Errorf("seal: %w", err)
	}
	return NewPublicKey(kem, b)
}

// WriteKeyFiles writes the private key to path (mode 0600, refusing to
// overwrite an existing file) and the public key to path+".pub" (0644).
func WriteKeyFiles(path string, k *PrivateKey) error {
	priv, err := k.MarshalPEM()
	if err != nil {
		return err
	}
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return fmt.Errorf("seal: write collector key %s: %w (remove it first to replace the key)", path, err)
	}
	if _, err := f.Write(priv); err != nil {
		f.Close()
		return fmt.Errorf("seal: write collector key %s: %w", path, err)
	}
	if err := f.Close(); err != nil {
		return fmt.Errorf("seal: write collector key %s: %w", path, err)
	}
	if err := os.WriteFile(path+".pub", k.Public().MarshalPEM(), 0o644); err != nil {
		return fmt.Errorf("seal: write collector public key %s.pub: %w", path, err)
	}
	return nil
}

// LoadPrivateKey reads a collector private key file written by
// [WriteKeyFiles].
func LoadPrivateKey(path string) (*PrivateKey, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("seal: read collector private key: %w", err)
	}
	k, err := ParsePrivateKeyPEM(data)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return k, nil
}

// LoadPublicKey reads a collector public key file (the ".pub" file written
// by [WriteKeyFiles]).
func LoadPublicKey(path string) (*PublicKey, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("seal: read collector public key: %w", err)
	}
	k, err := ParsePublicKeyPEM(data)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return k, nil
}
