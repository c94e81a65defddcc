package main

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"strings"

	"github.com/spf13/cobra"

	"github.com/tpmagent/tpmagent/agent/config"
	"github.com/tpmagent/tpmagent/agent/identity"
	"github.com/tpmagent/tpmagent/tpmkeys"
)

// newKeyCmd is `tpmagent key create|show|csr`: the device key in the TPM.
func (a *app) newKeyCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "key",
		Short: "Create, show and certify the TPM-resident device key",
		Long: `The device key lives in the TPM at tpm.key_handle (default 0x81000100), a child
of the storage root key at tpm.srk_handle (default 0x81000002). Its private part
never leaves the TPM: it is created inside (sensitivedataorigin), bound to this
TPM and to its parent (fixedtpm, fixedparent), and can only sign.

The --tpm.* flags override the configuration for one command.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return usagef("key: give a subcommand: create, show or csr (tpmagent key --help)")
		},
	}
	pf := cmd.PersistentFlags()
	pf.String("tpm.device", "", "TPM device: /dev/tpmrm0, /dev/tpm0 or swtpm://HOST:PORT (default from config)")
	pf.String("tpm.key_handle", "", "persistent handle of the device key, hex (default from config, 0x81000100)")
	pf.String("tpm.srk_handle", "", "persistent handle of the SRK, hex (default from config, 0x81000002)")
	pf.String("tpm.key_type", "", "key type for create: ecc-p256 or rsa-2048 (default from config, ecc-p256)")
	cmd.AddCommand(a.newKeyCreateCmd(), a.newKeyShowCmd(), a.newKeyCSRCmd())
	cmd.AddCommand(a.newKeyAttestCmd())
	return cmd
}

// keySpec names the device key: the handle state_dir/identity.json names
// after a certificate renewal moved the key to the other handle of the pair,
// else tpm.key_handle.
func keySpec(cfg *config.Config) tpmkeys.KeySpec {
	h := uint32(cfg.TPM.KeyHandle)
	if active, err := identity.ActiveKeyHandle(cfg); err == nil {
		h = active
	}
	return tpmkeys.KeySpec{Handle: h, SRKHandle: uint32(cfg.TPM.SRKHandle), Type: cfg.TPM.KeyType}
}

// keyOpenTPM opens the configured TPM; errors name tpm.device.
func keyOpenTPM(ctx context.Context, cfg *config.Config) (*tpmkeys.TPM, error) {
	tp, err := tpmkeys.Open(ctx, cfg.TPM.Device)
	if err != nil {
		return nil, fmt.Errorf("tpm.device %s: %w", cfg.TPM.Device, err)
	}
	return tp, nil
}

// withKey loads the configuration, opens the TPM and the device key (of tpm.key_type) and
// runs fn.
func (a *app) withKey(cmd *cobra.Command, fn func(cfg *config.Config, k *tpmkeys.Key) error) error {
	cfg, err := a.loadConfig(cmd)
	if err != nil {
		return err
	}
	ctx := cmd.Context()
	tp, err := keyOpenTPM(ctx, cfg)
	if err != nil {
		return err
	}
	defer tp.Close()
	k, err := tp.OpenKey(ctx, keySpec(cfg))
	if err != nil {
		return err
	}
	defer k.Close()
	return fn(cfg, k)
}

func (a *app) newKeyCreateCmd() *cobra.Command {
	var force, jsonOut bool
	cmd := &cobra.Command{
		Use:   "create [--force] [--json]",
		Short: "Create the SRK and the device key in the TPM (idempotent)",
		Long: `create makes the storage root key (ECC P-256, at tpm.srk_handle) when it is absent
and the device key (tpm.key_type, at tpm.key_handle) with the attributes
fixedtpm|fixedparent|sensitivedataorigin|userwithauth|sign.

An existing key of the configured type at tpm.key_handle is kept and reported
(exit 0). Another object there (a key of another type, a non-signing key) is an
error. --force evicts whatever is at tpm.key_handle and creates a new key: the
old private key is gone for good and certificates issued for it become useless.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			cfg, err := a.loadConfig(cmd)
			if err != nil {
				return err
			}
			ctx := cmd.Context()
			tp, err := keyOpenTPM(ctx, cfg)
			if err != nil {
				return err
			}
			defer tp.Close()
			res, err := tp.CreateKey(ctx, keySpec(cfg), force)
			if err != nil {
				return err
			}
			k, err := tp.LoadKey(ctx, res.Handle, res.SRKHandle)
			if err != nil {
				return err
			}
			defer k.Close()
			if jsonOut {
				return keyWriteJSON(a, map[string]any{
					"handle": keyHandle(res.Handle), "srk_handle": keyHandle(res.SRKHandle),
					"type": k.Type(), "created": res.Created, "replaced": res.Replaced,
					"srk_created": res.SRKCreated, "fingerprint_sha256": k.FingerprintSHA256(),
				})
			}
			if res.SRKCreated {
				fmt.Fprintf(a.stdout, "created SRK (ecc-p256 storage key) at %s\n", keyHandle(res.SRKHandle))
			}
			switch {
			case res.Replaced:
				fmt.Fprintf(a.stdout, "replaced the object at %s with a new %s key\n", keyHandle(res.Handle), k.Type())
			case res.Created:
				fmt.Fprintf(a.stdout, "created %s key at %s\n", k.Type(), keyHandle(res.Handle))
			default:
				fmt.Fprintf(a.stdout, "%s key at %s already exists: kept (use --force to replace it)\n", k.Type(), keyHandle(res.Handle))
			}
			fmt.Fprintf(a.stdout, "fingerprint_sha256: %s\n", k.FingerprintSHA256())
			return nil
		},
	}
	cmd.Flags().BoolVar(&force, "force", false, "replace whatever is at tpm.key_handle with a new key")
	cmd.Flags().BoolVar(&jsonOut, "json", false, "print the result as JSON")
	return cmd
}

