package transport

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"net/url"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// Defaults of ClientOptions.
const (
	DefaultKeepalive      = 30 * time.Second
	DefaultBackoffBase    = time.Second
	DefaultBackoffMax     = 2 * time.Minute
	DefaultInflight       = 1024
	MaxInflight           = 65535 // MQTT packet identifiers are 16-bit, 0 excluded
	DefaultConnectTimeout = 15 * time.Second
	DefaultWriteTimeout   = 10 * time.Second
	DefaultStatusTopic    = "devices/{id}/status"
	DefaultSubBuffer      = 256

	// StatusOnline is published retained to StatusTopic after every connect.
	StatusOnline = "online"
	// StatusOffline is the retained last will, and what Close publishes.
	StatusOffline = "offline"

	// stableAfter: a connection that lived this long resets the backoff.
	stableAfter = 10 * time.Second
)

// ClientOptions configures a Client. Zero values take the defaults named on
// each field.
type ClientOptions struct {
	// URLs are the brokers, tried in order on every (re)connect:
	// mqtts://, ssl:// or tls:// (TLS); tcp:// or mqtt:// only with
	// AllowPlaintext.
	URLs []string
	// TLS is the client configuration for TLS URLs (certificate, roots,
	// session cache). It is cloned per connection; the session cache is shared,
	// so reconnects resume. An empty ServerName is taken from the URL's host.
	TLS *tls.Config
	// AllowPlaintext permits tcp:// and mqtt:// URLs (a warning is logged).
	AllowPlaintext bool
	// ClientID is the MQTT client identifier (the device id). Required.
	ClientID string
	// Keepalive is the MQTT keepalive (default 30 s).
	Keepalive time.Duration
	// CleanSession asks the broker to drop the session on connect (default
	// false: subscriptions and queued QoS 1 messages survive reconnects).
	CleanSession bool
	// BackoffBase and BackoffMax shape the reconnect delay after a round in
	// which every URL failed: uniform in [0, min(BackoffMax, BackoffBase·2^n))
	// ("full jitter"). Defaults 1 s and 2 min.
	BackoffBase, BackoffMax time.Duration
	// ConnectTimeout bounds one connection attempt: TCP, TLS handshake,
	// CONNECT/CONNACK, subscriptions and the "online" status (default 15 s).
	ConnectTimeout time.Duration
	// WriteTimeout bounds one socket write and how long a Publish may wait
	// for paho's writer (default 10 s).
	WriteTimeout time.Duration
	// StatusTopic receives "online" (retained, QoS 1) after every connect and
	// is the last will: "offline", retained, QoS 1. "{id}" is replaced by
	// ClientID. Default "devices/{id}/status"; "-" disables both.
	StatusTopic string
	// Inflight bounds the messages handed to the broker connection whose done
	// callback has not run yet (default 1024, at most 65535).
	Inflight int
	// DisableCoalescing hands paho the TLS connection itself, one TLS record
	// per MQTT packet (for comparison; the default coalesces writes).
	DisableCoalescing bool
	// CoalesceBuffer is the coalescing write buffer (default 32 KiB).
	CoalesceBuffer int
	// SubscriptionBuffer is the queue between paho and each subscription
	// handler (default 256 messages).
	SubscriptionBuffer int
	// Logger receives connection events (default slog.Default()).
	Logger *slog.Logger
	// ExplainError, when set, turns a failed handshake or CONNECT into an
	// error naming the cause and what to do (TLSIdentity.ExplainTLSError).
	// peer is host:port; afterHandshake is true for errors from the first
	// read after a completed handshake (TLS 1.3 reports a rejected client
	// certificate there).
	ExplainError func(peer string, err error, afterHandshake bool) error
}

