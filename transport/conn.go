package transport

import (
	"bufio"
	"errors"
	"net"
	"runtime"
	"sync"
	"sync/atomic"
	"time"
)

// DefaultCoalesceBuffer is the write buffer of the coalescing connection: two
// TLS records' worth of MQTT packets per flush at most.
const DefaultCoalesceBuffer = 32 << 10

// flushYields is how often the woken flusher yields the processor before
// taking a buffer that is less than half full, so that a writer running
// right now can add to it. When nothing else is runnable a yield returns at
// once (an idle PINGREQ is not delayed measurably); under load it lifts the
// packets per TLS write from about 4 to 20-100 (BenchmarkPublish).
const flushYields = 2

// closeFlushTimeout bounds how long Close waits to flush what is still
// buffered (the DISCONNECT packet, typically) before it closes the socket.
const closeFlushTimeout = time.Second

// writeCounters count what the coalescing connections handed to the socket,
// so that status and benchmarks can show how many MQTT packets a TLS write
// carried. Shared by every connection of one Client.
type writeCounters struct {
	writes  atomic.Uint64 // Write calls from paho (one per MQTT packet)
	flushes atomic.Uint64 // writes to the underlying connection
	bytes   atomic.Uint64 // bytes written to the underlying connection
}

// coalescingConn sits between paho and the TLS connection. paho writes every
// MQTT packet with its own Write call, which on a tls.Conn is one TLS record
// and one syscall per packet. coalescingConn appends writes to a buffer and a
// dedicated flusher goroutine, woken by the first write into an empty buffer,
// yields the processor once or twice (flushYields) and writes whatever has
// accumulated in one call. While the flusher is busy on
// the socket, new packets pile up in the second buffer, so the batch size
// adapts to the load: one packet per write when idle (a PINGREQ or CONNECT
// waits only for a goroutine wake-up, microseconds), many packets per TLS
// record under load. A writer blocks only when the buffer is full while a
// flush is running (back-pressure).
//
// Reads go through a bufio.Reader so that paho's byte-by-byte header reads do
// not each enter the TLS layer.
type coalescingConn struct {
	net.Conn
	r *bufio.Reader

	max          int
	writeTimeout time.Duration
	counters     *writeCounters

	mu       sync.Mutex
	drained  *sync.Cond // signalled when the flusher takes the buffer or fails
	buf      []byte     // filled by Write
	spare    []byte     // the other buffer, written by the flusher
	err      error      // sticky: first write error, or net.ErrClosed after Close
	closing  bool
	kick     chan struct{} // capacity 1: "the buffer is not empty"
	done     chan struct{} // closed when the flusher exits
	closeErr error
	once     sync.Once
}

// newCoalescingConn wraps c. bufSize is the flush threshold (<= 0: default);
// writeTimeout, when positive, bounds each write to the socket.
func newCoalescingConn(c net.Conn, bufSize int, writeTimeout time.Duration, counters *writeCounters) *coalescingConn {
	if bufSize <= 0 {
		bufSize = DefaultCoalesceBuffer
	}
	if counters == nil {
		counters = &writeCounters{}
	}
	cc := &coalescingConn{
		Conn:         c,
		r:            bufio.NewReaderSize(c, bufSize),
		max:          bufSize,
		writeTimeout: writeTimeout,
		counters:     counters,
		buf:          make([]byte, 0, bufSize),
		spare:        make([]byte, 0, bufSize),
		kick:         make(chan struct{}, 1),
		done:         make(chan struct{}),
	}
	cc.drained = sync.NewCond(&cc.mu)
	go cc.flusher()
	return cc
}

// Read reads through the connection's read buffer.
func (c *coalescingConn) Read(p []byte) (int, error) { return c.r.Read(p) }

// Write queues p for the flusher. It returns an error if an earlier flush
// failed or the connection is closed; it blocks only while the buffer is full.
func (c *coalescingConn) Write(p []byte) (int, error) {
	c.counters.writes.Add(1)
	c.mu.Lock()
	for c.err == nil && len(c.buf) > 0 && len(c.buf)+len(p) > c.max {
		c.drained.Wait()
	}
	if c.err != nil {
		err := c.err
		c.mu.Unlock()
		return 0, err
	}
	wasEmpty := len(c.buf) == 0
	c.buf = append(c.buf, p...)
	c.mu.Unlock()
	if wasEmpty {
		select {
		case c.kick <- struct{}{}:
		default:
		}
	}
	return len(p), nil
}

// SetWriteDeadline is accepted and ignored: writes only fill a buffer, and
// the flusher bounds each socket write with the configured write timeout.
// (paho sets and clears a deadline around every packet when its WriteTimeout
// is set; forwarding those would cost two poller updates per message.)
func (c *coalescingConn) SetWriteDeadline(time.Time) error { return nil }

// SetDeadline sets the read deadline only; see SetWriteDeadline.
func (c *coalescingConn) SetDeadline(t time.Time) error { return c.Conn.SetReadDeadline(t) }

// flusher writes the accumulated buffer to the socket until the connection
// closes or a write fails.
func (c *coalescingConn) flusher() {
	defer close(c.done)
	for {
		c.mu.Lock()
		for len(c.buf) == 0 && !c.closing && c.err == nil {
			c.mu.Unlock()
			<-c.kick
			c.mu.Lock()
		}
		if c.err != nil || (len(c.buf) == 0 && c.closing) {
			c.mu.Unlock()
			return
		}
		for i := 0; i < flushYields && len(c.buf) < c.max/2 && !c.closing; i++ {
			c.mu.Unlock()
			runtime.Gosched()
			c.mu.Lock()
		}
		out := c.buf
		c.buf = c.spare[:0]
		c.spare = nil
		c.drained.Broadcast()
		c.mu.Unlock()

		if c.writeTimeout > 0 {
			_ = c.Conn.SetWriteDeadline(time.Now().Add(c.writeTimeout))
		}
		_, err := c.Conn.Write(out)
		c.counters.flushes.Add(1)
		c.counters.bytes.Add(uint64(len(out)))

		c.mu.Lock()
		c.spare = out[:0]
		if err != nil && c.err == nil {
			c.err = err
		}
		failed := c.err != nil && !c.closing
		c.drained.Broadcast()
		c.mu.Unlock()
		if failed {
			// Make paho's reader see the failure too, so the connection is
			// reported lost rather than hanging with unsent packets.
			_ = c.Conn.Close()
			return
		}
	}
}

// Close flushes what is buffered (bounded by closeFlushTimeout) and closes
// the connection. paho closes right after writing DISCONNECT, so the flush
// matters.
func (c *coalescingConn) Close() error {
	c.once.Do(func() {
		_ = c.Conn.SetWriteDeadline(time.Now().Add(closeFlushTimeout))
		c.mu.Lock()
		c.closing = true
		c.mu.Unlock()
		select {
		case c.kick <- struct{}{}:
		default:
		}
		select {
		case <-c.done:
		case <-time.After(closeFlushTimeout):
		}
		c.mu.Lock()
		if c.err == nil {
			c.err = net.ErrClosed
		}
		c.drained.Broadcast()
		c.mu.Unlock()
		c.closeErr = c.Conn.Close()
		// Wake a flusher still waiting for a kick (only when it timed out above).
		select {
		case c.kick <- struct{}{}:
		default:
		}
		if errors.Is(c.closeErr, net.ErrClosed) {
			c.closeErr = nil
		}
	})
	return c.closeErr
}
