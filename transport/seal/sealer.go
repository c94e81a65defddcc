package seal

import (
	"crypto"
	"crypto/rand"
	"crypto/x509"
	"encoding/binary"
	"fmt"
	"math"
	"strings"
	"sync"
	"time"
)

// SealerOptions tune a [Sealer]. The zero value is usable.
type SealerOptions struct {
	// Suite of every session; the zero Suite means DefaultSuite for an
	// X25519 collector key and HybridPQSuite for an MLKEM768-X25519 key.
	Suite Suite
	// RekeyMessages starts a new session after this many frames
	// (seal.rekey_messages). 0 means 1<<20.
	RekeyMessages uint64
	// RekeyAfter starts a new session when the current one is this old
	// (seal.rekey_after). 0 means one hour.
	RekeyAfter time.Duration
	// Now returns the current time; nil means time.Now. For tests.
	Now func() time.Time
}

// Defaults of [SealerOptions].
const (
	DefaultRekeyMessages = 1 << 20
	DefaultRekeyAfter    = time.Hour
)

// Sealer seals telemetry frames on the device. It starts a new HPKE session
// on its first Seal, after RekeyMessages frames and after RekeyAfter; a new
// Sealer (one per agent start) always starts a new session, so a sequence
// number is never reused under one key and nothing needs to be persisted.
//
// Sealer is safe for concurrent use. Seal signs with the device key once
// per session (one TPM operation, 25-190 ms on real chips) and never per
// frame.
type Sealer struct {
	deviceID  string
	topicPre  string
	collector *PublicKey
	signer    crypto.Signer
	chain     [][]byte
	opts      SealerOptions

	mu      sync.Mutex
	cur     *sealerSession
	nextSeq uint64
	forced  bool
}

type sealerSession struct {
	ann   *Announcement
	keys  *frameKeys
	count uint64
}

// NewSealer returns a Sealer for deviceID that seals to the collector's
// public key and signs announcements with signer, whose certificate chain
// (DER, leaf first, leaf CN = deviceID) goes into every announcement.
// signer is called with a SHA-256 digest and crypto.SHA256 as opts; for an
// ECDSA P-256 key it must return an ASN.1 signature, for RSA PKCS#1 v1.5.
func NewSealer(deviceID string, collector *PublicKey, signer crypto.Signer, chain [][]byte, opts SealerOptions) (*Sealer, error) {
	if err := ValidDeviceID(deviceID); err != nil {
		return nil, fmt.Errorf("seal: %w", err)
	}
	if collector == nil || signer == nil {
		return nil, fmt.Errorf("seal: sealer for %s: collector key and signer are required", deviceID)
	}
	if opts.Suite == (Suite{}) {
		opts.Suite = DefaultSuite
		if collector.kem == KEMMLKEM768X25519 {
			opts.Suite = HybridPQSuite
		}
	}
	if err := opts.Suite.check(); err != nil {
		return nil, err
	}
	if opts.Suite.KEM != collector.kem {
		return nil, fmt.Errorf("seal: suite %s needs a %s collector key, but seal.collector_key is %s: use a matching suite or key",
			opts.Suite, kemName(opts.Suite.KEM), kemName(collector.kem))
	}
	if opts.RekeyMessages == 0 {
		opts.RekeyMessages = DefaultRekeyMessages
	}
	if opts.RekeyAfter <= 0 {
		opts.RekeyAfter = DefaultRekeyAfter
	}
	if opts.Now == nil {
		opts.Now = time.Now
	}
	if len(chain) == 0 || len(chain) > maxChain {
		return nil, fmt.Errorf("seal: sealer for %s: certificate chain of %d certificates, want 1..%d", deviceID, len(chain), maxChain)
	}
	leaf, err := x509.ParseCertificate(chain[0])
	if err != nil {
		return nil, fmt.Errorf("seal: sealer for %s: device certificate: %w", deviceID, err)
	}
	if leaf.Subject.CommonName != deviceID {
		return nil, fmt.Errorf("seal: device certificate CN %q differs from device id %q: the collector would reject every announcement", leaf.Subject.CommonName, deviceID)
	}
	if pk, ok := leaf.PublicKey.(interface{ Equal(crypto.PublicKey) bool }); !ok || !pk.Equal(signer.Public()) {
		return nil, fmt.Errorf("seal: device certificate of %s does not hold the signer's public key: use the certificate issued for this device key", deviceID)
	}
	if _, _, err := schemeFor(signer.Public()); err != nil {
		return nil, err
	}
	return &Sealer{
		deviceID:  deviceID,
		topicPre:  "devices/" + deviceID + "/",
		collector: collector,
		signer:    signer,
		chain:     chain,
		opts:      opts,
	}, nil
}

// Seal seals plaintext for publication on topic, which must be
// devices/{device_id}/<something other than sessions> and is bound into the
// frame. ann is non-nil when this frame starts a new session (the first
// call, a rekey): publish ann.Marshal() on SessionsTopic (QoS1, retained)
// before or together with the frame, and keep it in the same durable queue.
func (s *Sealer) Seal(topic string, plaintext []byte) (frame []byte, ann *Announcement, err error) {
	if !strings.HasPrefix(topic, s.topicPre) || len(topic) == len(s.topicPre) || topic == SessionsTopic(s.deviceID) || len(topic) > math.MaxUint16 {
		return nil, nil, fmt.Errorf("seal: topic %q: want %s<name> (not sessions), bound into the frame so the collector can check it", topic, s.topicPre)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	now := s.opts.Now()
	if s.cur == nil || s.forced || s.cur.count >= s.opts.RekeyMessages || now.Sub(s.cur.ann.StartTime) >= s.opts.RekeyAfter {
		if err := s.startSession(now); err != nil {
			return nil, nil, err
		}
		ann = s.cur.ann
	}
	if s.nextSeq == math.MaxUint64 {
		return nil, nil, fmt.Errorf("seal: sequence space of device %s exhausted: restart the agent", s.deviceID)
	}
	seq := s.nextSeq
	s.nextSeq++
	s.cur.count++
	frame = make([]byte, 0, FrameOverhead+len(plaintext))
	frame = s.cur.keys.seal(frame, s.cur.ann.SessionID, seq, s.deviceID, topic, plaintext)
	return frame, ann, nil
}

// Announcement returns the current session's announcement (nil before the
// first Seal). Republish it on reconnect; it costs no signature.
func (s *Sealer) Announcement() *Announcement {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.cur == nil {
		return nil
	}
	return s.cur.ann
}

// Rekey makes the next Seal start a new session.
func (s *Sealer) Rekey() {
	s.mu.Lock()
	s.forced = true
	s.mu.Unlock()
}

// startSession runs HPKE to the collector and signs the announcement
// (sections 4 and 6). Sequence numbers continue across sessions.
func (s *Sealer) startSession(now time.Time) error {
	var rb [8]byte
	if _, err := rand.Read(rb[8-SessionIDSize:]); err != nil {
		return fmt.Errorf("seal: session id: %w", err)
	}
	a := &Announcement{
		DeviceID:  s.deviceID,
		SessionID: binary.BigEndian.Uint64(rb[:]),
		Suite:     s.opts.Suite,
		StartTime: time.UnixMilli(now.UnixMilli()),
		SeqStart:  s.nextSeq,
		Chain:     s.chain,
	}
	enc, keys, _, err := senderContext(s.collector, a)
	if err != nil {
		return err
	}
	a.Enc = enc
	if err := a.sign(s.signer); err != nil {
		return err
	}
	s.cur = &sealerSession{ann: a, keys: keys}
	s.forced = false
	return nil
}
