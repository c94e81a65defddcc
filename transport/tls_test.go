package transport

import (
	"bytes"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"encoding/json"
	"errors"
	"io"
	"log/slog"
	"net"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/tpmagent/tpmagent/internal/testenv"
)

// hsKey stands in for a tpmkeys signer in tests: a software ECDSA P-256
// key that exposes a handle and counts its signatures like tpmkeys does.
type hsKey struct {
	key    *ecdsa.PrivateKey
	handle uint32
	n      atomic.Uint64
}

func newHSKey(t testing.TB) *hsKey {
	t.Helper()
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	return &hsKey{key: k, handle: 0x81000100}
}

func (s *hsKey) Public() crypto.PublicKey { return s.key.Public() }
func (s *hsKey) Handle() uint32           { return s.handle }
func (s *hsKey) Signatures() uint64       { return s.n.Load() }
func (s *hsKey) Sign(r io.Reader, d []byte, o crypto.SignerOpts) ([]byte, error) {
	s.n.Add(1)
	return s.key.Sign(r, d, o)
}

// hsLab is a PKI, a device key with a certificate from that PKI and a broker.
type hsLab struct {
	pki      *testenv.PKI
	key      crypto.Signer
	certFile string
	broker   *testenv.Mosquitto
}

func newHSLab(t testing.TB, key crypto.Signer, brokerOpts *testenv.MosquittoOptions) *hsLab {
	t.Helper()
	l := &hsLab{pki: testenv.NewPKI(t, "", "tpmagent lab CA"), key: key}
	l.certFile = filepath.Join(l.pki.Dir, "device.pem")
	l.pki.IssueClient(t, "dev-0001", key.Public(), time.Now().Add(-time.Hour), time.Now().Add(24*time.Hour), l.certFile)
	if brokerOpts != nil {
		o := *brokerOpts
		o.PKI = l.pki
		l.broker = testenv.StartMosquitto(t, o)
	}
	return l
}

func (l *hsLab) options() TLSOptions {
	return TLSOptions{Signer: l.key, CertFile: l.certFile, CAFile: l.pki.CAFile}
}

func (l *hsLab) identity(t testing.TB) *TLSIdentity {
	t.Helper()
	id, err := NewTLSConfig(l.options())
	if err != nil {
		t.Fatal(err)
	}
	return id
}