func (a *app) newKeyShowCmd() *cobra.Command {
	var jsonOut, pemOnly bool
	cmd := &cobra.Command{
		Use:   "show [--json | --pem]",
		Short: "Show the device key: handle, type, attributes, public key, SHA-256 fingerprint",
		Long: `show prints the device key at tpm.key_handle: handle, type, attributes (named as
tpm2_readpublic names them), the public key in PEM and the SHA-256 fingerprint
of its DER SubjectPublicKeyInfo (hex; equal to
openssl pkey -pubin -in pub.pem -outform DER | sha256sum).

--json prints {"handle","srk_handle","type","attributes","public_key_pem",
"fingerprint_sha256"}; --pem prints only the public key PEM.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if jsonOut && pemOnly {
				return usagef("key show: --json and --pem exclude each other")
			}
			return a.withKey(cmd, func(cfg *config.Config, k *tpmkeys.Key) error {
				switch {
				case pemOnly:
					_, err := a.stdout.Write(k.PublicKeyPEM())
					return err
				case jsonOut:
					return keyWriteJSON(a, keyShowJSON{
						Handle: keyHandle(k.Handle()), SRKHandle: cfg.TPM.SRKHandle.String(), Type: k.Type(),
						Attributes: k.Attributes(), PublicKeyPEM: string(k.PublicKeyPEM()),
						FingerprintSHA256: k.FingerprintSHA256(),
					})
				default:
					_, err := fmt.Fprintf(a.stdout, "handle:             %s\nsrk_handle:         %s\ntype:               %s\n"+
						"attributes:         %s\nfingerprint_sha256: %s\n%s",
						keyHandle(k.Handle()), cfg.TPM.SRKHandle, k.Type(), strings.Join(k.Attributes(), "|"),
						k.FingerprintSHA256(), k.PublicKeyPEM())
					return err
				}
			})
		},
	}
	cmd.Flags().BoolVar(&jsonOut, "json", false, "print JSON")
	cmd.Flags().BoolVar(&pemOnly, "pem", false, "print only the public key (PEM)")
	return cmd
}

// keyShowJSON is the `key show --json` output (a contract: scripts read it).
type keyShowJSON struct {
	Handle            string   `json:"handle"`
	SRKHandle         string   `json:"srk_handle"`
	Type              string   `json:"type"`
	Attributes        []string `json:"attributes"`
	PublicKeyPEM      string   `json:"public_key_pem"`
	FingerprintSHA256 string   `json:"fingerprint_sha256"`
}

func (a *app) newKeyCSRCmd() *cobra.Command {
	var (
		cn   string
		dns  []string
		out  string
		form string
	)
	cmd := &cobra.Command{
		Use:   "csr [--cn ID] [--dns NAME]... [-o FILE] [--der]",
		Short: "Write a PKCS#10 certificate signing request signed inside the TPM",
		Long: `csr writes a certificate signing request for the device key with subject CN=ID
(--cn, default: device_id from the configuration) and the --dns names as
subjectAltName (an IP address becomes an IP SAN). The request is signed by the
TPM (ECDSA with SHA-256 for ECC keys, PKCS#1 v1.5 with SHA-256 for RSA keys):
check it with openssl req -in FILE -verify -noout.

Output: PEM to stdout, or to FILE with -o (mode 0644).`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if form != "pem" && form != "der" {
				return usagef("key csr: --format %q: use pem or der", form)
			}
			return a.withKey(cmd, func(cfg *config.Config, k *tpmkeys.Key) error {
				if cn == "" {
					cn = cfg.DeviceID
				}
				if cn == "" {
					return usagef("key csr: no subject: give --cn ID or set device_id in the configuration")
				}
				der, err := tpmkeys.CreateCSR(k, cn, dns)
				if err != nil {
					return err
				}
				b := der
				if form == "pem" {
					b = tpmkeys.EncodeCSRPEM(der)
				}
				if out == "" || out == "-" {
					_, err = a.stdout.Write(b)
					return err
				}
				if err := os.WriteFile(out, b, 0o644); err != nil {
					return fmt.Errorf("key csr: write %s: %w", out, err)
				}
				fmt.Fprintf(a.stderr, "wrote CSR for CN=%s (%s key %s, fingerprint_sha256 %s) to %s\n",
					cn, k.Type(), keyHandle(k.Handle()), k.FingerprintSHA256(), out)
				return nil
			})
		},
	}
	f := cmd.Flags()
	f.StringVar(&cn, "cn", "", "subject common name, usually the device id (default: device_id)")
	f.StringArrayVar(&dns, "dns", nil, "subjectAltName DNS name or IP address (repeatable)")
	f.StringVarP(&out, "output", "o", "", "write the CSR to FILE instead of stdout")
	f.StringVar(&form, "format", "pem", "pem or der")
	return cmd
}

func keyHandle(h uint32) string { return fmt.Sprintf("0x%08x", h) }

func keyWriteJSON(a *app, v any) error {
	enc := json.NewEncoder(a.stdout)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}
