//go:build !nodocs

package main

import (
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"time"

	"github.com/spf13/cobra"
	"github.com/spf13/cobra/doc"
)

// newGenDocsCmd is the hidden "gen-docs" command the packaging uses
// (scripts/deb.sh): man pages for every visible command (section 1) and
// bash, zsh and fish completions, written under the given directories with
// the names the Debian paths expect (bash: tpmagent, zsh: _tpmagent, fish:
// tpmagent.fish). SOURCE_DATE_EPOCH, when set, dates the man pages so that
// package builds are reproducible. Device builds leave it out (-tags
// nodocs): cobra/doc and its markdown renderer cost 260 KB of binary and
// 100 KB of heap at every start.
func (a *app) newGenDocsCmd() *cobra.Command {
	var manDir, complDir string
	cmd := &cobra.Command{
		Use:    "gen-docs",
		Short:  "Generate man pages and shell completions (for packaging)",
		Hidden: true,
		Args:   cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if manDir == "" && complDir == "" {
				return usagef("gen-docs: give --man DIR and/or --completions DIR")
			}
			root := cmd.Root()
			root.DisableAutoGenTag = true
			if manDir != "" {
				if err := genMan(root, manDir); err != nil {
					return err
				}
			}
			if complDir != "" {
				if err := genCompletions(root, complDir); err != nil {
					return err
				}
			}
			return nil
		},
	}
	cmd.Flags().StringVar(&manDir, "man", "", "directory for man pages (tpmagent.1, tpmagent-run.1, ...)")
	cmd.Flags().StringVar(&complDir, "completions", "", "directory for completions (tpmagent, _tpmagent, tpmagent.fish)")
	return cmd
}

// genMan writes one section-1 man page per visible command into dir.
func genMan(root *cobra.Command, dir string) error {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return fmt.Errorf("gen-docs: create man directory: %w", err)
	}
	date := time.Now()
	if s := os.Getenv("SOURCE_DATE_EPOCH"); s != "" {
		sec, err := strconv.ParseInt(s, 10, 64)
		if err != nil {
			return usagef("gen-docs: SOURCE_DATE_EPOCH=%q is not a Unix time in seconds", s)
		}
		date = time.Unix(sec, 0).UTC()
	}
	header := &doc.GenManHeader{
		Title:   "TPMAGENT",
		Section: "1",
		Date:    &date,
		Source:  "tpmagent " + version,
		Manual:  "tpmagent manual",
	}
	if err := doc.GenManTree(root, header, dir); err != nil {
		return fmt.Errorf("gen-docs: write man pages to %s: %w", dir, err)
	}
	return nil
}

// genCompletions writes bash, zsh and fish completion scripts into dir.
func genCompletions(root *cobra.Command, dir string) error {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return fmt.Errorf("gen-docs: create completions directory: %w", err)
	}
	gens := []struct {
		file string
		gen  func(f *os.File) error
	}{
		{"tpmagent", func(f *os.File) error { return root.GenBashCompletionV2(f, true) }},
		{"_tpmagent", func(f *os.File) error { return root.GenZshCompletion(f) }},
		{"tpmagent.fish", func(f *os.File) error { return root.GenFishCompletion(f, true) }},
	}
	for _, g := range gens {
		path := filepath.Join(dir, g.file)
		f, err := os.Create(path)
		if err != nil {
			return fmt.Errorf("gen-docs: %w", err)
		}
		err = g.gen(f)
		if cerr := f.Close(); err == nil {
			err = cerr
		}
		if err != nil {
			return fmt.Errorf("gen-docs: write %s: %w", path, err)
		}
	}
	return nil
}
