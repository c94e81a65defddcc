package firmware

import (
	"fmt"
	"os"

	"github.com/tpmagent/tpmagent/internal/atomicfile"
)

// writeFileAtomic replaces path with data (atomicfile.Write): a crash leaves
// either the old or the new content.
func writeFileAtomic(path string, data []byte, perm os.FileMode) error {
	if err := atomicfile.Write(path, data, perm); err != nil {
		return fmt.Errorf("firmware: %w", err)
	}
	return nil
}

// syncDir fsyncs a directory so a rename or create in it is durable.
func syncDir(dir string) error {
	if err := atomicfile.SyncDir(dir); err != nil {
		return fmt.Errorf("firmware: %w", err)
	}
	return nil
}
