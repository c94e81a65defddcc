// Package source holds the agent's telemetry sources: the local unix socket
// that applications write JSON lines to, the system source (CPU, memory,
// load, uptime, thermal zones) and the synthetic source that bench uses.
// Each runs until its context ends and hands readings to a Sink.
package source

import (
	"context"

	"github.com/tpmagent/tpmagent/agent/reading"
)

// Sink takes readings from sources; the agent's pipeline implements it.
type Sink interface {
	// Submit queues r. done, when not nil, is called exactly once: with nil
	// once the batch carrying r is durable in the spool, or with the error
	// that kept it out. Submit blocks while the pipeline is full (back
	// pressure) and fails when ctx ends or the pipeline stopped.
	Submit(ctx context.Context, r reading.Reading, done func(error)) error
	// Reject counts a line a source could not parse.
	Reject(err error)
}

// Source produces readings until ctx ends.
type Source interface {
	// Name identifies the source in logs ("socket", "system", "synthetic").
	Name() string
	// Run produces readings into sink until ctx ends or the source is
	// exhausted, and returns after every reading it submitted was answered.
	Run(ctx context.Context, sink Sink) error
}
