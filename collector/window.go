package collector

import "github.com/tpmagent/tpmagent/transport/seal"

// window is the state's copy of a session's replay window, with the
// seal.Collector's rules (docs/SEALED-TELEMETRY.md section 8.2): next is
// the highest opened seq + 1, bits the last size sequence numbers below
// it, missing the numbers in [seqStart, next) not opened. The
// seal.Collector's own window starts empty after a restart; this one is
// persisted and is the authority on what was written.
type window struct {
	bits     []uint64
	size     uint64
	seqStart uint64
	next     uint64
	missing  uint64
}

func newWindow(size int, seqStart uint64) *window {
	return &window{bits: make([]uint64, size/64), size: uint64(size), seqStart: seqStart, next: seqStart}
}

func (w *window) bit(seq uint64) (word int, mask uint64) {
	i := seq % w.size
	return int(i / 64), 1 << (i % 64)
}

// check classifies seq without changing state: nil (new), seal.ErrReplay or
// seal.ErrTooOld.
func (w *window) check(seq uint64) error {
	if seq < w.seqStart {
		return seal.ErrTooOld
	}
	if seq >= w.next {
		return nil
	}
	if w.next-seq > w.size {
		return seal.ErrTooOld
	}
	if i, m := w.bit(seq); w.bits[i]&m != 0 {
		return seal.ErrReplay
	}
	return nil
}

// mark records seq (which check accepted) and returns the change in the
// number of missing sequence numbers.
func (w *window) mark(seq uint64) int64 {
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
