package main

import (
	"context"
	"crypto"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/tpmagent/tpmagent/agent"
	"github.com/tpmagent/tpmagent/agent/config"
	"github.com/tpmagent/tpmagent/agent/identity"
	"github.com/tpmagent/tpmagent/collector"
	"github.com/tpmagent/tpmagent/transport"
	"github.com/tpmagent/tpmagent/transport/seal"
)

// newCollectCmd is `tpmagent collect`: the sealed-telemetry backend.
func (a *app) newCollectCmd() *cobra.Command {
	var (
		output    string
		stateDir  string
		jsonStats bool
		clientID  string
	)
	cmd := &cobra.Command{
		Use:   "collect [--output FILE] [--state-dir DIR] [--json-stats] [--client-id ID]",
		Short: "Backend: subscribe, verify and open sealed telemetry, write JSON lines, count gaps and rejections",
		Long: `collect is the fleet backend for sealed telemetry (docs/SEALED-TELEMETRY.md).
It connects to broker.urls with its own mutual-TLS identity (broker.cert_file
with the key in broker.key_file, a PEM file, or else the TPM key at
tpm.key_handle), subscribes at QoS 1 with a persistent session to
devices/+/sessions and to the sealed telemetry topic (telemetry.topic with
{device_id} as "+", plus /sealed), and:

  - accepts a session announcement only if its certificate chain verifies to
    seal.fleet_ca, the certificate CN is the device id of the topic, and the
    device key's signature is valid;
  - opens frames with seal.collector_private_key, rejecting forged, altered,
    moved and replayed frames, and parks frames that overtake their
    announcement;
  - writes one JSON line per reading to seal.output / --output (default "-",
    standard output; a file is appended to, mode 0600):
    {"device","session","seq","topic","reading":{"name","value","unit","ts","tags"}}
    QoS 1 redeliveries are suppressed: every reading is written exactly once
    while the process runs.

With seal.state_dir / --state-dir the replay windows and the committed
output length are kept on disk (DIR/collector.state and DIR/collector.log),
so a restarted collector neither writes a reading again nor leaves a torn
line: output is written, then fsynced together with the state every 20 ms,
and lines written after the last commit are truncated at the next start
(their frames come again from the broker). A damaged state file stops the
collector (exit 2) with the file and the fix; it never starts from empty on
its own. Sessions older than seal.max_session_age are forgotten. Guarantees
and limits: docs/SEALED-TELEMETRY.md section 8.5.

It runs until SIGINT or SIGTERM, then prints its counters (opened, readings,
gaps, replays_rejected, forged_rejected, wrong_device, unknown_session,
bad_announcements, ...): to standard output when the readings go to a file,
to standard error when they go to standard output. --json-stats prints them
as one JSON object.

Exit status: 0 after a signal, 1 on a runtime failure, 2 on a usage or
configuration error.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			cfg, err := a.loadConfig(cmd)
			if err != nil {
				return err
			}
			if cmd.Flags().Changed("output") {
				cfg.Seal.Output = output
			}
			if cmd.Flags().Changed("state-dir") {
				cfg.Seal.StateDir = stateDir
			}
			return a.runCollect(cmd.Context(), cfg, clientID, jsonStats)
		},
	}
	f := cmd.Flags()
	f.StringVar(&output, "output", "", `file the JSON lines are appended to ("-": standard output; default seal.output)`)
	f.StringVar(&stateDir, "state-dir", "", "directory of the durable collector state (default seal.state_dir; empty: in memory only)")
	f.BoolVar(&jsonStats, "json-stats", false, "print the counters on exit as one JSON object")
	f.StringVar(&clientID, "client-id", "", `MQTT client id, stable so the broker keeps the session (default: device_id, else "tpmagent-collector")`)
	return cmd
}

// runCollect runs the collector until ctx ends.
func (a *app) runCollect(ctx context.Context, cfg *config.Config, clientID string, jsonStats bool) error {
	log := a.logger(cfg)
	if err := cfg.RequireBroker(); err != nil {
		return err
	}
	if cfg.Seal.CollectorPrivateKey == "" {
		return &config.FieldError{Field: "seal.collector_private_key", File: cfg.File, Msg: "is empty: point it at the key made by `tpmagent collector keygen -o FILE`"}
	}
	if cfg.Seal.FleetCA == "" {
		return &config.FieldError{Field: "seal.fleet_ca", File: cfg.File, Msg: "is empty: point it at the PEM CA certificate(s) that device certificates chain to"}
	}
	priv, err := seal.LoadPrivateKey(cfg.Seal.CollectorPrivateKey)
	if err != nil {
		return usageError{fmt.Errorf("seal.collector_private_key: %w", err)}
	}
	fleet, err := loadCertPool(cfg.Seal.FleetCA)
	if err != nil {
		return usageError{err}
	}
	col, err := seal.NewCollector(priv, fleet, seal.CollectorOptions{MaxSessionAge: cfg.Seal.MaxSessionAge})
	if err != nil {
		return fmt.Errorf("collect: %w", err)
	}

	out, statsOut := a.stdout, a.stderr
	var outFile *os.File
	if cfg.Seal.Output != "" && cfg.Seal.Output != "-" {
		f, err := os.OpenFile(cfg.Seal.Output, os.O_RDWR|os.O_CREATE|os.O_APPEND, 0o600)
		if err != nil {
			return fmt.Errorf("collect: seal.output %s: %w (check the directory exists and is writable)", cfg.Seal.Output, err)
		}
		defer f.Close()
		out, statsOut, outFile = f, a.stdout, f
	}
	var state *collector.State
	if cfg.Seal.StateDir != "" {
		state, err = collector.OpenState(cfg.Seal.StateDir, collector.StateOptions{
			Output:        outFile,
			MaxSessionAge: cfg.Seal.MaxSessionAge,
			Logger:        log,
		})
		if err != nil {
			return usageError{fmt.Errorf("collect: seal.state_dir: %w", err)}
		}
		defer state.Close()
		log.Info("collector state opened", "dir", cfg.Seal.StateDir, "state", state.Describe(), "truncated_bytes", state.Truncated())
	} else {
		log.Warn("seal.state_dir is empty: readings are exactly-once only while this process runs (a restart writes redelivered frames again)")
	}
	framesFilter := strings.ReplaceAll(cfg.Telemetry.Topic, "{device_id}", "+") + agent.SealedSuffix
	run, err := collector.New(collector.Options{
		Collector:      col,
		Output:         out,
		SessionsFilter: collector.DefaultSessionsFilter,
		FramesFilter:   framesFilter,
		Logger:         log,
		State:          state,
	})
	if err != nil {
		return err
	}

	signer, closeKey, err := collectorKey(ctx, cfg, log)
	if err != nil {
		return err
	}
	defer closeKey()
	id, err := transport.NewTLSConfig(transport.TLSOptions{
		Signer:     signer,
		CertFile:   cfg.Broker.CertFile,
		CAFile:     cfg.Broker.CAFile,
		ServerName: cfg.Broker.ServerName,
		MinTLS:     cfg.Broker.MinTLS,
		Logger:     log,
	})
	if err != nil {
		return fmt.Errorf("collect: %w", err)
	}
	if clientID == "" {
		clientID = cfg.DeviceID
	}
	if clientID == "" {
		clientID = "tpmagent-collector"
	}
	client, err := transport.NewClient(transport.ClientOptions{
		URLs:           cfg.Broker.URLs,
		TLS:            id.Config(),
		AllowPlaintext: cfg.Broker.AllowPlaintext,
		ClientID:       clientID,
		Keepalive:      cfg.Broker.Keepalive,
		CleanSession:   cfg.Broker.CleanSession,
		BackoffBase:    cfg.Broker.BackoffBase,
		BackoffMax:     cfg.Broker.BackoffMax,
		StatusTopic:    "-",
		Logger:         log,
		ExplainError:   id.ExplainTLSError,
	})
	if err != nil {
		return usageError{fmt.Errorf("collect: %w", err)}
	}
	connCtx, stopConn := context.WithCancel(context.WithoutCancel(ctx))
	defer stopConn()
	if err := client.Start(connCtx); err != nil {
		return fmt.Errorf("collect: %w", err)
	}
	log.Info("collector running", "brokers", cfg.Broker.URLs, "client_id", clientID,
		"sessions", collector.DefaultSessionsFilter, "frames", framesFilter, "output", cfg.Seal.Output)
	if err := run.Subscribe(ctx, client); err != nil {
		stopConn()
		return fmt.Errorf("collect: %w", err)
	}
	runErr := run.Run(ctx)
	closeCtx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
	if err := client.Close(closeCtx); err != nil && !errors.Is(err, transport.ErrClosed) {
		log.Warn("broker disconnect", "err", err)
	}
	cancel()
	if err := run.Flush(); err != nil && runErr == nil {
		runErr = err
	}
	if err := printCollectStats(statsOut, run.Stats(), jsonStats); err != nil && runErr == nil {
		runErr = err
	}
	return runErr
}

// printCollectStats prints the counters, one "name value" per line or as JSON.
func printCollectStats(w io.Writer, s collector.Stats, asJSON bool) error {
	if asJSON {
		return json.NewEncoder(w).Encode(s)
	}
	rows := []struct {
		name string
		v    any
	}{
		{"opened", s.Opened}, {"readings", s.Readings}, {"gaps", s.Gaps},
		{"replays_rejected", s.Replays}, {"too_old_rejected", s.TooOld}, {"forged_rejected", s.Forged},
		{"wrong_device", s.WrongDevice}, {"malformed", s.Malformed},
		{"unknown_session", s.Unknown}, {"held", s.Held}, {"expired", s.Expired},
		{"announcements", s.Announcements}, {"bad_announcements", s.BadAnnouncements},
		{"sessions", s.Sessions}, {"decode_errors", s.DecodeErrors}, {"write_errors", s.WriteErrors},
		{"commits", s.Commits}, {"restored_sessions", s.Restored},
	}
	for _, r := range rows {
		if _, err := fmt.Fprintf(w, "%-18s %v\n", r.name, r.v); err != nil {
			return err
		}
	}
	return nil
}

// loadCertPool reads PEM CA certificates (seal.fleet_ca).
func loadCertPool(path string) (*x509.CertPool, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("seal.fleet_ca %s: %w", path, err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(b) {
		return nil, fmt.Errorf("seal.fleet_ca %s: no PEM CERTIFICATE found (want the CA that issues device certificates)", path)
	}
	return pool, nil
}

// collectorKey returns the collector's own TLS key: broker.key_file (PEM; a
// server-side collector may keep its key in a file) or the TPM key.
func collectorKey(ctx context.Context, cfg *config.Config, log *slog.Logger) (crypto.Signer, func(), error) {
	id, err := identity.Open(ctx, cfg, true, log)
	switch {
	case err != nil && cfg.Broker.KeyFile != "":
		return nil, nil, usageError{fmt.Errorf("collect: %w", err)}
	case err != nil:
		return nil, nil, fmt.Errorf("collect: %w (or set broker.key_file to use a key file)", err)
	}
	return id.Signer, func() { id.Close() }, nil
}
