package transport

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"net/url"
	"sync"
	"time"

	mqtt "github.com/eclipse/paho.mqtt.golang"
	"github.com/eclipse/paho.mqtt.golang/packets"
)

// endpoint is one checked broker URL.
type endpoint struct {
	u      *url.URL
	secure bool
}

// pending is a message handed to paho whose done callback has not run.
type pending struct {
	tok  mqtt.Token
	done func(error)
}

// session is one broker connection: its own paho client (paho clients are
// never reused: Disconnect and connection loss have known deadlocks, #509,
// #473, #502), the FIFO of unfinished messages and the goroutine that runs
// their callbacks in order.
type session struct {
	c        *Client
	ep       endpoint
	url      *url.URL
	pc       mqtt.Client
	since    time.Time
	tlsState *tls.ConnectionState

	connMu  sync.Mutex
	raw     net.Conn // the TCP connection, closed to abort
	aborted bool

	mu    sync.Mutex // serializes paho Publish with the queue, so order matches
	dead  bool
	queue chan pending

	lost      chan struct{} // closed when the connection is gone
	lostOnce  sync.Once
	why       error
	completed chan struct{} // closed when every queued callback ran
}

// dial makes one connection attempt to ep: TCP, TLS, CONNECT, the
// subscriptions and the "online" status, all within ConnectTimeout.
func (c *Client) dial(ctx context.Context, ep endpoint) (*session, error) {
	actx, cancel := context.WithTimeout(ctx, c.opts.ConnectTimeout)
	defer cancel()
	s := &session{
		c:         c,
		ep:        ep,
		url:       ep.u,
		queue:     make(chan pending, c.opts.Inflight),
		lost:      make(chan struct{}),
		completed: make(chan struct{}),
	}
	po := mqtt.NewClientOptions().
		AddBroker(ep.u.String()).
		SetClientID(c.opts.ClientID).
		SetProtocolVersion(4).
		SetKeepAlive(c.opts.Keepalive).
		SetCleanSession(c.opts.CleanSession).
		SetAutoReconnect(false).
		SetConnectRetry(false).
		SetResumeSubs(false).
		SetOrderMatters(true). // handlers only enqueue (see Subscribe)
		// Acknowledgements are sent by deliver (on enqueue) or by the
		// handler of a SubscribeAck subscription (when it is done).
		SetAutoAckDisabled(true).
		SetConnectTimeout(c.opts.ConnectTimeout).
		SetWriteTimeout(c.opts.WriteTimeout).
		SetStore(nullStore{}). // resending is the spool's job, not paho's
		SetConnectionLostHandler(func(_ mqtt.Client, err error) { s.markLost(err) }).
		SetCustomOpenConnectionFn(func(*url.URL, mqtt.ClientOptions) (net.Conn, error) { return s.open(actx) })
	if c.status != "" {
		po.SetWill(c.status, StatusOffline, 1, true)
	}
	s.pc = mqtt.NewClient(po)
	// Routes before CONNECT: a persistent session's queued messages arrive
	// right after CONNACK, before SUBSCRIBE; without a route paho drops them
	// unacknowledged.
	c.mu.Lock()
	for _, sub := range c.subs {
		s.pc.AddRoute(sub.topic, sub.deliver)
	}
	c.mu.Unlock()
	if err := waitToken(actx, s.pc.Connect()); err != nil {
		s.abort(err)
		if s.tlsState != nil && s.tlsState.DidResume {
			// A broker may refuse a resumed session's login (RabbitMQ with
			// session tickets: CONNACK 4). Forget the ticket so that the
			// next attempt is a full handshake with the certificate.
			s.forgetSession()
		}
		if s.tlsState != nil && c.opts.ExplainError != nil {
			return nil, c.opts.ExplainError(ep.u.Host, err, true)
		}
		return nil, fmt.Errorf("connect to %s: %w", ep.u.Redacted(), err)
	}
	c.mu.Lock()
	subs := append([]*subscription(nil), c.subs...)
	c.mu.Unlock()
	for _, sub := range subs {
		if err := s.subscribe(actx, sub); err != nil {
			s.abort(err)
			return nil, err
		}
	}
	if c.status != "" {
		if err := waitToken(actx, s.pc.Publish(c.status, 1, true, StatusOnline)); err != nil {
			s.abort(err)
			return nil, fmt.Errorf("publish %q to %s on %s: %w", StatusOnline, c.status, ep.u.Redacted(), err)
		}
	}
	s.since = time.Now()
	return s, nil
}

// forgetSession drops the cached TLS session for this broker.
func (s *session) forgetSession() {
	cfg := s.c.opts.TLS
	if cfg == nil || cfg.ClientSessionCache == nil {
		return
	}
	cfg.ClientSessionCache.Put(s.serverName(), nil)
}

// serverName is the name the TLS handshake checks (and the session cache key).
func (s *session) serverName() string {
	if s.c.opts.TLS != nil && s.c.opts.TLS.ServerName != "" {
		return s.c.opts.TLS.ServerName
	}
	return s.url.Hostname()
}

