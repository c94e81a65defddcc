// Package seal implements sealed telemetry: frames that a device encrypts to
// a collector's HPKE public key so that only the fleet's backend can read
// them and no one (the broker included) can forge, replay or move them.
//
// The wire format is specified in docs/SEALED-TELEMETRY.md; this package is
// its reference implementation and is pinned by the vectors in
// testdata/vectors.json.
//
// Device side: a [Sealer] runs one HPKE (RFC 9180, base mode) session per
// agent start and per rekey, signs one [Announcement] per session with the
// device key (a crypto.Signer, the TPM in production) and seals each frame
// with an AEAD key and nonce base taken from the HPKE exporter. Frames carry
// an explicit 64-bit sequence number, so they open in any order.
//
// Collector side: a [Collector] verifies announcements against the fleet CA,
// opens frames, rejects replays with a sliding window, counts gaps, and parks
// frames that arrive before their announcement.
//
// Neither side talks to a broker: callers publish what [Sealer.Seal] returns
// and feed what they receive to [Collector.HandleAnnouncement] and
// [Collector.Open].
package seal
