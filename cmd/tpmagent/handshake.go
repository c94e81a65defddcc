package main

import (
	"context"
	"crypto"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"os"
	"strings"

	"github.com/spf13/cobra"

	"github.com/tpmagent/tpmagent/agent/config"
	"github.com/tpmagent/tpmagent/agent/identity"
	"github.com/tpmagent/tpmagent/transport"
)

// newHandshakeCmd is `tpmagent handshake`: N mTLS connections to the broker
// with one session cache, each printed step by step.
func (a *app) newHandshakeCmd() *cobra.Command {
	var (
		jsonOut bool
		repeat  int
		keylog  string
		rawURL  string
	)
	cmd := &cobra.Command{
		Use:   "handshake [--json] [--repeat N] [--keylog FILE] [--url URL]",
		Short: "Connect to the broker with the TPM key and print every step of the TLS handshake",
		Long: `handshake makes one mutual-TLS connection to the broker (the first of
broker.urls, or --url), sends an MQTT CONNECT so that the broker's verdict on the
device certificate is seen, and prints each step of the handshake: ClientHello
(offered versions, cipher suites, key-exchange groups), ServerHello (chosen
version, suite, group), the broker's certificate chain and its verification
against broker.ca_file, the CertificateRequest and the client certificate sent,
the CertificateVerify signed inside the TPM (handle, duration), the traffic keys
derived (cipher and key length, never the keys), whether the session was
resumed, and the total time.

With --repeat N it connects N times with one session cache: the first
connection is a full handshake (one TPM signature), the others resume the
session without touching the TPM.

--json prints one JSON object per connection and line, with at least version,
cipher_suite, group, server_verified, client_cert_sent, resumed,
tpm_signatures (cumulative in this process) and handshake_ms.

--keylog FILE (or broker.keylog) appends the TLS secrets in NSS key log format
for Wireshark. Anyone with that file can decrypt the traffic: debugging only.

Exit status: 0 when every connection succeeded, 1 on a connection failure,
2 on a usage or configuration error.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if repeat < 1 {
				return usagef("handshake: --repeat %d: give a count of 1 or more", repeat)
			}
			cfg, err := a.loadConfig(cmd)
			if err != nil {
				return err
			}
			if keylog != "" {
				cfg.Broker.KeyLog = keylog
			}
			return a.runHandshake(cmd.Context(), cfg, rawURL, repeat, jsonOut)
		},
	}
	f := cmd.Flags()
	f.BoolVar(&jsonOut, "json", false, "print one JSON object per connection")
	f.IntVar(&repeat, "repeat", 1, "number of connections, sharing one TLS session cache")
	f.StringVar(&keylog, "keylog", "", "append TLS secrets to FILE (NSS key log format; debugging only)")
	f.StringVar(&rawURL, "url", "", "broker URL to connect to (default: the first of broker.urls)")
	return cmd
}

// runHandshake connects repeat times and prints the traces.
func (a *app) runHandshake(ctx context.Context, cfg *config.Config, rawURL string, repeat int, jsonOut bool) error {
	log := a.logger(cfg)
	if rawURL == "" {
		if len(cfg.Broker.URLs) == 0 {
			return usagef("handshake: broker.urls is empty: set it (e.g. [mqtts://broker:8883]) or pass --url")
		}
		rawURL = cfg.Broker.URLs[0]
	}
	scheme, hostport, _, err := transport.ParseBrokerURL(rawURL, cfg.Broker.AllowPlaintext)
	if err != nil {
		return usageError{err}
	}
	if scheme == "tcp" || scheme == "mqtt" {
		return usagef("handshake: %s is a plaintext URL: there is no TLS handshake to show; use an mqtts:// URL", rawURL)
	}

	signer, closeKey, err := handshakeDeviceKey(ctx, cfg, log)
	if err != nil {
		return err
	}
	defer closeKey()

	var keylogW io.Writer
	if cfg.Broker.KeyLog != "" {
		f, err := os.OpenFile(cfg.Broker.KeyLog, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o600)
		if err != nil {
			return fmt.Errorf("handshake: broker.keylog %s: %w", cfg.Broker.KeyLog, err)
		}
		defer f.Close()
		keylogW = f
	}
	id, err := transport.NewTLSConfig(transport.TLSOptions{
		Signer:       signer,
		CertFile:     cfg.Broker.CertFile,
		CAFile:       cfg.Broker.CAFile,
		ServerName:   cfg.Broker.ServerName,
		MinTLS:       cfg.Broker.MinTLS,
		KeyLogWriter: keylogW,
		Logger:       log,
	})
	if err != nil {
		if strings.Contains(err.Error(), "broker.min_tls") {
			return usageError{err}
		}
		return err
	}

	clientID := "tpmagent-handshake"
	if cfg.DeviceID != "" {
		clientID = cfg.DeviceID + "-handshake"
	}
	enc := json.NewEncoder(a.stdout)
	for i := 1; i <= repeat; i++ {
		tr, err := transport.Handshake(ctx, hostport, id, transport.HandshakeOptions{ClientID: clientID})
		if jsonOut {
			if encErr := enc.Encode(tr); encErr != nil {
				return encErr
			}
		} else {
			fmt.Fprintf(a.stdout, "connection %d of %d to %s:\n%s", i, repeat, rawURL, tr.Text())
			if i < repeat {
				fmt.Fprintln(a.stdout)
			}
		}
		if err != nil {
			return err
		}
		if ctx.Err() != nil {
			return ctx.Err()
		}
	}
	return nil
}

// handshakeDeviceKey returns the device key: the TPM key at tpm.key_handle, or a
// software key from broker.key_file (not protected by the TPM; logged).
func handshakeDeviceKey(ctx context.Context, cfg *config.Config, log *slog.Logger) (crypto.Signer, func(), error) {
	id, err := identity.Open(ctx, cfg, true, log)
	if err != nil {
		return nil, nil, fmt.Errorf("handshake: %w", err)
	}
	return id.Signer, func() { id.Close() }, nil
}
