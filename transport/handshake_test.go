package transport

import (
	"bytes"
	"context"
	"crypto"
	"encoding/json"
	"errors"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/tpmagent/tpmagent/internal/testenv"
)

// TestHandshakeRepeat is the issue's "handshake --repeat 3": a full handshake
// signed once by the device key, then two resumptions with no signature.
func TestHandshakeRepeat(t *testing.T) {
	key := newHSKey(t)
	l := newHSLab(t, key, &testenv.MosquittoOptions{Extra: hsNoDelay})
	var keylog bytes.Buffer
	o := l.options()
	o.KeyLogWriter = &keylog
	id, err := NewTLSConfig(o)
	if err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 3; i++ {
		tr, err := Handshake(t.Context(), l.broker.Addr(), id, HandshakeOptions{ClientID: "dev-0001-handshake"})
		if err != nil {
			t.Fatalf("connection %d: %v\n%s", i+1, err, tr.Text())
		}
		t.Logf("connection %d:\n%s", i+1, tr.Text())
		if tr.Version != "TLS 1.3" || !tr.ServerVerified || !tr.ClientCertSent || tr.TPMSignatures != 1 || tr.MQTT != "accepted" {
			t.Fatalf("connection %d: %+v", i+1, tr)
		}
		if want := i > 0; tr.Resumed != want {
			t.Fatalf("connection %d: resumed = %v, want %v", i+1, tr.Resumed, want)
		}
		if tr.CipherSuite == "" || tr.Group == "" || tr.HandshakeMs <= 0 {
			t.Fatalf("connection %d: missing suite/group/time: %+v", i+1, tr)
		}
		ch, sh := tr.ClientHello, tr.ServerHello
		if ch == nil || sh == nil {
			t.Fatalf("connection %d: hellos not seen on the wire", i+1)
		}
		if !slices.Equal(ch.Versions, []string{"TLS 1.3"}) || !slices.Contains(ch.Groups, "X25519MLKEM768") || len(ch.KeyShares) == 0 || ch.ServerName != "" {
			// ServerName "" because SNI is not sent for an IP address.
			t.Fatalf("connection %d: ClientHello %+v", i+1, ch)
		}
		if ch.PSKOffered != (i > 0) || sh.PSKAccepted != (i > 0) {
			t.Fatalf("connection %d: PSK offered %v accepted %v", i+1, ch.PSKOffered, sh.PSKAccepted)
		}
		if sh.Version != tr.Version || sh.CipherSuite != tr.CipherSuite || sh.KeyShareGroup != tr.Group {
			t.Fatalf("connection %d: wire ServerHello %+v disagrees with ConnectionState %+v", i+1, sh, tr)
		}
		if tr.TrafficKeys == nil || tr.TrafficKeys.KeyBytes == 0 {
			t.Fatalf("connection %d: traffic keys %+v", i+1, tr.TrafficKeys)
		}
		if i == 0 {
			cv := tr.CertificateVerify
			if cv == nil || cv.Handle != "0x81000100" || !cv.Succeeded || !tr.SignedThisHandshake || tr.CertificateRequest == nil ||
				len(tr.ServerChain) == 0 || tr.ClientCert == nil || !strings.Contains(tr.ClientCert.Subject, "dev-0001") {
				t.Fatalf("full handshake incomplete: %+v", tr)
			}
			// mosquitto sends no certificate_authorities list (any CA), but the
			// signature schemes must include the device key's.
			if !slices.Contains(tr.CertificateRequest.SignatureSchemes, "ECDSAWithP256AndSHA256") {
				t.Fatalf("CertificateRequest schemes %v", tr.CertificateRequest.SignatureSchemes)
			}
			steps := hsStepNames(tr)
			want := []string{"TCP", "ClientHello", "ServerHello", "HandshakeKeys", "Certificate", "Verify", "CertificateRequest", "Certificate", "CertificateVerify", "Resumption", "Finished", "Total", "MQTT"}
			if !slices.Equal(steps, want) {
				t.Fatalf("steps %v, want %v", steps, want)
			}
		} else if tr.CertificateVerify != nil || tr.SignedThisHandshake || tr.CertificateRequest != nil {
			t.Fatalf("resumed handshake signed or got a CertificateRequest: %+v", tr)
		}
		// No traffic secret (as written to the key log) shows up in the trace.
		b, _ := json.Marshal(tr)
		for _, line := range strings.Split(strings.TrimSpace(keylog.String()), "\n") {
			f := strings.Fields(line)
			if len(f) != 3 {
				t.Fatalf("key log line %q", line)
			}
			secret := f[2]
			if strings.Contains(strings.ToLower(string(b)+tr.Text()), secret) {
				t.Fatalf("trace contains the secret %s", f[0])
			}
		}
	}
	if key.Signatures() != 1 {
		t.Fatalf("signer signed %d times, want 1", key.Signatures())
	}
	// The broker took the certificate CN as username, also on resumed connections.
	if n := strings.Count(l.broker.LogText(), "u'dev-0001'"); n < 3 {
		t.Fatalf("broker log shows %d connections as u'dev-0001', want 3:\n%s", n, l.broker.LogText())
	}
}

