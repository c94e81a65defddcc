package fleet

import (
	"context"
	"crypto/x509"
	"fmt"
	"math/rand/v2"
	"time"

	"github.com/tpmagent/tpmagent/tpmkeys"
)

// RenewAt returns when cert should be renewed: at 2/3 of its lifetime, moved by a uniform
// random offset of up to ±jitter/2 of the lifetime (jitter is a fraction, clamped to
// [0, 0.5]; 0.1 spreads a fleet enrolled at the same moment over 10% of the lifetime), so
// devices do not all come back at once. The result is never after NotAfter.
func RenewAt(cert *x509.Certificate, jitter float64) time.Time {
	return renewAt(cert, jitter, rand.Float64())
}

func renewAt(cert *x509.Certificate, jitter, u float64) time.Time {
	jitter = min(max(jitter, 0), 0.5)
	life := cert.NotAfter.Sub(cert.NotBefore)
	frac := 2.0/3.0 + (u-0.5)*jitter
	at := cert.NotBefore.Add(time.Duration(float64(life) * frac))
	if at.After(cert.NotAfter) {
		at = cert.NotAfter
	}
	return at
}

// RenewOptions describes a renewal: a new key at RenewHandle (`enrol.renew_handle`),
// attested and certified through Requester.
type RenewOptions struct {
	TPM       *tpmkeys.TPM
	DeviceID  string
	DNS       []string
	Spec      tpmkeys.KeySpec // Handle = the renew handle; SRKHandle, Type as configured
	Requester CertRequester
}

// Renewal is a new key and its certificate, not yet in use.
type Renewal struct {
	Key     *tpmkeys.Key
	CertPEM []byte
	Cert    *x509.Certificate
}

// PrepareRenewal creates a fresh key at o.Spec.Handle (replacing a leftover from an earlier
// failed attempt, never touching the current key's handle), attests it and asks the CA for
// its certificate. On success the caller proves the pair (a real handshake), switches its
// configuration to the new handle and certificate, and then drops the old key with
// TPM.EvictKey. On failure the new key is evicted again and the current identity is
// untouched, so the caller simply retries later with backoff.
func PrepareRenewal(ctx context.Context, o RenewOptions) (*Renewal, error) {
	if o.TPM == nil || o.Requester == nil || o.DeviceID == "" || o.Spec.Handle == 0 {
		return nil, fmt.Errorf("fleet: renewal needs a TPM, a requester, the device id and enrol.renew_handle")
	}
	if _, err := o.TPM.CreateKey(ctx, o.Spec, true); err != nil {
		return nil, fmt.Errorf("fleet: renewal: create key at renew handle 0x%x: %w", o.Spec.Handle, err)
	}
	fail := func(err error) (*Renewal, error) {
		if _, eerr := o.TPM.EvictKey(context.WithoutCancel(ctx), o.Spec.Handle); eerr != nil {
			return nil, fmt.Errorf("%w (and removing the new key failed: %v)", err, eerr)
		}
		return nil, err
	}
	key, err := o.TPM.OpenKey(ctx, o.Spec)
	if err != nil {
		return fail(fmt.Errorf("fleet: renewal: open new key: %w", err))
	}
	certPEM, cert, err := Enrol(ctx, &KeyAttester{TPM: o.TPM, Key: key, DeviceID: o.DeviceID, DNS: o.DNS}, o.Requester)
	if err != nil {
		key.Close()
		return fail(fmt.Errorf("fleet: renewal of %s: %w", o.DeviceID, err))
	}
	return &Renewal{Key: key, CertPEM: certPEM, Cert: cert}, nil
}
