//go:build chaos

package chaos

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"testing"
)

// forwarder is a TCP proxy between the agent and the broker that can cut
// every connection at once and counts TLS 1.3 handshakes on the wire: a
// ServerHello with a pre_shared_key extension (41) is a resumption, one
// without is a full handshake (the only kind that needs a TPM signature).
type forwarder struct {
	ln       net.Listener
	upstream string

	mu    sync.Mutex
	conns map[net.Conn]struct{}

	full, resumed atomic.Uint64
}

// helloRetryRandom marks a HelloRetryRequest (RFC 8446 section 4.1.3).
var helloRetryRandom = []byte{0xCF, 0x21, 0xAD, 0x74, 0xE5, 0x9A, 0x61, 0x11, 0xBE, 0x1D, 0x8C, 0x02, 0x1E, 0x65, 0xB8, 0x91,
	0xC2, 0xA2, 0x11, 0x16, 0x7A, 0xBB, 0x8C, 0x5E, 0x07, 0x9E, 0x09, 0xE2, 0xC8, 0xA8, 0x33, 0x9C}

func startForwarder(t *testing.T, upstream string) *forwarder {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	f := &forwarder{ln: ln, upstream: upstream, conns: map[net.Conn]struct{}{}}
	go f.serve()
	t.Cleanup(func() { ln.Close(); f.cutAll() })
	return f
}

func (f *forwarder) Addr() string { return f.ln.Addr().String() }

func (f *forwarder) serve() {
	for {
		c, err := f.ln.Accept()
		if err != nil {
			return
		}
		u, err := net.Dial("tcp", f.upstream)
		if err != nil {
			c.Close()
			continue
		}
		f.mu.Lock()
		f.conns[c], f.conns[u] = struct{}{}, struct{}{}
		f.mu.Unlock()
		done := func() {
			c.Close()
			u.Close()
			f.mu.Lock()
			delete(f.conns, c)
			delete(f.conns, u)
			f.mu.Unlock()
		}
		go func() { _, _ = io.Copy(u, c); done() }()
		go func() { f.inspect(c, u); done() }()
	}
}

// inspect forwards server→client bytes and classifies the first
// ServerHello that is not a HelloRetryRequest.
func (f *forwarder) inspect(dst io.Writer, src io.Reader) {
	r := bufio.NewReader(src)
	for {
		var h [5]byte
		if _, err := io.ReadFull(r, h[:]); err != nil {
			return
		}
		body := make([]byte, binary.BigEndian.Uint16(h[3:5]))
		if _, err := io.ReadFull(r, body); err != nil {
			return
		}
		if _, err := dst.Write(append(h[:], body...)); err != nil {
			return
		}
		if h[0] != 22 || len(body) < 4 || body[0] != 2 {
			break // not a handshake record with a ServerHello: give up inspecting
		}
		resumed, retry, ok := parseServerHello(body[4:])
		if !ok {
			break
		}
		if retry {
			continue
		}
		if resumed {
			f.resumed.Add(1)
		} else {
			f.full.Add(1)
		}
		break
	}
	_, _ = io.Copy(dst, r)
}

// parseServerHello reports whether a ServerHello body carries the
// pre_shared_key extension and whether it is a HelloRetryRequest.
func parseServerHello(b []byte) (resumed, retry, ok bool) {
	if len(b) < 2+32+1 {
		return false, false, false
	}
	retry = bytes.Equal(b[2:34], helloRetryRandom)
	b = b[34:]
	sid := int(b[0])
	if len(b) < 1+sid+2+1+2 {
		return false, false, false
	}
	b = b[1+sid+3:]
	extLen := int(binary.BigEndian.Uint16(b))
	b = b[2:]
	if len(b) < extLen {
		return false, false, false
	}
	b = b[:extLen]
	for len(b) >= 4 {
		typ, l := binary.BigEndian.Uint16(b), int(binary.BigEndian.Uint16(b[2:]))
		if typ == 41 {
			resumed = true
		}
		if len(b) < 4+l {
			return false, false, false
		}
		b = b[4+l:]
	}
	return resumed, retry, true
}

// cutAll closes every proxied connection (both sides).
func (f *forwarder) cutAll() {
	f.mu.Lock()
	defer f.mu.Unlock()
	for c := range f.conns {
		c.Close()
	}
}
