package main

import (
	"os"
	"testing"

	"github.com/rogpeppe/go-internal/testscript"
)

// TestMain lets testscript run this binary as "tpmagent".
func TestMain(m *testing.M) {
	testscript.Main(m, map[string]func(){
		"tpmagent": func() { os.Exit(Main()) },
	})
}

// TestScripts runs testdata/script/*.txtar. Scripts get $SWTPM (a
// swtpm://127.0.0.1:PORT URL) from the "swtpm" command, which starts a
// fresh swtpm for that script; see scriptCmds.
func TestScripts(t *testing.T) {
	testscript.Run(t, testscript.Params{
		Dir:                 "testdata/script",
		Setup:               scriptSetup(t),
		Cmds:                scriptCmds(),
		RequireExplicitExec: false,
	})
}
