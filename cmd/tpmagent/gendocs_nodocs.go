//go:build nodocs

package main

import "github.com/spf13/cobra"

// newGenDocsCmd: device builds (-tags nodocs) have no gen-docs; the
// packaging generates man pages and completions with a host build.
func (a *app) newGenDocsCmd() *cobra.Command { return nil }
