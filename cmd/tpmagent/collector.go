package main

import "github.com/spf13/cobra"

// Stub: replaced wholesale by the work that implements this command.
func (a *app) newCollectorCmd() *cobra.Command {
	return &cobra.Command{Use: "collector", Short: "Collector key management (keygen) (not in this build yet)", RunE: a.notYet("collector")}
}
