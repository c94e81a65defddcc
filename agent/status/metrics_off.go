//go:build nometrics

package status

import (
	"context"
	"errors"
	"fmt"
	"net"
)

// ErrNoMetrics is returned when metrics.listen is set in a build without
// the Prometheus endpoint (built with -tags nometrics to save ≈ 2.9 MB:
// `make cross-small`). The status socket has the same counters.
var ErrNoMetrics = errors.New("this build has no Prometheus endpoint (built with -tags nometrics): leave metrics.listen empty and read `tpmagent status --json`, or install a standard build")

// ServeMetrics returns nil for an empty addr and ErrNoMetrics otherwise.
func ServeMetrics(ctx context.Context, addr string, c *Counters) error {
	if addr == "" {
		return nil
	}
	return fmt.Errorf("status: metrics.listen %s: %w", addr, ErrNoMetrics)
}

// ServeMetricsOn returns ErrNoMetrics.
func ServeMetricsOn(ctx context.Context, l net.Listener, c *Counters) error {
	return fmt.Errorf("status: metrics on %s: %w", l.Addr(), ErrNoMetrics)
}
