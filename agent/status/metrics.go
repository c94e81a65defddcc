//go:build !nometrics

package status

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// Registry returns a new Prometheus registry (not the global one) holding
// the counters as tpmagent_* metrics, read at every scrape, plus the Go and
// process collectors.
func Registry(c *Counters) *prometheus.Registry {
	reg := prometheus.NewRegistry()
	counter := func(name, help string, f func() float64) {
		reg.MustRegister(prometheus.NewCounterFunc(prometheus.CounterOpts{Namespace: "tpmagent", Name: name, Help: help}, f))
	}
	gauge := func(name, help string, f func() float64) {
		reg.MustRegister(prometheus.NewGaugeFunc(prometheus.GaugeOpts{Namespace: "tpmagent", Name: name, Help: help}, f))
	}
	u := func(a interface{ Load() uint64 }) func() float64 { return func() float64 { return float64(a.Load()) } }
	counter("readings_in_total", "Readings accepted from all sources.", u(&c.ReadingsIn))
	counter("readings_rejected_total", "Lines rejected by the reading parser.", u(&c.ReadingsRejected))
	counter("batches_total", "Batches encoded and spooled.", u(&c.Batches))
	counter("messages_published_total", "Messages handed to the broker connection.", u(&c.MessagesPublished))
	counter("messages_acked_total", "Messages acknowledged by the broker (QoS1) or written (QoS0).", u(&c.MessagesAcked))
	counter("messages_failed_total", "Publishes that failed and will be resent after reconnect.", u(&c.MessagesFailed))
	counter("published_bytes_total", "Payload bytes published.", u(&c.Bytes))
	counter("reconnects_total", "Broker connections after the first.", u(&c.Reconnects))
	spool := func(f func(Spool) float64) func() float64 {
		return func() float64 {
			if c.SpoolStats == nil {
				return 0
			}
			return f(c.SpoolStats())
		}
	}
	gauge("spool_records", "Unacknowledged records in the spool.", spool(func(s Spool) float64 { return float64(s.Records) }))
	gauge("spool_bytes", "Bytes of spool segment files.", spool(func(s Spool) float64 { return float64(s.Bytes) }))
	counter("spool_dropped_total", "Unacknowledged records dropped by spool.on_full=drop_oldest.", spool(func(s Spool) float64 { return float64(s.Dropped) }))
	counter("tpm_signatures_total", "Signatures made with the TPM device key.", func() float64 {
		if c.TPMSignatures == nil {
			return 0
		}
		return float64(c.TPMSignatures())
	})
	gauge("broker_connected", "1 when a broker connection is up.", func() float64 {
		if c.Broker != nil && c.Broker() != "" {
			return 1
		}
		return 0
	})
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	return reg
}

// ServeMetrics serves /metrics from Registry(c) on addr (HOST:PORT) until ctx
// is done. An empty addr turns metrics off: it returns nil at once.
func ServeMetrics(ctx context.Context, addr string, c *Counters) error {
	if addr == "" {
		return nil
	}
	l, err := net.Listen("tcp", addr)
	if err != nil {
		return fmt.Errorf("status: metrics.listen %s: %w", addr, err)
	}
	return ServeMetricsOn(ctx, l, c)
}

// ServeMetricsOn is ServeMetrics on an open listener.
func ServeMetricsOn(ctx context.Context, l net.Listener, c *Counters) error {
	mux := http.NewServeMux()
	mux.Handle("/metrics", promhttp.HandlerFor(Registry(c), promhttp.HandlerOpts{}))
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second}
	go func() {
		<-ctx.Done()
		sctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		_ = srv.Shutdown(sctx)
	}()
	if err := srv.Serve(l); err != nil && !errors.Is(err, http.ErrServerClosed) {
		return fmt.Errorf("status: metrics on %s: %w", l.Addr(), err)
	}
	return nil
}
