// Package testmqtt starts transport clients for tests that talk to a real
// broker (the daemon, collector, sealing and chaos tests).
package testmqtt

import (
	"context"
	"testing"
	"time"

	"github.com/tpmagent/tpmagent/transport"
)

// Start makes a transport.Client from opts, starts it and closes it (within
// 3 s) when the test ends. It then waits up to wait for the first
// connection and returns the client with WaitConnected's error, so that the
// caller can fail with what it knows (the broker's log, say).
func Start(tb testing.TB, opts transport.ClientOptions, wait time.Duration) (*transport.Client, error) {
	tb.Helper()
	c, err := transport.NewClient(opts)
	if err != nil {
		tb.Fatalf("client %s: %v", opts.ClientID, err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	if err := c.Start(ctx); err != nil {
		cancel()
		tb.Fatalf("client %s: start: %v", opts.ClientID, err)
	}
	tb.Cleanup(func() {
		cctx, ccancel := context.WithTimeout(context.Background(), 3*time.Second)
		_ = c.Close(cctx)
		ccancel()
		cancel()
	})
	wctx, wcancel := context.WithTimeout(ctx, wait)
	defer wcancel()
	return c, c.WaitConnected(wctx)
}
