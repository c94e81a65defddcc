package transport

import (
	"bytes"
	"errors"
	"io"
	"math/rand/v2"
	"net"
	"os"
	"slices"
	"testing"
	"time"
)

// tcpPair returns the two ends of a loopback TCP connection.
func tcpPair(t *testing.T) (client, server net.Conn) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	acc := make(chan net.Conn, 1)
	go func() {
		c, _ := ln.Accept()
		acc <- c
	}()
	client, err = net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	server = <-acc
	if server == nil {
		t.Fatal("accept failed")
	}
	t.Cleanup(func() { client.Close(); server.Close() })
	return client, server
}

// TestCoalescingConnStream: many packet-sized writes arrive intact and in
// order, in fewer socket writes than packets.
func TestCoalescingConnStream(t *testing.T) {
	for _, tc := range []struct {
		name    string
		bufSize int
		maxPkt  int
		n       int
	}{
		{"small packets", 0, 200, 50_000},
		{"packets larger than the buffer", 1024, 5000, 5_000},
	} {
		t.Run(tc.name, func(t *testing.T) {
			a, b := tcpPair(t)
			var wc writeCounters
			cc := newCoalescingConn(a, tc.bufSize, 10*time.Second, &wc)
			var want bytes.Buffer
			got := make(chan []byte, 1)
			go func() {
				all, _ := io.ReadAll(b)
				got <- all
			}()
			r := rand.New(rand.NewPCG(1, 2))
			n := tc.n
			for i := 0; i < n; i++ {
				p := make([]byte, 1+r.IntN(tc.maxPkt))
				for j := range p {
					p[j] = byte(r.Uint32())
				}
				want.Write(p)
				if _, err := cc.Write(p); err != nil {
					t.Fatalf("write %d: %v", i, err)
				}
			}
			if err := cc.Close(); err != nil {
				t.Fatal(err)
			}
			all := <-got
			if !bytes.Equal(all, want.Bytes()) {
				t.Fatalf("received %d bytes, want %d (or contents differ)", len(all), want.Len())
			}
			if w, f := wc.writes.Load(), wc.flushes.Load(); f >= w || w != uint64(n) {
				t.Fatalf("%d packets in %d socket writes: no coalescing", w, f)
			} else {
				t.Logf("%d packets in %d socket writes (%.1f per write)", w, f, float64(w)/float64(f))
			}
		})
	}
}

// TestCoalescingConnLatency: a lone small write (a PINGREQ) reaches the
// peer without waiting for more data.
func TestCoalescingConnLatency(t *testing.T) {
	a, b := tcpPair(t)
	cc := newCoalescingConn(a, 0, time.Second, nil)
	defer cc.Close()
	pingreq := []byte{0xc0, 0x00}
	buf := make([]byte, 2)
	var lat []time.Duration
	for i := 0; i < 50; i++ {
		time.Sleep(2 * time.Millisecond) // idle between pings
		start := time.Now()
		if _, err := cc.Write(pingreq); err != nil {
			t.Fatal(err)
		}
		if _, err := io.ReadFull(b, buf); err != nil {
			t.Fatal(err)
		}
		lat = append(lat, time.Since(start))
	}
	slices.Sort(lat)
	med, p90 := lat[len(lat)/2], lat[len(lat)*9/10]
	t.Logf("lone 2-byte write to peer: median %v, p90 %v, max %v", med, p90, lat[len(lat)-1])
	if med > 2*time.Millisecond {
		t.Fatalf("median latency of a lone write %v exceeds 2 ms: the flusher waits for more data", med)
	}
}

// TestCoalescingConnWriteError: when the socket fails, writes start failing
// and the connection is closed so that paho's reader sees it too.
func TestCoalescingConnWriteError(t *testing.T) {
	a, b := tcpPair(t)
	cc := newCoalescingConn(a, 0, 200*time.Millisecond, nil)
	b.Close()
	deadline := time.Now().Add(5 * time.Second)
	p := make([]byte, 1000)
	var err error
	for err == nil && time.Now().Before(deadline) {
		_, err = cc.Write(p)
		time.Sleep(time.Millisecond)
	}
	if err == nil {
		t.Fatal("writes kept succeeding after the peer closed")
	}
	one := make([]byte, 1)
	_ = a.SetReadDeadline(time.Now().Add(time.Second))
	if _, rerr := cc.Read(one); rerr == nil || errors.Is(rerr, os.ErrDeadlineExceeded) {
		t.Fatalf("read after a failed flush: %v, want the connection closed", rerr)
	}
	_ = cc.Close()
	if _, err := cc.Write(p); err == nil {
		t.Fatal("write after Close succeeded")
	}
}

// TestCoalescingConnBackpressure: a writer faster than the socket is held
// back: the buffer never grows past two buffers' worth.
func TestCoalescingConnBackpressure(t *testing.T) {
	a, b := tcpPair(t)
	const size = 4096
	cc := newCoalescingConn(a, size, 5*time.Second, nil)
	done := make(chan struct{})
	go func() {
		defer close(done)
		p := make([]byte, 100)
		for i := 0; i < 20_000; i++ {
			if _, err := cc.Write(p); err != nil {
				return
			}
			cc.mu.Lock()
			n, s := len(cc.buf), len(cc.spare)
			cc.mu.Unlock()
			if n > size || n+s > 2*size {
				t.Errorf("buffered %d+%d bytes with a %d-byte buffer", n, s, size)
				return
			}
		}
	}()
	// A slow reader.
	buf := make([]byte, 512)
	total := 0
	for total < 20_000*100 {
		k, err := b.Read(buf)
		if err != nil {
			t.Fatal(err)
		}
		total += k
		if total < 200_000 {
			time.Sleep(100 * time.Microsecond)
		}
	}
	<-done
	cc.Close()
}