// Client is an MQTT client over TLS that owns connecting, failover and
// reconnecting, and implements Publisher. A new paho client is made for
// every connection attempt; paho's own reconnect logic is not used.
type Client struct {
	opts   ClientOptions
	urls   []endpoint
	status string // resolved StatusTopic, "" when disabled
	log    *slog.Logger

	sem       chan struct{} // in-flight window
	inflight  atomic.Int64
	peak      atomic.Int64
	published atomic.Uint64
	acked     atomic.Uint64
	lostCount atomic.Uint64
	connects  atomic.Uint64
	failures  atomic.Uint64
	wc        writeCounters

	connCh chan struct{}

	mu       sync.Mutex
	cur      *session      // the live session, nil while down
	changed  chan struct{} // closed and replaced whenever cur changes
	lastErr  error
	lastAt   time.Time
	subs     []*subscription
	started  bool
	cancel   context.CancelFunc
	runDone  chan struct{}
	tail     chan struct{} // completion of the newest session's callbacks
	graceful atomic.Bool

	closing   chan struct{}
	closeOnce sync.Once
	subWG     sync.WaitGroup
}

var _ Publisher = (*Client)(nil)

// NewClient checks opts and returns a Client that is not connected yet:
// call Start.
func NewClient(opts ClientOptions) (*Client, error) {
	if opts.Logger == nil {
		opts.Logger = slog.Default()
	}
	if opts.ClientID == "" {
		return nil, errors.New("transport: client id is empty: set device_id")
	}
	if len(opts.URLs) == 0 {
		return nil, errors.New("transport: no broker URL: set broker.urls")
	}
	def := func(d *time.Duration, v time.Duration) {
		if *d <= 0 {
			*d = v
		}
	}
	def(&opts.Keepalive, DefaultKeepalive)
	def(&opts.BackoffBase, DefaultBackoffBase)
	def(&opts.BackoffMax, DefaultBackoffMax)
	def(&opts.ConnectTimeout, DefaultConnectTimeout)
	def(&opts.WriteTimeout, DefaultWriteTimeout)
	if opts.BackoffMax < opts.BackoffBase {
		opts.BackoffMax = opts.BackoffBase
	}
	if opts.Inflight <= 0 {
		opts.Inflight = DefaultInflight
	}
	if opts.Inflight > MaxInflight {
		return nil, fmt.Errorf("transport: inflight %d exceeds %d (16-bit MQTT packet identifiers): lower telemetry.inflight", opts.Inflight, MaxInflight)
	}
	if opts.SubscriptionBuffer <= 0 {
		opts.SubscriptionBuffer = DefaultSubBuffer
	}
	if opts.StatusTopic == "" {
		opts.StatusTopic = DefaultStatusTopic
	}
	c := &Client{
		opts:    opts,
		log:     opts.Logger.With("component", "mqtt", "client_id", opts.ClientID),
		sem:     make(chan struct{}, opts.Inflight),
		connCh:  make(chan struct{}, 1),
		changed: make(chan struct{}),
		closing: make(chan struct{}),
	}
	if opts.StatusTopic != "-" {
		c.status = strings.ReplaceAll(opts.StatusTopic, "{id}", opts.ClientID)
		c.status = strings.ReplaceAll(c.status, "{device_id}", opts.ClientID)
	}
	for i, raw := range opts.URLs {
		u, secure, err := parseMQTTURL(raw, opts.AllowPlaintext)
		if err != nil {
			return nil, fmt.Errorf("transport: broker.urls[%d]: %w", i, err)
		}
		if !secure {
			c.log.Warn("plaintext MQTT allowed by broker.allow_plaintext: the device certificate is not used and traffic is readable on the network", "url", u.Redacted())
		} else if opts.TLS == nil {
			return nil, fmt.Errorf("transport: broker.urls[%d] %s needs a TLS configuration (none given)", i, u.Redacted())
		}
		c.urls = append(c.urls, endpoint{u: u, secure: secure})
	}
	return c, nil
}