// startTLS12OnlyBroker starts a mosquitto that speaks only TLS 1.2.
// mosquitto 2.0.11's `tls_version tlsv1.2` means "TLS 1.2 or newer" (it
// still negotiates 1.3), so the listener is capped with an OpenSSL config
// (MaxProtocol = TLSv1.2) passed through OPENSSL_CONF, which mosquitto
// inherits; the variable is restored as soon as the broker runs.
func startTLS12OnlyBroker(t testing.TB, pki *testenv.PKI) *testenv.Mosquitto {
	t.Helper()
	cnf := filepath.Join(t.TempDir(), "openssl-tls12.cnf")
	conf := "openssl_conf = default_conf\n[default_conf]\nssl_conf = ssl_sect\n[ssl_sect]\nsystem_default = tls12\n[tls12]\nMaxProtocol = TLSv1.2\n"
	if err := os.WriteFile(cnf, []byte(conf), 0o644); err != nil {
		t.Fatal(err)
	}
	old, had := os.LookupEnv("OPENSSL_CONF")
	os.Setenv("OPENSSL_CONF", cnf)
	m := testenv.StartMosquitto(t, testenv.MosquittoOptions{PKI: pki, TLSVersion: "tlsv1.2", Extra: hsNoDelay})
	if had {
		os.Setenv("OPENSSL_CONF", old)
	} else {
		os.Unsetenv("OPENSSL_CONF")
	}
	return m
}

// hsNoDelay makes mosquitto write without Nagle's delay. Without it, the
// CONNACK that follows the TLS 1.3 session tickets waits for the client's
// delayed ACK: about 40 ms per connection on loopback.
var hsNoDelay = []string{"set_tcp_nodelay true"}

func hsStepNames(tr *HandshakeTrace) []string {
	var out []string
	for _, s := range tr.Steps {
		out = append(out, s.Step)
	}
	return out
}

// TestHandshakePlainSigner: a signer without Handle/Signatures is counted by the identity.
func TestHandshakePlainSigner(t *testing.T) {
	soft := newHSKey(t)
	l := newHSLab(t, soft.key, &testenv.MosquittoOptions{Extra: hsNoDelay})
	id := l.identity(t)
	for i := 0; i < 2; i++ {
		tr, err := Handshake(t.Context(), l.broker.Addr(), id, HandshakeOptions{})
		if err != nil {
			t.Fatal(err)
		}
		if tr.TPMSignatures != 1 || tr.Resumed != (i == 1) {
			t.Fatalf("connection %d: signatures %d resumed %v", i+1, tr.TPMSignatures, tr.Resumed)
		}
		if i == 0 && (tr.CertificateVerify == nil || tr.CertificateVerify.Handle != "") {
			t.Fatalf("CertificateVerify %+v", tr.CertificateVerify)
		}
	}
}

// TestHandshakeTLS12 checks that min_tls 1.2 works against a TLS 1.2 broker
// with an ECDHE+AEAD suite.
func TestHandshakeTLS12(t *testing.T) {
	l := newHSLab(t, newHSKey(t), nil)
	l.broker = startTLS12OnlyBroker(t, l.pki)
	o := l.options()
	o.MinTLS = "1.2"
	id, err := NewTLSConfig(o)
	if err != nil {
		t.Fatal(err)
	}
	tr, err := Handshake(t.Context(), l.broker.Addr(), id, HandshakeOptions{})
	if err != nil {
		t.Fatalf("%v\n%s", err, tr.Text())
	}
	if tr.Version != "TLS 1.2" || !strings.HasPrefix(tr.CipherSuite, "TLS_ECDHE_ECDSA_WITH_") || !tr.ServerVerified || !tr.ClientCertSent || tr.MQTT != "accepted" {
		t.Fatalf("%+v\n%s", tr, tr.Text())
	}
}

