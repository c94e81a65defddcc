// Package agent runs the telemetry pipeline of the device:
//
//	sources ─> batcher ─> encoder ─> sealer (optional) ─> spool.Append (durable)
//	        ─> publish loop (spool.Next ─> Publisher.Publish ─> done ─> spool.Ack)
//
// A reading's Done callback fires once the batch carrying it is durable in the
// spool, which is when the telemetry socket answers "ok". The publish loop
// reads the spool in order, keeps the publisher's in-flight window full
// without waiting per message, acknowledges records to the spool as the broker
// acknowledges them, and rewinds the spool after every (re)connection so that
// what the broker never acknowledged is sent again (at-least-once, in order
// per topic). Run drains gracefully when its context ends. docs/TELEMETRY.md
// specifies topics, encodings and delivery semantics.
package agent