// parseMQTTURL checks one broker URL: scheme, host and port, and whether it
// uses TLS. Plaintext schemes are refused unless allowPlaintext.
func parseMQTTURL(raw string, allowPlaintext bool) (u *url.URL, secure bool, err error) {
	u, err = url.Parse(raw)
	if err != nil {
		return nil, false, fmt.Errorf("broker URL %q: %w", raw, err)
	}
	switch strings.ToLower(u.Scheme) {
	case "mqtts", "ssl", "tls", "tcps", "mqtt+ssl":
		secure = true
	case "tcp", "mqtt":
		if !allowPlaintext {
			return nil, false, fmt.Errorf("broker URL %s is plaintext MQTT (%s://): refused; use mqtts:// or set broker.allow_plaintext: true", u.Redacted(), u.Scheme)
		}
	default:
		return nil, false, fmt.Errorf("broker URL %s: unsupported scheme %q (use mqtts://host:8883)", u.Redacted(), u.Scheme)
	}
	if u.Hostname() == "" {
		return nil, false, fmt.Errorf("broker URL %s: no host", u.Redacted())
	}
	if u.Port() == "" {
		port := "8883"
		if !secure {
			port = "1883"
		}
		u.Host = u.Host + ":" + port
	}
	return u, secure, nil
}

// Start launches the goroutine that connects and keeps reconnecting until
// ctx is done or Close is called. Cancelling ctx drops the connection
// without DISCONNECT, so the broker publishes the last will; Close is the
// graceful way. Start returns at once; see WaitConnected.
func (c *Client) Start(ctx context.Context) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	select {
	case <-c.closing:
		return ErrClosed
	default:
	}
	if c.started {
		return errors.New("transport: client already started")
	}
	c.started = true
	ctx, c.cancel = context.WithCancel(ctx)
	c.runDone = make(chan struct{})
	go c.run(ctx)
	return nil
}

// run is the one place that owns connect and reconnect.
func (c *Client) run(ctx context.Context) {
	defer close(c.runDone)
	attempt := 0
	for {
		s, err := c.connectRound(ctx)
		if err != nil {
			if ctx.Err() != nil {
				return
			}
			d := backoff(c.opts.BackoffBase, c.opts.BackoffMax, attempt)
			attempt++
			c.log.Warn("no broker reachable; retrying", "attempt", attempt, "backoff", d.Round(time.Millisecond), "err", err)
			t := time.NewTimer(d)
			select {
			case <-t.C:
			case <-ctx.Done():
				t.Stop()
				return
			}
			continue
		}
		c.install(s)
		select {
		case <-s.lost:
			c.uninstall(s)
			lived := time.Since(s.since)
			if errors.Is(s.cause(), errRedial) {
				c.log.Info("broker connection ended for a redial", "broker", s.url.Redacted(), "after", lived.Round(time.Millisecond), "reason", s.cause())
			} else {
				c.log.Warn("broker connection lost", "broker", s.url.Redacted(), "after", lived.Round(time.Millisecond), "err", s.cause())
				c.setErr(fmt.Errorf("connection to %s lost: %w", s.url.Redacted(), s.cause()))
			}
			if lived >= stableAfter {
				attempt = 0
			}
		case <-ctx.Done():
			if !c.graceful.Load() {
				// Cancelled, not closed: drop the socket without DISCONNECT so
				// the broker publishes the last will.
				s.abort(ErrClosed)
				c.uninstall(s)
			}
			return
		}
	}
}

// connectRound tries every URL once, in order, and returns the first
// connection that came up.
func (c *Client) connectRound(ctx context.Context) (*session, error) {
	var errs []error
	for _, ep := range c.urls {
		s, err := c.dial(ctx, ep)
		if err == nil {
			return s, nil
		}
		c.failures.Add(1)
		c.setErr(err)
		errs = append(errs, err)
		if ctx.Err() != nil {
			return nil, ctx.Err()
		}
		c.log.Info("broker connection attempt failed", "broker", ep.u.Redacted(), "err", err)
	}
	return nil, errors.Join(errs...)
}

// backoff returns the full-jitter delay before reconnect round attempt+1.
func backoff(base, limit time.Duration, attempt int) time.Duration {
	ceil := limit
	if attempt < 32 {
		if d := base << uint(attempt); d > 0 && d < limit {
			ceil = d
		}
	}
	if ceil <= 0 {
		return 0
	}
	return rand.N(ceil)
}

