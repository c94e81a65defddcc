package testenv

import (
	"crypto/tls"
	"testing"
)

func TestMosquittoRequiresClientCert(t *testing.T) {
	pki := NewPKI(t, "", "lab-ca")
	m := StartMosquitto(t, MosquittoOptions{PKI: pki})
	_, _, cert := pki.SoftClient(t, "sub-1")
	conn, err := tls.Dial("tcp", m.Addr(), &tls.Config{RootCAs: pki.Pool(), ServerName: "localhost", Certificates: []tls.Certificate{cert}})
	if err != nil {
		t.Fatalf("dial with client cert: %v", err)
	}
	conn.Close()
	// Without a client certificate the handshake (or the first read) fails.
	conn, err = tls.Dial("tcp", m.Addr(), &tls.Config{RootCAs: pki.Pool(), ServerName: "localhost"})
	if err == nil {
		buf := make([]byte, 1)
		_, err = conn.Read(buf)
		conn.Close()
	}
	if err == nil {
		t.Fatal("broker accepted a connection without a client certificate")
	}
	m.Restart()
	if _, err := tls.Dial("tcp", m.Addr(), &tls.Config{RootCAs: pki.Pool(), ServerName: "localhost", Certificates: []tls.Certificate{cert}}); err != nil {
		t.Fatalf("after restart: %v", err)
	}
}
