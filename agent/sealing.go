package agent

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"fmt"
	"math/big"
	"os"
	"sync/atomic"
	"time"

	"github.com/tpmagent/tpmagent/internal/pemfile"

	"github.com/tpmagent/tpmagent/agent/config"
	"github.com/tpmagent/tpmagent/transport/seal"
)

// SealingOptions configure NewSealing (the seal.* settings plus the device
// identity).
type SealingOptions struct {
	// DeviceID is the device id; it must equal the certificate's CN.
	DeviceID string
	// CollectorKey is the collector's public key (seal.collector_key).
	CollectorKey *seal.PublicKey
	// Signer is the device key (the TPM key). It signs one announcement
	// per session, never a frame.
	Signer crypto.Signer
	// Chain is the device certificate chain, DER, leaf first (from
	// broker.cert_file; see LoadCertChain).
	Chain [][]byte
	// Suite (seal.suite); the zero Suite follows the collector key's KEM.
	Suite seal.Suite
	// RekeyMessages and RekeyAfter (seal.rekey_messages, seal.rekey_after);
	// zero takes seal's defaults.
	RekeyMessages uint64
	RekeyAfter    time.Duration
	// Now is the clock; nil means time.Now. For tests.
	Now func() time.Time
}

// Sealing adapts a *seal.Sealer to the pipeline: it implements Sealer (each
// encoded batch becomes one frame; a new session's announcement is returned
// ahead of the frame, so the pipeline spools both in the same Append and the
// announcement is always published first) and Reannouncer (after a
// reconnection the current announcement is published again, retained, in
// case the broker lost its retained copy).
//
// The announcement rides QoS 1 and retained on devices/{device_id}/sessions
// (seal.SessionsTopic). Sealing is safe for concurrent use.
type Sealing struct {
	deviceID string
	sessions string
	s        *seal.Sealer
	started  atomic.Uint64
	frames   atomic.Uint64
}

var (
	_ Sealer      = (*Sealing)(nil)
	_ Reannouncer = (*Sealing)(nil)
)

// NewSealing returns the pipeline's sealer for o.DeviceID. Every call starts
// a new HPKE session on its first Seal (one per agent start), so nothing
// needs to be persisted across restarts (docs/SEALED-TELEMETRY.md section 9).
func NewSealing(o SealingOptions) (*Sealing, error) {
	s, err := seal.NewSealer(o.DeviceID, o.CollectorKey, o.Signer, o.Chain, seal.SealerOptions{
		Suite:         o.Suite,
		RekeyMessages: o.RekeyMessages,
		RekeyAfter:    o.RekeyAfter,
		Now:           o.Now,
	})
	if err != nil {
		return nil, fmt.Errorf("agent: sealed telemetry: %w", err)
	}
	return WrapSealer(o.DeviceID, s), nil
}

// NewSealingFromConfig builds the sealer from the seal.* settings: the
// collector public key file (seal.collector_key), seal.suite,
// seal.rekey_messages and seal.rekey_after, with signer as the device key and
// certFile (broker.cert_file) as its certificate chain. Errors name the
// setting at fault; a bad seal.suite is a *config.FieldError.
func NewSealingFromConfig(deviceID string, sc config.Seal, signer crypto.Signer, certFile string) (*Sealing, error) {
	suite, err := seal.ParseSuite(sc.Suite)
	if err != nil {
		return nil, &config.FieldError{Field: "seal.suite", Value: sc.Suite, Msg: "is not a suite: use x25519-aes128gcm, x25519-chacha20poly1305, mlkem768x25519-aes128gcm or mlkem768x25519-chacha20poly1305"}
	}
	if sc.CollectorKey == "" {
		return nil, &config.FieldError{Field: "seal.collector_key", Msg: "is empty: point it at the collector's public key (collector.key.pub from `tpmagent collector keygen`)"}
	}
	pub, err := seal.LoadPublicKey(sc.CollectorKey)
	if err != nil {
		return nil, fmt.Errorf("agent: seal.collector_key: %w", err)
	}
	chain, err := LoadCertChain(certFile)
	if err != nil {
		return nil, err
	}
	return NewSealing(SealingOptions{
		DeviceID:      deviceID,
		CollectorKey:  pub,
		Signer:        signer,
		Chain:         chain,
		Suite:         suite,
		RekeyMessages: sc.RekeyMessages,
		RekeyAfter:    sc.RekeyAfter,
	})
}

