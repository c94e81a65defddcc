//go:build chaos

package chaos

import (
	"net"
	"strings"
	"testing"
	"time"

	"github.com/tpmagent/tpmagent/internal/testenv"
)

// TestScenario4TPMRestarted stops swtpm while the agent streams: the live
// TLS session keeps publishing without the TPM. The broker is then
// restarted (its session tickets die with it), so the reconnect needs a
// full handshake and a TPM signature: the agent must report the TPM error
// and keep spooling. When swtpm comes back the agent signs again,
// reconnects and delivers the backlog.
func TestScenario4TPMRestarted(t *testing.T) {
	_, br, _, d, tr := setup(t)
	a := newAgent(t, d, writeConfig(t, d, confOpts{}), "")
	a.start()
	if !a.waitConnected(15 * time.Second) {
		t.Fatalf("agent never connected:\n%s", tail(a.log, 3000))
	}
	s := startStream(t, tr, a.sock, 100, 50*time.Millisecond)
	time.Sleep(1500 * time.Millisecond)
	before, _ := a.snap()

	d.Swtpm.Stop()
	d0 := tr.delivered()
	time.Sleep(pick(3*time.Second, 10*time.Second))
	if got := tr.delivered() - d0; got == 0 {
		t.Errorf("nothing delivered on the live session while the TPM was away")
	} else {
		t.Logf("TPM away, live session: %d readings delivered", got)
	}

	br.Restart()
	time.Sleep(pick(3*time.Second, 10*time.Second))
	snap, err := a.snap()
	if err != nil {
		t.Fatalf("status while the TPM is away: %v", err)
	}
	t.Logf("TPM away, broker restarted: connected=%v spool=%d records last_error=%q", snap.Connected, snap.Spool.Records, snap.LastError)
	if snap.Connected {
		t.Errorf("agent reports a broker connection that needed a TPM signature while swtpm was stopped")
	}
	logText := tail(a.log, 20000)
	if !strings.Contains(strings.ToLower(snap.LastError+logText), "swtpm") {
		t.Errorf("neither status last_error nor the log names the TPM error; last_error=%q", snap.LastError)
	}
	if snap.Spool.Records == 0 {
		t.Errorf("spool holds no records while offline")
	}

	d.Swtpm.Restart()
	back := time.Now()
	rec, ok := tr.recovered(tr.mark(), back, 60*time.Second)
	if !ok {
		t.Errorf("backlog not delivered within 60 s after swtpm came back; %v\n%s", tr.missing(), tail(a.log, 3000))
	}
	time.Sleep(time.Second)
	after, _ := a.snap()
	if after.TPMSignatures <= before.TPMSignatures {
		t.Errorf("TPM signatures %d → %d: the reconnect after the TPM came back did not sign", before.TPMSignatures, after.TPMSignatures)
	}
	finish(t, 4, "swtpm stopped + restarted", "live session kept; reconnect signed after TPM returned", tr, s, rec, 60*time.Second, a.log)
}

// TestScenario5BrokerCertificates rotates the broker's certificate while
// the agent is connected (same CA: the agent reconnects), then gives the
// broker a certificate from a CA the agent does not trust (the agent
// refuses and keeps spooling), then restores a trusted one.
func TestScenario5BrokerCertificates(t *testing.T) {
	pki := testenv.NewPKI(t, "", "lab-ca")
	other := testenv.NewPKI(t, "", "untrusted-ca")
	br, bopts := chaosBroker(t, pki)
	d := newDevice(t, pki, br)
	tr := newTracker()
	subscriber(t, pki, br, "devices/"+d.ID+"/telemetry", tr, other.CA)
	br.Save()
	a := newAgent(t, d, writeConfig(t, d, confOpts{}), "")
	a.start()
	if !a.waitConnected(15 * time.Second) {
		t.Fatalf("agent never connected:\n%s", tail(a.log, 3000))
	}
	s := startStream(t, tr, a.sock, 100, 50*time.Millisecond)
	time.Sleep(1500 * time.Millisecond)

	rotCert, rotKey := pki.IssueServer(t, "server-rotated", []string{"localhost"}, []net.IP{net.ParseIP("127.0.0.1")}, time.Now().Add(48*time.Hour))
	rotated := bopts
	rotated.CertFile, rotated.KeyFile = rotCert, rotKey
	br.Reconfigure(rotated)
	rec1, ok := tr.recovered(tr.mark(), time.Now(), 60*time.Second)
	if !ok {
		t.Errorf("no recovery after the certificate rotation; %v", tr.missing())
	}
	time.Sleep(time.Second)

	untrusted := bopts
	untrusted.CertFile, untrusted.KeyFile = other.ServerCertFile, other.ServerKeyFile
	br.Reconfigure(untrusted)
	time.Sleep(1500 * time.Millisecond)
	d0 := tr.delivered()
	time.Sleep(pick(3*time.Second, 12*time.Second))
	if got := tr.delivered() - d0; got != 0 {
		t.Errorf("%d readings delivered through a broker with an untrusted certificate", got)
	}
	snap, err := a.snap()
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("untrusted broker: connected=%v spool=%d records last_error=%q", snap.Connected, snap.Spool.Records, snap.LastError)
	if snap.Connected {
		t.Errorf("agent connected to a broker whose certificate comes from an untrusted CA")
	}
	if snap.Spool.Records == 0 {
		t.Errorf("agent does not keep spooling while it refuses the broker")
	}
	if !strings.Contains(snap.LastError+tail(a.log, 20000), "certificate") {
		t.Errorf("the refusal does not name the certificate; last_error=%q", snap.LastError)
	}

	br.Reconfigure(rotated)
	rec2, ok := tr.recovered(tr.mark(), time.Now(), 60*time.Second)
	if !ok {
		t.Errorf("no recovery after a trusted certificate came back; %v", tr.missing())
	}
	time.Sleep(time.Second)
	finish(t, 5, "broker cert rotated; untrusted CA refused", "", tr, s, max(rec1, rec2), 60*time.Second, a.log)
}
