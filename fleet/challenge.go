package fleet

import (
	"crypto/rand"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/hex"
	"fmt"
	"time"

	"github.com/google/go-tpm/tpm2"

	"github.com/tpmagent/tpmagent/tpmkeys"
)

// DefaultChallengeTTL is how long a challenge may be answered.
const DefaultChallengeTTL = 10 * time.Minute

// Pending is the CA's record of an open challenge. It holds only the SHA-256 of the secret,
// so it may be written to disk (the offline flow keeps it in a file between
// `fleet ca challenge` and `fleet ca issue`).
type Pending struct {
	ID           string    `json:"id"`
	DeviceID     string    `json:"device_id"`
	SecretSHA256 []byte    `json:"secret_sha256"`
	BundleDigest []byte    `json:"bundle_sha256"`
	Expires      time.Time `json:"expires"`
}

// NewChallenge makes a credential activation challenge for a verified bundle: a random
// 32-byte secret wrapped (MakeCredential, done in software) to the bundle's EK and bound to
// its AK's name. Only the TPM that holds the EK's private key and has that AK loaded can
// unwrap it.
func NewChallenge(v *Verified, ttl time.Duration, now time.Time) (*tpmkeys.Challenge, *Pending, error) {
	if ttl <= 0 {
		ttl = DefaultChallengeTTL
	}
	ek, err := tpm2.ImportEncapsulationKey(&v.EKPublic)
	if err != nil {
		return nil, nil, fmt.Errorf("fleet: challenge for %s: EK cannot receive a credential: %w", v.DeviceID, err)
	}
	secret := make([]byte, 32)
	idb := make([]byte, 16)
	if _, err := rand.Read(secret); err != nil {
		return nil, nil, err
	}
	if _, err := rand.Read(idb); err != nil {
		return nil, nil, err
	}
	blob, encSecret, err := tpm2.CreateCredential(rand.Reader, ek, v.AKName, secret)
	if err != nil {
		return nil, nil, fmt.Errorf("fleet: challenge for %s: make credential: %w", v.DeviceID, err)
	}
	sum := sha256.Sum256(secret)
	id := hex.EncodeToString(idb)
	ch := &tpmkeys.Challenge{
		Version: tpmkeys.BundleVersion, ID: id, DeviceID: v.DeviceID, AKName: v.AKName,
		CredentialBlob: blob, EncryptedSecret: encSecret,
	}
	p := &Pending{ID: id, DeviceID: v.DeviceID, SecretSHA256: sum[:], BundleDigest: v.BundleDigest[:], Expires: now.Add(ttl)}
	return ch, p, nil
}

// Check verifies an activation response against the pending challenge. It does not mark
// the challenge used: callers delete the Pending after a successful Check (Service does;
// `fleet ca issue` removes the pending file).
func (p *Pending) Check(r *tpmkeys.ActivationResponse, now time.Time) error {
	if r == nil {
		return refuse(p.DeviceID, ReasonActivation, "no activation response")
	}
	if r.ID != p.ID {
		return refuse(p.DeviceID, ReasonActivation, "the response answers challenge %q, the open challenge is %q", r.ID, p.ID)
	}
	if r.DeviceID != p.DeviceID {
		return refuse(p.DeviceID, ReasonActivation, "the response names device %q", r.DeviceID)
	}
	if now.After(p.Expires) {
		return refuse(p.DeviceID, ReasonActivation, "challenge %s expired at %s: attest again", p.ID, p.Expires.Format(time.RFC3339))
	}
	sum := sha256.Sum256(r.Secret)
	if subtle.ConstantTimeCompare(sum[:], p.SecretSHA256) != 1 {
		return refuse(p.DeviceID, ReasonActivation, "the activation secret is wrong: the response does not come from the TPM "+
			"that holds the attested EK and AK (replayed, or from another TPM)")
	}
	return nil
}
