package transport

import (
	"crypto"
	"errors"
	"fmt"
	"time"
)

// Rotate switches the identity to a new device key and its certificate in
// one step: it reads certFile (PEM, leaf first), checks that the leaf
// certifies signer's public key and is valid now, then makes the pair the
// one every following full handshake presents, and resets the session cache
// so that no session made with the old certificate resumes. Connections that
// are up keep their session (TLS 1.3 has no renegotiation); Client.Redial
// moves the live broker connection to the new pair. On error nothing
// changes. The tls.Config returned by Config stays the same pointer.
//
// Certificate renewal calls it after the new certificate has been written to
// broker.cert_file and the new key has proven itself in a handshake; the old
// key may be removed from the TPM once Rotate returns.
func (id *TLSIdentity) Rotate(signer crypto.Signer, certFile string) error {
	if signer == nil {
		return errors.New("transport: rotate: no signer for the new certificate")
	}
	ch, err := id.loadChain(newTLSCountingSigner(signer), certFile)
	if err != nil {
		return fmt.Errorf("transport: rotate to %s: %w", keyName(signer), err)
	}
	id.mu.Lock()
	id.chain = ch
	id.mu.Unlock()
	id.cache.reset()
	return nil
}

// Signer returns the device key currently used for full handshakes (the one
// given to NewTLSConfig, or to the last Rotate).
func (id *TLSIdentity) Signer() crypto.Signer { return id.current().signer.s }

// errRedial ends a connection that Redial asked to end: a reconnect the
// caller wanted, not a failure (logged, not recorded as the last error).
var errRedial = errors.New("transport: redial")

// Redial ends the live broker connection with a clean MQTT DISCONNECT (no
// last will, no "offline" status) and lets the client connect again at once.
// Use it after TLSIdentity.Rotate, so that the broker authenticates the
// connection with the new certificate (a full handshake: Rotate emptied the
// session cache). Messages in flight complete with ErrConnectionLost, as on
// any connection loss, so a caller that resends unacknowledged messages (the
// agent's spool) loses none. It reports whether a connection was up.
func (c *Client) Redial(reason string) bool {
	c.mu.Lock()
	s := c.cur
	c.mu.Unlock()
	if s == nil || s.isLost() {
		return false
	}
	c.log.Info("reconnecting to the broker", "broker", s.url.Redacted(), "reason", reason)
	s.markLost(fmt.Errorf("%w: %s", errRedial, reason))
	done := make(chan struct{})
	go func() {
		s.pc.Disconnect(100)
		close(done)
	}()
	select {
	case <-done:
	case <-time.After(2 * time.Second):
		s.abort(fmt.Errorf("%w: %s", errRedial, reason)) // paho hung in Disconnect: drop the socket
	}
	return true
}
