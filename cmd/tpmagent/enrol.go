package main

import (
	"crypto/tls"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/spf13/cobra"

	"github.com/tpmagent/tpmagent/agent/config"
	"github.com/tpmagent/tpmagent/agent/identity"
	"github.com/tpmagent/tpmagent/fleet"
	"github.com/tpmagent/tpmagent/tpmkeys"
	"github.com/tpmagent/tpmagent/transport"
)

// newKeyAttestCmd is `tpmagent key attest`: the device side of enrolment.
func (a *app) newKeyAttestCmd() *cobra.Command {
	var (
		out, cn, challenge string
		dns                []string
	)
	cmd := &cobra.Command{
		Use:   "attest -o BUNDLE [--cn ID] | attest --challenge CHALLENGE -o RESPONSE",
		Short: "Prove to the fleet CA that the device key lives in this TPM",
		Long: `attest writes an attestation bundle (JSON) for the device key at
tpm.key_handle: the EK certificate read from NV (0x01c00002 RSA, 0x01c0000a ECC),
the EK and attestation key public areas, TPM2_Certify of the device key by the
attestation key (it shows fixedtpm|fixedparent|sensitivedataorigin and is bound
to the CSR), and a CSR for CN=--cn (default device_id) signed inside the TPM.

With --challenge FILE it answers the CA's credential activation challenge
(TPM2_ActivateCredential with the EK) and writes the response for
` + "`tpmagent fleet ca issue`" + `. ` + "`tpmagent fleet ca --help`" + ` shows the whole flow.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if out == "" {
				return usagef("key attest: -o FILE is required")
			}
			cfg, err := a.loadConfig(cmd)
			if err != nil {
				return err
			}
			ctx := cmd.Context()
			id, err := identity.Open(ctx, cfg, false, a.logger(cfg))
			if err != nil {
				return err
			}
			defer id.Close()
			if challenge != "" {
				var ch tpmkeys.Challenge
				if err := readJSON(challenge, &ch); err != nil {
					return usageError{err}
				}
				resp, err := id.TPM.ActivateCredential(ctx, &ch)
				if err != nil {
					return err
				}
				return writeJSON(out, resp, 0o644)
			}
			if cn == "" {
				cn = cfg.DeviceID
			}
			if cn == "" {
				return usagef("key attest: no device id: set device_id in the config or pass --cn ID")
			}
			b, err := id.TPM.Attest(ctx, id.Key, cn, dns)
			if err != nil {
				return err
			}
			return writeJSON(out, b, 0o644)
		},
	}
	f := cmd.Flags()
	f.StringVarP(&out, "output", "o", "", "write the bundle (or the activation response) to FILE")
	f.StringVar(&cn, "cn", "", "device id for the CSR's common name (default: device_id)")
	f.StringSliceVar(&dns, "dns", nil, "subjectAltName DNS names or IPs for the CSR")
	f.StringVar(&challenge, "challenge", "", "answer this challenge file instead of making a bundle")
	return cmd
}

// newCertCmd is `tpmagent cert`: the device certificate's state and online (MQTT) requests.
func (a *app) newCertCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "cert",
		Short: "Show the device certificate's renewal state, request a certificate from the fleet CA service",
		Args:  cobra.NoArgs,
		RunE: func(*cobra.Command, []string) error {
			return usagef("cert: give a subcommand: status or request (tpmagent cert --help)")
		},
	}
	cmd.AddCommand(a.newCertStatusCmd(), a.newCertRequestCmd())
	return cmd
}

func (a *app) newCertStatusCmd() *cobra.Command {
	var jsonOut bool
	cmd := &cobra.Command{
		Use:   "status [--json]",
		Short: "Print broker.cert_file's subject, expiry and when renewal is due (2/3 of its lifetime)",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			cfg, err := a.loadConfig(cmd)
			if err != nil {
				return err
			}
			certs, err := fleet.ReadCertificates(cfg.Broker.CertFile)
			if err != nil {
				return fmt.Errorf("broker.cert_file: %w", err)
			}
			c := certs[0]
			renew := fleet.RenewAt(c, 0)
			st := map[string]any{
				"subject": c.Subject.CommonName, "serial": c.SerialNumber.Text(16),
				"not_before": c.NotBefore.UTC().Format(time.RFC3339), "not_after": c.NotAfter.UTC().Format(time.RFC3339),
				"renew_at": renew.UTC().Format(time.RFC3339), "renewal_due": !time.Now().Before(renew),
				"expired": time.Now().After(c.NotAfter),
			}
			if jsonOut {
				return json.NewEncoder(a.stdout).Encode(st)
			}
			fmt.Fprintf(a.stdout, "subject:     CN=%s\nserial:      %s\nnot_after:   %s\nrenew_at:    %s\nrenewal_due: %v\n",
				st["subject"], st["serial"], st["not_after"], st["renew_at"], st["renewal_due"])
			return nil
		},
	}
	cmd.Flags().BoolVar(&jsonOut, "json", false, "print JSON")
	return cmd
}

func (a *app) newCertRequestCmd() *cobra.Command {
	var (
		out, rawURL, bootCert, bootKey string
		timeout                        time.Duration
	)
	cmd := &cobra.Command{
		Use:   "request [-o FILE] [--url URL] [--bootstrap-cert F --bootstrap-key F]",
		Short: "Attest the device key and get its certificate from `tpmagent fleet ca serve` over MQTT",
		Long: `request runs the enrolment exchange over the broker: it publishes the
attestation bundle on $fleet/certificates/<device_id>/request, answers the
challenge that comes back on …/response, and writes the issued certificate to
-o (default broker.cert_file). It connects with the current device identity
(broker.cert_file and the TPM key), or with --bootstrap-cert/--bootstrap-key
for a first enrolment when the broker lets that identity use the device's
$fleet topics.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			cfg, err := a.loadConfig(cmd)
			if err != nil {
				return err
			}
			if cfg.DeviceID == "" {
				return usagef("cert request: device_id is not set")
			}
			if rawURL == "" && len(cfg.Broker.URLs) > 0 {
				rawURL = cfg.Broker.URLs[0]
			}
			if rawURL == "" {
				return usagef("cert request: broker.urls is empty: pass --url")
			}
			if out == "" {
				out = cfg.Broker.CertFile
			}
			ctx := cmd.Context()
			id, err := identity.Open(ctx, cfg, false, a.logger(cfg))
			if err != nil {
				return err
			}
			defer id.Close()
			tlsCfg, err := a.enrolTLS(cfg, id, bootCert, bootKey)
			if err != nil {
				return err
			}
			req, err := fleet.NewMQTTRequester(ctx, fleet.MQTTRequesterOptions{BrokerURL: rawURL, TLS: tlsCfg, DeviceID: cfg.DeviceID, Timeout: timeout})
			if err != nil {
				return err
			}
			defer req.Close()
			certPEM, cert, err := fleet.Enrol(ctx, &fleet.KeyAttester{TPM: id.TPM, Key: id.Key, DeviceID: cfg.DeviceID}, req)
			if err != nil {
				return err
			}
			if err := writeFileAtomic(out, certPEM, 0o644); err != nil {
				return err
			}
			fmt.Fprintf(a.stdout, "certificate for CN=%s serial %s valid until %s written to %s\n",
				cert.Subject.CommonName, cert.SerialNumber.Text(16), cert.NotAfter.UTC().Format(time.RFC3339), out)
			return nil
		},
	}
	f := cmd.Flags()
	f.StringVarP(&out, "output", "o", "", "write the certificate here (default broker.cert_file)")
	f.StringVar(&rawURL, "url", "", "broker URL (default the first of broker.urls)")
	f.StringVar(&bootCert, "bootstrap-cert", "", "connect with this certificate instead of broker.cert_file")
	f.StringVar(&bootKey, "bootstrap-key", "", "private key file of --bootstrap-cert")
	f.DurationVar(&timeout, "timeout", 30*time.Second, "time to wait for each answer of the CA service")
	return cmd
}