// TestReloadCertificate: a rotated certificate is used at once, with a full handshake.
func TestReloadCertificate(t *testing.T) {
	key := newHSKey(t)
	l := newHSLab(t, key, &testenv.MosquittoOptions{Extra: hsNoDelay})
	id := l.identity(t)
	for i := 0; i < 2; i++ {
		if _, err := Handshake(t.Context(), l.broker.Addr(), id, HandshakeOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	l.pki.IssueClient(t, "dev-0001-rotated", key.Public(), time.Now().Add(-time.Minute), time.Now().Add(time.Hour), l.certFile)
	if err := id.ReloadCertificate(); err != nil {
		t.Fatal(err)
	}
	tr, err := Handshake(t.Context(), l.broker.Addr(), id, HandshakeOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if tr.Resumed || tr.TPMSignatures != 2 || !strings.Contains(tr.ClientCert.Subject, "dev-0001-rotated") {
		t.Fatalf("after reload: resumed %v signatures %d cert %+v", tr.Resumed, tr.TPMSignatures, tr.ClientCert)
	}
	// A reload that fails keeps the old certificate.
	other := newHSKey(t)
	l.pki.IssueClient(t, "x", other.Public(), time.Now().Add(-time.Minute), time.Now().Add(time.Hour), l.certFile)
	if err := id.ReloadCertificate(); err == nil || !strings.Contains(err.Error(), "is not the TPM key") {
		t.Fatalf("reload of a foreign certificate: %v", err)
	}
	if !strings.Contains(id.Leaf().Subject.CommonName, "rotated") {
		t.Fatal("failed reload replaced the certificate")
	}
}

// TestHandshakeFailures: each failure names its cause, the peer and the file.
func TestHandshakeFailures(t *testing.T) {
	key := newHSKey(t)
	l := newHSLab(t, key, &testenv.MosquittoOptions{Extra: hsNoDelay})

	// Another CA: its CA file for the unknown-CA case, and a device
	// certificate from it for the rejected-client case.
	otherPKI := testenv.NewPKI(t, "", "some other CA")
	foreignCert := filepath.Join(otherPKI.Dir, "device-foreign.pem")
	otherPKI.IssueClient(t, "dev-0001", key.Public(), time.Now().Add(-time.Hour), time.Now().Add(time.Hour), foreignCert)

	// A broker whose certificate is for another name.
	wrongNameCert, wrongNameKey := l.pki.IssueServer(t, "elsewhere", []string{"elsewhere.example"}, nil, time.Now().Add(time.Hour))
	wrongName := testenv.StartMosquitto(t, testenv.MosquittoOptions{PKI: l.pki, CertFile: wrongNameCert, KeyFile: wrongNameKey, Extra: hsNoDelay})
	// A broker that only speaks TLS 1.2.
	tls12 := startTLS12OnlyBroker(t, l.pki)
	// A broker whose certificate expired.
	expCert, expKey := l.pki.IssueServer(t, "expired", []string{"localhost"}, []net.IP{net.ParseIP("127.0.0.1")}, time.Now().Add(-time.Minute))
	expired := testenv.StartMosquitto(t, testenv.MosquittoOptions{PKI: l.pki, CertFile: expCert, KeyFile: expKey, Extra: hsNoDelay})

	tests := []struct {
		name   string
		addr   string
		mod    func(o *TLSOptions)
		cause  string
		errHas []string
	}{
		{name: "unknown CA", addr: l.broker.Addr(), mod: func(o *TLSOptions) { o.CAFile = otherPKI.CAFile }, cause: CauseUnknownCA,
			errHas: []string{"broker " + l.broker.Addr(), "not signed by a CA in broker.ca_file " + otherPKI.CAFile}},
		{name: "name mismatch", addr: wrongName.Addr(), cause: CauseNameMismatch,
			errHas: []string{"broker " + wrongName.Addr(), "elsewhere.example", `not for "127.0.0.1"`, "broker.server_name"}},
		{name: "server expired", addr: expired.Addr(), cause: CauseServerExpired,
			errHas: []string{"broker " + expired.Addr(), "expired"}},
		{name: "TLS 1.2 only broker", addr: tls12.Addr(), cause: CauseProtocolVersion,
			errHas: []string{"broker " + tls12.Addr(), "TLS 1.3", `broker.min_tls is "1.3"`, "protocol version"}},
		{name: "client certificate rejected", addr: l.broker.Addr(), mod: func(o *TLSOptions) { o.CertFile = foreignCert }, cause: CauseClientRejected,
			errHas: []string{"broker " + l.broker.Addr() + " rejected the client certificate", "broker.cert_file " + foreignCert, "some other CA"}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			o := l.options()
			if tc.mod != nil {
				tc.mod(&o)
			}
			id, err := NewTLSConfig(o)
			if err != nil {
				t.Fatal(err)
			}
			tr, err := Handshake(t.Context(), tc.addr, id, HandshakeOptions{})
			if err == nil {
				t.Fatalf("no error\n%s", tr.Text())
			}
			t.Logf("%v\n%s", err, tr.Text())
			var te *TLSError
			if !errors.As(err, &te) || te.Cause != tc.cause || tr.Cause != tc.cause {
				t.Fatalf("cause: got %v (%T), want %s", err, err, tc.cause)
			}
			for _, s := range tc.errHas {
				if !strings.Contains(err.Error(), s) {
					t.Errorf("error %q lacks %q", err, s)
				}
			}
			if tr.Error == "" || hsStepNames(tr)[len(tr.Steps)-1] != "Error" {
				t.Errorf("trace does not end with the error: %v", hsStepNames(tr))
			}
		})
	}

	// Failures that stop before any connection.
	t.Run("expired device certificate", func(t *testing.T) {
		id := l.identity(t)
		id.opts.Now = func() time.Time { return time.Now().Add(25 * time.Hour) }
		_, err := Handshake(t.Context(), l.broker.Addr(), id, HandshakeOptions{})
		if err == nil || !strings.Contains(err.Error(), "broker.cert_file "+l.certFile) || !strings.Contains(err.Error(), "expired on") {
			t.Fatalf("got %v", err)
		}
	})
	t.Run("certificate of another key", func(t *testing.T) {
		o := l.options()
		o.Signer = newHSKey(t)
		_, err := NewTLSConfig(o)
		if err == nil || !strings.Contains(err.Error(), "broker.cert_file "+l.certFile) || !strings.Contains(err.Error(), "is not the TPM key at 0x81000100") {
			t.Fatalf("got %v", err)
		}
	})
	t.Run("plaintext URL", func(t *testing.T) {
		_, _, _, err := ParseBrokerURL("tcp://"+l.broker.Addr(), false)
		if err == nil || !strings.Contains(err.Error(), "broker.allow_plaintext: true") || !strings.Contains(err.Error(), l.broker.Addr()) {
			t.Fatalf("got %v", err)
		}
	})
}

// TestReconnects1000 reconnects 1,000 times (TLS + MQTT CONNECT/CONNACK) with
// one session cache: one signature in total while tickets stay valid.
func TestReconnects1000(t *testing.T) {
	n := 1000
	if testing.Short() {
		n = 100
	}
	key := newHSKey(t)
	l := newHSLab(t, key, &testenv.MosquittoOptions{Extra: hsNoDelay})
	id := l.identity(t)
	ctx := t.Context()
	start := time.Now()
	resumed := 0
	for i := 0; i < n; i++ {
		tr, err := Handshake(ctx, l.broker.Addr(), id, HandshakeOptions{})
		if err != nil {
			t.Fatalf("reconnect %d: %v", i, err)
		}
		if tr.Resumed {
			resumed++
		}
	}
	t.Logf("%d reconnects in %v (%.2f ms each), %d resumed, %d signatures", n, time.Since(start), float64(time.Since(start).Microseconds())/1000/float64(n), resumed, key.Signatures())
	if key.Signatures() != 1 || resumed != n-1 {
		t.Fatalf("signatures %d (want 1), resumed %d (want %d)", key.Signatures(), resumed, n-1)
	}
}

// BenchmarkHandshakeSoftKey is BenchmarkHandshake with a software ECDSA key.
func BenchmarkHandshakeSoftKey(b *testing.B) {
	runHandshakeBench(b, func(b *testing.B) crypto.Signer { return newHSKey(b) })
}

func runHandshakeBench(b *testing.B, newKey func(b *testing.B) crypto.Signer) {
	key := newKey(b)
	l := newHSLab(b, key, &testenv.MosquittoOptions{Extra: hsNoDelay})
	id := l.identity(b)
	ctx := context.Background()
	b.Run("full", func(b *testing.B) {
		for b.Loop() {
			id.ResetSessionCache()
			tr, err := Handshake(ctx, l.broker.Addr(), id, HandshakeOptions{})
			if err != nil || tr.Resumed {
				b.Fatalf("%v resumed=%v", err, tr.Resumed)
			}
		}
	})
	b.Run("resumed", func(b *testing.B) {
		if _, err := Handshake(ctx, l.broker.Addr(), id, HandshakeOptions{}); err != nil {
			b.Fatal(err)
		}
		for b.Loop() {
			tr, err := Handshake(ctx, l.broker.Addr(), id, HandshakeOptions{})
			if err != nil || !tr.Resumed {
				b.Fatalf("%v resumed=%v", err, tr.Resumed)
			}
		}
	})
}
