// Package status keeps the agent's live counters and serves them: as one JSON
// document per connection on a local unix socket (what `tpmagent status`
// reads) and as Prometheus metrics on a local HTTP address, from a registry
// of its own (never the process-global one).
package status

import (
	"os"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// Counters are the agent's live counters. The zero value is ready; the
// counter fields are updated with atomic adds by the pipeline and read
// without locks. The func fields are optional and are called on every
// Snapshot.
type Counters struct {
	ReadingsIn        atomic.Uint64 // readings accepted from every source
	ReadingsRejected  atomic.Uint64 // lines rejected by the parser
	Batches           atomic.Uint64 // batches encoded and spooled
	MessagesPublished atomic.Uint64 // messages handed to the broker connection
	MessagesAcked     atomic.Uint64 // messages acknowledged (QoS1 PUBACK / QoS0 written)
	MessagesFailed    atomic.Uint64 // publish callbacks with an error (resent after reconnect)
	Reconnects        atomic.Uint64 // broker connections after the first
	Bytes             atomic.Uint64 // payload bytes published

	// SpoolStats reports the durable queue; nil leaves the spool fields zero.
	SpoolStats func() Spool
	// TPMSignatures reports signing operations done by the TPM key.
	TPMSignatures func() uint64
	// Broker reports the broker currently connected ("" when none).
	Broker func() string
	// Certificate reports the device certificate and its renewal.
	Certificate func() Certificate

	mu      sync.Mutex
	lastErr string
	lastAt  time.Time
	started time.Time
}

// Spool is the durable queue's part of a snapshot.
type Spool struct {
	Records         int64  `json:"records"`
	Bytes           int64  `json:"bytes"`
	Dropped         uint64 `json:"dropped"`
	TornTailRepairs uint64 `json:"torn_tail_repairs"`
	CorruptSkips    uint64 `json:"corrupt_skips"`
}

// SetError records err as the last error (nil is ignored).
func (c *Counters) SetError(err error) {
	if err == nil {
		return
	}
	c.mu.Lock()
	c.lastErr = err.Error()
	c.lastAt = time.Now()
	c.mu.Unlock()
}

// Start records the agent's start time (for uptime).
func (c *Counters) Start(t time.Time) {
	c.mu.Lock()
	c.started = t
	c.mu.Unlock()
}

// Certificate is the device certificate's part of a snapshot.
type Certificate struct {
	KeyHandle    string    `json:"key_handle"`
	Serial       string    `json:"serial"`
	NotAfter     time.Time `json:"not_after"`
	RenewAt      time.Time `json:"renew_at"`
	RenewalState string    `json:"renewal_state"`
	Renewals     uint64    `json:"renewals"`
	Failures     uint64    `json:"renewal_failures"`
}

// Snapshot is the status document served on the status socket.
type Snapshot struct {
	Time              time.Time    `json:"time"`
	UptimeSeconds     float64      `json:"uptime_seconds"`
	ReadingsIn        uint64       `json:"readings_in"`
	ReadingsRejected  uint64       `json:"readings_rejected"`
	Batches           uint64       `json:"batches"`
	MessagesPublished uint64       `json:"messages_published"`
	MessagesAcked     uint64       `json:"messages_acked"`
	MessagesFailed    uint64       `json:"messages_failed"`
	BytesPublished    uint64       `json:"bytes_published"`
	Reconnects        uint64       `json:"reconnects"`
	Spool             Spool        `json:"spool"`
	Drops             uint64       `json:"drops"`
	TPMSignatures     uint64       `json:"tpm_signatures"`
	Broker            string       `json:"broker"`
	Connected         bool         `json:"connected"`
	LastError         string       `json:"last_error,omitempty"`
	LastErrorTime     time.Time    `json:"last_error_time,omitzero"`
	Certificate       *Certificate `json:"certificate,omitempty"`
	// Memory is the agent process's resident set (Linux; nil elsewhere).
	// Serve fills it in; Snapshot leaves it nil (the watchdog's frequent
	// snapshots need no /proc read).
	Memory *Memory `json:"memory,omitempty"`
}

// Memory is a process's resident set from /proc/self/status, in KiB.
type Memory struct {
	RSSKiB     int64 `json:"rss_kib"`      // resident now (VmRSS)
	RSSPeakKiB int64 `json:"rss_peak_kib"` // highest so far (VmHWM)
	AnonKiB    int64 `json:"anon_kib"`     // private: heap, stacks, runtime (RssAnon)
	FileKiB    int64 `json:"file_kib"`     // pages of the binary and other files (RssFile)
}

// ReadMemory reads this process's Memory; nil when /proc/self/status
// cannot be read.
func ReadMemory() *Memory {
	b, err := os.ReadFile("/proc/self/status")
	if err != nil {
		return nil
	}
	m := Memory{RSSKiB: -1, RSSPeakKiB: -1, AnonKiB: -1, FileKiB: -1}
	fields := map[string]*int64{"VmRSS": &m.RSSKiB, "VmHWM": &m.RSSPeakKiB, "RssAnon": &m.AnonKiB, "RssFile": &m.FileKiB}
	for _, line := range strings.Split(string(b), "\n") {
		name, v, ok := strings.Cut(line, ":")
		if p := fields[name]; ok && p != nil {
			if n, err := strconv.ParseInt(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(v), "kB")), 10, 64); err == nil {
				*p = n
			}
		}
	}
	return &m
}

// Snapshot reads every counter now.
func (c *Counters) Snapshot() Snapshot {
	now := time.Now()
	s := Snapshot{
		Time:              now.UTC(),
		ReadingsIn:        c.ReadingsIn.Load(),
		ReadingsRejected:  c.ReadingsRejected.Load(),
		Batches:           c.Batches.Load(),
		MessagesPublished: c.MessagesPublished.Load(),
		MessagesAcked:     c.MessagesAcked.Load(),
		MessagesFailed:    c.MessagesFailed.Load(),
		BytesPublished:    c.Bytes.Load(),
		Reconnects:        c.Reconnects.Load(),
	}
	if c.SpoolStats != nil {
		s.Spool = c.SpoolStats()
		s.Drops = s.Spool.Dropped
	}
	if c.TPMSignatures != nil {
		s.TPMSignatures = c.TPMSignatures()
	}
	if c.Broker != nil {
		s.Broker = c.Broker()
		s.Connected = s.Broker != ""
	}
	if c.Certificate != nil {
		cert := c.Certificate()
		s.Certificate = &cert
	}
	c.mu.Lock()
	s.LastError, s.LastErrorTime = c.lastErr, c.lastAt
	if !c.started.IsZero() {
		s.UptimeSeconds = now.Sub(c.started).Seconds()
	}
	c.mu.Unlock()
	return s
}
