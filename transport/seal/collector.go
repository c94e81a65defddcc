package seal

import (
	"bytes"
	"crypto/sha256"
	"crypto/x509"
	"errors"
	"fmt"
	"strings"
	"sync"
	"time"
)

// CollectorOptions tune a [Collector]. The zero value is usable.
type CollectorOptions struct {
	// Window is the replay window in sequence numbers, a multiple of 64.
	// 0 means 1024.
	Window int
	// HoldUnknown is how long a frame whose announcement has not arrived
	// is parked before it is dropped. 0 means 30 s; negative disables
	// parking (such frames are rejected at once).
	HoldUnknown time.Duration
	// MaxHeld bounds the parked frames across all devices. 0 means 4096.
	MaxHeld int
	// MaxSessionsPerDevice bounds the open sessions kept per device; the
	// least recently used one is retired beyond it. 0 means 256.
	MaxSessionsPerDevice int
	// MaxSessionAge: announcements whose start time is older are rejected
	// and sessions older are retired. It is what keeps a replayed old
	// announcement from resetting a replay window. 0 means 30 days.
	MaxSessionAge time.Duration
	// Now returns the current time; nil means time.Now. For tests.
	Now func() time.Time
}

// Message is an opened frame.
type Message struct {
	DeviceID  string
	SessionID uint64
	Seq       uint64
	Topic     string
	Plaintext []byte
}

// Stats are the collector's counters since it was created.
type Stats struct {
	Opened           uint64 // frames opened and returned, each exactly once
	Gaps             uint64 // sequence numbers skipped and not (yet) arrived, over all sessions
	Replays          uint64 // authentic frames already opened (QoS1 duplicates, replays)
	TooOld           uint64 // authentic frames below the window or of a retired session
	Forged           uint64 // frames failing authentication
	Unknown          uint64 // frames that arrived before their announcement
	Expired          uint64 // parked frames dropped (hold time over, or MaxHeld reached)
	WrongDevice      uint64 // frames on another device's topic
	Malformed        uint64 // frames or topics that do not parse
	Announcements    uint64 // sessions accepted
	BadAnnouncements uint64 // announcements rejected
	Held             int    // frames parked now
	Sessions         int    // sessions open now
}

// Collector opens sealed telemetry on the backend. It is safe for
// concurrent use; its state (sessions, replay windows) lives in memory.
type Collector struct {
	priv  *PrivateKey
	roots *x509.CertPool
	opts  CollectorOptions

	mu        sync.Mutex
	devices   map[string]map[uint64]*collSession
	bySID     map[uint64]string // session id -> device, to tell a moved frame from an unknown one
	retired   map[sessionKey]time.Time
	held      map[sessionKey][]heldFrame
	nheld     int
	lastSweep time.Time
	stats     Stats
	gaps      int64
}

type sessionKey struct {
	device string
	id     uint64
}

type collSession struct {
	ann      *Announcement
	annHash  [32]byte
	keys     *frameKeys
	win      *ReplayWindow
	lastUsed time.Time
}

type heldFrame struct {
	topic   string
	frame   []byte
	arrived time.Time
}

// NewCollector returns a Collector that opens sessions sealed to priv and
// accepts announcements from devices whose certificates chain to fleetCA.
func NewCollector(priv *PrivateKey, fleetCA *x509.CertPool, opts CollectorOptions) (*Collector, error) {
	if priv == nil || fleetCA == nil {
		return nil, errors.New("seal: collector: private key (seal.collector_private_key) and fleet CA (seal.fleet_ca) are required")
	}
	if opts.Window == 0 {
		opts.Window = 1024
	}
	if opts.Window < 64 || opts.Window%64 != 0 {
		return nil, fmt.Errorf("seal: collector: window %d: want a positive multiple of 64", opts.Window)
	}
	if opts.HoldUnknown == 0 {
		opts.HoldUnknown = 30 * time.Second
	}
	if opts.MaxHeld == 0 {
		opts.MaxHeld = 4096
	}
	if opts.MaxSessionsPerDevice <= 0 {
		opts.MaxSessionsPerDevice = 256
	}
	if opts.MaxSessionAge <= 0 {
		opts.MaxSessionAge = 30 * 24 * time.Hour
	}
	if opts.Now == nil {
		opts.Now = time.Now
	}
	return &Collector{
		priv:    priv,
		roots:   fleetCA,
		opts:    opts,
		devices: make(map[string]map[uint64]*collSession),
		bySID:   make(map[uint64]string),
		retired: make(map[sessionKey]time.Time),
		held:    make(map[sessionKey][]heldFrame),
	}, nil
}

