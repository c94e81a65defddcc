package seal

// window is the per-session anti-replay state (section 8): a bitmap of the
// last size sequence numbers below next (next = highest opened + 1), as in
// RFC 6479 but without the ring-of-blocks optimisation. missing counts the
// sequence numbers in [seqStart, next) not yet opened.
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

// check classifies seq without changing state: nil (new), ErrReplay or
// ErrTooOld.
func (w *window) check(seq uint64) error {
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
