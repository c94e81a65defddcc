//go:build !nometrics

package status

import (
	"context"
	"io"
	"net"
	"net/http"
	"strings"
	"testing"
)

func TestMetrics(t *testing.T) {
	var c Counters
	c.MessagesPublished.Add(42)
	c.SpoolStats = func() Spool { return Spool{Records: 9} }
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go ServeMetricsOn(ctx, l, &c)
	resp, err := http.Get("http://" + l.Addr().String() + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	b, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	for _, want := range []string{"tpmagent_messages_published_total 42", "tpmagent_spool_records 9", "go_goroutines", "process_resident_memory_bytes"} {
		if !strings.Contains(string(b), want) {
			t.Errorf("metrics lack %q", want)
		}
	}
	if err := ServeMetrics(ctx, "", &c); err != nil {
		t.Fatalf("empty listen must be off: %v", err)
	}
}