// topicDevice returns the device id of a topic devices/{id}/{rest...}.
func topicDevice(topic string) (id, rest string, err error) {
	r, ok := strings.CutPrefix(topic, "devices/")
	if ok {
		id, rest, ok = strings.Cut(r, "/")
	}
	if !ok || rest == "" || ValidDeviceID(id) != nil {
		return "", "", fmt.Errorf("seal: topic %q: want devices/{device_id}/...: %w", topic, ErrMalformed)
	}
	return id, rest, nil
}

// HandleAnnouncement verifies an announcement received on topic (which
// must be devices/{device_id}/sessions) and starts its session: the
// certificate chain must verify to the fleet CA, the leaf CN must equal
// the device id (and the topic's), the signature must verify with the leaf
// key, and the suite must match the collector key. A repeated identical
// announcement (QoS1 redelivery, retained copy) is accepted and changes
// nothing. Frames parked for the session are opened and returned.
func (c *Collector) HandleAnnouncement(topic string, payload []byte) ([]Message, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	now := c.opts.Now()
	c.sweepLocked(now, false)
	sess, err := c.acceptAnnouncement(topic, payload, now)
	if err != nil {
		c.stats.BadAnnouncements++
		return nil, err
	}
	if sess == nil {
		return nil, nil // duplicate
	}
	k := sessionKey{sess.ann.DeviceID, sess.ann.SessionID}
	parked := c.held[k]
	delete(c.held, k)
	c.nheld -= len(parked)
	var out []Message
	for _, h := range parked {
		if m, err := c.openLocked(h.topic, h.frame, now); err == nil {
			out = append(out, m)
		}
	}
	return out, nil
}

