package main

import (
	"log/slog"
	"os"
	"os/signal"
	"syscall"

	"github.com/spf13/cobra"

	"github.com/tpmagent/tpmagent/agent/config"
	"github.com/tpmagent/tpmagent/agent/daemon"
)

func (a *app) newRunCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "run",
		Short: "Run the agent daemon (telemetry, spool, status; systemd notify)",
		Long: `run opens the TPM-resident device key, connects to the brokers with mutual
TLS 1.3, and publishes telemetry from the telemetry socket through the durable
spool. SIGTERM drains and stops; SIGHUP reloads the certificate and log level.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			cfg, err := a.loadConfig(cmd)
			if err != nil {
				return err
			}
			level := new(slog.LevelVar)
			_ = level.UnmarshalText([]byte(cfg.Log.Level))
			log := a.loggerWithLevel(cfg, level)
			hup := make(chan os.Signal, 1)
			signal.Notify(hup, syscall.SIGHUP)
			defer signal.Stop(hup)
			reload := make(chan struct{}, 1)
			go func() {
				for range hup {
					select {
					case reload <- struct{}{}:
					default:
					}
				}
			}()
			return daemon.Run(cmd.Context(), daemon.Options{
				Config:   cfg,
				Logger:   log,
				LogLevel: level,
				Reload:   reload,
				ReloadConfig: func() (*config.Config, error) {
					return a.loadConfig(cmd)
				},
			})
		},
	}
}
