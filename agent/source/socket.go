package source

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"strconv"
	"sync"
	"time"

	"github.com/tpmagent/tpmagent/agent/reading"
	"github.com/tpmagent/tpmagent/agent/status"
)

// Socket is the telemetry socket: a unix stream socket (telemetry.socket,
// mode 0660) where local applications write one JSON reading per line. Every
// line gets one reply line, in order:
//
//	ok                              the reading is durable in the spool
//	error: line N: <reason>         the line was rejected (nothing stored)
//
// A bad line is rejected and counted on its own; the stream goes on. A client
// that half-closes its side (shutdown(SHUT_WR)) gets the remaining replies and
// then EOF.
type Socket struct {
	// Path of the socket file.
	Path string
	// Mode of the socket file; 0 means 0660.
	Mode os.FileMode
	// MaxLine is the longest accepted line; 0 means reading.MaxLineBytes.
	MaxLine int
	// Logger; nil discards.
	Logger *slog.Logger
	// Now stamps readings without ts; nil means time.Now.
	Now func() time.Time

	ready chan struct{}
	once  sync.Once
}

// Name implements Source.
func (*Socket) Name() string { return "socket" }

// Ready is closed once the socket listens.
func (s *Socket) Ready() <-chan struct{} {
	s.once.Do(func() { s.ready = make(chan struct{}) })
	return s.ready
}

// Run implements Source. It stops accepting when ctx ends, stops reading
// from open connections, answers every line already read, and returns.
func (s *Socket) Run(ctx context.Context, sink Sink) error {
	mode := s.Mode
	if mode == 0 {
		mode = 0o660
	}
	log := s.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	l, err := status.ListenUnix(s.Path, mode)
	if err != nil {
		return fmt.Errorf("telemetry.socket: %w", err)
	}
	s.Ready()
	close(s.ready)
	var wg sync.WaitGroup
	var mu sync.Mutex
	conns := map[net.Conn]bool{}
	stop := context.AfterFunc(ctx, func() {
		l.Close()
		mu.Lock()
		for c := range conns {
			_ = c.SetReadDeadline(time.Now()) // stop reading; replies still go out
		}
		mu.Unlock()
	})
	defer stop()
	for {
		c, err := l.Accept()
		if err != nil {
			if ctx.Err() != nil {
				break
			}
			wg.Wait()
			return fmt.Errorf("telemetry.socket %s: accept: %w", s.Path, err)
		}
		mu.Lock()
		conns[c] = true
		mu.Unlock()
		if ctx.Err() != nil {
			_ = c.SetReadDeadline(time.Now())
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			s.serve(ctx, c, sink, log)
			mu.Lock()
			delete(conns, c)
			mu.Unlock()
		}()
	}
	wg.Wait()
	return nil
}

// reply is the answer to one line, filled in when known.
type reply struct {
	ready chan struct{}
	line  int
	err   error
}

func (s *Socket) serve(ctx context.Context, c net.Conn, sink Sink, log *slog.Logger) {
	defer c.Close()
	maxLine := s.MaxLine
	if maxLine <= 0 {
		maxLine = reading.MaxLineBytes
	}
	now := s.Now
	if now == nil {
		now = time.Now
	}
	replies := make(chan *reply, 4096)
	writerDone := make(chan struct{})
	go func() {
		defer close(writerDone)
		writeReplies(c, replies, log)
	}()
	r := bufio.NewReaderSize(c, maxLine+1)
	for n := 1; ; n++ {
		line, err := r.ReadSlice('\n')
		if errors.Is(err, bufio.ErrBufferFull) {
			size := len(line)
			for errors.Is(err, bufio.ErrBufferFull) { // skip the rest of the line
				line, err = r.ReadSlice('\n')
				size += len(line)
			}
			if err == nil {
				size-- // the newline
			}
			perr := reading.LineTooLong(size, maxLine)
			sink.Reject(perr)
			replies <- done(n, perr)
			if err != nil {
				break
			}
			continue
		}
		if len(line) == 0 && err != nil {
			break
		}
		if err == nil {
			line = line[:len(line)-1]
		}
		if len(line) > 0 && line[len(line)-1] == '\r' {
			line = line[:len(line)-1]
		}
		rd, perr := reading.Parse(line, now)
		if perr != nil {
			sink.Reject(perr)
			replies <- done(n, perr)
		} else {
			rp := &reply{ready: make(chan struct{}), line: n}
			replies <- rp
			if serr := sink.Submit(ctx, rd, func(err error) { rp.err = err; close(rp.ready) }); serr != nil {
				rp.err = serr
				close(rp.ready)
			}
		}
		if err != nil {
			break // EOF without a final newline, deadline, or a broken connection
		}
	}
	close(replies)
	<-writerDone
}

func done(line int, err error) *reply {
	rp := &reply{ready: make(chan struct{}), line: line, err: err}
	close(rp.ready)
	return rp
}

// writeReplies writes one line per reply, in order, flushing whenever no
// further reply is ready.
func writeReplies(c net.Conn, replies <-chan *reply, log *slog.Logger) {
	w := bufio.NewWriterSize(c, 16<<10)
	broken := false
	for rp := range replies {
		select {
		case <-rp.ready:
		default:
			if !broken && w.Flush() != nil {
				broken = true
			}
			<-rp.ready
		}
		if broken {
			continue // keep draining so the reader never blocks
		}
		if rp.err == nil {
			_, _ = w.WriteString("ok\n")
		} else {
			_, _ = w.WriteString("error: line " + strconv.Itoa(rp.line) + ": " + oneLine(rp.err.Error()) + "\n")
		}
		if len(replies) == 0 {
			if err := w.Flush(); err != nil {
				broken = true
				log.Debug("telemetry socket client went away", "err", err)
			}
		}
	}
	if !broken {
		_ = w.Flush()
	}
	if cw, ok := c.(interface{ CloseWrite() error }); ok {
		_ = cw.CloseWrite()
	}
}

func oneLine(s string) string {
	b := []byte(s)
	for i, c := range b {
		if c == '\n' || c == '\r' {
			b[i] = ' '
		}
	}
	return string(b)
}

// Send writes lines (each one JSON reading, without newline) to the
// telemetry socket at path and returns the replies in order. It is what
// `tpmagent send` does.
func Send(ctx context.Context, path string, lines io.Reader, replyFn func(line int, reply string)) (ok, rejected int, err error) {
	var d net.Dialer
	c, err := d.DialContext(ctx, "unix", path)
	if err != nil {
		return 0, 0, fmt.Errorf("connect to telemetry.socket %s: %w (is `tpmagent run` running?)", path, err)
	}
	defer c.Close()
	stop := context.AfterFunc(ctx, func() { _ = c.SetDeadline(time.Now()) })
	defer stop()
	werr := make(chan error, 1)
	go func() {
		_, err := io.Copy(c, lines)
		if cw, ok := c.(interface{ CloseWrite() error }); ok {
			_ = cw.CloseWrite()
		}
		werr <- err
	}()
	sc := bufio.NewScanner(c)
	n := 0
	for sc.Scan() {
		n++
		if sc.Text() == "ok" {
			ok++
		} else {
			rejected++
		}
		if replyFn != nil {
			replyFn(n, sc.Text())
		}
	}
	if err := sc.Err(); err != nil {
		return ok, rejected, fmt.Errorf("read replies from %s: %w", path, err)
	}
	if err := <-werr; err != nil {
		return ok, rejected, fmt.Errorf("write readings to %s: %w", path, err)
	}
	return ok, rejected, nil
}
