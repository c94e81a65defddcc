package collector

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"hash/crc32"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/tpmagent/tpmagent/internal/atomicfile"
	"github.com/tpmagent/tpmagent/transport/seal"
)

// State file names inside the state directory.
const (
	StateFile    = "collector.state" // snapshot, replaced atomically
	StateLogFile = "collector.log"   // commits since the snapshot, appended
	stateVersion = 1
	stateWindow  = 1024 // the seal.Collector's default window
)

// Defaults of StateOptions.
const (
	DefaultMaxSessionAge   = 30 * 24 * time.Hour
	DefaultSupersededIdle  = 24 * time.Hour
	DefaultCompactLogBytes = 8 << 20
)

// StateError is a collector state that cannot be used: unreadable or
// damaged files, or an output file that does not match what was committed.
// The collector refuses to start rather than start from empty, which would
// write again whatever the broker redelivers.
type StateError struct {
	File string
	Err  error
	Fix  string
}

func (e *StateError) Error() string {
	return fmt.Sprintf("collector state %s: %v; %s", e.File, e.Err, e.Fix)
}

func (e *StateError) Unwrap() error { return e.Err }

const fixDamaged = "the collector does not start from an empty state (it would write again every frame the broker redelivers): " +
	"restore the file from a backup, or accept duplicates and move it away (mv FILE FILE.bad) to start afresh"

// StateOptions configure OpenState.
type StateOptions struct {
	// Output is the output file, opened for writing and appending, or nil
	// when the output is standard output (no length is committed then).
	Output *os.File
	// MaxSessionAge: sessions whose announced start time is older are
	// forgotten (the seal.Collector rejects their announcements from then
	// on). Default 30 days; use the seal.Collector's MaxSessionAge.
	MaxSessionAge time.Duration
	// SupersededIdle: a session superseded by a newer announcement of the
	// same device and idle this long is reduced to a marker (device,
	// session, start time) that rejects its frames and announcement until
	// MaxSessionAge. Default 24 h.
	SupersededIdle time.Duration
	// CompactLogBytes: the log is folded into a new snapshot when it grows
	// beyond this (default 8 MiB).
	CompactLogBytes int64
	// Now for tests; nil means time.Now.
	Now func() time.Time
	// Logger; nil discards.
	Logger *slog.Logger
}

// State is the collector's durable state: per session the announcement
// (to open redelivered frames after a restart) and the replay window, and
// the committed length of the output file. It lives in two files of one
// directory: StateFile, a snapshot replaced atomically, and StateLogFile,
// one CRC-protected JSON record per commit appended since the snapshot.
//
// A Runner with a State writes output, then commits (output fsync, log
// append, log fsync), and only then acknowledges messages it was handed
// with an ack (AckSubscriber). Methods other than Open/Close are called by
// the Runner under its lock.
type State struct {
	dir, snapPath, logPath string
	opts                   StateOptions
	log                    *slog.Logger

	out            *os.File
	outDev, outIno uint64
	outLen         int64 // committed output length (file output only)
	n              uint64
	gapsDropped    uint64

	sessions map[sessKey]*stSession
	latest   map[string]sessKey
	retired  map[sessKey]time.Time // start time

	logf    *os.File
	logSize int64

	pend      logRec
	restored  int // sessions read from disk at open
	truncated int64
}

type sessKey struct {
	dev string
	sid uint64
}

type stSession struct {
	topic      string
	ann        []byte
	start      time.Time
	win        *seal.ReplayWindow
	lastUsed   time.Time
	superseded time.Time
}

type logRec struct {
	N     uint64    `json:"n"`
	At    int64     `json:"at"`
	Out   int64     `json:"out"`
	Anns  []annRec  `json:"anns,omitempty"`
	Marks []markRec `json:"marks,omitempty"`
}

type annRec struct {
	Topic string `json:"topic"`
	Ann   []byte `json:"ann"`
}

