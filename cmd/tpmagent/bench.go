package main

import "github.com/spf13/cobra"

// Stub: replaced wholesale by the work that implements this command.
func (a *app) newBenchCmd() *cobra.Command {
	return &cobra.Command{Use: "bench", Short: "Full pipeline under synthetic load (not in this build yet)", RunE: a.notYet("bench")}
}
