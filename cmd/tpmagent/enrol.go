package main

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/tpmagent/tpmagent/internal/atomicfile"

	"github.com/spf13/cobra"

	"github.com/tpmagent/tpmagent/agent/config"
	"github.com/tpmagent/tpmagent/agent/daemon"
	"github.com/tpmagent/tpmagent/agent/identity"
	"github.com/tpmagent/tpmagent/agent/status"
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
		Short: "Show the device certificate's renewal state, request or renew a certificate from the fleet CA service",
		Args:  cobra.NoArgs,
		RunE: func(*cobra.Command, []string) error {
			return usagef("cert: give a subcommand: status, request or renew (tpmagent cert --help)")
		},
	}
	cmd.AddCommand(a.newCertStatusCmd(), a.newCertRequestCmd(), a.newCertRenewCmd())
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
			handle, err := identity.ActiveKeyHandle(cfg)
			if err != nil {
				return err
			}
			st := map[string]any{
				"subject": c.Subject.CommonName, "serial": c.SerialNumber.Text(16),
				"not_before": c.NotBefore.UTC().Format(time.RFC3339), "not_after": c.NotAfter.UTC().Format(time.RFC3339),
				"renew_at": renew.UTC().Format(time.RFC3339), "renewal_due": !time.Now().Before(renew),
				"expired": time.Now().After(c.NotAfter), "key_handle": fmt.Sprintf("0x%08x", handle),
			}
			// The running agent's renewal state (state_dir/renewal.json).
			rs, err := daemon.ReadRenewalStatus(cfg)
			if err != nil {
				return err
			}
			if rs != nil {
				st["renewal"] = rs
			}
			if jsonOut {
				return json.NewEncoder(a.stdout).Encode(st)
			}
			fmt.Fprintf(a.stdout, "subject:     CN=%s\nserial:      %s\nnot_after:   %s\nrenew_at:    %s\nrenewal_due: %v\nkey_handle:  %s\n",
				st["subject"], st["serial"], st["not_after"], st["renew_at"], st["renewal_due"], st["key_handle"])
			if rs != nil {
				fmt.Fprintf(a.stdout, "renewal:     %s (agent: %d attempts, %d failures, %d renewals", rs.State, rs.Attempts, rs.Failures, rs.Renewals)
				if !rs.NextAttempt.IsZero() && rs.State != daemon.RenewalStopped {
					fmt.Fprintf(a.stdout, "; next attempt %s", rs.NextAttempt.UTC().Format(time.RFC3339))
				}
				fmt.Fprintln(a.stdout, ")")
				if rs.LastError != "" {
					fmt.Fprintf(a.stdout, "last_error:  %s (%s)\n", rs.LastError, rs.LastErrorAt.UTC().Format(time.RFC3339))
				}
			}
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