type markRec struct {
	Dev string `json:"d"`
	SID uint64 `json:"s"`
	Seq uint64 `json:"q"`
}

type snapshot struct {
	Version     int            `json:"version"`
	N           uint64         `json:"n"`
	Output      *snapOutput    `json:"output,omitempty"`
	GapsDropped uint64         `json:"gaps_dropped"`
	Sessions    []snapSession  `json:"sessions"`
	Retired     []snapRetiredS `json:"retired"`
}

type snapOutput struct {
	Dev uint64 `json:"dev"`
	Ino uint64 `json:"ino"`
	Len int64  `json:"len"`
}

type snapSession struct {
	Topic      string   `json:"topic"`
	Ann        []byte   `json:"ann"`
	Next       uint64   `json:"next"`
	Missing    uint64   `json:"missing"`
	Bits       []uint64 `json:"bits"`
	LastUsed   int64    `json:"last_used"`
	Superseded int64    `json:"superseded,omitempty"`
}

type snapRetiredS struct {
	Dev   string `json:"device"`
	SID   uint64 `json:"session"`
	Start int64  `json:"start"`
}

// OpenState reads the state in dir (created if missing, mode 0700) and
// reconciles the output file with it: a tail written after the last commit
// is truncated (its frames were not acknowledged, the broker delivers them
// again); an output shorter than committed is an error; an empty output
// file that is not the committed one (rotated while the collector was
// stopped) starts at length 0. Unreadable or damaged files are a
// *StateError naming the file; a log record torn by a crash at its end is
// dropped (it was never committed). A new snapshot is written before
// OpenState returns.
func OpenState(dir string, opts StateOptions) (*State, error) {
	if opts.MaxSessionAge <= 0 {
		opts.MaxSessionAge = DefaultMaxSessionAge
	}
	if opts.SupersededIdle <= 0 {
		opts.SupersededIdle = DefaultSupersededIdle
	}
	if opts.CompactLogBytes <= 0 {
		opts.CompactLogBytes = DefaultCompactLogBytes
	}
	if opts.Now == nil {
		opts.Now = time.Now
	}
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, &StateError{File: dir, Err: err, Fix: "check that seal.state_dir is a writable directory"}
	}
	s := &State{
		dir: dir, snapPath: filepath.Join(dir, StateFile), logPath: filepath.Join(dir, StateLogFile),
		opts: opts, log: opts.Logger, out: opts.Output,
		sessions: make(map[sessKey]*stSession), latest: make(map[string]sessKey), retired: make(map[sessKey]time.Time),
	}
	snapOut, err := s.readSnapshot()
	if err != nil {
		return nil, err
	}
	logOut, err := s.readLog()
	if err != nil {
		return nil, err
	}
	if logOut != nil {
		snapOut.Len = *logOut
	}
	if err := s.reconcileOutput(snapOut); err != nil {
		return nil, err
	}
	s.logf, err = os.OpenFile(s.logPath, os.O_RDWR|os.O_CREATE|os.O_APPEND, 0o600)
	if err != nil {
		return nil, &StateError{File: s.logPath, Err: err, Fix: "check that seal.state_dir is writable"}
	}
	if err := s.snapshot(); err != nil {
		s.logf.Close()
		return nil, err
	}
	s.restored = len(s.sessions)
	return s, nil
}

