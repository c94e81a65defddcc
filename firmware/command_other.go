//go:build !unix

package firmware

import "os/exec"

// setProcessGroup is a no-op where process groups do not exist; cancellation kills the child.
func setProcessGroup(*exec.Cmd) {}
