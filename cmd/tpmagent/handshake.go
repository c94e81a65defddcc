package main

import "github.com/spf13/cobra"

// Stub: replaced wholesale by the work that implements this command.
func (a *app) newHandshakeCmd() *cobra.Command {
	return &cobra.Command{Use: "handshake", Short: "One mTLS connection to the broker, printed step by step (not in this build yet)", RunE: a.notYet("handshake")}
}