func (s *State) readSnapshot() (*snapOutput, error) {
	b, err := os.ReadFile(s.snapPath)
	if errors.Is(err, fs.ErrNotExist) {
		if _, lerr := os.Stat(s.logPath); lerr == nil {
			return nil, &StateError{File: s.snapPath, Err: errors.New("missing, but its log " + StateLogFile + " exists"), Fix: fixDamaged}
		}
		s.log.Info("collector state: none yet, starting a new one", "dir", s.dir)
		return &snapOutput{Len: -1}, nil
	}
	if err != nil {
		return nil, &StateError{File: s.snapPath, Err: err, Fix: "check its permissions (the collector needs to read and replace it)"}
	}
	var snap snapshot
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&snap); err != nil {
		return nil, &StateError{File: s.snapPath, Err: fmt.Errorf("damaged: %w", err), Fix: fixDamaged}
	}
	if snap.Version != stateVersion {
		return nil, &StateError{File: s.snapPath, Err: fmt.Errorf("version %d, this collector reads version %d", snap.Version, stateVersion), Fix: fixDamaged}
	}
	s.n, s.gapsDropped = snap.N, snap.GapsDropped
	for i, ss := range snap.Sessions {
		a, err := seal.ParseAnnouncement(ss.Ann)
		if err != nil || len(ss.Bits) != stateWindow/64 || ss.Next < a.SeqStart {
			return nil, &StateError{File: s.snapPath, Err: fmt.Errorf("damaged: session %d: announcement %v, %d window words, next %d", i, err, len(ss.Bits), ss.Next), Fix: fixDamaged}
		}
		st := &stSession{topic: ss.Topic, ann: ss.Ann, start: a.StartTime,
			win:      seal.RestoreWindow(stateWindow, a.SeqStart, seal.WindowState{Next: ss.Next, Missing: ss.Missing, Bits: ss.Bits}),
			lastUsed: time.UnixMilli(ss.LastUsed)}
		if ss.Superseded != 0 {
			st.superseded = time.UnixMilli(ss.Superseded)
		}
		s.putSession(sessKey{a.DeviceID, a.SessionID}, st)
	}
	for _, r := range snap.Retired {
		s.retired[sessKey{r.Dev, r.SID}] = time.UnixMilli(r.Start)
	}
	if snap.Output == nil {
		return &snapOutput{Len: -1}, nil
	}
	return snap.Output, nil
}

// readLog applies the records after the snapshot and returns the last
// committed output length (nil: none in the log).
func (s *State) readLog() (*int64, error) {
	b, err := os.ReadFile(s.logPath)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, &StateError{File: s.logPath, Err: err, Fix: "check its permissions"}
	}
	var out *int64
	off := 0
	for line := 1; off < len(b); line++ {
		end := bytes.IndexByte(b[off:], '\n')
		rec, perr := parseLogLine(b[off:], end)
		if perr != nil {
			if end < 0 || off+end+1 == len(b) {
				// The last record, torn by a crash while it was appended:
				// never fsynced, so never acknowledged. Dropped (the
				// snapshot written at open replaces the log).
				s.log.Warn("collector state: dropping a torn last record (crash during a commit)", "file", s.logPath, "line", line, "bytes", len(b)-off)
				break
			}
			return nil, &StateError{File: s.logPath, Err: fmt.Errorf("damaged at line %d: %w", line, perr), Fix: fixDamaged}
		}
		off += end + 1
		if rec.N <= s.n {
			continue // already in the snapshot (crash between snapshot and log reset)
		}
		if rec.N != s.n+1 {
			return nil, &StateError{File: s.logPath, Err: fmt.Errorf("damaged at line %d: commit %d follows %d", line, rec.N, s.n), Fix: fixDamaged}
		}
		s.n = rec.N
		at := time.UnixMilli(rec.At)
		for _, a := range rec.Anns {
			if _, err := s.addAnnouncement(a.Topic, a.Ann, at); err != nil {
				return nil, &StateError{File: s.logPath, Err: fmt.Errorf("damaged at line %d: %w", line, err), Fix: fixDamaged}
			}
		}
		for _, m := range rec.Marks {
			if ss := s.sessions[sessKey{m.Dev, m.SID}]; ss != nil && ss.win.Check(m.Seq) == nil {
				ss.win.Mark(m.Seq)
				ss.lastUsed = at
			}
		}
		o := rec.Out
		out = &o
	}
	s.pend = logRec{}
	return out, nil
}

