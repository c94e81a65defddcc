package main

import "github.com/spf13/cobra"

// Stub: replaced wholesale by the work that implements this command.
func (a *app) newStatusCmd() *cobra.Command {
	return &cobra.Command{Use: "status", Short: "Live counters from the running agent (not in this build yet)", RunE: a.notYet("status")}
}