// enrolTLS builds the client TLS config for the enrolment connection.
func (a *app) enrolTLS(cfg *config.Config, id *identity.Identity, bootCert, bootKey string) (*tls.Config, error) {
	if bootCert != "" {
		pair, err := tls.LoadX509KeyPair(bootCert, bootKey)
		if err != nil {
			return nil, fmt.Errorf("bootstrap identity: %w", err)
		}
		pool, err := fleet.CertPoolFromFiles(cfg.Broker.CAFile)
		if err != nil {
			return nil, fmt.Errorf("broker.ca_file: %w", err)
		}
		return &tls.Config{MinVersion: tls.VersionTLS12, RootCAs: pool, Certificates: []tls.Certificate{pair},
			ServerName: cfg.Broker.ServerName}, nil
	}
	tid, err := transport.NewTLSConfig(transport.TLSOptions{Signer: id.Signer, CertFile: cfg.Broker.CertFile,
		CAFile: cfg.Broker.CAFile, ServerName: cfg.Broker.ServerName, MinTLS: cfg.Broker.MinTLS, Logger: a.logger(cfg)})
	if err != nil {
		return nil, err
	}
	return tid.Config(), nil
}

func readJSON(path string, v any) error {
	b, err := os.ReadFile(path)
	if err != nil {
		return err
	}
	if err := json.Unmarshal(b, v); err != nil {
		return fmt.Errorf("%s: %w", path, err)
	}
	return nil
}

func writeJSON(path string, v any, mode os.FileMode) error {
	b, err := json.MarshalIndent(v, "", "  ")
	if err != nil {
		return err
	}
	return writeFileAtomic(path, append(b, '\n'), mode)
}

// writeFileAtomic writes via a temporary file and rename ("-" is stdout).
func writeFileAtomic(path string, b []byte, mode os.FileMode) error {
	if path == "-" {
		_, err := os.Stdout.Write(b)
		return err
	}
	tmp, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".*")
	if err != nil {
		return err
	}
	defer os.Remove(tmp.Name())
	if _, err := tmp.Write(b); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Chmod(mode); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Close(); err != nil {
		return err
	}
	return os.Rename(tmp.Name(), path)
}