func (c *Collector) acceptAnnouncement(topic string, payload []byte, now time.Time) (*collSession, error) {
	dev, rest, err := topicDevice(topic)
	if err != nil {
		return nil, fmt.Errorf("seal: announcement: %w", err)
	}
	if rest != "sessions" {
		return nil, fmt.Errorf("seal: announcement on topic %q: want devices/%s/sessions: %w", topic, dev, ErrMalformed)
	}
	a, err := ParseAnnouncement(payload)
	if err != nil {
		return nil, err
	}
	fail := func(format string, args ...any) error {
		return fmt.Errorf("seal: announcement of session %012x from %s on %s: %s: %w",
			a.SessionID, a.DeviceID, topic, fmt.Sprintf(format, args...), ErrBadAnnouncement)
	}
	if a.DeviceID != dev {
		return nil, fmt.Errorf("%w (%w)", fail("device id %q differs from the topic's %q", a.DeviceID, dev), ErrWrongDevice)
	}
	h := sha256.Sum256(payload)
	k := sessionKey{a.DeviceID, a.SessionID}
	if s := c.devices[dev][a.SessionID]; s != nil {
		if s.annHash == h {
			return nil, nil
		}
		return nil, fail("session id already announced with other content (replay of an old announcement or id collision)")
	}
	if _, ok := c.retired[k]; ok {
		return nil, fail("session was retired")
	}
	if now.Sub(a.StartTime) > c.opts.MaxSessionAge {
		return nil, fail("start time %s is older than %s: check the device clock", a.StartTime.UTC().Format(time.RFC3339), c.opts.MaxSessionAge)
	}
	if a.Suite.KEM != c.priv.kem {
		return nil, fail("suite %s needs a %s collector key, this collector has %s", a.Suite, kemName(a.Suite.KEM), kemName(c.priv.kem))
	}
	if err := a.Suite.check(); err != nil {
		return nil, fail("%v", err)
	}
	leaf, inter, err := a.certificates()
	if err != nil {
		return nil, fail("%v", err)
	}
	if _, err := leaf.Verify(x509.VerifyOptions{
		Roots:         c.roots,
		Intermediates: inter,
		CurrentTime:   now,
		KeyUsages:     []x509.ExtKeyUsage{x509.ExtKeyUsageAny},
	}); err != nil {
		return nil, fail("device certificate does not chain to the fleet CA (seal.fleet_ca): %v", err)
	}
	if leaf.Subject.CommonName != a.DeviceID {
		return nil, fail("certificate CN %q differs from the device id", leaf.Subject.CommonName)
	}
	if err := a.verifySignature(leaf.PublicKey); err != nil {
		return nil, fail("%v", err)
	}
	keys, _, err := recipientContext(c.priv, a)
	if err != nil {
		return nil, fail("%v", err)
	}
	s := &collSession{ann: a, annHash: h, keys: keys, win: NewReplayWindow(c.opts.Window, a.SeqStart), lastUsed: now}
	m := c.devices[dev]
	if m == nil {
		m = make(map[uint64]*collSession)
		c.devices[dev] = m
	}
	if len(m) >= c.opts.MaxSessionsPerDevice {
		c.retireLRU(m)
	}
	m[a.SessionID] = s
	c.bySID[a.SessionID] = dev
	c.stats.Announcements++
	return s, nil
}

func (c *Collector) retireLRU(m map[uint64]*collSession) {
	var old *collSession
	for _, s := range m {
		if old == nil || s.lastUsed.Before(old.lastUsed) {
			old = s
		}
	}
	c.retire(old)
}

func (c *Collector) retire(s *collSession) {
	k := sessionKey{s.ann.DeviceID, s.ann.SessionID}
	delete(c.devices[k.device], k.id)
	if len(c.devices[k.device]) == 0 {
		delete(c.devices, k.device)
	}
	if c.bySID[k.id] == k.device {
		delete(c.bySID, k.id)
	}
	c.retired[k] = s.ann.StartTime
}

// Open authenticates and decrypts a frame received on topic (which must be
// devices/{device_id}/...). Errors wrap ErrMalformed, ErrWrongDevice,
// ErrUnknownSession (the frame is parked and comes back from
// HandleAnnouncement), ErrForged, ErrReplay or ErrTooOld; each is counted.
// A replay or duplicate is never returned twice: output is exactly-once
// for as long as the collector runs.
func (c *Collector) Open(topic string, frame []byte) (Message, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	now := c.opts.Now()
	c.sweepLocked(now, false)
	m, err := c.openLocked(topic, frame, now)
	if errors.Is(err, ErrUnknownSession) {
		c.park(topic, frame, now)
	}
	return m, err
}

