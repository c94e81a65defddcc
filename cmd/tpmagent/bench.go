package main

import (
	"encoding/json"
	"fmt"
	"os"
	"runtime/pprof"
	"time"

	"github.com/spf13/cobra"

	"github.com/tpmagent/tpmagent/agent"
	"github.com/tpmagent/tpmagent/agent/batch"
	"github.com/tpmagent/tpmagent/agent/daemon"
	"github.com/tpmagent/tpmagent/agent/spool"
)

// newBenchCmd: tpmagent bench, the whole pipeline under synthetic load.
func (a *app) newBenchCmd() *cobra.Command {
	var (
		o       daemon.BenchOptions
		qos     int
		fsync   string
		encName string
		asJSON  bool
		cpuProf string
	)
	cmd := &cobra.Command{
		Use:   "bench",
		Short: "Full pipeline under synthetic load: msgs/s, readings/s, MB/s, TPM signatures, peak RSS",
		Long: `bench runs synthetic readings through the whole pipeline (batcher, optional
sealing, a spool of its own in a temporary directory, the MQTT publisher with
its in-flight window) to the configured broker with the device's TPM identity,
and prints what it measured. Each reading's value is its sequence number, so
a subscriber can check that every one arrived.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			cfg, err := a.loadConfig(cmd)
			if err != nil {
				return err
			}
			if qos != 0 && qos != 1 {
				return usagef("bench: --qos %d: must be 0 or 1", qos)
			}
			o.QoS = byte(qos)
			if o.Fsync, err = spool.ParseFsync(fsync); err != nil {
				return usagef("bench: --fsync %q: %v", fsync, err)
			}
			if o.Encoder, err = batch.NewEncoder(encName); err != nil {
				return usagef("bench: --encoding %q: %v", encName, err)
			}
			if cpuProf != "" {
				f, err := os.Create(cpuProf)
				if err != nil {
					return fmt.Errorf("bench: --cpuprofile: %w", err)
				}
				defer f.Close()
				if err := pprof.StartCPUProfile(f); err != nil {
					return fmt.Errorf("bench: --cpuprofile: %w", err)
				}
				defer pprof.StopCPUProfile()
			}
			res, err := daemon.Bench(cmd.Context(), cfg, a.logger(cfg), o)
			if err != nil {
				return err
			}
			if asJSON {
				return json.NewEncoder(a.stdout).Encode(res)
			}
			printBench(a, res)
			return nil
		},
	}
	f := cmd.Flags()
	f.IntVar(&o.Count, "count", 200000, "synthetic readings")
	f.IntVar(&qos, "qos", 1, "MQTT QoS (0 or 1)")
	f.IntVar(&o.Size, "size", 64, "approximate JSON size of one reading in bytes")
	f.IntVar(&o.Batch, "batch", 1, "readings per message")
	f.DurationVar(&o.Linger, "linger", 2*time.Millisecond, "longest a batch waits to fill")
	f.StringVar(&fsync, "fsync", "batch", "spool durability: always, batch or never")
	f.StringVar(&encName, "encoding", "json", "batch encoding: json or cbor")
	f.BoolVar(&o.Seal, "seal", false, "seal every batch end to end (HPKE session to a throwaway collector key)")
	f.BoolVar(&asJSON, "json", false, "print one JSON object")
	f.StringVar(&cpuProf, "cpuprofile", "", "write a CPU profile to this file (go tool pprof)")
	return cmd
}

func printBench(a *app, r agent.BenchResult) {
	w := a.stdout
	fmt.Fprintf(w, "messages:        %d (QoS %d, %d readings each at most, sealed %v)\n", r.Messages, r.QoS, r.Batch, r.Sealed)
	fmt.Fprintf(w, "readings:        %d\n", r.Readings)
	fmt.Fprintf(w, "bytes:           %d\n", r.Bytes)
	fmt.Fprintf(w, "seconds:         %.3f\n", r.Seconds)
	fmt.Fprintf(w, "msgs/s:          %.0f\n", r.MsgsPerS)
	fmt.Fprintf(w, "readings/s:      %.0f\n", r.ReadingsPerS)
	fmt.Fprintf(w, "MB/s:            %.2f\n", r.MBPerS)
	fmt.Fprintf(w, "tpm signatures:  %d\n", r.TPMSignatures)
	fmt.Fprintf(w, "peak RSS:        %d KiB (at the end: %d KiB private, %d KiB of the binary)\n", r.RSSPeakKiB, r.RSSAnonKiB, r.RSSFileKiB)
}
