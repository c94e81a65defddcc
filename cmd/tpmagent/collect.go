package main

import "github.com/spf13/cobra"

// Stub: replaced wholesale by the work that implements this command.
func (a *app) newCollectCmd() *cobra.Command {
	return &cobra.Command{Use: "collect", Short: "Backend: open sealed telemetry (not in this build yet)", RunE: a.notYet("collect")}
}
