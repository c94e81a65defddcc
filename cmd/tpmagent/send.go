package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/tpmagent/tpmagent/agent/source"
)

// newSendCmd: tpmagent send [--name N --value V [--unit U] [--tag k=v]] or
// JSON lines on stdin, handed to the running agent's telemetry socket.
func (a *app) newSendCmd() *cobra.Command {
	var name, unit string
	var value float64
	var tags []string
	cmd := &cobra.Command{
		Use:   "send",
		Short: "Hand readings to the running agent (--name/--value, or JSON lines on stdin)",
		Long: `Hands readings to the running agent over telemetry.socket and prints one reply
per reading: "ok" once it is durable in the spool, or the reason it was rejected.
Exits 1 when any reading was rejected.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			cfg, err := a.loadConfig(cmd)
			if err != nil {
				return err
			}
			var in io.Reader = a.stdin
			if cmd.Flags().Changed("name") || cmd.Flags().Changed("value") {
				if name == "" || !cmd.Flags().Changed("value") {
					return usagef("send: give both --name and --value, or JSON lines on stdin")
				}
				obj := map[string]any{"name": name, "value": value}
				if unit != "" {
					obj["unit"] = unit
				}
				if len(tags) > 0 {
					m := map[string]string{}
					for _, t := range tags {
						k, v, ok := strings.Cut(t, "=")
						if !ok || k == "" {
							return usagef("send: --tag %q: write it as key=value", t)
						}
						m[k] = v
					}
					obj["tags"] = m
				}
				b, _ := json.Marshal(obj)
				in = strings.NewReader(string(b) + "\n")
			}
			ctx, cancel := context.WithTimeout(cmd.Context(), 10*time.Minute)
			defer cancel()
			ok, rejected, err := source.Send(ctx, cfg.Telemetry.Socket, in, func(_ int, reply string) {
				if reply != "ok" || !a.jsonOut {
					fmt.Fprintln(a.stdout, reply)
				}
			})
			if err != nil {
				return fmt.Errorf("send: %w", err)
			}
			if a.jsonOut {
				_ = json.NewEncoder(a.stdout).Encode(map[string]int{"ok": ok, "rejected": rejected})
			}
			if rejected > 0 {
				return fmt.Errorf("send: %d of %d readings rejected (reasons above)", rejected, ok+rejected)
			}
			return nil
		},
	}
	cmd.Flags().StringVar(&name, "name", "", "reading name")
	cmd.Flags().Float64Var(&value, "value", 0, "reading value")
	cmd.Flags().StringVar(&unit, "unit", "", "unit")
	cmd.Flags().StringArrayVar(&tags, "tag", nil, "tag key=value (repeatable)")
	cmd.Flags().BoolVar(&a.jsonOut, "json", false, "print only rejections, then {\"ok\":N,\"rejected\":M}")
	return cmd
}
