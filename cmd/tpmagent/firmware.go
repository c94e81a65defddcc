package main

import "github.com/spf13/cobra"

// Stub: replaced wholesale by the work that implements this command.
func (a *app) newFirmwareCmd() *cobra.Command {
	return &cobra.Command{Use: "firmware", Short: "Firmware release and device side (not in this build yet)", RunE: a.notYet("firmware")}
}
