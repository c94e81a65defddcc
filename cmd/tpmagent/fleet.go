package main

import (
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/tpmagent/tpmagent/agent/identity"
	"github.com/tpmagent/tpmagent/fleet"
	"github.com/tpmagent/tpmagent/tpmkeys"
)

// newFleetCmd is `tpmagent fleet ca …`: the fleet CA (verification and issuance).
func (a *app) newFleetCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "fleet",
		Short: "Fleet CA: verify TPM attestation bundles and issue device certificates",
		Args:  cobra.NoArgs,
		RunE: func(*cobra.Command, []string) error {
			return usagef("fleet: give a subcommand: ca (tpmagent fleet ca --help)")
		},
	}
	ca := &cobra.Command{
		Use:   "ca",
		Short: "Fleet CA commands: init, verify, challenge, issue, sign, serve",
		Long: `The fleet CA issues a device certificate only for a key that a TPM proves it holds:

  offline, three steps (CA and device apart; files carried between them):
    device: tpmagent key attest -o bundle.json
    CA:     tpmagent fleet ca challenge --manufacturer-ca M --bundle bundle.json -o challenge.json
    device: tpmagent key attest --challenge challenge.json -o response.json
    CA:     tpmagent fleet ca issue --ca-cert C --ca-key K --manufacturer-ca M \
              --bundle bundle.json --pending challenge.json.pending --response response.json -o device.pem

  lab, one step (the TPM reachable from the CA's process, e.g. swtpm at provisioning):
    tpmagent fleet ca sign --config agent.yaml --ca-cert C --ca-key K --manufacturer-ca M -o device.pem

  online: tpmagent fleet ca serve (MQTT), device: tpmagent cert request.`,
		Args: cobra.NoArgs,
		RunE: func(*cobra.Command, []string) error {
			return usagef("fleet ca: give a subcommand: init, verify, challenge, issue, sign or serve")
		},
	}
	ca.AddCommand(a.newFleetInitCmd(), a.newFleetVerifyCmd(), a.newFleetChallengeCmd(), a.newFleetIssueCmd(),
		a.newFleetSignCmd(), a.newFleetServeCmd())
	cmd.AddCommand(ca)
	return cmd
}

// caFlags are the flags shared by the CA commands.
type caFlags struct {
	caCert, caKey string
	manufacturer  []string
	validity      time.Duration
}

func (f *caFlags) add(cmd *cobra.Command, signing bool) {
	fl := cmd.Flags()
	fl.StringSliceVar(&f.manufacturer, "manufacturer-ca", nil, "trusted EK manufacturer CA certificates (PEM or DER; repeatable)")
	if signing {
		fl.StringVar(&f.caCert, "ca-cert", "", "fleet CA certificate (PEM)")
		fl.StringVar(&f.caKey, "ca-key", "", "fleet CA private key (PEM)")
		fl.DurationVar(&f.validity, "validity", fleet.DefaultValidity, "lifetime of issued device certificates")
	}
}

func (f *caFlags) pool() (*x509.CertPool, error) {
	if len(f.manufacturer) == 0 {
		return nil, usagef("--manufacturer-ca is required: the CA certificate(s) that sign EK certificates " +
			"(for swtpm: swtpm-localca's issuercert.pem and swtpm-localca-rootca-cert.pem)")
	}
	p, err := fleet.CertPoolFromFiles(f.manufacturer...)
	if err != nil {
		return nil, usageError{err}
	}
	return p, nil
}

func (f *caFlags) ca() (*fleet.CA, error) {
	if f.caCert == "" || f.caKey == "" {
		return nil, usagef("--ca-cert and --ca-key are required (create them with `tpmagent fleet ca init --dir DIR`)")
	}
	s, err := fleet.LoadFileSigner(f.caCert, f.caKey)
	if err != nil {
		return nil, usageError{err}
	}
	return &fleet.CA{Signer: s, Validity: f.validity}, nil
}

