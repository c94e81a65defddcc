package main

import (
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"
	"os"

	"github.com/spf13/cobra"

	"github.com/tpmagent/tpmagent/transport/seal"
)

// newCollectorCmd is `tpmagent collector`: the collector's key management.
func (a *app) newCollectorCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "collector",
		Short: "Sealed-telemetry collector key management (keygen)",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return usagef("collector: give a subcommand: keygen")
		},
	}
	cmd.AddCommand(a.newCollectorKeygenCmd())
	return cmd
}

// newCollectorKeygenCmd is `tpmagent collector keygen -o FILE [--suite S]`.
func (a *app) newCollectorKeygenCmd() *cobra.Command {
	var out, suiteName string
	cmd := &cobra.Command{
		Use:   "keygen -o FILE [--suite SUITE]",
		Short: "Make the collector's HPKE key pair: FILE (private, 0600) and FILE.pub",
		Long: `keygen makes the key pair that sealed telemetry is encrypted to
(docs/SEALED-TELEMETRY.md). FILE gets the private key, mode 0600: it opens every
reading of the fleet, so keep it on the collector only and point
seal.collector_private_key at it. FILE.pub gets the public key (0644): install it
on every device as seal.collector_key.

--suite (default: seal.suite) picks the KEM: x25519-aes128gcm and
x25519-chacha20poly1305 make an X25519 key; mlkem768x25519-aes128gcm ("pq") and
mlkem768x25519-chacha20poly1305 make a hybrid post-quantum ML-KEM-768 + X25519
key. Devices must use a suite with the same KEM.

keygen never overwrites: it fails if FILE or FILE.pub exists.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if out == "" {
				return usagef("collector keygen: -o FILE is required (e.g. -o collector.key)")
			}
			if suiteName == "" {
				cfg, err := a.loadConfig(cmd)
				if err != nil {
					return err
				}
				suiteName = cfg.Seal.Suite
			}
			suite, err := seal.ParseSuite(suiteName)
			if err != nil {
				return usageError{fmt.Errorf("collector keygen: --suite: %w", err)}
			}
			for _, p := range []string{out, out + ".pub"} {
				if _, err := os.Lstat(p); err == nil {
					return fmt.Errorf("collector keygen: %s exists: refusing to overwrite a key (devices may depend on it); remove it first or choose another -o", p)
				} else if !errors.Is(err, fs.ErrNotExist) {
					return fmt.Errorf("collector keygen: %s: %w", p, err)
				}
			}
			k, err := seal.GenerateCollectorKey(suite)
			if err != nil {
				return fmt.Errorf("collector keygen: %w", err)
			}
			if err := seal.WriteKeyFiles(out, k); err != nil {
				return fmt.Errorf("collector keygen: %w", err)
			}
			sum := sha256.Sum256(k.Public().Bytes())
			fmt.Fprintf(a.stdout, "private key: %s (mode 0600; set seal.collector_private_key on the collector, nowhere else)\n", out)
			fmt.Fprintf(a.stdout, "public key:  %s.pub (set seal.collector_key on every device)\n", out)
			fmt.Fprintf(a.stdout, "suite:       %s\n", suite)
			fmt.Fprintf(a.stdout, "fingerprint: sha256:%s\n", hex.EncodeToString(sum[:]))
			return nil
		},
	}
	cmd.Flags().StringVarP(&out, "output", "o", "", "private key file to write (the public key goes to FILE.pub)")
	cmd.Flags().StringVar(&suiteName, "suite", "", "suite whose KEM the key is for (default: seal.suite)")
	return cmd
}
