package main

import "github.com/spf13/cobra"

// Stub: replaced wholesale by the work that implements this command.
func (a *app) newRunCmd() *cobra.Command {
	return &cobra.Command{Use: "run", Short: "Run the agent daemon (not in this build yet)", RunE: a.notYet("run")}
}
