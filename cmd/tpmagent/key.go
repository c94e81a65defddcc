package main

import "github.com/spf13/cobra"

// Stub: replaced wholesale by the work that implements this command.
func (a *app) newKeyCmd() *cobra.Command {
	return &cobra.Command{Use: "key", Short: "Create, show and certify the TPM-resident device key (not in this build yet)", RunE: a.notYet("key")}
}
