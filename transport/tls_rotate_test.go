package transport

import (
	"context"
	"crypto/tls"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/tpmagent/tpmagent/internal/testenv"
)

// TestRotate: Rotate refuses a certificate that is not the new key's, or not
// valid now, and changes nothing then; a good pair replaces key and
// certificate together and empties the session cache.
func TestRotate(t *testing.T) {
	oldKey := newHSKey(t)
	l := newHSLab(t, oldKey, nil)
	id := l.identity(t)
	oldSerial := id.Leaf().SerialNumber

	newKey := newHSKey(t)
	newKey.handle = 0x81000101
	dir := t.TempDir()
	newCert := filepath.Join(dir, "new.pem")
	l.pki.IssueClient(t, "dev-0001", newKey.Public(), time.Now().Add(-time.Minute), time.Now().Add(time.Hour), newCert)
	expired := filepath.Join(dir, "expired.pem")
	l.pki.IssueClient(t, "dev-0001", newKey.Public(), time.Now().Add(-2*time.Hour), time.Now().Add(-time.Hour), expired)

	// A session in the cache, to see that a good Rotate drops it.
	id.cache.Put("broker", &tls.ClientSessionState{})
	tests := []struct {
		name   string
		signer *hsKey
		file   string
		want   string
	}{
		{"certificate of another key", oldKey, newCert, "is not the TPM key at 0x81000100"},
		{"expired certificate", newKey, expired, "expired"},
		{"missing file", newKey, filepath.Join(dir, "none.pem"), "none.pem"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			err := id.Rotate(tc.signer, tc.file)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("Rotate: %v, want an error containing %q", err, tc.want)
			}
			if id.Leaf().SerialNumber.Cmp(oldSerial) != 0 || id.Signer() != oldKey || id.CertFile() != l.certFile {
				t.Fatal("a refused Rotate changed the identity")
			}
		})
	}
	if _, ok := id.cache.Get("broker"); !ok {
		t.Fatal("a refused Rotate emptied the session cache")
	}

	if err := id.Rotate(newKey, newCert); err != nil {
		t.Fatalf("Rotate: %v", err)
	}
	if id.Leaf().SerialNumber.Cmp(oldSerial) == 0 || id.Signer() != newKey || id.CertFile() != newCert {
		t.Fatal("Rotate did not switch certificate and key")
	}
	if _, ok := id.cache.Get("broker"); ok {
		t.Fatal("Rotate kept the session cache")
	}
	if err := id.Check(); err != nil {
		t.Fatalf("Check after Rotate: %v", err)
	}
	// ReloadCertificate after Rotate re-reads the new file with the new key.
	if err := id.ReloadCertificate(); err != nil {
		t.Fatalf("ReloadCertificate after Rotate: %v", err)
	}
	c, err := id.getClientCertificate(nil)
	if err != nil || c.PrivateKey.(*tlsCountingSigner).s != newKey || c.Leaf.SerialNumber.Cmp(id.Leaf().SerialNumber) != 0 {
		t.Fatalf("client certificate after Rotate: %v", err)
	}
}

// TestRotateAndRedial: a client connected with the old pair keeps
// publishing; after Rotate and Redial it reconnects once, with a full
// handshake signed by the new key, and no QoS 1 message is lost.
func TestRotateAndRedial(t *testing.T) {
	oldKey := newHSKey(t)
	l := newHSLab(t, oldKey, &testenv.MosquittoOptions{})
	id := l.identity(t)
	lab := &mqLab{pki: l.pki, broker: l.broker}
	const total = 4000
	seen := newMQSeqSet(total)
	lab.subscribe(t, "subscriber", "devices/dev-0001/t", 1, seen, false)
	c := lab.newClient(t, func(o *ClientOptions) { o.TLS = id.Config(); o.StatusTopic = "-" })
	mqWaitConnected(t, c, 10*time.Second)
	if oldKey.Signatures() != 1 {
		t.Fatalf("first connection: %d signatures by the old key, want 1", oldKey.Signatures())
	}

	newKey := newHSKey(t)
	newKey.handle = 0x81000101
	newCert := filepath.Join(t.TempDir(), "new.pem")
	l.pki.IssueClient(t, "dev-0001", newKey.Public(), time.Now().Add(-time.Minute), time.Now().Add(time.Hour), newCert)

	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	errs := make(chan error, total)
	for i := 0; i < total; i++ {
		if i == total/2 {
			if err := id.Rotate(newKey, newCert); err != nil {
				t.Fatal(err)
			}
			if !c.Redial("test rotation") {
				t.Fatal("Redial: no connection was up")
			}
		}
		if err := c.Publish(ctx, "devices/dev-0001/t", 1, false, mqPayload(uint64(i), 16), func(err error) { errs <- err }); err != nil {
			t.Fatal(err)
		}
	}
	// Messages failed by the redial are what a spool would resend.
	var failed int
	for i := 0; i < total; i++ {
		if err := <-errs; err != nil {
			failed++
		}
	}
	if failed > 0 {
		t.Logf("%d messages failed with the redial; resending them", failed)
		n, _ := seen.missing()
		for seq := 0; seq < total && n > 0; seq++ {
			seen.mu.Lock()
			miss := seen.count[seq] == 0
			seen.mu.Unlock()
			if miss {
				done := make(chan error, 1)
				if err := c.Publish(ctx, "devices/dev-0001/t", 1, false, mqPayload(uint64(seq), 16), func(err error) { done <- err }); err != nil {
					t.Fatal(err)
				}
				if err := <-done; err != nil {
					t.Fatalf("resend %d: %v", seq, err)
				}
			}
		}
	}
	mqWaitFor(t, 20*time.Second, "every sequence number", func() bool { n, _ := seen.missing(); return n == 0 })
	st := c.Stats()
	if st.Reconnects != 1 {
		t.Fatalf("reconnects = %d, want exactly 1 (the redial)", st.Reconnects)
	}
	if st.LastError != "" {
		t.Fatalf("last error %q after a requested redial: a redial is no failure", st.LastError)
	}
	cs, ok := c.ConnectionState()
	if !ok || cs.DidResume {
		t.Fatalf("connection after the redial resumed (%v): the old session survived Rotate", cs.DidResume)
	}
	if newKey.Signatures() != 1 || oldKey.Signatures() != 1 {
		t.Fatalf("signatures: new key %d (want 1: the reconnect's full handshake), old key %d (want 1)", newKey.Signatures(), oldKey.Signatures())
	}
}
