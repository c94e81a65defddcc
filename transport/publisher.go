// Package transport connects the device to its brokers: a TLS 1.3 client
// configuration whose private key is the TPM-resident device key, a session
// cache so that reconnects resume without a TPM signature, a step-by-step
// handshake trace, and the MQTT client (paho) that owns connect, failover and
// reconnect. The rest of the agent sees only the small Publisher interface.
package transport

import (
	"context"
	"errors"
)

// ErrConnectionLost is passed to a publish callback when the connection
// carrying the message dropped before the broker acknowledged it. The message
// may or may not have reached the broker: resend it (at-least-once).
var ErrConnectionLost = errors.New("transport: connection lost before acknowledgement")

// ErrClosed is returned by Publish after Close, and passed to callbacks of
// messages still pending when the client closed.
var ErrClosed = errors.New("transport: client closed")

// Publisher is what the agent sees of the broker connection.
type Publisher interface {
	// Publish hands one message to the connection. It blocks while the
	// in-flight window is full, while no connection is up, or until ctx is
	// done. done is called exactly once, from a goroutine owned by the
	// Publisher and in publish order: with nil once the broker acknowledged
	// the message (QoS 1, PUBACK) or the message was written to the
	// connection (QoS 0); or with ErrConnectionLost / ErrClosed. done must not
	// block for long.
	Publish(ctx context.Context, topic string, qos byte, retained bool, payload []byte, done func(error)) error

	// Connected reports whether a broker connection is up now.
	Connected() bool

	// Connections returns a channel that receives a value after every
	// successful (re)connection; the agent rewinds its spool then so that
	// unacknowledged records are sent again. The channel is buffered and
	// values are dropped when the agent is slow: one pending value is enough.
	Connections() <-chan struct{}
}