func (a *app) newFleetInitCmd() *cobra.Command {
	var dir, cn string
	var names []string
	cmd := &cobra.Command{
		Use:   "init --dir DIR [--cn NAME] [--broker-name N]",
		Short: "Create (or reuse) a lab fleet CA: ca.pem, ca.key (0600), broker.pem/.key, fleet-ca.pem/.key",
		Args:  cobra.NoArgs,
		RunE: func(*cobra.Command, []string) error {
			if dir == "" {
				return usagef("fleet ca init: --dir is required")
			}
			created, err := fleet.InitCA(dir, cn, names)
			if err != nil {
				return err
			}
			verb := "reused"
			if created {
				verb = "created"
			}
			fmt.Fprintf(a.stdout, "%s fleet CA in %s\n", verb, dir)
			return nil
		},
	}
	cmd.Flags().StringVar(&dir, "dir", "", "CA directory")
	cmd.Flags().StringVar(&cn, "cn", "tpmagent fleet CA", "CA common name")
	cmd.Flags().StringSliceVar(&names, "broker-name", []string{"localhost", "127.0.0.1"}, "DNS names/IPs of the broker certificate")
	return cmd
}

func readBundle(path string) (*tpmkeys.AttestationBundle, error) {
	var b tpmkeys.AttestationBundle
	if path == "" {
		return nil, usagef("--bundle FILE is required")
	}
	if err := readJSON(path, &b); err != nil {
		return nil, usageError{fmt.Errorf("bundle: %w", err)}
	}
	return &b, nil
}

func (a *app) newFleetVerifyCmd() *cobra.Command {
	var f caFlags
	var bundle string
	cmd := &cobra.Command{
		Use:   "verify --manufacturer-ca F --bundle B",
		Short: "Check an attestation bundle (exit 1 with the reason when it would be refused)",
		Args:  cobra.NoArgs,
		RunE: func(*cobra.Command, []string) error {
			pool, err := f.pool()
			if err != nil {
				return err
			}
			b, err := readBundle(bundle)
			if err != nil {
				return err
			}
			v, err := fleet.Verify(b, pool)
			if err != nil {
				return err
			}
			fmt.Fprintf(a.stdout, "ok: device %s, key sha256 %s, EK issuer %s\n", v.DeviceID, v.KeyFingerprint, v.EKCert.Issuer)
			return nil
		},
	}
	f.add(cmd, false)
	cmd.Flags().StringVar(&bundle, "bundle", "", "attestation bundle (from `tpmagent key attest`)")
	return cmd
}

func (a *app) newFleetChallengeCmd() *cobra.Command {
	var f caFlags
	var bundle, out, pending string
	var ttl time.Duration
	cmd := &cobra.Command{
		Use:   "challenge --manufacturer-ca F --bundle B -o CHALLENGE [--pending P]",
		Short: "Verify a bundle and write its credential activation challenge (offline step 1)",
		Args:  cobra.NoArgs,
		RunE: func(*cobra.Command, []string) error {
			if out == "" {
				return usagef("fleet ca challenge: -o FILE is required")
			}
			pool, err := f.pool()
			if err != nil {
				return err
			}
			b, err := readBundle(bundle)
			if err != nil {
				return err
			}
			v, err := fleet.Verify(b, pool)
			if err != nil {
				return err
			}
			ch, p, err := fleet.NewChallenge(v, ttl, time.Now())
			if err != nil {
				return err
			}
			if pending == "" {
				pending = out + ".pending"
			}
			if err := writeJSON(pending, p, 0o600); err != nil {
				return err
			}
			return writeJSON(out, ch, 0o644)
		},
	}
	f.add(cmd, false)
	fl := cmd.Flags()
	fl.StringVar(&bundle, "bundle", "", "attestation bundle")
	fl.StringVarP(&out, "output", "o", "", "challenge file for the device")
	fl.StringVar(&pending, "pending", "", "CA-side record of the challenge (default: OUTPUT.pending)")
	fl.DurationVar(&ttl, "ttl", fleet.DefaultChallengeTTL, "how long the challenge may be answered")
	return cmd
}