// open is paho's dial function: TCP, then the TLS handshake, then the
// coalescing layer.
func (s *session) open(ctx context.Context) (net.Conn, error) {
	var d net.Dialer
	raw, err := d.DialContext(ctx, "tcp", s.url.Host)
	if err != nil {
		return nil, err
	}
	var conn net.Conn = raw
	if s.ep.secure {
		cfg := s.c.opts.TLS.Clone() // shares the session cache: reconnects resume
		cfg.ServerName = s.serverName()
		tc := tls.Client(raw, cfg)
		if err := tc.HandshakeContext(ctx); err != nil {
			raw.Close()
			if s.c.opts.ExplainError != nil {
				return nil, s.c.opts.ExplainError(s.url.Host, err, false)
			}
			return nil, fmt.Errorf("TLS handshake with %s: %w", s.url.Host, err)
		}
		st := tc.ConnectionState()
		s.tlsState = &st
		conn = tc
	}
	if !s.c.opts.DisableCoalescing {
		conn = newCoalescingConn(conn, s.c.opts.CoalesceBuffer, s.c.opts.WriteTimeout, &s.c.wc)
	}
	s.connMu.Lock()
	s.raw = raw
	aborted := s.aborted
	s.connMu.Unlock()
	if aborted {
		conn.Close()
		return nil, fmt.Errorf("connection to %s aborted", s.url.Host)
	}
	return conn, nil
}

func (s *session) isLost() bool {
	select {
	case <-s.lost:
		return true
	default:
		return false
	}
}

// cause is why the session ended (valid once lost is closed).
func (s *session) cause() error {
	if s.why == nil {
		return errors.New("connection closed")
	}
	return s.why
}

// markLost ends the session: no more publishes on it, and the callback
// goroutine finishes the queue. Idempotent.
func (s *session) markLost(err error) {
	s.lostOnce.Do(func() {
		s.why = err
		close(s.lost)
		s.mu.Lock() // waits for a publish in progress (bounded by WriteTimeout)
		s.dead = true
		close(s.queue)
		s.mu.Unlock()
	})
}

// abort drops the TCP connection without DISCONNECT (the broker then
// publishes the last will) and ends the session.
func (s *session) abort(err error) {
	s.connMu.Lock()
	s.aborted = true
	raw := s.raw
	s.connMu.Unlock()
	if raw != nil {
		raw.Close()
	}
	s.markLost(err)
}

// publish hands one message to paho and queues its callback; false if the
// session is already gone.
func (s *session) publish(topic string, qos byte, retained bool, payload []byte, done func(error)) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.dead || s.isLost() {
		return false
	}
	tok := s.pc.Publish(topic, qos, retained, payload)
	s.queue <- pending{tok: tok, done: done} // never blocks: capacity = window
	return true
}

// complete runs the callbacks of this session in publish order, after those
// of the previous session (prev) so that order holds across reconnects.
// Tokens complete in order (PUBACKs arrive in order, QoS 0 completes when
// written), so waiting on the head of the queue is enough.
func (s *session) complete(prev <-chan struct{}) {
	defer close(s.completed)
	if prev != nil {
		<-prev
	}
	for p := range s.queue {
		s.c.finish(p, s.wait(p.tok))
	}
}

func (s *session) wait(tok mqtt.Token) error {
	select {
	case <-tok.Done():
		err := tok.Error()
		if err == nil {
			return nil
		}
		// paho gave up on this message (writer stuck past WriteTimeout, say):
		// the connection is not trustworthy any more.
		s.abort(err)
		return s.lostErr(err)
	case <-s.lost:
		select {
		case <-tok.Done():
			if tok.Error() == nil {
				return nil // acknowledged just before the loss
			}
		default:
		}
		return s.lostErr(s.cause())
	}
}

func (s *session) lostErr(cause error) error {
	if errors.Is(s.why, ErrClosed) {
		return ErrClosed
	}
	return fmt.Errorf("%w: %s: %v", ErrConnectionLost, s.url.Redacted(), cause)
}

// disconnect is the graceful end: "offline" retained, then DISCONNECT.
func (s *session) disconnect(ctx context.Context) error {
	var err error
	if s.c.status != "" && !s.isLost() {
		s.mu.Lock()
		tok := s.pc.Publish(s.c.status, 1, true, StatusOffline)
		s.mu.Unlock()
		if werr := waitToken(ctx, tok); werr != nil {
			err = fmt.Errorf("transport: publish %q to %s on %s before disconnect: %w", StatusOffline, s.c.status, s.url.Redacted(), werr)
		}
	}
	s.markLost(ErrClosed)
	done := make(chan struct{})
	go func() {
		s.pc.Disconnect(250)
		close(done)
	}()
	select {
	case <-done:
	case <-time.After(2 * time.Second):
		s.abort(ErrClosed) // paho hung in Disconnect: drop the socket
	}
	return err
}

// waitToken waits for a paho token without Wait (#563) and gives up with ctx.
func waitToken(ctx context.Context, tok mqtt.Token) error {
	select {
	case <-tok.Done():
		return tok.Error()
	case <-ctx.Done():
		return ctx.Err()
	}
}