func parseLogLine(b []byte, end int) (logRec, error) {
	var rec logRec
	if end < 0 {
		return rec, errors.New("no end of line")
	}
	line := b[:end]
	sum, body, ok := bytes.Cut(line, []byte{' '})
	if !ok || len(sum) != 8 {
		return rec, errors.New("no checksum")
	}
	want, err := strconv.ParseUint(string(sum), 16, 32)
	if err != nil || uint32(want) != crc32.ChecksumIEEE(body) {
		return rec, errors.New("checksum mismatch")
	}
	if err := json.Unmarshal(body, &rec); err != nil {
		return rec, err
	}
	return rec, nil
}

func fileID(f *os.File) (dev, ino uint64, size int64, err error) {
	fi, err := f.Stat()
	if err != nil {
		return 0, 0, 0, err
	}
	st, ok := fi.Sys().(*syscall.Stat_t)
	if !ok {
		return 0, 0, fi.Size(), nil
	}
	return uint64(st.Dev), uint64(st.Ino), fi.Size(), nil
}

func (s *State) reconcileOutput(c *snapOutput) error {
	if s.out == nil {
		return nil
	}
	name := s.out.Name()
	dev, ino, size, err := fileID(s.out)
	if err != nil {
		return &StateError{File: name, Err: err, Fix: "check seal.output"}
	}
	s.outDev, s.outIno = dev, ino
	switch {
	case c.Len < 0:
		// No length committed yet (new state, or standard output before):
		// what the file holds is taken as committed.
		s.outLen = size
	case c.Dev != dev || c.Ino != ino:
		if size != 0 {
			return &StateError{File: name, Err: fmt.Errorf("is not the output file the state in %s committed %d bytes of, and not empty", s.dir, c.Len),
				Fix: "point seal.output at the committed file, or at a new empty file to continue there (after rotating the old one away)"}
		}
		s.log.Info("collector state: new output file (rotated while stopped)", "output", name)
		s.outLen = 0
	case size < c.Len:
		return &StateError{File: name, Err: fmt.Errorf("is %d bytes, shorter than the %d bytes the state in %s committed (truncated or replaced in place?)", size, c.Len, s.dir),
			Fix: "restore the output file; to continue in a new file, move this one away so that the collector starts an empty one"}
	case size > c.Len:
		if err := s.out.Truncate(c.Len); err != nil {
			return &StateError{File: name, Err: fmt.Errorf("truncate the uncommitted tail: %w", err), Fix: "check that seal.output is writable"}
		}
		if err := s.out.Sync(); err != nil {
			return &StateError{File: name, Err: err, Fix: "check seal.output"}
		}
		s.truncated = size - c.Len
		s.log.Warn("collector output: truncated the lines written after the last commit (the broker delivers their frames again)",
			"output", name, "bytes", s.truncated)
		s.outLen = c.Len
	default:
		s.outLen = c.Len
	}
	return nil
}

// OutputLen is the committed output length (the output file's length after
// OpenState).
func (s *State) OutputLen() int64 { return s.outLen }

// Truncated is the number of uncommitted output bytes OpenState removed.
func (s *State) Truncated() int64 { return s.truncated }

// Sessions returns the topic and payload of every announcement the state
// holds an open session for, oldest first, to feed the seal.Collector at
// start so that redelivered frames of sessions whose announcement the broker
// does not deliver again (not retained) can be opened.
func (s *State) Sessions() (topics []string, payloads [][]byte) {
	keys := make([]*stSession, 0, len(s.sessions))
	for _, ss := range s.sessions {
		keys = append(keys, ss)
	}
	sortSessions(keys)
	for _, ss := range keys {
		topics = append(topics, ss.topic)
		payloads = append(payloads, ss.ann)
	}
	return topics, payloads
}

func sortSessions(ss []*stSession) {
	for i := 1; i < len(ss); i++ {
		for j := i; j > 0 && ss[j].start.Before(ss[j-1].start); j-- {
			ss[j], ss[j-1] = ss[j-1], ss[j]
		}
	}
}