func (a *app) newFleetIssueCmd() *cobra.Command {
	var f caFlags
	var bundle, pending, response, out string
	cmd := &cobra.Command{
		Use:   "issue --ca-cert C --ca-key K --manufacturer-ca M --bundle B --pending P --response R -o CERT",
		Short: "Check the device's activation response and issue its certificate (offline step 2)",
		Args:  cobra.NoArgs,
		RunE: func(*cobra.Command, []string) error {
			if out == "" || pending == "" || response == "" {
				return usagef("fleet ca issue: --pending, --response and -o are required")
			}
			pool, err := f.pool()
			if err != nil {
				return err
			}
			ca, err := f.ca()
			if err != nil {
				return err
			}
			b, err := readBundle(bundle)
			if err != nil {
				return err
			}
			var p fleet.Pending
			if err := readJSON(pending, &p); err != nil {
				if errors.Is(err, fs.ErrNotExist) {
					return fmt.Errorf("pending challenge %s is gone: it was used already, make a new challenge", pending)
				}
				return usageError{err}
			}
			var r tpmkeys.ActivationResponse
			if err := readJSON(response, &r); err != nil {
				return usageError{err}
			}
			v, err := fleet.Verify(b, pool)
			if err != nil {
				return err
			}
			if string(p.BundleDigest) != string(v.BundleDigest[:]) {
				return fmt.Errorf("pending challenge %s was made for another bundle than %s", pending, bundle)
			}
			// A challenge is good once, whatever the outcome.
			if err := os.Remove(pending); err != nil {
				return err
			}
			if err := p.Check(&r, time.Now()); err != nil {
				return err
			}
			cert, err := ca.Issue(v)
			if err != nil {
				return err
			}
			return a.writeIssued(out, cert)
		},
	}
	f.add(cmd, true)
	fl := cmd.Flags()
	fl.StringVar(&bundle, "bundle", "", "attestation bundle")
	fl.StringVar(&pending, "pending", "", "the challenge's pending record")
	fl.StringVar(&response, "response", "", "the device's activation response")
	fl.StringVarP(&out, "output", "o", "", "write the device certificate (PEM)")
	return cmd
}

func (a *app) writeIssued(out string, cert *x509.Certificate) error {
	if err := writeFileAtomic(out, fleet.EncodeCertPEM(cert), 0o644); err != nil {
		return err
	}
	if a.jsonOut {
		return json.NewEncoder(a.stdout).Encode(map[string]any{
			"id": cert.Subject.CommonName, "serial": cert.SerialNumber.Text(16),
			"not_after": cert.NotAfter.UTC().Format(time.RFC3339), "file": out,
		})
	}
	fmt.Fprintf(a.stdout, "issued CN=%s serial %s not_after %s -> %s\n", cert.Subject.CommonName,
		cert.SerialNumber.Text(16), cert.NotAfter.UTC().Format(time.RFC3339), out)
	return nil
}