// nullStore is a paho Store that keeps nothing: paho's own resend-from-store
// on reconnect is replaced by the agent's spool, and every connection gets a
// fresh paho client anyway.
type nullStore struct{}

func (nullStore) Open()                             {}
func (nullStore) Put(string, packets.ControlPacket) {}
func (nullStore) Get(string) packets.ControlPacket  { return nil }
func (nullStore) All() []string                     { return nil }
func (nullStore) Del(string)                        {}
func (nullStore) Close()                            {}
func (nullStore) Reset()                            {}

// Message is one message received on a subscription.
type Message struct {
	Topic     string
	Payload   []byte
	QoS       byte
	Retained  bool
	Duplicate bool
	// Queued is how many messages of the same subscription were waiting
	// behind this one when its handler was called: 0 means the queue ran
	// empty, the moment for a handler that commits in groups to commit.
	Queued int
}

type subscription struct {
	topic string
	qos   byte
	ch    chan delivery
	stop  chan struct{}
	// manual: the handler acknowledges (SubscribeAck); otherwise a
	// message is acknowledged as soon as it is queued.
	manual bool
}

// delivery is a queued message and its acknowledgement.
type delivery struct {
	m   Message
	ack func()
}

// Subscribe registers handler for the topic filter at qos: subscribed on the
// live connection now (if one is up; its error is returned) and again after
// every reconnect. handler runs on a goroutine of its own, one message at a
// time in arrival order. paho's reader only queues the message
// (SubscriptionBuffer deep), so a slow handler does not stall keepalive
// unless the queue is full. A QoS 1 message is acknowledged once queued:
// if the process dies before handler ran, the message is lost. Use
// SubscribeAck when that matters.
func (c *Client) Subscribe(ctx context.Context, topic string, qos byte, handler func(Message)) error {
	return c.subscribe(ctx, topic, qos, false, func(m Message, _ func()) { handler(m) })
}

// SubscribeAck is Subscribe for handlers that acknowledge each QoS 1
// message themselves, by calling ack once the message is safe (written
// and synced, say): a message whose ack was not called before a crash or a
// lost connection is delivered again by the broker (for a persistent
// session, CleanSession false). Calling ack more than once is harmless;
// an ack after the message's connection is gone is dropped (the broker
// redelivers it on the next connection, where it must be acknowledged
// again). PUBACKs go out in the order the acks are called; the broker
// sends no more than its in-flight limit (mosquitto: max_inflight_messages,
// default 20) unacknowledged messages, so a handler that holds acks back
// to commit in groups should commit when its queue runs empty rather than
// wait for a larger group.
func (c *Client) SubscribeAck(ctx context.Context, topic string, qos byte, handler func(m Message, ack func())) error {
	return c.subscribe(ctx, topic, qos, true, handler)
}

func (c *Client) subscribe(ctx context.Context, topic string, qos byte, manual bool, handler func(Message, func())) error {
	if qos > 1 {
		return fmt.Errorf("transport: subscribe %s: QoS %d not supported (use 0 or 1)", topic, qos)
	}
	sub := &subscription{topic: topic, qos: qos, ch: make(chan delivery, c.opts.SubscriptionBuffer), stop: make(chan struct{}), manual: manual}
	c.mu.Lock()
	select {
	case <-c.closing:
		c.mu.Unlock()
		return ErrClosed
	default:
	}
	c.subs = append(c.subs, sub)
	s := c.cur
	c.subWG.Add(1)
	c.mu.Unlock()
	go func() {
		defer c.subWG.Done()
		for {
			select {
			case d := <-sub.ch:
				d.m.Queued = len(sub.ch)
				handler(d.m, d.ack)
			case <-sub.stop:
				return
			}
		}
	}()
	if s != nil && !s.isLost() {
		return s.subscribe(ctx, sub)
	}
	return nil
}

func (s *session) subscribe(ctx context.Context, sub *subscription) error {
	tok := s.pc.Subscribe(sub.topic, sub.qos, sub.deliver)
	if err := waitToken(ctx, tok); err != nil {
		return fmt.Errorf("transport: subscribe %s on %s: %w", sub.topic, s.url.Redacted(), err)
	}
	if st, ok := tok.(*mqtt.SubscribeToken); ok {
		if q, ok := st.Result()[sub.topic]; ok && q == 0x80 {
			return fmt.Errorf("transport: subscribe %s on %s: refused by the broker (check its ACL for this client)", sub.topic, s.url.Redacted())
		}
	}
	return nil
}

func (sub *subscription) deliver(_ mqtt.Client, m mqtt.Message) {
	d := delivery{m: Message{Topic: m.Topic(), Payload: m.Payload(), QoS: m.Qos(), Retained: m.Retained(), Duplicate: m.Duplicate()}, ack: m.Ack}
	if !sub.manual {
		d.ack = func() {}
	}
	select {
	case sub.ch <- d:
		if !sub.manual {
			m.Ack()
		}
	case <-sub.stop:
		// Not queued: not acknowledged either, so the broker sends it
		// again to a persistent session.
	}
}
