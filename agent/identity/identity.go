// Package identity opens the device's signing identity as the configuration
// names it: the TPM-resident device key (the normal case), or a software key
// file (broker.key_file: backends such as the collector, which run on servers
// without a TPM). Commands and the daemon share it so that every one reports
// a missing TPM or key the same way.
//
// The device key lives at tpm.key_handle until the first certificate
// renewal. A renewal creates the new key at the other handle of the pair
// (tpm.key_handle, enrol.renew_handle), so renewals alternate between the two
// and the configuration file is never rewritten; state_dir/identity.json
// (State) names the handle in use. Open honours it, and when broker.cert_file
// does not certify the key there but certifies the key at the other handle of
// the pair (a renewal interrupted between its two writes) it takes that one.
package identity

import (
	"context"
	"crypto"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"os"

	"github.com/tpmagent/tpmagent/internal/pemfile"

	"github.com/tpmagent/tpmagent/agent/config"
	"github.com/tpmagent/tpmagent/tpmkeys"
)

// Identity is an open signing identity. Close releases the TPM connection.
type Identity struct {
	// Signer signs with the device key (TPM-resident unless FromFile).
	Signer crypto.Signer
	// TPM is the open TPM (nil for a key file).
	TPM *tpmkeys.TPM
	// Key is the TPM key (nil for a key file).
	Key *tpmkeys.Key
	// FromFile names the key file when the key is not in a TPM.
	FromFile string
}

// Open opens the identity that cfg names. With allowKeyFile false a
// broker.key_file setting is ignored and the TPM key is used.
func Open(ctx context.Context, cfg *config.Config, allowKeyFile bool, log *slog.Logger) (*Identity, error) {
	if allowKeyFile && cfg.Broker.KeyFile != "" {
		s, err := LoadKeyFile(cfg.Broker.KeyFile)
		if err != nil {
			return nil, err
		}
		if log != nil {
			log.Warn("signing key loaded from broker.key_file, not from a TPM: the private key is a file on disk", "file", cfg.Broker.KeyFile)
		}
		return &Identity{Signer: s, FromFile: cfg.Broker.KeyFile}, nil
	}
	active, err := ActiveKeyHandle(cfg)
	if err != nil {
		return nil, err
	}
	tp, err := tpmkeys.Open(ctx, cfg.TPM.Device)
	if err != nil {
		return nil, fmt.Errorf("tpm.device %s: %w", cfg.TPM.Device, err)
	}
	k, err := openActiveKey(ctx, tp, cfg, active, log)
	if err != nil {
		tp.Close()
		if errors.Is(err, tpmkeys.ErrKeyNotFound) {
			return nil, fmt.Errorf("%w (create it with `tpmagent key create`, then get a certificate with `tpmagent key csr`)", err)
		}
		return nil, err
	}
	return &Identity{Signer: k, TPM: tp, Key: k}, nil
}

// openActiveKey opens the key at active, unless broker.cert_file certifies
// the key at the other handle of the pair and not this one: then that key.
func openActiveKey(ctx context.Context, tp *tpmkeys.TPM, cfg *config.Config, active uint32, log *slog.Logger) (*tpmkeys.Key, error) {
	spec := tpmkeys.KeySpec{Handle: active, SRKHandle: uint32(cfg.TPM.SRKHandle), Type: cfg.TPM.KeyType}
	k, err := tp.OpenKey(ctx, spec)
	cert := readLeaf(cfg.Broker.CertFile)
	other := OtherKeyHandle(cfg, active)
	if cert == nil || other == 0 || (err == nil && samePublic(cert.PublicKey, k.Public())) {
		return k, err
	}
	spec.Handle = other
	ok, oerr := tp.OpenKey(ctx, spec)
	if oerr != nil || !samePublic(cert.PublicKey, ok.Public()) {
		if oerr == nil {
			ok.Close()
		}
		return k, err // neither matches: the caller reports the mismatch
	}
	if k != nil {
		k.Close()
	}
	if log != nil {
		log.Warn("broker.cert_file certifies the key at the other renewal handle: a certificate renewal was interrupted; using that key",
			"cert_file", cfg.Broker.CertFile, "handle", fmt.Sprintf("0x%08x", other), "state", StatePath(cfg), "expected_handle", fmt.Sprintf("0x%08x", active))
	}
	return ok, nil
}

// readLeaf returns the first certificate in path, nil if there is none.
func readLeaf(path string) *x509.Certificate {
	if path == "" {
		return nil
	}
	b, err := os.ReadFile(path)
	if err != nil {
		return nil
	}
	ders := pemfile.CertificatesDER(b)
	if len(ders) == 0 {
		return nil
	}
	c, err := x509.ParseCertificate(ders[0])
	if err != nil {
		return nil
	}
	return c
}

func samePublic(a, b crypto.PublicKey) bool {
	k, ok := a.(interface{ Equal(crypto.PublicKey) bool })
	return ok && k.Equal(b)
}

// Signatures is the number of signatures made with the key in this process
// (0 for a key file).
func (id *Identity) Signatures() uint64 {
	if id.Key == nil {
		return 0
	}
	return id.Key.Signatures()
}

// Close closes the key and the TPM connection.
func (id *Identity) Close() error {
	if id.Key != nil {
		id.Key.Close()
	}
	if id.TPM != nil {
		return id.TPM.Close()
	}
	return nil
}

// LoadKeyFile reads a PEM private key (PKCS#8, SEC 1 EC or PKCS#1 RSA).
func LoadKeyFile(path string) (crypto.Signer, error) {
	s, err := pemfile.LoadSigner(path)
	if err != nil {
		return nil, fmt.Errorf("broker.key_file: %w", err)
	}
	return s, nil
}
