//go:build nometrics

package status

import (
	"context"
	"errors"
	"testing"
)

// TestNoMetricsBuild: a build without the Prometheus endpoint refuses a
// configured metrics.listen with an error that says what to do.
func TestNoMetricsBuild(t *testing.T) {
	var c Counters
	if err := ServeMetrics(context.Background(), "", &c); err != nil {
		t.Fatalf("empty listen must be off: %v", err)
	}
	err := ServeMetrics(context.Background(), "127.0.0.1:9108", &c)
	if !errors.Is(err, ErrNoMetrics) {
		t.Fatalf("got %v, want ErrNoMetrics", err)
	}
}
