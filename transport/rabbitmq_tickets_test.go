package transport

import (
	"context"
	"path/filepath"
	"testing"
	"time"

	"github.com/tpmagent/tpmagent/internal/testenv"
)

// TestRabbitMQSessionTicketsRefused: RabbitMQ with TLS 1.3 session tickets
// resumes the session but refuses the login of a resumed connection
// (CONNACK 4: it sees no client certificate). The client must then forget
// the ticket and reconnect with a full handshake (one more TPM signature)
// instead of retrying the refused resumption forever.
func TestRabbitMQSessionTicketsRefused(t *testing.T) {
	pki := testenv.NewPKI(t, "", "transport rabbitmq tickets CA")
	node := testenv.StartRabbitMQ(t, testenv.RabbitOptions{PKI: pki, Users: []string{"dev-0001"}, SessionTickets: "stateless"})
	_, _, key := swtpmKey(t)
	certFile := filepath.Join(pki.Dir, "device.pem")
	pki.IssueClient(t, "dev-0001", key.Public(), time.Now().Add(-time.Hour), time.Now().Add(24*time.Hour), certFile)
	id, err := NewTLSConfig(TLSOptions{Signer: key, CertFile: certFile, CAFile: pki.CAFile})
	if err != nil {
		t.Fatal(err)
	}
	proxy := newMQProxy(t, node.Addr())
	c, err := NewClient(ClientOptions{URLs: []string{proxy.URL()}, TLS: id.Config(), ClientID: "dev-0001", StatusTopic: "-",
		BackoffBase: 50 * time.Millisecond, BackoffMax: 300 * time.Millisecond, Logger: mqLogger(t)})
	if err != nil {
		t.Fatal(err)
	}
	if err := c.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_ = c.Close(ctx)
	})
	mqWaitConnected(t, c, 15*time.Second)
	if key.Signatures() != 1 {
		t.Fatalf("first connection: %d TPM signatures, want 1", key.Signatures())
	}
	proxy.Cut()
	mqWaitFor(t, 20*time.Second, "reconnected after the refused resumption", func() bool {
		return c.Connected() && c.Stats().Reconnects >= 1
	})
	st := c.Stats()
	if st.Failures < 1 {
		t.Errorf("connect failures %d: the resumed login was not refused, so this test proves nothing", st.Failures)
	}
	if st.Failures > 3 {
		t.Errorf("connect failures %d: the client kept retrying the refused resumption", st.Failures)
	}
	if key.Signatures() != 2 {
		t.Errorf("TPM signatures %d, want 2 (the first connection and one full handshake after the refusal)", key.Signatures())
	}
	if tlsState, ok := c.ConnectionState(); !ok || tlsState.DidResume {
		t.Errorf("live connection resumed=%v ok=%v: want a full handshake", tlsState.DidResume, ok)
	}
}
