package daemon

import (
	"context"
	"fmt"
	"log/slog"
	"time"

	"github.com/tpmagent/tpmagent/agent"
	"github.com/tpmagent/tpmagent/agent/config"
	"github.com/tpmagent/tpmagent/agent/sdnotify"
	"github.com/tpmagent/tpmagent/agent/status"
	"github.com/tpmagent/tpmagent/transport/seal"
)

// BenchOptions configure Bench: the synthetic load and whether to seal.
type BenchOptions struct {
	agent.BenchOptions
	// Seal seals every batch for a throwaway collector key (the device's
	// TPM key signs the session announcement, as in production).
	Seal bool
}

// Bench runs the whole pipeline (synthetic source → batcher → [sealer] →
// spool → publisher) against the configured broker with the device's real
// identity: the same start-up as Run (TPM key, TLS 1.3, MQTT client), its own
// spool in a temporary directory, then agent.Bench.
func Bench(ctx context.Context, cfg *config.Config, log *slog.Logger, opts BenchOptions) (agent.BenchResult, error) {
	d := &daemon{cfg: cfg, log: log, notify: sdnotify.New(log), counters: &status.Counters{}, clientSuffix: "-bench"}
	if err := cfg.RequireDeviceID(); err != nil {
		return agent.BenchResult{}, err
	}
	if err := cfg.RequireBroker(); err != nil {
		return agent.BenchResult{}, err
	}
	defer d.close()
	d.cfg.Telemetry.Socket = "" // bench does not own the agent's socket
	for _, step := range []func(context.Context) error{d.openIdentity, d.buildTLS, d.connect} {
		if err := step(ctx); err != nil {
			return agent.BenchResult{}, err
		}
	}
	wctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	err := d.client.WaitConnected(wctx)
	cancel()
	if err != nil {
		return agent.BenchResult{}, fmt.Errorf("bench: no broker connection within 30 s (%v): %w", cfg.Broker.URLs, err)
	}
	o := opts.BenchOptions
	o.TPMSignatures = d.id.Signatures
	if o.Topic == "" {
		o.Topic = cfg.Expand(cfg.Telemetry.Topic)
	}
	if opts.Seal {
		chain, err := agent.LoadCertChain(cfg.Broker.CertFile)
		if err != nil {
			return agent.BenchResult{}, err
		}
		s, _, err := agent.NewBenchSealing(cfg.DeviceID, d.id.Signer, chain, seal.DefaultSuite)
		if err != nil {
			return agent.BenchResult{}, fmt.Errorf("bench: %w", err)
		}
		o.Sealer = s
	}
	return agent.Bench(ctx, d.client, o)
}
