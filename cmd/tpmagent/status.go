package main

import (
	"context"
	"encoding/json"
	"fmt"
	"time"

	"github.com/spf13/cobra"

	"github.com/tpmagent/tpmagent/agent/status"
)

// newStatusCmd: tpmagent status [--json], the live counters of the running
// agent read from status.socket.
func (a *app) newStatusCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "status",
		Short: "Live counters from the running agent (status.socket)",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			cfg, err := a.loadConfig(cmd)
			if err != nil {
				return err
			}
			ctx, cancel := context.WithTimeout(cmd.Context(), 10*time.Second)
			defer cancel()
			s, err := status.Fetch(ctx, cfg.Status.Socket)
			if err != nil {
				return err
			}
			if a.jsonOut {
				enc := json.NewEncoder(a.stdout)
				enc.SetIndent("", "  ")
				return enc.Encode(s)
			}
			broker := s.Broker
			if broker == "" {
				broker = "(not connected)"
			}
			w := a.stdout
			fmt.Fprintf(w, "broker:             %s\n", broker)
			fmt.Fprintf(w, "uptime:             %s\n", (time.Duration(s.UptimeSeconds) * time.Second).String())
			fmt.Fprintf(w, "readings in:        %d (rejected %d)\n", s.ReadingsIn, s.ReadingsRejected)
			fmt.Fprintf(w, "messages:           published %d, acked %d, failed %d (%d bytes)\n", s.MessagesPublished, s.MessagesAcked, s.MessagesFailed, s.BytesPublished)
			fmt.Fprintf(w, "spool:              %d records, %d bytes, %d dropped\n", s.Spool.Records, s.Spool.Bytes, s.Spool.Dropped)
			fmt.Fprintf(w, "reconnects:         %d\n", s.Reconnects)
			fmt.Fprintf(w, "tpm signatures:     %d\n", s.TPMSignatures)
			if m := s.Memory; m != nil {
				fmt.Fprintf(w, "memory:             %d KiB resident (peak %d; private %d, binary and files %d)\n", m.RSSKiB, m.RSSPeakKiB, m.AnonKiB, m.FileKiB)
			}
			if c := s.Certificate; c != nil {
				fmt.Fprintf(w, "certificate:        serial %s, key %s, expires %s, renewal %s at %s (%d renewals, %d failures)\n",
					c.Serial, c.KeyHandle, c.NotAfter.Format(time.RFC3339), c.RenewalState, c.RenewAt.Format(time.RFC3339), c.Renewals, c.Failures)
			}
			if s.LastError != "" {
				fmt.Fprintf(w, "last error:         %s (%s)\n", s.LastError, s.LastErrorTime.Format(time.RFC3339))
			}
			return nil
		},
	}
	cmd.Flags().BoolVar(&a.jsonOut, "json", false, "print the snapshot as JSON")
	return cmd
}