// Restored is the number of open sessions read from disk.
func (s *State) Restored() int { return s.restored }

func (s *State) putSession(k sessKey, ss *stSession) {
	s.sessions[k] = ss
	if cur, ok := s.latest[k.dev]; !ok || s.sessions[cur] == nil || s.sessions[cur].start.Before(ss.start) {
		if ok && s.sessions[cur] != nil && s.sessions[cur].superseded.IsZero() {
			s.sessions[cur].superseded = ss.lastUsed
		}
		s.latest[k.dev] = k
	} else if ss.superseded.IsZero() {
		ss.superseded = ss.lastUsed
	}
}

// retiredSession reports whether frames and announcements of (dev, sid)
// must be rejected: the state forgot the window but remembers the session.
func (s *State) retiredSession(dev string, sid uint64) bool {
	_, ok := s.retired[sessKey{dev, sid}]
	return ok
}

// addAnnouncement records an accepted announcement (a new session) for the
// next commit. It returns false if the session is known already.
func (s *State) addAnnouncement(topic string, payload []byte, now time.Time) (bool, error) {
	a, err := seal.ParseAnnouncement(payload)
	if err != nil {
		return false, err
	}
	k := sessKey{a.DeviceID, a.SessionID}
	if _, retired := s.retired[k]; retired || s.sessions[k] != nil {
		return false, nil
	}
	ann := bytes.Clone(payload)
	s.putSession(k, &stSession{topic: topic, ann: ann, start: a.StartTime,
		win: seal.NewReplayWindow(stateWindow, a.SeqStart), lastUsed: now})
	s.pend.Anns = append(s.pend.Anns, annRec{Topic: topic, Ann: ann})
	return true, nil
}

// check classifies seq of an open session: nil (new), seal.ErrReplay,
// seal.ErrTooOld; errNoSession if the state has no such open session.
func (s *State) check(dev string, sid, seq uint64) error {
	ss := s.sessions[sessKey{dev, sid}]
	if ss == nil {
		return errNoSession
	}
	return ss.win.Check(seq)
}

var errNoSession = errors.New("collector: session not in the state")

// mark records seq (accepted by check) for the next commit and returns the
// change in missing sequence numbers.
func (s *State) mark(dev string, sid, seq uint64, now time.Time) int64 {
	ss := s.sessions[sessKey{dev, sid}]
	ss.lastUsed = now
	s.pend.Marks = append(s.pend.Marks, markRec{Dev: dev, SID: sid, Seq: seq})
	return ss.win.Mark(seq)
}

// gaps is the number of sequence numbers missing over the sessions held,
// plus those missing in sessions forgotten.
func (s *State) gaps() uint64 {
	g := s.gapsDropped
	for _, ss := range s.sessions {
		g += ss.win.Missing()
	}
	return g
}

// takePending returns the record of what happened since the last commit,
// with the output length outLen, and starts a new one. The caller holds
// the runner's lock, so the record and outLen agree.
func (s *State) takePending(outLen int64) logRec {
	s.n++
	rec := s.pend
	rec.N, rec.At, rec.Out = s.n, s.opts.Now().UnixMilli(), outLen
	if s.out == nil {
		rec.Out = -1
	}
	s.pend = logRec{}
	return rec
}

// commit makes rec durable: output fsync, then the log record appended and
// fsynced. Commits must not run concurrently.
func (s *State) commit(rec logRec) error {
	if s.out != nil {
		if err := s.out.Sync(); err != nil {
			return fmt.Errorf("collector: fsync output %s: %w", s.out.Name(), err)
		}
	}
	body, err := json.Marshal(rec)
	if err != nil {
		return fmt.Errorf("collector: state record: %w", err)
	}
	line := make([]byte, 0, len(body)+10)
	line = fmt.Appendf(line, "%08x ", crc32.ChecksumIEEE(body))
	line = append(append(line, body...), '\n')
	if _, err := s.logf.Write(line); err != nil {
		return fmt.Errorf("collector: append %s: %w", s.logPath, err)
	}
	if err := s.logf.Sync(); err != nil {
		return fmt.Errorf("collector: fsync %s: %w", s.logPath, err)
	}
	if rec.Out >= 0 {
		s.outLen = rec.Out
	}
	s.logSize += int64(len(line))
	return nil
}

