// Package identity opens the device's signing identity as the configuration
// names it: the TPM-resident key at tpm.key_handle (the normal case), or a
// software key file (broker.key_file: backends such as the collector, which
// run on servers without a TPM). Commands and the daemon share it so that
// every one reports a missing TPM or key the same way.
package identity

import (
	"context"
	"crypto"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"log/slog"
	"os"

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
	tp, err := tpmkeys.Open(ctx, cfg.TPM.Device)
	if err != nil {
		return nil, fmt.Errorf("tpm.device %s: %w", cfg.TPM.Device, err)
	}
	k, err := tp.OpenKey(ctx, tpmkeys.KeySpec{Handle: uint32(cfg.TPM.KeyHandle), SRKHandle: uint32(cfg.TPM.SRKHandle), Type: cfg.TPM.KeyType})
	if err != nil {
		tp.Close()
		if errors.Is(err, tpmkeys.ErrKeyNotFound) {
			return nil, fmt.Errorf("%w (create it with `tpmagent key create`, then get a certificate with `tpmagent key csr`)", err)
		}
		return nil, err
	}
	return &Identity{Signer: k, TPM: tp, Key: k}, nil
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
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("broker.key_file %s: %w", path, err)
	}
	for {
		var blk *pem.Block
		blk, b = pem.Decode(b)
		if blk == nil {
			return nil, fmt.Errorf("broker.key_file %s: no PEM private key found (expected PRIVATE KEY, EC PRIVATE KEY or RSA PRIVATE KEY)", path)
		}
		var k any
		switch blk.Type {
		case "PRIVATE KEY":
			k, err = x509.ParsePKCS8PrivateKey(blk.Bytes)
		case "EC PRIVATE KEY":
			k, err = x509.ParseECPrivateKey(blk.Bytes)
		case "RSA PRIVATE KEY":
			k, err = x509.ParsePKCS1PrivateKey(blk.Bytes)
		default:
			continue
		}
		if err != nil {
			return nil, fmt.Errorf("broker.key_file %s: %w", path, err)
		}
		s, ok := k.(crypto.Signer)
		if !ok {
			return nil, fmt.Errorf("broker.key_file %s: key type %T cannot sign", path, k)
		}
		return s, nil
	}
}
