package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"syscall"

	"github.com/spf13/cobra"

	"github.com/tpmagent/tpmagent/agent/config"
	"github.com/tpmagent/tpmagent/agent/daemon"
)

// Exit codes (DESIGN.md): 0 ok, 1 runtime failure, 2 usage or config error.
const (
	exitOK      = 0
	exitFailure = 1
	exitUsage   = 2
)

// app holds what every command shares: the --config flag, output streams
// and the loaded configuration. Each command file adds one constructor
// (newXxxCmd) that takes the app.
type app struct {
	configFile     string
	configExplicit bool
	jsonOut        bool
	stdin          io.Reader
	stdout, stderr io.Writer
}

// usageError marks an error as a usage problem (exit 2).
type usageError struct{ err error }

func (e usageError) Error() string { return e.err.Error() }
func (e usageError) Unwrap() error { return e.err }

// usagef returns a usage error (exit code 2).
func usagef(format string, args ...any) error { return usageError{fmt.Errorf(format, args...)} }

// Main runs the CLI with os.Args and returns the exit code; testscript calls
// it as the "tpmagent" command.
func Main() int {
	a := &app{stdin: os.Stdin, stdout: os.Stdout, stderr: os.Stderr}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	root := a.rootCmd()
	root.SetArgs(os.Args[1:])
	err := root.ExecuteContext(ctx)
	if err == nil {
		return exitOK
	}
	if errors.Is(err, daemon.ErrRestart) {
		// An installed update asks for a restart (systemd: Restart=on-failure,
		// RestartForceExitStatus=75).
		fmt.Fprintln(a.stderr, "tpmagent: "+err.Error())
		return daemon.RestartExitCode
	}
	fmt.Fprintln(a.stderr, "tpmagent: "+err.Error())
	var ue usageError
	if errors.As(err, &ue) || config.IsConfigError(err) {
		return exitUsage
	}
	return exitFailure
}

func (a *app) rootCmd() *cobra.Command {
	root := &cobra.Command{
		Use:   "tpmagent",
		Short: "Device agent with a TPM-resident key: mTLS MQTT telemetry, sealed telemetry, signed firmware updates",
		Long: `tpmagent keeps the device's private key inside a TPM 2.0, uses it for mutual
TLS 1.3 to MQTT brokers, publishes telemetry through a durable spool, and takes
signed firmware updates. Configuration: --config FILE (default ` + config.DefaultFile + `),
TPMAGENT_* environment variables (TPMAGENT_TPM_DEVICE for tpm.device), flags.`,
		SilenceUsage:  true,
		SilenceErrors: true,
	}
	root.SetOut(a.stdout)
	root.SetErr(a.stderr)
	root.SetFlagErrorFunc(func(_ *cobra.Command, err error) error { return usageError{err} })
	root.PersistentFlags().StringVar(&a.configFile, "config", config.DefaultFile, "configuration file (YAML)")
	root.PersistentPreRun = func(cmd *cobra.Command, _ []string) {
		a.configExplicit = cmd.Flags().Changed("config")
	}
	for _, c := range []*cobra.Command{
		a.newVersionCmd(),
		a.newKeyCmd(),
		a.newHandshakeCmd(),
		a.newRunCmd(),
		a.newSendCmd(),
		a.newStatusCmd(),
		a.newBenchCmd(),
		a.newCollectorCmd(),
		a.newCollectCmd(),
		a.newFirmwareCmd(),
		a.newGenDocsCmd(),
		a.newFleetCmd(),
		a.newCertCmd(),
	} {
		if c != nil { // gen-docs in -tags nodocs builds
			root.AddCommand(c)
		}
	}
	return root
}

// loadConfig loads the configuration for cmd: the --config file, the
// environment, and cmd's flags whose names are config keys ("tpm.device").
func (a *app) loadConfig(cmd *cobra.Command) (*config.Config, error) {
	return config.Load(a.configFile, a.configExplicit || cmd.Flags().Changed("config"), cmd.Flags())
}

// logger builds the process logger from cfg.Log: text or JSON on stderr;
// without timestamps when journald captures stderr (JOURNAL_STREAM set).
func (a *app) logger(cfg *config.Config) *slog.Logger {
	level := new(slog.LevelVar)
	_ = level.UnmarshalText([]byte(cfg.Log.Level))
	return a.loggerWithLevel(cfg, level)
}

// loggerWithLevel is logger with a level that can change later (SIGHUP).
func (a *app) loggerWithLevel(cfg *config.Config, level slog.Leveler) *slog.Logger {
	opts := &slog.HandlerOptions{Level: level}
	if os.Getenv("JOURNAL_STREAM") != "" {
		opts.ReplaceAttr = func(groups []string, at slog.Attr) slog.Attr {
			if len(groups) == 0 && at.Key == slog.TimeKey {
				return slog.Attr{}
			}
			return at
		}
	}
	if cfg.Log.Format == "json" {
		return slog.New(slog.NewJSONHandler(a.stderr, opts))
	}
	return slog.New(slog.NewTextHandler(a.stderr, opts))
}
