//go:build chaos

package chaos

import (
	"fmt"
	"testing"
	"time"
)

// TestScenario7Reconnects cuts the agent's broker connection 10,000 times
// (300 in the short suite) through a forwarder that classifies every TLS
// handshake on the wire. The TPM must sign for full handshakes only (the
// rest resume from the session cache), and after the agent stops, swtpm
// must hold no transient object and no loaded session.
func TestScenario7Reconnects(t *testing.T) {
	_, br, _, d, tr := setup(t)
	fw := startForwarder(t, br.Addr())
	cfg := writeConfig(t, d, confOpts{URL: "mqtts://" + fw.Addr(), Backoff: [2]string{"1ms", "20ms"}})
	a := newAgent(t, d, cfg, "")
	a.start()
	if !a.waitConnected(15 * time.Second) {
		t.Fatalf("agent never connected:\n%s", tail(a.log, 3000))
	}
	s := startStream(t, tr, a.sock, 20, 20*time.Millisecond)
	n := pick(1000, 10000)
	start := time.Now()
	var worst time.Duration
	for i := 0; i < n; i++ {
		before, err := a.snap()
		if err != nil {
			t.Fatal(err)
		}
		fw.cutAll()
		cut := time.Now()
		for {
			s, err := a.snap()
			if err == nil && s.Reconnects > before.Reconnects && s.Connected {
				break
			}
			if time.Since(cut) > 30*time.Second {
				t.Fatalf("reconnect %d: agent not back within 30 s (status %+v, %v)\n%s", i+1, s, err, tail(a.log, 3000))
			}
			time.Sleep(time.Millisecond)
		}
		worst = max(worst, time.Since(cut))
	}
	elapsed := time.Since(start)
	rec, ok := tr.recovered(tr.mark(), time.Now(), 60*time.Second)
	if !ok {
		t.Errorf("backlog not delivered; %v", tr.missing())
	}
	snap, err := a.snap()
	if err != nil {
		t.Fatal(err)
	}
	full, resumed := fw.full.Load(), fw.resumed.Load()
	t.Logf("%d reconnects in %v (slowest %v): %d full handshakes, %d resumed, %d TPM signatures, agent reconnects %d",
		n, elapsed.Round(time.Millisecond), worst.Round(time.Millisecond), full, resumed, snap.TPMSignatures, snap.Reconnects)
	if snap.TPMSignatures != full {
		t.Errorf("TPM signatures %d != full handshakes %d seen on the wire", snap.TPMSignatures, full)
	}
	if full+resumed < uint64(n) {
		t.Errorf("only %d handshakes seen for %d reconnects", full+resumed, n)
	}
	s.halt()
	a.stop()
	transient, sessions := tpmHandles(t, d.Swtpm)
	if len(transient) != 0 || len(sessions) != 0 {
		t.Errorf("TPM handles left after %d reconnects and a clean stop: transient %v, sessions %v", n, transient, sessions)
	}
	note := fmt.Sprintf("%d reconnects in %.0f s, %d full handshakes = %d TPM signatures, %d resumed, handles left %d",
		n, elapsed.Seconds(), full, snap.TPMSignatures, resumed, len(transient)+len(sessions))
	finish(t, 7, fmt.Sprintf("%d reconnects", n), note, tr, s, max(rec, worst), 60*time.Second, a.log)
}
