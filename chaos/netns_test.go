//go:build chaos

package chaos

import (
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"math/big"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/tpmagent/tpmagent/internal/testenv"
)

// netns is a network namespace made by the test and joined to the root
// namespace by a veth pair with link-local addresses (a /30 in
// 169.254.0.0/16 that no interface on the machine uses). Everything is
// removed in t.Cleanup.
type netns struct {
	t      *testing.T
	Name   string
	HostIf string // veth end in the root namespace
	NSIf   string // veth end inside Name
	HostIP string
	NSIP   string
}

func run(t *testing.T, args ...string) string {
	t.Helper()
	out, err := exec.Command(args[0], args[1:]...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return string(out)
}

func newNetns(t *testing.T) *netns {
	t.Helper()
	testenv.NeedTool(t, "ip", "iproute2")
	testenv.NeedTool(t, "nft", "nftables")
	b := make([]byte, 3)
	_, _ = rand.Read(b)
	id := hex.EncodeToString(b)
	n := &netns{t: t, Name: "tpa-" + id, HostIf: "tpah" + id, NSIf: "tpan" + id}
	used := run(t, "ip", "-4", "-o", "addr", "show")
	for {
		x, _ := rand.Int(rand.Reader, big.NewInt(100))
		y, _ := rand.Int(rand.Reader, big.NewInt(60))
		prefix := fmt.Sprintf("169.254.%d.", 120+x.Int64())
		if strings.Contains(used, prefix) {
			continue
		}
		base := 4 * (1 + y.Int64())
		n.HostIP, n.NSIP = fmt.Sprintf("%s%d", prefix, base+1), fmt.Sprintf("%s%d", prefix, base+2)
		break
	}
	run(t, "ip", "netns", "add", n.Name)
	t.Cleanup(func() {
		_ = exec.Command("ip", "link", "del", n.HostIf).Run()
		_ = exec.Command("ip", "netns", "del", n.Name).Run()
	})
	run(t, "ip", "link", "add", n.HostIf, "type", "veth", "peer", "name", n.NSIf)
	run(t, "ip", "link", "set", n.NSIf, "netns", n.Name)
	run(t, "ip", "addr", "add", n.HostIP+"/30", "dev", n.HostIf)
	run(t, "ip", "link", "set", n.HostIf, "up")
	n.exec("ip", "addr", "add", n.NSIP+"/30", "dev", n.NSIf)
	n.exec("ip", "link", "set", n.NSIf, "up")
	n.exec("ip", "link", "set", "lo", "up")
	return n
}

// exec runs a command inside the namespace.
func (n *netns) exec(args ...string) string {
	n.t.Helper()
	return run(n.t, append([]string{"ip", "netns", "exec", n.Name}, args...)...)
}

// loss drops pct % of the packets to and from peer inside the namespace
// (nftables numgen; this kernel has no sch_netem).
func (n *netns) loss(peer string, pct int) {
	n.t.Helper()
	script := fmt.Sprintf(`table inet tpa {
	chain out { type filter hook output priority 0; ip daddr %[1]s numgen random mod 100 < %[2]d drop; }
	chain in { type filter hook input priority 0; ip saddr %[1]s numgen random mod 100 < %[2]d drop; }
}
`, peer, pct)
	f := filepath.Join(n.t.TempDir(), "loss.nft")
	if err := os.WriteFile(f, []byte(script), 0o600); err != nil {
		n.t.Fatal(err)
	}
	n.exec("nft", "-f", f)
}

// clearLoss removes the loss rules.
func (n *netns) clearLoss() { n.exec("nft", "delete", "table", "inet", "tpa") }

// link sets the root namespace's end of the veth pair up or down.
func (n *netns) link(up bool) {
	n.t.Helper()
	state := "down"
	if up {
		state = "up"
	}
	run(n.t, "ip", "link", "set", n.HostIf, state)
}

// nsSwtpm is swtpm running inside a namespace on its loopback, serving an
// existing state directory (the device's key lives there).
type nsSwtpm struct {
	cmd    *exec.Cmd
	exited chan struct{}
}

// startSwtpmIn stops sw (in the root namespace) and serves its state from
// inside ns on 127.0.0.1:2321/2322; it returns the tpm.device URL.
func startSwtpmIn(t *testing.T, ns *netns, sw *testenv.Swtpm) string {
	t.Helper()
	sw.Stop()
	cmd := exec.Command("ip", "netns", "exec", ns.Name, "swtpm", "socket", "--tpm2",
		"--server", "type=tcp,port=2321,bindaddr=127.0.0.1",
		"--ctrl", "type=tcp,port=2322,bindaddr=127.0.0.1",
		"--tpmstate", "dir="+sw.StateDir(),
		"--flags", "not-need-init,startup-clear")
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	out, err := os.Create(filepath.Join(t.TempDir(), "swtpm.log"))
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stdout, cmd.Stderr = out, out
	if err := cmd.Start(); err != nil {
		t.Fatalf("swtpm in %s: %v", ns.Name, err)
	}
	s := &nsSwtpm{cmd: cmd, exited: make(chan struct{})}
	go func() { _ = cmd.Wait(); out.Close(); close(s.exited) }()
	t.Cleanup(func() {
		_ = cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-s.exited:
		case <-time.After(5 * time.Second):
			_ = cmd.Process.Kill()
			<-s.exited
		}
	})
	deadline := time.Now().Add(10 * time.Second)
	for {
		if exec.Command("ip", "netns", "exec", ns.Name, "bash", "-c", "exec 3<>/dev/tcp/127.0.0.1/2321").Run() == nil {
			return "swtpm://127.0.0.1:2321"
		}
		if time.Now().After(deadline) {
			t.Fatalf("swtpm in %s never listened", ns.Name)
		}
		time.Sleep(50 * time.Millisecond)
	}
}
