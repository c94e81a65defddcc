package seal

// ReplayWindow is the per-session anti-replay state (section 8): a bitmap
// of the last size sequence numbers below next (next = highest opened + 1),
// as in RFC 6479 but without the ring-of-blocks optimisation. Missing
// counts the sequence numbers in [seqStart, next) not yet opened. The
// Collector keeps one per session; the backend's durable state
// (package collector) persists one per session with WindowState and
// RestoreWindow.
type ReplayWindow struct {
	bits     []uint64
	size     uint64
	seqStart uint64
	next     uint64
	missing  uint64
}

// NewReplayWindow returns an empty window of size sequence numbers (a
// multiple of 64) for a session whose first sequence number is seqStart.
func NewReplayWindow(size int, seqStart uint64) *ReplayWindow {
	return &ReplayWindow{bits: make([]uint64, size/64), size: uint64(size), seqStart: seqStart, next: seqStart}
}

// WindowState is what a ReplayWindow needs to be restored.
type WindowState struct {
	Next    uint64   // highest opened seq + 1
	Missing uint64   // seqs in [seqStart, Next) not opened
	Bits    []uint64 // the bitmap (size/64 words)
}

// State returns the window's state (the bitmap is shared, not copied).
func (w *ReplayWindow) State() WindowState {
	return WindowState{Next: w.next, Missing: w.missing, Bits: w.bits}
}

// RestoreWindow rebuilds a window of size from a saved state. bits must
// hold size/64 words.
func RestoreWindow(size int, seqStart uint64, st WindowState) *ReplayWindow {
	return &ReplayWindow{bits: st.Bits, size: uint64(size), seqStart: seqStart, next: st.Next, missing: st.Missing}
}

// Missing is the number of sequence numbers in [seqStart, next) not opened.
func (w *ReplayWindow) Missing() uint64 { return w.missing }

func (w *ReplayWindow) bit(seq uint64) (word int, mask uint64) {
	i := seq % w.size
	return int(i / 64), 1 << (i % 64)
}

// Check classifies seq without changing state: nil (new), ErrReplay or
// ErrTooOld.
func (w *ReplayWindow) Check(seq uint64) error {
	if seq < w.seqStart {
		return ErrTooOld
	}
	if seq >= w.next {
		return nil
	}
	if w.next-seq > w.size {
		return ErrTooOld
	}
	if i, m := w.bit(seq); w.bits[i]&m != 0 {
		return ErrReplay
	}
	return nil
}

// Mark records seq (which Check accepted) and returns the change in the
// number of missing sequence numbers.
func (w *ReplayWindow) Mark(seq uint64) int64 {
	if seq < w.next {
		i, m := w.bit(seq)
		w.bits[i] |= m
		w.missing--
		return -1
	}
	skipped := seq - w.next
	if skipped >= w.size {
		clear(w.bits)
	} else {
		for s := w.next; s < seq; s++ {
			i, m := w.bit(s)
			w.bits[i] &^= m
		}
	}
	i, m := w.bit(seq)
	w.bits[i] |= m
	w.next = seq + 1
	w.missing += skipped
	return int64(skipped)
}
