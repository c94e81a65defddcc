package seal

import "errors"

// Sentinel errors returned (wrapped, with context) by the collector and the
// parsers. Test them with errors.Is.
var (
	// ErrMalformed: a frame, announcement or topic does not parse.
	ErrMalformed = errors.New("malformed")
	// ErrForged: a frame failed authentication (wrong key, altered bytes,
	// or different AAD: another topic or device).
	ErrForged = errors.New("authentication failed (forged or altered)")
	// ErrReplay: an authentic frame whose sequence number was already
	// opened in its session (a replay or a QoS1 duplicate).
	ErrReplay = errors.New("replayed frame")
	// ErrTooOld: an authentic frame below the replay window (or below the
	// session's sequence start, or of a retired session); it cannot be
	// told apart from a replay and is rejected.
	ErrTooOld = errors.New("frame older than the replay window")
	// ErrUnknownSession: no announcement for the frame's session yet. The
	// collector parks the frame and opens it when the announcement comes.
	ErrUnknownSession = errors.New("unknown session")
	// ErrWrongDevice: a frame or announcement on another device's topic.
	ErrWrongDevice = errors.New("wrong device")
	// ErrBadAnnouncement: an announcement failed verification (chain,
	// signature, certificate name, suite, age or conflict).
	ErrBadAnnouncement = errors.New("bad announcement")
)
