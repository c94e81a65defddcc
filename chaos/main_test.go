//go:build chaos

package chaos

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"
)

// agentBin is the tpmagent binary built once by TestMain for scenarios that
// run the agent as a separate process (kill -9, network namespaces).
var agentBin string

// short is CHAOS_SHORT=1: every scenario runs a shorter version (CI).
var short = os.Getenv("CHAOS_SHORT") != ""

// pick returns s in the short suite and l in the long one.
func pick[T any](s, l T) T {
	if short {
		return s
	}
	return l
}

// result is one row of the table.
type result struct {
	N          int
	Scenario   string
	Offered    int
	Delivered  int
	Lost       int
	Duplicates int
	Recovery   time.Duration
	Note       string
}

// table collects the rows of every scenario that ran (TestMain prints it).
var table struct {
	sync.Mutex
	rows []result
}

func record(r result) {
	table.Lock()
	defer table.Unlock()
	table.rows = append(table.rows, r)
}

// renderTable renders the rows as one markdown table, in scenario order.
func renderTable() string {
	table.Lock()
	defer table.Unlock()
	rows := append([]result(nil), table.rows...)
	sort.SliceStable(rows, func(i, j int) bool { return rows[i].N < rows[j].N })
	var b strings.Builder
	b.WriteString("| scenario | offered | delivered | lost | duplicates | recovery_s |\n")
	b.WriteString("|---|---:|---:|---:|---:|---:|\n")
	for _, r := range rows {
		name := fmt.Sprintf("%d. %s", r.N, r.Scenario)
		if r.Note != "" {
			name += " (" + r.Note + ")"
		}
		fmt.Fprintf(&b, "| %s | %d | %d | %d | %d | %.2f |\n", name, r.Offered, r.Delivered, r.Lost, r.Duplicates, r.Recovery.Seconds())
	}
	return b.String()
}

func TestMain(m *testing.M) {
	if os.Geteuid() != 0 {
		fmt.Fprintln(os.Stderr, "chaos: the suite needs root (network namespaces, nftables, tmpfs mounts, packet capture): run it as root (CI does)")
		os.Exit(1)
	}
	dir, err := os.MkdirTemp("", "tpa-chaos-bin-")
	if err != nil {
		fmt.Fprintln(os.Stderr, "chaos:", err)
		os.Exit(1)
	}
	agentBin = filepath.Join(dir, "tpmagent")
	build := exec.Command("go", "build", "-o", agentBin, "github.com/tpmagent/tpmagent/cmd/tpmagent")
	build.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := build.CombinedOutput(); err != nil {
		fmt.Fprintf(os.Stderr, "chaos: build tpmagent: %v\n%s", err, out)
		os.RemoveAll(dir)
		os.Exit(1)
	}
	code := m.Run()
	t := renderTable()
	fmt.Print("\n" + t)
	if f := os.Getenv("CHAOS_TABLE"); f != "" {
		if err := os.WriteFile(f, []byte(t), 0o644); err != nil {
			fmt.Fprintln(os.Stderr, "chaos: write CHAOS_TABLE:", err)
		}
	}
	os.RemoveAll(dir)
	os.Exit(code)
}