func (a *app) newFleetSignCmd() *cobra.Command {
	var f caFlags
	var bundle, bundleOut, out, cn string
	cmd := &cobra.Command{
		Use:   "sign --ca-cert C --ca-key K --manufacturer-ca M [--bundle B] -o CERT",
		Short: "Attest, challenge, activate and issue in one process (lab: the TPM is reachable from here)",
		Long: `sign drives both sides in one process for a TPM that the CA can reach (swtpm at
provisioning time, a device on the bench): it opens the TPM named by the
configuration (tpm.device, tpm.key_handle), makes the attestation bundle (or
reads --bundle, made earlier by ` + "`tpmagent key attest`" + ` on that TPM), verifies
it against --manufacturer-ca, answers the credential activation challenge with
the same TPM, and issues the certificate. Every check of the offline flow is
made; only the transport of the challenge is skipped.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if out == "" {
				return usagef("fleet ca sign: -o FILE is required")
			}
			pool, err := f.pool()
			if err != nil {
				return err
			}
			ca, err := f.ca()
			if err != nil {
				return err
			}
			cfg, err := a.loadConfig(cmd)
			if err != nil {
				return err
			}
			if cn == "" {
				cn = cfg.DeviceID
			}
			ctx := cmd.Context()
			id, err := identity.Open(ctx, cfg, false, a.logger(cfg))
			if err != nil {
				return err
			}
			defer id.Close()
			var b *tpmkeys.AttestationBundle
			if bundle != "" {
				if b, err = readBundle(bundle); err != nil {
					return err
				}
			} else {
				if cn == "" {
					return usagef("fleet ca sign: no device id: set device_id or pass --cn")
				}
				if b, err = id.TPM.Attest(ctx, id.Key, cn, nil); err != nil {
					return err
				}
				if bundleOut != "" {
					if err := writeJSON(bundleOut, b, 0o644); err != nil {
						return err
					}
				}
			}
			svc := &fleet.Service{CA: ca, Manufacturers: pool}
			ch, err := svc.Submit("", b)
			if err != nil {
				return err
			}
			resp, err := id.TPM.ActivateCredential(ctx, ch)
			if err != nil {
				return err
			}
			cert, err := svc.Complete("", resp)
			if err != nil {
				return err
			}
			return a.writeIssued(out, cert)
		},
	}
	f.add(cmd, true)
	fl := cmd.Flags()
	fl.StringVar(&bundle, "bundle", "", "use this bundle instead of attesting now")
	fl.StringVar(&bundleOut, "bundle-out", "", "also write the bundle made now to FILE")
	fl.StringVar(&cn, "cn", "", "device id (default: device_id)")
	fl.StringVarP(&out, "output", "o", "", "write the device certificate (PEM)")
	fl.String("tpm.device", "", "TPM device (default from config)")
	fl.BoolVar(&a.jsonOut, "json", false, "print the result as JSON")
	return cmd
}

func (a *app) newFleetServeCmd() *cobra.Command {
	var f caFlags
	var url, cert, key, brokerCA string
	cmd := &cobra.Command{
		Use:   "serve --ca-cert C --ca-key K --manufacturer-ca M --url mqtts://HOST:PORT --cert F --key F --broker-ca F",
		Short: "Answer enrolment requests on $fleet/certificates/+/request over MQTT",
		Long: `serve connects to the broker with the CA service's own identity (CN fleet-ca;
` + "`fleet ca init`" + ` writes fleet-ca.pem/.key) and answers each device on
$fleet/certificates/<id>/response. The broker's ACL must let user fleet-ca read
$fleet/certificates/+/request and write $fleet/certificates/+/response, and
each device only its own topics (scripts/provision-fleet.sh writes such an ACL).`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			pool, err := f.pool()
			if err != nil {
				return err
			}
			ca, err := f.ca()
			if err != nil {
				return err
			}
			if url == "" || cert == "" || key == "" || brokerCA == "" {
				return usagef("fleet ca serve: --url, --cert, --key and --broker-ca are required")
			}
			pair, err := tls.LoadX509KeyPair(cert, key)
			if err != nil {
				return usagef("fleet ca serve: --cert/--key: %v", err)
			}
			roots, err := fleet.CertPoolFromFiles(brokerCA)
			if err != nil {
				return usageError{err}
			}
			cfg, err := a.loadConfig(cmd)
			if err != nil {
				return err
			}
			svc := &fleet.Service{CA: ca, Manufacturers: pool, Logger: a.logger(cfg)}
			host := strings.TrimPrefix(strings.TrimPrefix(url, "mqtts://"), "ssl://")
			if i := strings.LastIndex(host, ":"); i > 0 {
				host = host[:i]
			}
			return svc.Serve(cmd.Context(), fleet.ServeOptions{BrokerURL: url,
				TLS: &tls.Config{MinVersion: tls.VersionTLS12, RootCAs: roots, Certificates: []tls.Certificate{pair}, ServerName: host}})
		},
	}
	f.add(cmd, true)
	fl := cmd.Flags()
	fl.StringVar(&url, "url", "", "broker URL (mqtts://HOST:PORT)")
	fl.StringVar(&cert, "cert", "", "the service's client certificate (CN fleet-ca)")
	fl.StringVar(&key, "key", "", "its private key")
	fl.StringVar(&brokerCA, "broker-ca", "", "CA certificate of the broker's server certificate")
	return cmd
}
