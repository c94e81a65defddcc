package config

import (
	"fmt"
	"os"
	"path/filepath"
)

// CheckPermissions returns one warning for every way the configuration file
// at path, or a directory on its way, can be read or changed by users other
// than its owner: a config names the key handles, the certificate and the
// broker, and whoever can write it can point the agent elsewhere. The
// warnings say what to run; nil means the permissions are tight. A file
// that cannot be examined gives one warning naming the error.
func CheckPermissions(path string) []string {
	if path == "" {
		return nil
	}
	abs, err := filepath.Abs(path)
	if err != nil {
		return []string{fmt.Sprintf("config %s: cannot check permissions: %v", path, err)}
	}
	fi, err := os.Stat(abs)
	if err != nil {
		return []string{fmt.Sprintf("config %s: cannot check permissions: %v", path, err)}
	}
	var warns []string
	mode := fi.Mode().Perm()
	if mode&0o004 != 0 {
		warns = append(warns, fmt.Sprintf("config %s is readable by every user (mode %04o): run `chmod o-rwx %s` (0640, group tpmagent, is enough)", path, mode, path))
	}
	if mode&0o022 != 0 {
		warns = append(warns, fmt.Sprintf("config %s is writable by group or others (mode %04o): run `chmod go-w %s`", path, mode, path))
	}
	// A directory on the way that others can write lets them swap the file
	// (sticky directories such as /tmp excepted).
	for dir := filepath.Dir(abs); ; dir = filepath.Dir(dir) {
		if di, err := os.Stat(dir); err == nil {
			m := di.Mode()
			if m.Perm()&0o002 != 0 && m&os.ModeSticky == 0 {
				warns = append(warns, fmt.Sprintf("config %s: directory %s is writable by every user (mode %04o): run `chmod o-w %s`", path, dir, m.Perm(), dir))
			}
		}
		if parent := filepath.Dir(dir); parent == dir {
			break
		}
	}
	return warns
}