func (a *app) newCertRenewCmd() *cobra.Command {
	var (
		timeout time.Duration
		jsonOut bool
	)
	cmd := &cobra.Command{
		Use:   "renew [--timeout D] [--json]",
		Short: "Renew the device certificate now: new TPM key, certificate from the fleet CA service, switch",
		Long: `renew forces one certificate renewal, the same that ` + "`tpmagent run`" + ` starts by
itself at 2/3 of the certificate's lifetime: a new key in the TPM at the other
handle of the pair (tpm.key_handle, enrol.renew_handle), attested and
certified by ` + "`tpmagent fleet ca serve`" + ` over MQTT, proven in a handshake with
the broker; then broker.cert_file is replaced (the old one kept as
broker.cert_file.prev), state_dir/identity.json names the new handle, and the
old key is evicted from the TPM.

When the agent is running (its status.socket answers), renew asks it to do
the renewal (it writes state_dir/renew.request; the agent switches without
restarting, with one broker reconnect) and waits for the result. Otherwise it
renews itself, with the TPM and the current certificate. On failure the old
key and certificate stay in use; the exit code is 1.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			cfg, err := a.loadConfig(cmd)
			if err != nil {
				return err
			}
			if err := cfg.RequireDeviceID(); err != nil {
				return err
			}
			if err := cfg.RequireBroker(); err != nil {
				return err
			}
			ctx, cancel := context.WithTimeout(cmd.Context(), timeout)
			defer cancel()
			var res certRenewResult
			if agentRunning(ctx, cfg) {
				res, err = renewThroughAgent(ctx, cfg)
			} else if rs, _ := daemon.ReadRenewalStatus(cfg); rs.AgentAlive() {
				// Renewing here would evict the key the agent signs with.
				return fmt.Errorf("cert renew: the agent (pid %d) seems to be running but its status.socket %q does not answer: "+
					"set status.socket so that it can be asked to renew, or stop it first", rs.PID, cfg.Status.Socket)
			} else {
				res, err = a.renewHere(ctx, cfg)
			}
			if err != nil {
				return err
			}
			if jsonOut {
				return json.NewEncoder(a.stdout).Encode(res)
			}
			fmt.Fprintf(a.stdout, "certificate renewed by %s: serial %s valid until %s, key at %s (the key at %s was removed); %s written, old certificate in %s.prev\n",
				res.By, res.Serial, res.NotAfter.UTC().Format(time.RFC3339), res.KeyHandle, res.PreviousKeyHandle, cfg.Broker.CertFile, cfg.Broker.CertFile)
			return nil
		},
	}
	cmd.Flags().DurationVar(&timeout, "timeout", 2*time.Minute, "give up after this long")
	cmd.Flags().BoolVar(&jsonOut, "json", false, "print JSON")
	return cmd
}

// certRenewResult is what `cert renew` prints.
type certRenewResult struct {
	By                string    `json:"renewed_by"` // "running agent" or "this command"
	Serial            string    `json:"serial"`
	NotAfter          time.Time `json:"not_after"`
	KeyHandle         string    `json:"key_handle"`
	PreviousKeyHandle string    `json:"previous_key_handle"`
	PreviousSerial    string    `json:"previous_serial"`
}

// agentRunning reports whether the agent's status socket answers.
func agentRunning(ctx context.Context, cfg *config.Config) bool {
	if cfg.Status.Socket == "" {
		return false
	}
	sctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	_, err := status.Fetch(sctx, cfg.Status.Socket)
	return err == nil
}

// renewThroughAgent drops a renewal request for the running agent and waits
// for its answer in state_dir/renewal.json.
func renewThroughAgent(ctx context.Context, cfg *config.Config) (certRenewResult, error) {
	if rs, err := daemon.ReadRenewalStatus(cfg); err == nil && rs != nil && rs.State == daemon.RenewalDisabled {
		return certRenewResult{}, fmt.Errorf("cert renew: the running agent has renewal off (no TPM key, or enrol.renew_handle not set): see its log")
	}
	id, err := daemon.RequestRenewal(cfg)
	if err != nil {
		return certRenewResult{}, err
	}
	t := time.NewTicker(100 * time.Millisecond)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			_ = os.Remove(filepath.Join(cfg.StateDir, daemon.RenewalRequestFile))
			return certRenewResult{}, fmt.Errorf("cert renew: the running agent did not finish the renewal in time (request %s in %s): see `tpmagent cert status` and the agent's log", id, cfg.StateDir)
		case <-t.C:
		}
		rs, err := daemon.ReadRenewalStatus(cfg)
		if err != nil || rs == nil || rs.LastRequest != id {
			continue
		}
		if rs.LastRequestResult != "ok" {
			return certRenewResult{}, fmt.Errorf("cert renew: the running agent's renewal failed (it keeps the old key and certificate and retries): %s", rs.LastRequestResult)
		}
		prev, _ := identity.ReadState(cfg)
		res := certRenewResult{By: "the running agent", Serial: rs.CertSerial, NotAfter: rs.CertNotAfter, KeyHandle: rs.KeyHandle, PreviousSerial: rs.PreviousSerial}
		if prev != nil {
			res.PreviousKeyHandle = prev.PreviousKeyHandle
		}
		return res, nil
	}
}

// renewHere renews with the TPM and certificate of this configuration (no
// agent running).
func (a *app) renewHere(ctx context.Context, cfg *config.Config) (certRenewResult, error) {
	log := a.logger(cfg)
	id, err := identity.Open(ctx, cfg, false, log)
	if err != nil {
		return certRenewResult{}, err
	}
	defer id.Close()
	cur, err := transport.NewTLSConfig(transport.TLSOptions{Signer: id.Signer, CertFile: cfg.Broker.CertFile,
		CAFile: cfg.Broker.CAFile, ServerName: cfg.Broker.ServerName, MinTLS: cfg.Broker.MinTLS, Logger: log})
	if err != nil {
		return certRenewResult{}, err
	}
	ren, err := daemon.Renew(ctx, daemon.RenewOptions{Config: cfg, TPM: id.TPM, CurrentHandle: id.Key.Handle(), Current: cur, Logger: log})
	if err != nil {
		return certRenewResult{}, err
	}
	defer ren.Key.Close()
	if err := ren.DropOldKey(ctx, id.Key); err != nil {
		fmt.Fprintf(a.stderr, "tpmagent: warning: %v\n", err)
	}
	return certRenewResult{By: "this command", Serial: ren.Cert.SerialNumber.Text(16), NotAfter: ren.Cert.NotAfter,
		KeyHandle: fmt.Sprintf("0x%08x", ren.NewHandle), PreviousKeyHandle: fmt.Sprintf("0x%08x", ren.OldHandle), PreviousSerial: ren.OldSerial}, nil
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

// writeFileAtomic replaces path durably (atomicfile.Write); "-" is stdout.
func writeFileAtomic(path string, b []byte, mode os.FileMode) error {
	if path == "-" {
		_, err := os.Stdout.Write(b)
		return err
	}
	return atomicfile.Write(path, b, mode)
}