// install makes s the live session, starts its callback goroutine and
// signals Connections.
func (c *Client) install(s *session) {
	c.mu.Lock()
	prev := c.tail
	c.tail = s.completed
	c.cur = s
	close(c.changed)
	c.changed = make(chan struct{})
	c.mu.Unlock()
	go s.complete(prev)
	n := c.connects.Add(1)
	st := s.tlsState
	attrs := []any{"broker", s.url.Redacted(), "connection", n}
	if st != nil {
		attrs = append(attrs, "tls", tls.VersionName(st.Version), "cipher", tls.CipherSuiteName(st.CipherSuite), "resumed", st.DidResume)
	}
	c.log.Info("connected to broker", attrs...)
	select {
	case c.connCh <- struct{}{}:
	default:
	}
}

func (c *Client) uninstall(s *session) {
	c.mu.Lock()
	if c.cur == s {
		c.cur = nil
		close(c.changed)
		c.changed = make(chan struct{})
	}
	c.mu.Unlock()
}

func (c *Client) setErr(err error) {
	c.mu.Lock()
	c.lastErr, c.lastAt = err, time.Now()
	c.mu.Unlock()
}

// liveSession waits until a connection is up.
func (c *Client) liveSession(ctx context.Context) (*session, error) {
	for {
		c.mu.Lock()
		s, ch := c.cur, c.changed
		c.mu.Unlock()
		if s != nil && !s.isLost() {
			return s, nil
		}
		select {
		case <-ch:
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-c.closing:
			return nil, ErrClosed
		}
	}
}

// WaitConnected blocks until a broker connection is up or ctx is done.
func (c *Client) WaitConnected(ctx context.Context) error {
	_, err := c.liveSession(ctx)
	return err
}

// Publish implements Publisher. payload must not be modified until done
// runs. qos is 0 or 1. Calls are serialized per connection, so messages from
// one goroutine go out, and are acknowledged, in call order. A QoS 0 message
// counts as written once it is in the coalescing buffer (flushed within
// microseconds); if the connection drops before the flush it is lost, as
// QoS 0 allows.
func (c *Client) Publish(ctx context.Context, topic string, qos byte, retained bool, payload []byte, done func(error)) error {
	if qos > 1 {
		return fmt.Errorf("transport: publish to %s: QoS %d not supported (use 0 or 1)", topic, qos)
	}
	if done == nil {
		done = func(error) {}
	}
	select {
	case <-c.closing:
		return ErrClosed
	default:
	}
	select {
	case c.sem <- struct{}{}:
	case <-ctx.Done():
		return ctx.Err()
	case <-c.closing:
		return ErrClosed
	}
	for {
		s, err := c.liveSession(ctx)
		if err != nil {
			<-c.sem
			return err
		}
		if s.publish(topic, qos, retained, payload, done) {
			n := c.inflight.Add(1)
			for {
				p := c.peak.Load()
				if n <= p || c.peak.CompareAndSwap(p, n) {
					break
				}
			}
			c.published.Add(1)
			return nil
		}
		// s died between liveSession and publish: wait for the next one.
	}
}

// finish runs one done callback and frees its window slot.
func (c *Client) finish(p pending, err error) {
	switch {
	case err == nil:
		c.acked.Add(1)
	case errors.Is(err, ErrConnectionLost):
		c.lostCount.Add(1)
	}
	c.inflight.Add(-1)
	p.done(err)
	<-c.sem
}

// Connected reports whether a broker connection is up now.
func (c *Client) Connected() bool {
	c.mu.Lock()
	s := c.cur
	c.mu.Unlock()
	return s != nil && !s.isLost()
}

// Connections receives a value after every successful (re)connection.
func (c *Client) Connections() <-chan struct{} { return c.connCh }

// ConnectionState returns the TLS state of the live connection (DidResume,
// version, cipher suite, peer certificates); false while down or plaintext.
func (c *Client) ConnectionState() (tls.ConnectionState, bool) {
	c.mu.Lock()
	s := c.cur
	c.mu.Unlock()
	if s == nil || s.tlsState == nil {
		return tls.ConnectionState{}, false
	}
	return *s.tlsState, true
}

