package transport

import (
	"context"
	"crypto"
	"strings"
	"testing"
	"time"

	"github.com/tpmagent/tpmagent/internal/testenv"
	"github.com/tpmagent/tpmagent/tpmkeys"
)

// swtpmKey starts swtpm, creates the device key at the default handle
// (0x81000100) and returns it opened, with its TPM.
func swtpmKey(tb testing.TB) (*testenv.Swtpm, *tpmkeys.TPM, *tpmkeys.Key) {
	tb.Helper()
	sw := testenv.StartSwtpm(tb)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	tp, err := tpmkeys.Open(ctx, sw.URL())
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { tp.Close() })
	if _, err := tp.CreateKey(ctx, tpmkeys.KeySpec{}, false); err != nil {
		tb.Fatal(err)
	}
	k, err := tp.OpenKey(ctx, tpmkeys.KeySpec{})
	if err != nil {
		tb.Fatal(err)
	}
	return sw, tp, k
}

// tpmHandlesLeft lists transient objects and loaded sessions with
// tpm2-tools (the TPM connection must be closed: swtpm serves one client).
func tpmHandlesLeft(tb testing.TB, sw *testenv.Swtpm) string {
	tb.Helper()
	testenv.NeedTool(tb, "tpm2_getcap", "tpm2-tools")
	var left []string
	for _, what := range []string{"handles-transient", "handles-loaded-session", "handles-saved-session"} {
		out, err := sw.Command(context.Background(), "tpm2_getcap", what).CombinedOutput()
		if err != nil {
			tb.Fatalf("tpm2_getcap %s: %v\n%s", what, err, out)
		}
		if s := strings.TrimSpace(string(out)); s != "" {
			left = append(left, what+": "+s)
		}
	}
	return strings.Join(left, "; ")
}

// TestHandshakeRepeatSwtpm: with the key inside swtpm, the full handshake
// signs once in the TPM and the resumed ones not at all.
func TestHandshakeRepeatSwtpm(t *testing.T) {
	_, _, key := swtpmKey(t)
	l := newHSLab(t, key, &testenv.MosquittoOptions{Extra: hsNoDelay})
	id := l.identity(t)
	for i := 0; i < 3; i++ {
		tr, err := Handshake(t.Context(), l.broker.Addr(), id, HandshakeOptions{})
		if err != nil {
			t.Fatalf("connection %d: %v\n%s", i+1, err, tr.Text())
		}
		if i == 0 {
			t.Logf("full handshake with the swtpm key:\n%s", tr.Text())
		}
		if tr.Version != "TLS 1.3" || !tr.ServerVerified || !tr.ClientCertSent || tr.Resumed != (i > 0) || tr.TPMSignatures != 1 || tr.MQTT != "accepted" {
			t.Fatalf("connection %d: %+v", i+1, tr)
		}
		if i == 0 && (tr.CertificateVerify == nil || tr.CertificateVerify.Handle != "0x81000100" || tr.CertificateVerify.Ms <= 0) {
			t.Fatalf("CertificateVerify %+v", tr.CertificateVerify)
		}
	}
	if key.Signatures() != 1 {
		t.Fatalf("TPM signed %d times, want 1", key.Signatures())
	}
}

// TestReconnects1000Swtpm: 1,000 reconnects (TLS + MQTT CONNECT/CONNACK) with
// one session cache cost one TPM signature and one signing session, and leave
// no transient object or session in the TPM.
func TestReconnects1000Swtpm(t *testing.T) {
	n := 1000
	if testing.Short() {
		n = 100
	}
	sw, tp, key := swtpmKey(t)
	l := newHSLab(t, key, &testenv.MosquittoOptions{Extra: hsNoDelay})
	id := l.identity(t)
	start := time.Now()
	resumed := 0
	for i := 0; i < n; i++ {
		tr, err := Handshake(t.Context(), l.broker.Addr(), id, HandshakeOptions{})
		if err != nil {
			t.Fatalf("reconnect %d: %v", i, err)
		}
		if tr.Resumed {
			resumed++
		}
		if tr.TPMSignatures != 1 {
			t.Fatalf("reconnect %d: %d TPM signatures so far, want 1", i, tr.TPMSignatures)
		}
	}
	el := time.Since(start)
	t.Logf("%d reconnects in %v (%.2f ms each), %d resumed, %d TPM signatures, %d signing sessions started",
		n, el, float64(el.Microseconds())/1000/float64(n), resumed, key.Signatures(), key.SessionStarts())
	if key.Signatures() != 1 || resumed != n-1 || key.SessionStarts() != 1 {
		t.Fatalf("signatures %d (want 1), resumed %d (want %d), sessions started %d (want 1)", key.Signatures(), resumed, n-1, key.SessionStarts())
	}
	if err := tp.Close(); err != nil {
		t.Fatal(err)
	}
	if left := tpmHandlesLeft(t, sw); left != "" {
		t.Fatalf("TPM handles left behind: %s", left)
	}
}

// BenchmarkHandshake compares a full handshake (certificate chain, a
// CertificateVerify signed inside swtpm) with a resumed one (PSK, no
// signature); both include TCP connect and MQTT CONNECT/CONNACK against a
// real mosquitto. BenchmarkHandshakeSoftKey is the same with a software key.
func BenchmarkHandshake(b *testing.B) {
	runHandshakeBench(b, func(b *testing.B) crypto.Signer {
		_, _, k := swtpmKey(b)
		return k
	})
}