func TestParseBrokerURL(t *testing.T) {
	tests := []struct {
		raw       string
		plaintext bool
		scheme    string
		hostport  string
		host      string
		errHas    string
	}{
		{raw: "mqtts://broker.example:8883", scheme: "mqtts", hostport: "broker.example:8883", host: "broker.example"},
		{raw: "ssl://10.0.0.1", scheme: "ssl", hostport: "10.0.0.1:8883", host: "10.0.0.1"},
		{raw: "TLS://[::1]:9000", scheme: "tls", hostport: "[::1]:9000", host: "::1"},
		{raw: "tcp://broker:1883", errHas: "set broker.allow_plaintext: true"},
		{raw: "mqtt://broker", errHas: "plaintext MQTT"},
		{raw: "tcp://broker", plaintext: true, scheme: "tcp", hostport: "broker:1883", host: "broker"},
		{raw: "broker:8883", errHas: "not supported"},
		{raw: "//broker:8883", errHas: "no scheme"},
		{raw: "wss://broker/mqtt", errHas: "not supported"},
		{raw: "mqtts://:8883", errHas: "no host"},
		{raw: "mqtts://broker/x", errHas: "path"},
	}
	for _, tc := range tests {
		t.Run(tc.raw, func(t *testing.T) {
			scheme, hp, host, err := ParseBrokerURL(tc.raw, tc.plaintext)
			if tc.errHas != "" {
				if err == nil || !strings.Contains(err.Error(), tc.errHas) || !strings.Contains(err.Error(), "broker.urls") {
					t.Fatalf("err = %v, want one naming broker.urls and containing %q", err, tc.errHas)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if scheme != tc.scheme || hp != tc.hostport || host != tc.host {
				t.Fatalf("got %q %q %q, want %q %q %q", scheme, hp, host, tc.scheme, tc.hostport, tc.host)
			}
		})
	}
}

func TestNewTLSConfigChecks(t *testing.T) {
	key := newHSKey(t)
	l := newHSLab(t, key, nil)

	other := newHSKey(t)
	wrongKeyFile := filepath.Join(l.pki.Dir, "wrong-key.pem")
	l.pki.IssueClient(t, "dev-0001", other.Public(), time.Now().Add(-time.Hour), time.Now().Add(time.Hour), wrongKeyFile)
	expiredFile := filepath.Join(l.pki.Dir, "expired.pem")
	expiry := time.Now().Add(-48 * time.Hour).Truncate(time.Second)
	l.pki.IssueClient(t, "dev-0001", key.Public(), expiry.Add(-time.Hour), expiry, expiredFile)
	futureFile := filepath.Join(l.pki.Dir, "future.pem")
	l.pki.IssueClient(t, "dev-0001", key.Public(), time.Now().Add(time.Hour), time.Now().Add(2*time.Hour), futureFile)
	keyFP, _ := PublicKeyFingerprint(key.Public())

	tests := []struct {
		name   string
		mod    func(o *TLSOptions)
		errHas []string
	}{
		{name: "ok", mod: func(o *TLSOptions) {}},
		{name: "min_tls 1.2", mod: func(o *TLSOptions) { o.MinTLS = "1.2" }},
		{name: "min_tls 1.1", mod: func(o *TLSOptions) { o.MinTLS = "1.1" }, errHas: []string{"broker.min_tls", `"1.1"`}},
		{name: "key mismatch", mod: func(o *TLSOptions) { o.CertFile = wrongKeyFile },
			errHas: []string{"broker.cert_file " + wrongKeyFile, "is not the TPM key at 0x81000100", "sha256 " + keyFP[:16], "tpmagent key csr"}},
		{name: "expired", mod: func(o *TLSOptions) { o.CertFile = expiredFile },
			errHas: []string{"broker.cert_file " + expiredFile, "expired on " + expiry.UTC().Format(time.RFC3339), "renew it"}},
		{name: "not yet valid", mod: func(o *TLSOptions) { o.CertFile = futureFile },
			errHas: []string{"broker.cert_file " + futureFile, "not valid before", "clock"}},
		{name: "clock past expiry", mod: func(o *TLSOptions) { o.Now = func() time.Time { return time.Now().Add(48 * time.Hour) } },
			errHas: []string{"expired on"}},
		{name: "missing cert", mod: func(o *TLSOptions) { o.CertFile = filepath.Join(l.pki.Dir, "nope.pem") },
			errHas: []string{"broker.cert_file", "nope.pem", "no such file"}},
		{name: "ca not pem", mod: func(o *TLSOptions) { o.CAFile = l.pki.ServerKeyFile },
			errHas: []string{"broker.ca_file " + l.pki.ServerKeyFile, "no PEM CERTIFICATE"}},
		{name: "no signer", mod: func(o *TLSOptions) { o.Signer = nil }, errHas: []string{"tpmagent key create"}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			o := l.options()
			tc.mod(&o)
			id, err := NewTLSConfig(o)
			if len(tc.errHas) == 0 {
				if err != nil {
					t.Fatal(err)
				}
				if id.Config().MinVersion < tls.VersionTLS12 {
					t.Fatal("min version below 1.2")
				}
				return
			}
			if err == nil {
				t.Fatal("no error")
			}
			for _, s := range tc.errHas {
				if !strings.Contains(err.Error(), s) {
					t.Errorf("error %q does not contain %q", err, s)
				}
			}
		})
	}
}

func TestTLSConfigPolicy(t *testing.T) {
	l := newHSLab(t, newHSKey(t), nil)
	id := l.identity(t)
	if v := id.Config().MinVersion; v != tls.VersionTLS13 {
		t.Fatalf("default MinVersion = %s, want TLS 1.3", tls.VersionName(v))
	}
	o := l.options()
	o.MinTLS = "1.2"
	id12, err := NewTLSConfig(o)
	if err != nil {
		t.Fatal(err)
	}
	c := id12.Config()
	if c.MinVersion != tls.VersionTLS12 || len(c.CipherSuites) == 0 {
		t.Fatalf("min_tls 1.2: MinVersion %x suites %v", c.MinVersion, c.CipherSuites)
	}
	insecure := map[uint16]bool{}
	for _, s := range tls.InsecureCipherSuites() {
		insecure[s.ID] = true
	}
	for _, id := range c.CipherSuites {
		name := tls.CipherSuiteName(id)
		if insecure[id] || !strings.HasPrefix(name, "TLS_ECDHE_") || strings.Contains(name, "CBC") || strings.HasSuffix(name, "_SHA") ||
			!(strings.Contains(name, "GCM") || strings.Contains(name, "CHACHA20_POLY1305")) {
			t.Errorf("min_tls 1.2 offers %s: want only ECDHE + AEAD", name)
		}
	}
	// The session cache is one object shared by every configuration handed out.
	first, again := id.Config(), id.Config()
	if first.ClientSessionCache != id.ConfigFor("localhost").ClientSessionCache || first != again {
		t.Fatal("configs do not share the session cache")
	}
	if got := id.ConfigFor("broker.example").ServerName; got != "broker.example" {
		t.Fatalf("ConfigFor ServerName = %q", got)
	}
	o = l.options()
	o.ServerName = "override.example"
	idOv, err := NewTLSConfig(o)
	if err != nil {
		t.Fatal(err)
	}
	if got := idOv.ConfigFor("broker.example").ServerName; got != "override.example" {
		t.Fatalf("broker.server_name override ignored: %q", got)
	}
}

func TestKeyLogIsLoud(t *testing.T) {
	l := newHSLab(t, newHSKey(t), &testenv.MosquittoOptions{Extra: hsNoDelay})
	var logBuf, keylog bytes.Buffer
	o := l.options()
	o.KeyLogWriter = &keylog
	o.Logger = slog.New(slog.NewTextHandler(&logBuf, nil))
	id, err := NewTLSConfig(o)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(logBuf.String(), "level=WARN") || !strings.Contains(logBuf.String(), "key logging is ON") {
		t.Fatalf("no warning logged: %q", logBuf.String())
	}
	if _, err := Handshake(t.Context(), l.broker.Addr(), id, HandshakeOptions{}); err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(keylog.String(), "CLIENT_HANDSHAKE_TRAFFIC_SECRET") {
		t.Fatalf("key log has no TLS 1.3 secrets: %q", keylog.String())
	}

	// Off by default: no warning.
	logBuf.Reset()
	o.KeyLogWriter = nil
	if _, err := NewTLSConfig(o); err != nil {
		t.Fatal(err)
	}
	if logBuf.Len() != 0 {
		t.Fatalf("unexpected log without key log: %q", logBuf.String())
	}
}

// TestExplainTLSErrorUnknown keeps unrecognised errors wrapped with the peer.
func TestExplainTLSErrorUnknown(t *testing.T) {
	l := newHSLab(t, newHSKey(t), nil)
	id := l.identity(t)
	base := errors.New("boom")
	err := id.ExplainTLSError("127.0.0.1:1", base, false)
	if !errors.Is(err, base) || !strings.Contains(err.Error(), "127.0.0.1:1") {
		t.Fatalf("got %v", err)
	}
	// A refused TCP connection is a network cause naming the peer.
	ln, _ := net.Listen("tcp", "127.0.0.1:0")
	addr := ln.Addr().String()
	ln.Close()
	_, err = Handshake(t.Context(), addr, id, HandshakeOptions{})
	var te *TLSError
	if !errors.As(err, &te) || te.Cause != CauseNetwork || !strings.Contains(err.Error(), addr) {
		t.Fatalf("got %v", err)
	}
}

// TestTraceJSONFields pins the JSON names the CLI contract promises.
func TestTraceJSONFields(t *testing.T) {
	b, err := json.Marshal(&HandshakeTrace{})
	if err != nil {
		t.Fatal(err)
	}
	var m map[string]any
	_ = json.Unmarshal(b, &m)
	for _, k := range []string{"version", "cipher_suite", "group", "server_verified", "client_cert_sent", "resumed", "tpm_signatures", "handshake_ms"} {
		if _, ok := m[k]; !ok {
			t.Errorf("JSON lacks %q: %s", k, b)
		}
	}
}
