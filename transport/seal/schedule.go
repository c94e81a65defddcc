package seal

import (
	"crypto/cipher"
	"crypto/hpke"
	"fmt"
)

// Exporter contexts of the key schedule (section 6.2).
const (
	exportFrameKey  = "tpmagent seal v1 frame key"
	exportNonceBase = "tpmagent seal v1 nonce base"
	nonceSize       = 12
)

// frameKeys is the symmetric state of one session: the frame AEAD and the
// nonce base. It is the same on both ends.
//
// seal and open use scratch buffers in frameKeys: callers hold the lock
// of the Sealer or Collector that owns it.
type frameKeys struct {
	aead      cipher.AEAD
	nonceBase [nonceSize]byte
	nonce     []byte // scratch, nonceSize
	aad       []byte // scratch
}

// exporter is the Export method shared by hpke.Sender and hpke.Recipient.
type exporter interface {
	Export(exporterContext string, length int) ([]byte, error)
}

// deriveFrameKeys runs the key schedule on an HPKE context: frame key and
// nonce base from the exporter. It returns the raw key for test vectors.
func deriveFrameKeys(ctx exporter, aeadID uint16) (*frameKeys, []byte, error) {
	nk, err := aeadKeySize(aeadID)
	if err != nil {
		return nil, nil, err
	}
	key, err := ctx.Export(exportFrameKey, nk)
	if err != nil {
		return nil, nil, fmt.Errorf("seal: export frame key: %w", err)
	}
	nb, err := ctx.Export(exportNonceBase, nonceSize)
	if err != nil {
		return nil, nil, fmt.Errorf("seal: export nonce base: %w", err)
	}
	a, err := newAEAD(aeadID, key)
	if err != nil {
		return nil, nil, fmt.Errorf("seal: frame AEAD: %w", err)
	}
	fk := &frameKeys{aead: a, nonce: make([]byte, nonceSize), aad: make([]byte, 0, 128)}
	copy(fk.nonceBase[:], nb)
	return fk, key, nil
}

// senderContext runs HPKE SetupBaseS to pub with the announcement's info
// (export-only AEAD) and returns enc and the derived frame keys.
func senderContext(pub *PublicKey, a *Announcement) ([]byte, *frameKeys, []byte, error) {
	kdf, err := hpke.NewKDF(a.Suite.KDF)
	if err != nil {
		return nil, nil, nil, fmt.Errorf("seal: %w", err)
	}
	enc, s, err := hpke.NewSender(pub.key, kdf, hpke.ExportOnly(), a.hpkeInfo())
	if err != nil {
		return nil, nil, nil, fmt.Errorf("seal: HPKE setup to the collector key: %w", err)
	}
	fk, key, err := deriveFrameKeys(s, a.Suite.AEAD)
	return enc, fk, key, err
}

// recipientContext runs HPKE SetupBaseR for an announcement.
func recipientContext(priv *PrivateKey, a *Announcement) (*frameKeys, []byte, error) {
	kdf, err := hpke.NewKDF(a.Suite.KDF)
	if err != nil {
		return nil, nil, err
	}
	r, err := hpke.NewRecipient(a.Enc, priv.key, kdf, hpke.ExportOnly(), a.hpkeInfo())
	if err != nil {
		return nil, nil, fmt.Errorf("HPKE decapsulation: %w", err)
	}
	return deriveFrameKeys(r, a.Suite.AEAD)
}

// seal appends header || AEAD(plaintext) to dst.
func (k *frameKeys) seal(dst []byte, sid, seq uint64, deviceID, topic string, plaintext []byte) []byte {
	start := len(dst)
	dst = appendHeader(dst, sid, seq)
	k.aad = appendAAD(k.aad[:0], dst[start:], deviceID, topic)
	frameNonce((*[nonceSize]byte)(k.nonce), &k.nonceBase, seq)
	return k.aead.Seal(dst, k.nonce, plaintext, k.aad)
}

// open authenticates and decrypts a parsed frame.
func (k *frameKeys) open(dst []byte, raw []byte, f Frame, deviceID, topic string) ([]byte, error) {
	k.aad = appendAAD(k.aad[:0], raw[:FrameHeaderSize], deviceID, topic)
	frameNonce((*[nonceSize]byte)(k.nonce), &k.nonceBase, f.Seq)
	return k.aead.Open(dst, k.nonce, f.Ciphertext, k.aad)
}