func (c *Collector) openLocked(topic string, raw []byte, now time.Time) (Message, error) {
	dev, rest, err := topicDevice(topic)
	if err == nil && rest == "sessions" {
		err = fmt.Errorf("seal: frame on the announcement topic %q: %w", topic, ErrMalformed)
	}
	if err != nil {
		c.stats.Malformed++
		return Message{}, err
	}
	f, err := ParseFrame(raw)
	if err != nil {
		c.stats.Malformed++
		return Message{}, fmt.Errorf("%w (topic %s)", err, topic)
	}
	s := c.devices[dev][f.SessionID]
	if s == nil {
		if owner, ok := c.bySID[f.SessionID]; ok && owner != dev {
			c.stats.WrongDevice++
			return Message{}, fmt.Errorf("seal: frame of session %012x (device %s) on %s: %w", f.SessionID, owner, topic, ErrWrongDevice)
		}
		if _, ok := c.retired[sessionKey{dev, f.SessionID}]; ok {
			c.stats.TooOld++
			return Message{}, fmt.Errorf("seal: frame %d of retired session %012x on %s: %w", f.Seq, f.SessionID, topic, ErrTooOld)
		}
		return Message{}, fmt.Errorf("seal: frame %d of session %012x on %s: %w", f.Seq, f.SessionID, topic, ErrUnknownSession)
	}
	winErr := s.win.Check(f.Seq)
	pt, err := s.keys.open(make([]byte, 0, len(f.Ciphertext)-TagSize), raw, f, dev, topic)
	if err != nil {
		// Authentication first: an altered copy of an opened frame is a
		// forgery, not a replay.
		c.stats.Forged++
		return Message{}, fmt.Errorf("seal: frame %d of session %012x on %s: %w", f.Seq, f.SessionID, topic, ErrForged)
	}
	if winErr != nil {
		if winErr == ErrReplay {
			c.stats.Replays++
		} else {
			c.stats.TooOld++
		}
		return Message{}, fmt.Errorf("seal: frame %d of session %012x from %s: %w", f.Seq, f.SessionID, dev, winErr)
	}
	c.gaps += s.win.Mark(f.Seq)
	s.lastUsed = now
	c.stats.Opened++
	return Message{DeviceID: dev, SessionID: f.SessionID, Seq: f.Seq, Topic: topic, Plaintext: pt}, nil
}

func (c *Collector) park(topic string, frame []byte, now time.Time) {
	c.stats.Unknown++
	if c.opts.HoldUnknown < 0 || c.nheld >= c.opts.MaxHeld {
		c.stats.Expired++
		return
	}
	f, _ := ParseFrame(frame)
	dev, _, _ := topicDevice(topic)
	k := sessionKey{dev, f.SessionID}
	c.held[k] = append(c.held[k], heldFrame{topic: topic, frame: bytes.Clone(frame), arrived: now})
	c.nheld++
}

// Sweep drops parked frames held longer than HoldUnknown and retires
// sessions older than MaxSessionAge. Open and HandleAnnouncement sweep
// now and then; call Sweep from a ticker to expire frames when idle.
// It returns the number of parked frames dropped.
func (c *Collector) Sweep() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.sweepLocked(c.opts.Now(), true)
}

func (c *Collector) sweepLocked(now time.Time, force bool) int {
	every := c.opts.HoldUnknown / 4
	if every <= 0 {
		every = time.Second
	}
	if !force && now.Sub(c.lastSweep) < every {
		return 0
	}
	c.lastSweep = now
	dropped := 0
	for k, hs := range c.held {
		keep := hs[:0]
		for _, h := range hs {
			if now.Sub(h.arrived) > c.opts.HoldUnknown {
				dropped++
				continue
			}
			keep = append(keep, h)
		}
		if len(keep) == 0 {
			delete(c.held, k)
		} else {
			c.held[k] = keep
		}
	}
	c.nheld -= dropped
	c.stats.Expired += uint64(dropped)
	for _, m := range c.devices {
		for _, s := range m {
			if now.Sub(s.ann.StartTime) > c.opts.MaxSessionAge {
				c.retire(s)
			}
		}
	}
	for k, start := range c.retired {
		if now.Sub(start) > c.opts.MaxSessionAge {
			delete(c.retired, k) // its announcement is now rejected by age
		}
	}
	return dropped
}

// Stats returns a snapshot of the counters.
func (c *Collector) Stats() Stats {
	c.mu.Lock()
	defer c.mu.Unlock()
	st := c.stats
	st.Gaps = uint64(max(c.gaps, 0))
	st.Held = c.nheld
	for _, m := range c.devices {
		st.Sessions += len(m)
	}
	return st
}