// needsCompaction reports whether the log has grown past CompactLogBytes.
func (s *State) needsCompaction() bool { return s.logSize > s.opts.CompactLogBytes }

// snapshot prunes the sessions (age, superseded and idle), writes the whole
// state as a new snapshot (atomically) and empties the log. It must only be
// called when nothing is pending (right after a commit, under the runner's
// lock), since the snapshot claims every window bit it holds.
func (s *State) snapshot() error {
	now := s.opts.Now()
	s.prune(now)
	snap := snapshot{Version: stateVersion, N: s.n, GapsDropped: s.gapsDropped,
		Sessions: make([]snapSession, 0, len(s.sessions)), Retired: make([]snapRetiredS, 0, len(s.retired))}
	if s.out != nil {
		snap.Output = &snapOutput{Dev: s.outDev, Ino: s.outIno, Len: s.outLen}
	}
	for _, ss := range s.sessions {
		ws := ss.win.State()
		e := snapSession{Topic: ss.topic, Ann: ss.ann, Next: ws.Next, Missing: ws.Missing, Bits: ws.Bits, LastUsed: ss.lastUsed.UnixMilli()}
		if !ss.superseded.IsZero() {
			e.Superseded = ss.superseded.UnixMilli()
		}
		snap.Sessions = append(snap.Sessions, e)
	}
	for k, start := range s.retired {
		snap.Retired = append(snap.Retired, snapRetiredS{Dev: k.dev, SID: k.sid, Start: start.UnixMilli()})
	}
	b, err := json.Marshal(snap)
	if err != nil {
		return fmt.Errorf("collector: state snapshot: %w", err)
	}
	if err := atomicfile.Write(s.snapPath, b, 0o600); err != nil {
		return fmt.Errorf("collector: state snapshot: %w", err)
	}
	if err := s.logf.Truncate(0); err != nil {
		return fmt.Errorf("collector: reset %s: %w", s.logPath, err)
	}
	if err := s.logf.Sync(); err != nil {
		return fmt.Errorf("collector: fsync %s: %w", s.logPath, err)
	}
	s.logSize = 0
	return nil
}

// prune forgets sessions older than MaxSessionAge and reduces superseded
// sessions idle for SupersededIdle to markers.
func (s *State) prune(now time.Time) {
	for k, ss := range s.sessions {
		switch {
		case now.Sub(ss.start) > s.opts.MaxSessionAge:
			s.gapsDropped += ss.win.Missing()
			delete(s.sessions, k)
		case !ss.superseded.IsZero() && now.Sub(ss.lastUsed) > s.opts.SupersededIdle && now.Sub(ss.superseded) > s.opts.SupersededIdle:
			s.gapsDropped += ss.win.Missing()
			delete(s.sessions, k)
			s.retired[k] = ss.start
		}
	}
	for k, start := range s.retired {
		if now.Sub(start) > s.opts.MaxSessionAge {
			delete(s.retired, k) // the seal.Collector rejects its announcement by age
		}
	}
	for dev, k := range s.latest {
		if s.sessions[k] == nil {
			delete(s.latest, dev)
		}
	}
}

// Close closes the log file (the output file belongs to the caller).
func (s *State) Close() error { return s.logf.Close() }

// Describe is a one-line summary for logs.
func (s *State) Describe() string {
	var b strings.Builder
	fmt.Fprintf(&b, "%d sessions, %d retired, commit %d", len(s.sessions), len(s.retired), s.n)
	if s.out != nil {
		fmt.Fprintf(&b, ", output %d bytes committed", s.outLen)
	}
	return b.String()
}