// WrapSealer adapts an existing seal.Sealer made for deviceID.
func WrapSealer(deviceID string, s *seal.Sealer) *Sealing {
	return &Sealing{deviceID: deviceID, sessions: seal.SessionsTopic(deviceID), s: s}
}

// Seal implements Sealer: payload (an encoded batch) becomes one frame bound
// to topic. When the frame starts a new session (first frame, rekey by count
// or age), before holds the signed announcement for the sessions topic,
// retained.
func (g *Sealing) Seal(topic string, payload []byte) (frame []byte, before []Message, err error) {
	frame, ann, err := g.s.Seal(topic, payload)
	if err != nil {
		return nil, nil, err
	}
	g.frames.Add(1)
	if ann != nil {
		g.started.Add(1)
		before = []Message{{Topic: g.sessions, Payload: ann.Marshal(), Retained: true}}
	}
	return frame, before, nil
}

// Reannounce implements Reannouncer: the current session's announcement
// (none before the first frame). Announcements of earlier sessions are not
// repeated: they travel in the spool ahead of their frames, so a collector
// that was subscribed has them.
func (g *Sealing) Reannounce() []Message {
	ann := g.s.Announcement()
	if ann == nil {
		return nil
	}
	return []Message{{Topic: g.sessions, Payload: ann.Marshal(), Retained: true}}
}

// Rekey makes the next frame start a new session.
func (g *Sealing) Rekey() { g.s.Rekey() }

// Sessions returns the number of sessions started (TPM signatures spent on
// announcements) and Frames the number of frames sealed.
func (g *Sealing) Sessions() uint64 { return g.started.Load() }

// Frames returns the number of frames sealed.
func (g *Sealing) Frames() uint64 { return g.frames.Load() }

// LoadCertChain reads a PEM certificate chain (broker.cert_file: the device
// certificate first, then intermediates) and returns it as DER, leaf first.
func LoadCertChain(path string) ([][]byte, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("agent: certificate chain %s: %w", path, err)
	}
	chain := pemfile.CertificatesDER(b)
	if len(chain) == 0 {
		return nil, fmt.Errorf("agent: certificate chain %s: no PEM CERTIFICATE block (want the device certificate, leaf first)", path)
	}
	return chain, nil
}

// NewBenchSealing returns a Sealing for benchmarks: it seals to a throwaway
// collector key of suite's KEM (returned, so a benchmark may open what it
// sealed). With a nil signer it also makes a throwaway software P-256 device
// key and a self-signed certificate for deviceID; otherwise chain must be
// the signer's certificate chain (with a TPM signer, bench then measures one
// real TPM signature per session).
func NewBenchSealing(deviceID string, signer crypto.Signer, chain [][]byte, suite seal.Suite) (*Sealing, *seal.PrivateKey, error) {
	if suite == (seal.Suite{}) {
		suite = seal.DefaultSuite
	}
	priv, err := seal.GenerateCollectorKey(suite)
	if err != nil {
		return nil, nil, fmt.Errorf("agent: bench collector key: %w", err)
	}
	if signer == nil {
		signer, chain, err = selfSigned(deviceID)
		if err != nil {
			return nil, nil, err
		}
	}
	g, err := NewSealing(SealingOptions{DeviceID: deviceID, CollectorKey: priv.Public(), Signer: signer, Chain: chain, Suite: suite})
	if err != nil {
		return nil, nil, err
	}
	return g, priv, nil
}

// selfSigned makes a software P-256 key and a self-signed certificate with
// CN deviceID (benchmarks only: no collector would accept it).
func selfSigned(deviceID string) (crypto.Signer, [][]byte, error) {
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, nil, fmt.Errorf("agent: bench device key: %w", err)
	}
	now := time.Now()
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1),
		Subject:      pkix.Name{CommonName: deviceID},
		NotBefore:    now.Add(-time.Hour),
		NotAfter:     now.Add(24 * time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, k.Public(), k)
	if err != nil {
		return nil, nil, fmt.Errorf("agent: bench device certificate: %w", err)
	}
	return k, [][]byte{der}, nil
}
