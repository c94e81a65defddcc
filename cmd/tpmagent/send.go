package main

import "github.com/spf13/cobra"

// Stub: replaced wholesale by the work that implements this command.
func (a *app) newSendCmd() *cobra.Command {
	return &cobra.Command{Use: "send", Short: "Hand readings to the running agent (not in this build yet)", RunE: a.notYet("send")}
}