// Stats is a snapshot of the client's counters for status and metrics.
type Stats struct {
	Connected  bool   `json:"connected"`
	Broker     string `json:"broker"` // URL of the live connection, "" while down
	Resumed    bool   `json:"tls_resumed"`
	Published  uint64 `json:"published"` // handed to a connection
	Acked      uint64 `json:"acked"`     // done(nil): PUBACK (QoS 1) or written (QoS 0)
	Lost       uint64 `json:"lost"`      // done(ErrConnectionLost)
	Inflight   int64  `json:"inflight"`  // handed over, done not yet called
	InflightHi int64  `json:"inflight_peak"`
	Connects   uint64 `json:"connects"`   // successful connections
	Reconnects uint64 `json:"reconnects"` // Connects after the first
	Failures   uint64 `json:"connect_failures"`
	// PacketWrites is paho's Write calls (about one per MQTT packet) and
	// SocketWrites the writes that reached the TLS connection through the
	// coalescing layer; their ratio is packets per TLS write.
	PacketWrites uint64    `json:"packet_writes"`
	SocketWrites uint64    `json:"socket_writes"`
	SocketBytes  uint64    `json:"socket_bytes"`
	LastError    string    `json:"last_error,omitempty"`
	LastErrorAt  time.Time `json:"last_error_at,omitzero"`
}

// Stats returns the current counters.
func (c *Client) Stats() Stats {
	c.mu.Lock()
	s, lastErr, lastAt := c.cur, c.lastErr, c.lastAt
	c.mu.Unlock()
	st := Stats{
		Published:    c.published.Load(),
		Acked:        c.acked.Load(),
		Lost:         c.lostCount.Load(),
		Inflight:     c.inflight.Load(),
		InflightHi:   c.peak.Load(),
		Connects:     c.connects.Load(),
		Failures:     c.failures.Load(),
		PacketWrites: c.wc.writes.Load(),
		SocketWrites: c.wc.flushes.Load(),
		SocketBytes:  c.wc.bytes.Load(),
	}
	if st.Connects > 0 {
		st.Reconnects = st.Connects - 1
	}
	if s != nil && !s.isLost() {
		st.Connected = true
		st.Broker = s.url.Redacted()
		if s.tlsState != nil {
			st.Resumed = s.tlsState.DidResume
		}
	}
	if lastErr != nil {
		st.LastError, st.LastErrorAt = lastErr.Error(), lastAt
	}
	return st
}

// Close disconnects gracefully: no new Publish is accepted, the in-flight
// messages get until ctx is done to be acknowledged, "offline" is published
// retained to the status topic, then DISCONNECT (so the broker discards the
// last will). Callbacks of messages still pending get ErrClosed.
func (c *Client) Close(ctx context.Context) error {
	var err error
	c.closeOnce.Do(func() { err = c.close(ctx) })
	return err
}

func (c *Client) close(ctx context.Context) error {
	close(c.closing)
	// Let the in-flight messages drain.
	tick := time.NewTicker(2 * time.Millisecond)
	for c.inflight.Load() > 0 && c.Connected() && ctx.Err() == nil {
		select {
		case <-tick.C:
		case <-ctx.Done():
		}
	}
	tick.Stop()

	c.mu.Lock()
	started := c.started
	c.mu.Unlock()
	if started {
		c.graceful.Store(true)
		c.cancel()
		<-c.runDone
	}
	c.mu.Lock()
	s, tail := c.cur, c.tail
	c.mu.Unlock()
	var err error
	if s != nil {
		dctx := ctx
		if ctx.Err() != nil {
			// The drain used up ctx: still try to leave "offline" behind.
			var cancel context.CancelFunc
			dctx, cancel = context.WithTimeout(context.Background(), time.Second)
			defer cancel()
		}
		err = s.disconnect(dctx)
		c.uninstall(s)
	}
	if tail != nil {
		select {
		case <-tail:
		case <-ctx.Done():
		}
	}
	c.mu.Lock()
	for _, sub := range c.subs {
		close(sub.stop)
	}
	c.subs = nil
	c.mu.Unlock()
	c.subWG.Wait()
	if err != nil {
		return err
	}
	c.log.Info("disconnected from broker (graceful)")
	return nil
}
